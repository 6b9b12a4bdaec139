"""Figure 7: the full-size Qwen-Image-Edit-2511 transformer on a GPU, the pack beside plain diffusers.

    python benchmarks/gpu.py --save         # CUDA machine, JSON to benchmarks/results/gpu.json
                                            # (sized for 8 min on one H100; not yet run on one)
    python benchmarks/gpu.py --tiny         # any machine: the same code path on the tiny config (CPU: 2 configs)

What it does (no download):
1. Builds QwenImageTransformer2DModel from the real 2511 config (60 layers, 20.4B parameters) with
   random bf16 weights created directly on the GPU, the real-config VAE, and a Qwen2.5-VL text
   encoder of the real width (3584) but 2 of its 28 layers and a tiny vision tower; saves them as a
   diffusers folder (~42 GB, safetensors) so both sides load it the way users do.
2. For each configuration - bf16 on the GPU, NF4 (bitsandbytes, transformer + text encoder), model
   offload, group offload - loads it twice: through the pack's loader node and with plain diffusers
   (``from_pretrained`` + the same quantization / offload call), and edits one 1024x1024 image at
   true_cfg_scale 4 through the pack's sampler node and through a direct pipeline call.
3. Times each denoising step (a hook on ``scheduler.step`` that synchronises the GPU). To fit the
   time budget it runs 6 steps (2 warm-up + 4 timed), then extrapolates seconds per image to 40
   steps: the whole call's time plus (40 - 6) x the median timed step.

Progress is printed as it goes. A time budget (``--budget``, default 450 s) skips the remaining
runs, saying so, rather than overrun. ``--dir`` keeps / reuses the model folder between runs, so a
second call with ``--configs`` can finish what a first one skipped. ``--layers N`` cuts the
transformer to try the script on a smaller GPU (its figures are then not the real model's).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402 - the repo root must be on sys.path first
    LOCAL_RESULTS_DIR,
    dir_bytes,
    json_path,
    load_pack,
    log,
    machine_info,
    machine_line,
    median,
    pack_module,
    quiet,
    setup,
    table,
    write_json,
)

GB = 1e9
GiB = 2**30
MODEL_STEPS = 40  # the model card's num_inference_steps
PROMPT = "Replace the background with a sunny beach, keep the person unchanged."

#: name -> (quantization, offload) as the loader node spells them.
CONFIGS = {
    "bf16": ("none", "none"),
    "nf4": ("nf4", "none"),
    "model-offload": ("none", "model"),
    "group-offload": ("none", "group"),
}
NEEDS_CUDA = {"nf4": "bitsandbytes quantizes the transformer only on CUDA",
              "model-offload": "model offload moves weights between CPU and a GPU"}
# Rough cost of a run relative to bf16 on the GPU, to decide whether it still fits the budget.
COST = {"bf16": 1.0, "nf4": 1.4, "model-offload": 1.3, "group-offload": 2.2}


class StepClock:
    """Timestamps at every ``scheduler.step`` (the GPU synchronised first), printed as they come."""

    def __init__(self, scheduler: Any, cuda: bool, label: str, total: int) -> None:
        import torch

        self.times: list[float] = []
        self._scheduler = scheduler
        self._original = scheduler.step
        self._label, self._total = label, total

        def step(*args: Any, **kwargs: Any) -> Any:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.times:
                log(f"    {label}: step {len(self.times) + 1}/{total} {now - self.times[-1]:.2f} s")
            else:
                log(f"    {label}: step 1/{total} done")
            self.times.append(now)
            return self._original(*args, **kwargs)

        scheduler.step = step

    def restore(self) -> None:
        self._scheduler.__dict__.pop("step", None)

    def timed(self, warmup: int) -> list[float]:
        """Durations of the steps after the first ``warmup`` (each step = end minus previous end)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]  # gaps[k] = step k + 2
        return gaps[max(0, warmup - 1):]


def _host_empty_cache() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned host memory kept by group offload
            torch._C._host_emptyCache()


def plain_load(folder: Path, quantization: str, offload: str, device: str) -> Any:
    """Plain diffusers, as its docs show, with the same precision, quantization and offload settings."""
    import diffusers
    import torch
    from diffusers import PipelineQuantizationConfig, QwenImageEditPlusPipeline
    from packaging.version import Version

    dtype_key = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_key: torch.bfloat16, "local_files_only": True, "use_safetensors": True}
    if quantization == "nf4":
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit",
            quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
            components_to_quantize=["transformer", "text_encoder"],
        )
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(folder), **kwargs)
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=device.startswith("cuda"), exclude_modules=["vae"])
    pipe.set_progress_bar_config(disable=True)  # as the pack does; tqdm costs microseconds per step
    return pipe


