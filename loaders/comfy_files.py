"""ComfyUI's single model files: what a file is, read from its header, and its tensors in diffusers' names.

ComfyUI users hold Qwen-Image-Edit as three files: a diffusion model (`diffusion_models/` or `unet/`,
safetensors in bf16 / fp8 / scaled fp8, or GGUF), a Qwen2.5-VL text encoder (`text_encoders/`) and
the Wan 2.1-layout VAE (`vae/`). `inspect_file` reads only the header (safetensors JSON or GGUF
tensor table), so a wrong or broken file is refused in milliseconds with a message naming the file
and what it appears to be. `read_tensors` then gives the weights under the names the diffusers /
transformers classes use, with ComfyUI's fp8 scales resolved.

The formats, as ComfyUI 0.8 reads them (`comfy/model_detection.py`, `comfy/utils.py`, `comfy/quant_ops.py`):
* Qwen-Image transformer: `txt_norm.weight`; diffusers uses the same key names. `__index_timestep_zero__`
  marks Edit-2511 (diffusers' `zero_cond_t`); `time_text_embed.addition_t_embedding.weight` marks
  Qwen-Image-Layered. A prefix such as `model.diffusion_model.` may stand before every key.
* Legacy scaled fp8: a `scaled_fp8` marker key, `<layer>.scale_weight` (scalar float32);
  weight = fp8 * scale_weight. Per-layer `comfy_quant`: `<layer>.comfy_quant` is the UTF-8 JSON
  `{"format": "float8_e4m3fn"}` as a uint8 tensor, with `<layer>.weight_scale`; weight = fp8 * weight_scale.
* Text encoder: the original Qwen2.5-VL layout (`model.layers.N`, `model.embed_tokens`, `visual.*`), no lm_head.
* VAE: ComfyUI's WanVAE module names (`encoder.downsamples.K.residual.N`, `decoder.upsamples.K`, ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .weights import PICKLE_SUFFIXES, ModelFolderError, read_safetensors_header, tensor_bytes

ROLES = ("transformer", "text_encoder", "vae")
SUFFIXES = {"transformer": (".safetensors", ".gguf"), "text_encoder": (".safetensors",), "vae": (".safetensors",)}
MARKER_2511 = "__index_timestep_zero__"
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"
WAN22_VAE_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"
_FP8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_FULL_PRECISION = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "net.", "model.")
_TEXT_ENCODER_PREFIXES = ("text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.", "transformer.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")
_SCALE_KEYS = (".scale_weight", ".weight_scale")
_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")

# What other files look like, so a wrong choice is named in the refusal.
_LOOKS_LIKE: tuple[tuple[str, str], ...] = (
    (LAYERED_KEY, "a Qwen-Image-Layered diffusion model"),
    ("txt_in.text_norm.weight", "a Qwen-Image-2.1 diffusion model"),
    ("double_blocks.0.img_attn.qkv.weight", "a Flux diffusion model"),
    ("joint_blocks.0.context_block.attn.qkv.weight", "an SD3 diffusion model"),
    ("input_blocks.0.0.weight", "a Stable Diffusion / SDXL UNet"),
    ("blocks.0.self_attn.q.weight", "a Wan video diffusion model"),
    ("txt_norm.weight", "a Qwen-Image diffusion model"),
    ("model.layers.0.self_attn.k_proj.bias", "a Qwen2.5 language model (text encoder)"),
    ("model.layers.0.self_attn.k_proj.weight", "a language-model text encoder"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder"),
    (WAN22_VAE_KEY, "a Wan 2.2 VAE"),
    ("decoder.middle.0.residual.0.gamma", "a Wan 2.1 / Qwen-Image VAE"),
    ("decoder.up_blocks.0.resnets.0.norm1.gamma", "a diffusers-format Wan / Qwen-Image VAE"),
    ("decoder.up.0.block.0.conv1.weight", "a Stable Diffusion / Flux VAE"),
)
# The key each role must have (after its prefix), and the refusal when it is missing.
_REQUIRED = {
    "transformer": ("txt_norm.weight", "a Qwen-Image-Edit diffusion model (diffusion_models/ or unet/)"),
    "text_encoder": ("visual.merger.ln_q.weight", ("the Qwen2.5-VL-7B text encoder with its vision tower "
                                                   "(text_encoders/qwen_2.5_vl_7b*.safetensors)")),
    "vae": ("decoder.middle.0.residual.0.gamma", "the Qwen-Image VAE (vae/qwen_image_vae.safetensors)"),
}


@dataclass(frozen=True)
class ComfyFile:
    """One ComfyUI model file, as its header describes it."""

    path: Path
    role: str
    storage: str  # bf16 | fp16 | fp32 | fp8 | scaled fp8 | GGUF <type>
    params: int
    stored_bytes: int
    prefix: str = ""
    zero_cond_t: bool = False
    num_layers: int = 0
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def quantized(self) -> bool:
        """Stored below 16 bits: kept so in memory, and never quantized again with bitsandbytes."""
        return self.storage not in _FULL_PRECISION.values()

    @property
    def variant(self) -> str:
        return "Edit-2511" if self.zero_cond_t else "Edit-2509"


def _header_entries(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, Any]]:
    """{key: (dtype, shape)} and the metadata of a safetensors or GGUF file."""
    if path.suffix.lower() == ".gguf":
        return _gguf_entries(path), {}
    header = read_safetensors_header(path)
    return header.tensors, header.metadata


def _gguf_entries(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelFolderError(
            f"{path.name} is a GGUF file and the `gguf` package is not installed. Run `pip install gguf` in "
            "ComfyUI's Python (it is in this pack's requirements.txt)."
        ) from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken file
        raise ModelFolderError(f"{path} is not a readable GGUF file ({exc}). Download it again.") from None
    # GGUF lists dimensions innermost first; torch's order is the reverse.
    return {t.name: (f"GGUF {t.tensor_type.name}", tuple(int(d) for d in reversed(t.shape.tolist())))
            for t in reader.tensors}


def _strip_prefix(keys: list[str], anchor: str, prefixes: tuple[str, ...]) -> str:
    for prefix in ("",) + prefixes:
        if prefix + anchor in keys:
            return prefix
    for key in keys:  # any other prefix in front of the anchor key
        if key.endswith("." + anchor):
            return key[: -len(anchor)]
    return ""


def looks_like(keys: list[str]) -> str:
    """What a file appears to be, judged by its key names (for refusals)."""
    for key, what in _LOOKS_LIKE:
        if any(k == key or k.endswith("." + key) for k in keys):
            return what
    return "not a model this pack knows"


def _storage(entries: dict[str, tuple[str, tuple[int, ...]]], keys: list[str]) -> str:
    dtypes = [d for k, (d, s) in entries.items() if k.endswith(".weight") and len(s) >= 2]
    gguf = sorted({d for d in dtypes if d.startswith("GGUF ") and d not in ("GGUF F32", "GGUF F16", "GGUF BF16")})
    if gguf:
        return gguf[0] if len(gguf) == 1 else "GGUF " + "/".join(d[5:] for d in gguf)
    if any(d in _FP8 for d in dtypes):
        scaled = any(k.endswith(_SCALE_KEYS) for k in keys)
        return "scaled fp8" if scaled else "fp8"
    counts: dict[str, int] = {}
    for d in dtypes:
        counts[d.removeprefix("GGUF ")] = counts.get(d.removeprefix("GGUF "), 0) + 1
    common = max(counts, key=counts.get) if counts else "BF16"
    return _FULL_PRECISION.get(common, common.lower())


def inspect_file(path: Path | str, role: str) -> ComfyFile:
    """Read a ComfyUI model file's header and check that it is the `role` this pack needs."""
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"Model file not found: {path}.")
    if path.suffix.lower() not in SUFFIXES[role]:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelFolderError(
                f"{path.name} is a pickle file, which can run code when loaded; this pack loads only "
                f"{' and '.join(SUFFIXES[role])} files. Use the safetensors release of the model."
            )
        raise ModelFolderError(f"{path.name}: the {role.replace('_', ' ')} must be a {' or '.join(SUFFIXES[role])} file.")
    entries, metadata = _header_entries(path)
    keys = list(entries)
    anchor, wanted = _REQUIRED[role]
    prefix = _strip_prefix(keys, anchor, {"transformer": _TRANSFORMER_PREFIXES, "text_encoder": _TEXT_ENCODER_PREFIXES,
                                          "vae": _VAE_PREFIXES}[role])
    stripped = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    if anchor not in stripped or LAYERED_KEY in stripped or WAN22_VAE_KEY in stripped:
        raise ModelFolderError(
            f"{path.name} appears to be {looks_like(keys)}, not {wanted}. Choose the matching file."
        )
    if "_quantization_metadata" in metadata or any(k.endswith(".comfy_quant") for k in keys):
        _check_comfy_quant_formats(path, entries, metadata)
    params = sum(_numel(s) for k, (d, s) in entries.items() if not k.endswith(_IGNORED_SUFFIXES + _SCALE_KEYS))
    stored = sum(_stored_bytes(path, k, d, s) for k, (d, s) in entries.items())
    layers = len({m.group(1) for k in stripped if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    return ComfyFile(
        path=path, role=role, storage=_storage(entries, keys), params=params, stored_bytes=stored, prefix=prefix,
        zero_cond_t=role == "transformer" and MARKER_2511 in stripped, num_layers=layers,
        shapes=tuple((k[len(prefix):], s) for k, (d, s) in entries.items() if k.startswith(prefix)),
    )


def _check_comfy_quant_formats(path: Path, entries: dict, metadata: dict) -> None:
    """Only fp8 (e4m3fn / e5m2) with one scale per tensor is understood; NVFP4, MXFP8, int8 ... are refused."""
    formats: set[str] = set()
    raw = metadata.get("_quantization_metadata")
    try:
        if raw:
            formats |= {str(layer.get("format")) for layer in json.loads(raw).get("layers", {}).values()}
        quant_keys = [k for k in entries if k.endswith(".comfy_quant")]
        if quant_keys:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # a few bytes of JSON per layer
                formats |= {str(json.loads(bytes(f.get_tensor(k).tolist())).get("format")) for k in quant_keys}
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError, ValueError):
        raise ModelFolderError(f"{path} has corrupt quantization metadata. Download it again.") from None
    block_scaled = any(k.endswith(_SCALE_KEYS) and _numel(s) != 1 for k, (_, s) in entries.items())
    unknown = formats - {"float8_e4m3fn", "float8_e5m2"}
    if unknown or block_scaled:
        kinds = ", ".join(sorted(unknown)) or "block-scaled fp8"
        raise ModelFolderError(
            f"{path.name} is quantized as {kinds}, which only ComfyUI's own loader runs. This pack loads "
            "bf16, fp8 (plain or scaled) and GGUF files: use qwen_image_edit_2511_bf16, an fp8 file or a GGUF."
        )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _stored_bytes(path: Path, key: str, dtype: str, shape: tuple[int, ...]) -> int:
    if dtype.startswith("GGUF "):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype[5:]]]
        return _numel(shape) // block * size
    return tensor_bytes(path, key, dtype, shape)


