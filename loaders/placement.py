"""Choosing quantization and offload for `auto` from free memory and the components' sizes.

Pure arithmetic on byte counts: it is unit-tested with the real model's sizes for common GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3

# Bytes per parameter kept once quantized, relative to bf16, per component. NF4 stores 4 bits plus a
# fp32 absmax per 64 weights (~0.28x); layers bitsandbytes leaves alone (embeddings, norms, the text
# encoder's 0.5B-param embedding and lm_head) push the whole-model ratio up.
QUANTIZED_FRACTION = {
    "nf4": {"transformer": 0.30, "text_encoder": 0.40, "vae": 1.0},
    "8bit": {"transformer": 0.53, "text_encoder": 0.60, "vae": 1.0},
}
# Activations at ~1 MP with true CFG (two transformer passes, one at a time) plus the VAE decode.
ACTIVATION_HEADROOM = int(2.5 * GiB)
# Memory left unplanned so that allocator fragmentation and other apps do not tip a fit into OOM.
SAFETY = 0.95
# Group offload keeps one transformer block (~0.7 GB bf16) plus the next in flight on the device.
GROUP_RESIDENT = int(1.5 * GiB)

# Qwen-Image-Edit-2511's components in bf16, from the published checkpoint (the model card's sizes).
REAL_2511_BF16_BYTES: dict[str, int] = {"transformer": int(40.9e9), "text_encoder": int(16.6e9), "vae": int(0.25e9)}

QUANTIZATIONS = ("none", "nf4", "8bit")
OFFLOADS = ("none", "model", "group", "sequential")


@dataclass(frozen=True)
class Placement:
    quantization: str
    offload: str
    reason: str
    needed_bytes: int


def component_bytes(sizes: dict[str, int], quantization: str, quantized: tuple[str, ...]) -> dict[str, int]:
    """Per-component bytes on the device after quantizing the `quantized` components."""
    if quantization == "none":
        return dict(sizes)
    fractions = QUANTIZED_FRACTION[quantization]
    return {n: int(b * fractions.get(n, 1.0)) if n in quantized else b for n, b in sizes.items()}


def device_bytes_needed(sizes: dict[str, int], offload: str) -> int:
    """Peak device memory for one edit with the given offload mode."""
    if offload == "none":
        return sum(sizes.values()) + ACTIVATION_HEADROOM
    if offload == "model":
        return max(sizes.values()) + ACTIVATION_HEADROOM
    if offload == "group":
        return GROUP_RESIDENT + sizes.get("vae", 0) + ACTIVATION_HEADROOM
    return ACTIVATION_HEADROOM + sizes.get("vae", 0)


def _gb(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def plan_placement(
    sizes: dict[str, int],
    free_bytes: int | None,
    device_type: str,
    quantization: str = "auto",
    offload: str = "auto",
    quantized: tuple[str, ...] = ("transformer", "text_encoder"),
    can_quantize: bool = True,
) -> Placement:
    """Resolve `auto` quantization/offload: the fastest, highest-quality setup that fits.

    `sizes` are bytes per component at the requested precision. Preference order: everything on the
    device; bf16 with model offload; quantized on the device; quantized with model, group, then
    sequential offload. Fixed (non-auto) choices are kept and only the other setting is searched.
    """
    if device_type not in ("cuda", "xpu"):
        q = "none" if quantization == "auto" else quantization
        o = "none" if offload == "auto" else offload
        what = "bf16/fp16 weights" if q == "none" else f"{q} {'+'.join(quantized)}"
        return Placement(q, o, f"{what}, all in {device_type} memory (offload only helps with a GPU)", 0)

    q_options = [quantization] if quantization != "auto" else (["none", "nf4"] if can_quantize else ["none"])
    o_options = [offload] if offload != "auto" else list(OFFLOADS)
    candidates = [(q, o) for q in q_options for o in o_options]
    if quantization == "auto" and offload == "auto":
        candidates = [("none", "none"), ("none", "model")] + [("nf4", o) for o in OFFLOADS]
        if not can_quantize:
            candidates = [("none", o) for o in OFFLOADS]

    budget = None if free_bytes is None else int(free_bytes * SAFETY)
    if budget is None:
        q, o = candidates[0]
        need = device_bytes_needed(component_bytes(sizes, q, quantized), o)
        return Placement(q, o, "free memory unknown: keeping everything on the device", need)

    for q, o in candidates:
        need = device_bytes_needed(component_bytes(sizes, q, quantized), o)
        if need <= budget:
            what = "bf16/fp16 weights" if q == "none" else f"{q} {'+'.join(quantized)}"
            where = "all on the GPU" if o == "none" else f"{o} offload"
            return Placement(q, o, f"{what}, {where}: needs ~{_gb(need)} of {_gb(free_bytes)} free", need)

    q, o = candidates[-1]
    need = device_bytes_needed(component_bytes(sizes, q, quantized), o)
    return Placement(
        q, o,
        f"nothing fits in {_gb(free_bytes)} free; using the most frugal setup ({q}, {o} offload, "
        f"~{_gb(need)}). Close other GPU programs or edit at a smaller size if it runs out of memory",
        need,
    )