def run_one(name: str, side: str, folder: Path, device: str, args: argparse.Namespace, pil: Any,
            image: Any) -> tuple[dict[str, Any], Any]:
    """Load one configuration on one side, edit once, free everything. Returns figures and the image."""
    import torch

    from benchmarks.synthetic import module_bytes

    cuda = device.startswith("cuda")
    quantization, offload = CONFIGS[name]
    label = f"{name}/{side}"
    L = pack_module("loaders.pipeline")
    nodes = load_pack().NODE_CLASS_MAPPINGS
    if cuda:
        _host_empty_cache()
        torch.cuda.reset_peak_memory_stats()
    size, steps = args.size, args.steps
    out: dict[str, Any] = {"config": name, "side": side}
    clock = None
    pipe = handle = None
    try:
        log(f"  {label}: loading")
        start = time.perf_counter()
        if side == "pack":
            handle = nodes["QwenImageEditLoader"]().load(str(folder), "bfloat16", "same", quantization,
                                                         "transformer+text_encoder", device, offload)[0]
            pipe = L.current_pipeline().pipe
        else:
            pipe = plain_load(folder, quantization, offload, device)
        if cuda:
            torch.cuda.synchronize()
        out["load_s"] = round(time.perf_counter() - start, 2)
        out["transformer_gb"] = round(module_bytes(pipe.transformer) / GB, 3)
        out["text_encoder_gb"] = round(module_bytes(pipe.text_encoder) / GB, 3)
        if cuda:
            out["gpu_after_load_gb"] = round(torch.cuda.memory_allocated() / GB, 2)
            out["gpu_peak_load_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
            torch.cuda.reset_peak_memory_stats()
        log(f"  {label}: loaded in {out['load_s']:.1f} s; editing {size}x{size}, {steps} steps")

        clock = StepClock(pipe.scheduler, cuda, label, steps)
        start = time.perf_counter()
        if side == "pack":
            result = nodes["QwenImageEditSampler"]().edit(handle, image, PROMPT, " ", 0, steps, 4.0, "custom",
                                                          size, size, 1)[0]
        else:
            result = pipe(image=[pil], prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=size,
                          width=size, num_inference_steps=steps, num_images_per_prompt=1,
                          generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images
            result = result.float().permute(0, 2, 3, 1).cpu()
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        timed = clock.timed(args.warmup)
        per_step = median(timed) if timed else total / steps
        out.update(
            call_s=round(total, 2), steps=steps, timed_steps=[round(t, 3) for t in timed],
            s_per_step=round(per_step, 3),
            s_per_image=round(total + (MODEL_STEPS - steps) * per_step, 1),
        )
        if cuda:
            out["gpu_peak_run_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
            out["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
        log(f"  {label}: {out['s_per_step']:.2f} s/step, ~{out['s_per_image']:.0f} s/image at {MODEL_STEPS} steps"
            + (f", peak {out['gpu_peak_run_gb']:.1f} GB" if cuda else ""))
        return out, result
    finally:
        if clock is not None:
            clock.restore()
        if side == "pack":
            L.release_pipeline()
        elif pipe is not None:
            try:
                pipe.remove_all_hooks()
            except Exception:  # noqa: BLE001
                pass
        del pipe
        _host_empty_cache()


def build_folder(args: argparse.Namespace, folder: Path, device: str) -> dict[str, Any]:
    from benchmarks import synthetic

    full = {**synthetic.FULL_TRANSFORMER, "num_layers": args.layers}
    want_layers = 2 if args.tiny else args.layers
    index = folder / "model_index.json"
    if index.is_file():
        config = json.loads((folder / "transformer" / "config.json").read_text())
        if config.get("num_layers") == want_layers and config.get("zero_cond_t"):
            log(f"reusing the model folder {folder}")
            return {"reused": True, "disk_gb": round(dir_bytes(folder) / GB, 2)}
        raise SystemExit(f"{folder} holds another model; give an empty or new --dir")
    what = "tiny" if args.tiny else f"full-size 2511 ({args.layers} of 60 transformer layers)"
    log(f"building the {what} model with random bf16 weights on {device} "
        f"and saving it to {folder}")
    start = time.perf_counter()
    if args.tiny:
        synthetic.save_pipeline(folder, device=device)
    else:
        synthetic.save_pipeline(folder, full, text_encoder=synthetic.WIDE_TEXT_ENCODER,
                                vae="full", device=device, max_shard_size="5GB")
    _host_empty_cache()
    seconds = time.perf_counter() - start
    disk = dir_bytes(folder)
    log(f"built and saved {disk / GB:.1f} GB in {seconds:.0f} s")
    return {"reused": False, "build_save_s": round(seconds, 1), "disk_gb": round(disk / GB, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config and size: checks the code path (CPU works)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"JSON output (default {LOCAL_RESULTS_DIR}/gpu.json or gpu-tiny.json, outside the working tree)")
    parser.add_argument("--save", action="store_true",
                        help="write the JSON to benchmarks/results/gpu.json (--tiny: gpu-tiny.json), which the README quotes")
    parser.add_argument("--dir", help="model folder to build into and keep, or reuse if already built")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps run per edit (default 6; --tiny 4)")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps not timed (default 2)")
    parser.add_argument("--size", type=int, default=None, help="output and input size (default 1024; --tiny 64)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds: runs that would not fit in what is left are skipped (default 450)")
    parser.add_argument("--layers", type=int, default=60,
                        help="transformer layers (default 60, the real model); fewer only to try the script on a "
                        "smaller GPU - the figures are then not the real model's")
    parser.add_argument("--cpu-test", action="store_true", help=argparse.SUPPRESS)  # full-size code path on CPU
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 6)
    args.size = args.size or (64 if args.tiny else 1024)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (one step gives NaN with this scheduler)")
    setup()
    started = time.perf_counter()
    import torch

    quiet()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny and not args.cpu_test:
        print("benchmarks/gpu.py needs a CUDA GPU for its real figures; run it with --tiny to check the code path "
              "on this machine.", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)  # steadier on a shared CPU (see run.py, figure 2); both sides alike
    machine = machine_info(gpu=True)
    log(f"machine: {machine_line(machine)}")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs: {', '.join(sorted(unknown))}")

    from tinykit.tiny_pipeline import make_test_image

    I = pack_module("utils.image")  # noqa: E741
    pil = make_test_image(args.size, args.size, seed=3)
    image = I.pil_to_tensor(pil)
    temp_root = None if args.dir else Path(tempfile.mkdtemp(prefix="qwen-edit-gpu-bench-"))
    folder = Path(args.dir) if args.dir else temp_root / "model"
    runs: list[dict[str, Any]] = []
    outputs: dict[tuple[str, str], Any] = {}
    deadline = started + args.budget
    try:
        build = build_folder(args, folder, device)
        for name in names:
            for side in ("pack", "diffusers"):
                label = f"{name}/{side}"
                if not cuda and name in NEEDS_CUDA:
                    log(f"  {label}: skipped: needs CUDA ({NEEDS_CUDA[name]})")
                    runs.append({"config": name, "side": side, "skipped": "needs CUDA"})
                    continue
                estimate = _estimate(runs, name)
                left = deadline - time.perf_counter()
                if estimate is not None and estimate > left:
                    log(f"  {label}: skipped: ~{estimate:.0f} s needed, {left:.0f} s of the budget left")
                    runs.append({"config": name, "side": side, "skipped": f"time budget ({left:.0f} s left, "
                                 f"~{estimate:.0f} s needed)"})
                    continue
                start = time.perf_counter()
                try:
                    result, pixels = run_one(name, side, folder, device, args, pil, image)
                    outputs[(name, side)] = pixels
                except Exception as exc:  # noqa: BLE001 - report and go on with the next configuration
                    log(f"  {label}: failed: {type(exc).__name__}: {exc}")
                    result = {"config": name, "side": side, "error": f"{type(exc).__name__}: {exc}"[:500]}
                result["wall_s"] = round(time.perf_counter() - start, 1)
                runs.append(result)
    finally:
        if temp_root:
            shutil.rmtree(temp_root, ignore_errors=True)

    summary = _summarise(runs, outputs)
    total = time.perf_counter() - started
    payload = {
        "kind": "gpu-tiny" if args.tiny else "gpu", "machine": machine,
        "command": "python benchmarks/gpu.py" + (" --tiny" if args.tiny else ""),
        "settings": {"size": args.size, "steps_run": args.steps, "warmup_steps": args.warmup,
                     "extrapolated_to": MODEL_STEPS, "true_cfg_scale": 4.0, "reference_images": 1,
                     "device": device, "budget_s": args.budget},
        "model": {**build, "transformer": "tiny" if args.tiny else f"2511 config, {args.layers} of 60 layers, random bf16 weights",
                  "text_encoder": "tiny" if args.tiny else "Qwen2.5-VL width 3584, 2 of 28 layers, tiny vision tower",
                  "vae": "tiny" if args.tiny else "real config"},
        "seconds": round(total, 1),
        "figure": {"id": "7", "name": "GPU: pack vs plain diffusers", "unit": "s, GB",
                   "target": "finishes within 480 s on one H100, progress printed",
                   "met": (total <= 480) if (cuda and not args.tiny) else None,
                   "notes": _notes(args, total, cuda)},
        "runs": runs, "summary": summary,
    }
    print(f"Machine: {machine_line(machine)}")
    print(_table(summary))
    print(payload["figure"]["notes"])
    destination = json_path("gpu-tiny.json" if args.tiny else "gpu.json", args.json, args.save)
    write_json(destination, payload)
    print(f"JSON: {destination}")
    return 0


def _estimate(runs: list[dict[str, Any]], name: str) -> float | None:
    """Seconds a run of `name` will take, from the runs done so far (None: no basis yet, just run it)."""
    done = [r for r in runs if "wall_s" in r and "error" not in r]
    same = [r["wall_s"] for r in done if r["config"] == name]
    if same:
        return max(same)
    if not done:
        return None
    base = done[0]
    return base["wall_s"] * COST[name] / COST[base["config"]]


def _summarise(runs: list[dict[str, Any]], outputs: dict[tuple[str, str], Any]) -> list[dict[str, Any]]:
    import torch

    rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        pack = next((r for r in runs if r["config"] == name and r["side"] == "pack"), {})
        plain = next((r for r in runs if r["config"] == name and r["side"] == "diffusers"), {})
        row: dict[str, Any] = {"config": name, "pack": pack, "diffusers": plain}
        if "s_per_image" in pack and "s_per_image" in plain:
            row["time_ratio"] = round(pack["s_per_image"] / plain["s_per_image"], 3)
            row["step_ratio"] = round(pack["s_per_step"] / plain["s_per_step"], 3)
        if "gpu_peak_run_gb" in pack and "gpu_peak_run_gb" in plain:
            row["memory_ratio"] = round(pack["gpu_peak_run_gb"] / max(plain["gpu_peak_run_gb"], 1e-9), 3)
        a, b = outputs.get((name, "pack")), outputs.get((name, "diffusers"))
        if a is not None and b is not None and a.shape == b.shape:
            row["max_abs_pixel_diff"] = round(float((a - b).abs().max()), 5)
            row["identical_pixels"] = bool(torch.equal(a, b))
        rows.append(row)
    bf16 = next((r for r in rows if r["config"] == "bf16"), None)
    nf4 = next((r for r in rows if r["config"] == "nf4"), None)
    for side in ("pack", "diffusers"):
        if bf16 and nf4 and bf16[side].get("transformer_gb") and nf4[side].get("transformer_gb"):
            nf4[f"{side}_transformer_nf4_ratio"] = round(nf4[side]["transformer_gb"] / bf16[side]["transformer_gb"], 3)
    return rows


def _cell(run: dict[str, Any], key: str, fmt: str) -> str:
    if "skipped" in run:
        return "skipped"
    if "error" in run:
        return "error"
    value = run.get(key)
    return "-" if value is None else format(value, fmt)


def _table(summary: list[dict[str, Any]]) -> str:
    rows = []
    for row in summary:
        for side in ("pack", "diffusers"):
            run = row[side]
            why = run.get("skipped") or (run.get("error", "")[:60])
            rows.append([row["config"], side, _cell(run, "load_s", ".1f"), _cell(run, "s_per_step", ".2f"),
                         _cell(run, "s_per_image", ".1f"), _cell(run, "gpu_peak_run_gb", ".1f"),
                         _cell(run, "transformer_gb", ".2f"),
                         f"{row['time_ratio']:.3f}" if side == "pack" and "time_ratio" in row else "", why])
    return table(rows, ["config", "side", "load s", "s/step", "s/image@40", "peak GPU GB", "transformer GB",
                        "pack/diffusers", "note"])


def _notes(args: argparse.Namespace, total: float, cuda: bool) -> str:
    if args.tiny:
        return (f"--tiny: the tiny config at {args.size}x{args.size} on {'CUDA' if cuda else 'CPU'}, a check of the code "
                f"path, not performance figures; finished in {total:.0f} s.")
    model = "Full-size 2511 transformer" if args.layers == 60 else f"2511 transformer cut to {args.layers} of 60 layers"
    return (f"{model} (random bf16 weights), {args.size}x{args.size}, one reference image, true_cfg_scale 4. "
            f"{args.steps} steps run ({args.warmup} warm-up), s/image extrapolated to {MODEL_STEPS} steps as call time + "
            f"({MODEL_STEPS} - {args.steps}) x median timed step. The text encoder is Qwen2.5-VL at its real width but 2 "
            f"of 28 layers: the real 7B one adds ~16.6 GB (bf16) or ~6 GB (NF4) to peak memory without offload, and "
            f"its encode time, to these figures. Peak GPU memory = torch max_memory_allocated during the edit. "
            f"Finished in {total:.0f} s (target 480 s).")


if __name__ == "__main__":
    sys.exit(main())