def check_shapes(file: ComfyFile, expected: dict[str, tuple[int, ...]], what: str, optional: tuple[str, ...] = ()) -> None:
    """Refuse a file whose tensors do not fit the model built from the config (named, with the first mismatch)."""
    got = {k: s for k, s in file.shapes if not k.endswith(_IGNORED_SUFFIXES + _SCALE_KEYS)
           and k not in (MARKER_2511, "scaled_fp8")}
    if file.role == "vae":
        got = {wan_to_diffusers_vae_key(k, _vae_res_blocks(expected)): s for k, s in got.items()}
    missing = sorted(k for k in expected if k not in got and not k.startswith(optional))
    extra = sorted(k for k in got if k not in expected)
    wrong = sorted(k for k in expected if k in got and tuple(got[k]) != tuple(expected[k]))
    if not (missing or extra or wrong):
        return
    if wrong:
        k = wrong[0]
        detail = f"{k} is {list(got[k])}, {what} needs {list(expected[k])}"
    elif missing:
        detail = f"{len(missing)} weight(s) of {what} are missing, e.g. {missing[0]}"
    else:
        detail = f"it has {len(extra)} weight(s) {what} does not, e.g. {extra[0]}"
    raise ModelFolderError(
        f"{file.path.name} does not fit {what}: {detail}. It is probably another model's file "
        f"({looks_like([k for k, _ in file.shapes])}); choose the matching {file.role.replace('_', ' ')} file."
    )


def read_tensors(file: ComfyFile, keep_fp8: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file's weights in diffusers / transformers names, and the per-layer fp8 scales.

    fp8 weights stay fp8 when `keep_fp8`, with their scale returned per layer (`{layer: scale}`);
    otherwise they are dequantized (fp8 x scale, in float32, then cast by the caller).
    """
    import torch
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    scales: dict[str, Any] = {}
    with safe_open(str(file.path), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(file.prefix):
                continue
            name = key[len(file.prefix):]
            if name in (MARKER_2511, "scaled_fp8") or name.endswith(_IGNORED_SUFFIXES):
                continue
            tensor = f.get_tensor(key)
            for suffix in _SCALE_KEYS:
                if name.endswith(suffix):
                    scales[name[: -len(suffix)]] = tensor.to(torch.float32).reshape(())
                    break
            else:
                tensors[name] = tensor
    for layer in scales:
        if f"{layer}.weight" not in tensors:
            raise ModelFolderError(f"{file.path.name} has a scale for {layer} but no weight. Download it again.")
    if not keep_fp8:
        for name, tensor in tensors.items():
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                layer = name.removesuffix(".weight")
                tensors[name] = tensor.to(torch.float32) * scales.get(layer, 1.0)
        scales = {}
    if file.role == "vae":
        blocks = _vae_res_blocks({k: None for k in tensors if k.startswith("decoder.upsamples.")}, from_wan=True)
        tensors = {wan_to_diffusers_vae_key(k, blocks): v for k, v in tensors.items()}
    return tensors, scales


# -- the VAE's two namings -------------------------------------------------------------------------

_RESIDUAL = (("residual.0.gamma", "norm1.gamma"), ("residual.2.", "conv1."), ("residual.3.gamma", "norm2.gamma"),
             ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_VAE_FIXED = (("encoder.conv1.", "encoder.conv_in."), ("decoder.conv1.", "decoder.conv_in."),
              ("encoder.head.0.", "encoder.norm_out."), ("encoder.head.2.", "encoder.conv_out."),
              ("decoder.head.0.", "decoder.norm_out."), ("decoder.head.2.", "decoder.conv_out."),
              ("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))
_MIDDLE = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}


def _vae_res_blocks(keys: dict, from_wan: bool = False) -> int:
    """Residual blocks per level (the VAE's num_res_blocks) from the decoder's key names."""
    if from_wan:
        # Wan's decoder stage is num_res_blocks + 1 residual blocks, then one resample.
        indices = {int(k.split(".")[2]) for k in keys if ".resample." in k or ".time_conv." in k}
        return (min(indices) - 1) if indices else 2
    resnets = {int(k.split(".")[4]) for k in keys if k.startswith("decoder.up_blocks.0.resnets.")}
    return max(resnets) if resnets else 2


def _rename_residual(rest: str) -> str:
    for wan, diffusers in _RESIDUAL:
        if rest.startswith(wan):
            return diffusers + rest[len(wan):]
    return rest


def wan_to_diffusers_vae_key(key: str, num_res_blocks: int) -> str:
    """ComfyUI's WanVAE key -> diffusers' AutoencoderKLQwenImage key, for any num_res_blocks / dim_mult."""
    for wan, diffusers in _VAE_FIXED:
        if key.startswith(wan):
            return diffusers + key[len(wan):]
    parts = key.split(".")
    if parts[1] == "middle" and parts[2] in _MIDDLE:
        rest = ".".join(parts[3:])
        return f"{parts[0]}.{_MIDDLE[parts[2]]}{_rename_residual(rest) if parts[2] != '1' else rest}"
    if parts[:2] == ["encoder", "downsamples"]:
        return f"encoder.down_blocks.{parts[2]}.{_rename_residual('.'.join(parts[3:]))}"
    if parts[:2] == ["decoder", "upsamples"]:
        stage, j = divmod(int(parts[2]), num_res_blocks + 2)
        rest = ".".join(parts[3:])
        if j <= num_res_blocks:
            return f"decoder.up_blocks.{stage}.resnets.{j}.{_rename_residual(rest)}"
        return f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
    return key


def diffusers_to_wan_vae_key(key: str, num_res_blocks: int) -> str:
    """The inverse of `wan_to_diffusers_vae_key` (used to write ComfyUI-format VAE files)."""
    for wan, diffusers in _VAE_FIXED:
        if key.startswith(diffusers):
            return wan + key[len(diffusers):]
    for index, diffusers in _MIDDLE.items():
        for side in ("encoder", "decoder"):
            if key.startswith(f"{side}.{diffusers}"):
                rest = key[len(side) + 1 + len(diffusers):]
                return f"{side}.middle.{index}.{_unrename_residual(rest) if index != '1' else rest}"
    parts = key.split(".")
    if parts[:2] == ["encoder", "down_blocks"]:
        return f"encoder.downsamples.{parts[2]}.{_unrename_residual('.'.join(parts[3:]))}"
    if parts[:2] == ["decoder", "up_blocks"]:
        stage = int(parts[2])
        if parts[3] == "resnets":
            return f"decoder.upsamples.{stage * (num_res_blocks + 2) + int(parts[4])}." + \
                _unrename_residual(".".join(parts[5:]))
        return f"decoder.upsamples.{stage * (num_res_blocks + 2) + num_res_blocks + 1}.{'.'.join(parts[5:])}"
    return key


def _unrename_residual(rest: str) -> str:
    for wan, diffusers in _RESIDUAL:
        if rest.startswith(diffusers):
            return wan + rest[len(diffusers):]
    return rest


# -- the text encoder's two namings ----------------------------------------------------------------

def text_encoder_key(key: str) -> str:
    """Original Qwen2.5-VL layout (ComfyUI's files) -> transformers 5's module names."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def original_text_encoder_key(key: str) -> str:
    """transformers 5's module name -> the original layout ComfyUI's files use (inverse of text_encoder_key)."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key
