"""What this machine can do with Qwen-Image-Edit: the facts behind `python cli.py doctor`.

Every function returns plain, JSON-serialisable data (dicts, lists, str, int, float, bool, None),
so the command line prints it as a table or as JSON and the tests check the values themselves.
Nothing here is imported by the nodes: importing this module is cheap, and torch, diffusers and
bitsandbytes are imported inside the functions that need them.

The checks are done, not guessed: quantization is checked by quantizing a small ``nn.Linear`` with
bitsandbytes and running it; ``zero_cond_t`` support by reading the installed diffusers' signature.
The recommended loader settings come from the loader's own planner (`loaders/placement.py`), so
they are what `auto` would choose here, with the memory each setting needs.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
from pathlib import Path
from typing import Any

from .loaders import placement
from .loaders.pipeline import FILE_FOLDERS
from .loaders.weights import BYTES_PER_PARAM, PICKLE_SUFFIXES
from .utils import comfy

#: Qwen-Image-Edit-2511's component sizes in bfloat16 (bytes); one source, shared with the planner.
REAL_2511_BF16_BYTES = placement.REAL_2511_BF16_BYTES
REAL_SIZES_SOURCE = "Qwen-Image-Edit-2511 in bfloat16 (published sizes; pass --model to read a local folder)"

#: The oldest diffusers that honours 2511's `zero_cond_t` (older ones drop it with only a warning).
MIN_DIFFUSERS = (0, 37)
PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "bitsandbytes", "safetensors",
            "huggingface_hub", "peft")
QUANTIZED = ("transformer", "text_encoder")

log = logging.getLogger("qwen_image_edit")


def _version_tuple(version: str | None) -> tuple[int, ...]:
    if not version:
        return ()
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def package_versions() -> dict[str, str | None]:
    """Installed versions (None when missing), read from package metadata without importing."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def diffusers_check() -> dict[str, Any]:
    """Whether the installed diffusers runs Edit-2511 correctly (honours `zero_cond_t`)."""
    try:
        import inspect

        import diffusers
        from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        return {"ok": False, "version": None, "zero_cond_t": False,
                "detail": f"diffusers with QwenImageEditPlusPipeline cannot be imported ({type(exc).__name__}: "
                          f"{exc}). Run: pip install -U 'diffusers>=0.37'"}
    version = diffusers.__version__
    supported = "zero_cond_t" in inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    new_enough = _version_tuple(version)[:2] >= MIN_DIFFUSERS
    if supported:
        detail = f"diffusers {version} honours zero_cond_t: Edit-2511 runs as intended"
    else:
        detail = (f"diffusers {version} ignores Edit-2511's zero_cond_t and would edit wrongly; the loader refuses "
                  "2511 with it. Run: pip install -U 'diffusers>=0.37'")
    return {"ok": supported, "version": version, "zero_cond_t": supported, "new_enough": new_enough,
            "detail": detail}


def torchvision_check() -> dict[str, Any]:
    """torchvision must import: transformers 5's Qwen2VLProcessor needs it."""
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - e.g. an ABI mismatch with torch raises RuntimeError
        return {"ok": False, "version": None,
                "detail": f"torchvision does not import ({type(exc).__name__}: {exc}); the text encoder's "
                          "processor needs it. Install the torchvision that matches your torch."}
    return {"ok": True, "version": torchvision.__version__, "detail": "present"}


def _cuda_bf16(index: int) -> bool:
    import torch

    if torch.version.hip:  # ROCm: torch knows which gfx targets do bf16
        with torch.cuda.device(index):
            return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(index) >= (8, 0)  # Ampere and newer


def accelerators() -> list[dict[str, Any]]:
    """Each GPU (CUDA/ROCm, Intel XPU, Apple MPS) with its memory and bf16 support."""
    import torch

    found: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            major, minor = torch.cuda.get_device_capability(i)
            found.append({
                "device": f"cuda:{i}", "type": "cuda", "name": props.name,
                "total_bytes": int(props.total_memory), "free_bytes": comfy.free_device_memory(f"cuda:{i}"),
                "bf16": _cuda_bf16(i), "capability": f"{major}.{minor}",
                "backend": "ROCm" if torch.version.hip else "CUDA",
            })
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        for i in range(torch.xpu.device_count()):
            props = torch.xpu.get_device_properties(i)
            found.append({
                "device": f"xpu:{i}", "type": "xpu", "name": props.name, "total_bytes": int(props.total_memory),
                "free_bytes": comfy.free_device_memory(f"xpu:{i}"), "bf16": True, "capability": None,
                "backend": "XPU",
            })
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append({
            "device": "mps", "type": "mps", "name": "Apple GPU (unified memory)", "total_bytes": None,
            "free_bytes": comfy.free_device_memory("mps"), "bf16": True, "capability": None, "backend": "MPS",
        })
    return found


def cpu_info() -> dict[str, Any]:
    import os

    total = None
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "total_bytes": total, "free_bytes": comfy.free_device_memory("cpu"),
            "machine": platform.machine()}


def quantization_check(kind: str, device: str) -> dict[str, Any]:
    """Quantize a 64->32 `nn.Linear` with bitsandbytes (`nf4` or `8bit`) on `device` and run it.

    Works means: the weight is stored as 4/8-bit integers, the layer's output matches a plain matmul
    with the dequantized weight (the kernel is right), and the dequantized weight is close to the
    original (the quantization is right). 64x32 suits bitsandbytes' CPU NF4 kernel (in % 64, out % 32).
    """
    result: dict[str, Any] = {"kind": kind, "device": device, "works": False, "detail": ""}
    try:
        import bitsandbytes as bnb
        import torch
        result["version"] = bnb.__version__
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(32, 64, generator=generator) * 0.1
        bias = torch.randn(32, generator=generator) * 0.1
        x = torch.randn(8, 64, generator=generator)
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
            x = x.to(torch.bfloat16)
        elif kind == "8bit":
            layer = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
            if device.startswith("cuda"):
                x = x.to(torch.float16)
        else:
            raise ValueError(f"unknown quantization {kind!r}")
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
        layer = layer.to(device)  # bitsandbytes quantizes the weight on this move
        stored = layer.weight.dtype
        if stored not in (torch.uint8, torch.int8):
            result["detail"] = f"the weight stayed {stored}: bitsandbytes did not quantize it"
            return result
        if kind == "nf4":
            dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().cpu()
        else:
            dequantized = (layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127).cpu()
        with torch.no_grad():
            out = layer(x.to(device)).float().cpu()
        expected = x.float() @ dequantized.T + bias
        kernel_error = float((out - expected).abs().max())
        weight_error = float((dequantized - weight).abs().max() / weight.abs().max())
        scale = float(expected.abs().max())
        result["kernel_error"] = round(kernel_error / scale, 4)
        result["weight_error"] = round(weight_error, 4)
        if not torch.isfinite(out).all():
            result["detail"] = "the quantized layer gave non-finite output"
        elif kernel_error > 0.05 * scale:
            result["detail"] = f"the {kind} kernel is wrong on {device} (off by {kernel_error / scale:.0%})"
        elif weight_error > 0.2:
            result["detail"] = f"{kind} quantization lost too much ({weight_error:.0%} of the largest weight)"
        else:
            result["works"] = True
            result["detail"] = f"quantized and ran on {device}"
    except Exception as exc:  # noqa: BLE001 - what failed is the answer
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result["detail"] = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return result


def quantization_checks(devices: list[str] | None = None) -> dict[str, Any]:
    """NF4 and 8-bit on each device that matters: the first CUDA GPU (transformer + text encoder) and the CPU."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"installed": False, "results": [],
                "detail": "bitsandbytes is not installed: no NF4/8-bit (pip install bitsandbytes)"}
    if devices is None:
        devices = (["cuda:0"] if torch.cuda.is_available() else []) + ["cpu"]
    results = [quantization_check(kind, device) for device in devices for kind in ("nf4", "8bit")]
    cuda_nf4 = any(r["works"] and r["device"].startswith("cuda") and r["kind"] == "nf4" for r in results)
    detail = ("the transformer and the text encoder can be quantized here" if cuda_nf4 else
              "diffusers quantizes the transformer only on an NVIDIA GPU: here only the text encoder can be")
    return {"installed": True, "results": results, "transformer": cuda_nf4, "detail": detail}


def model_sizes(model: str | None = None, precision: str = "bfloat16") -> tuple[dict[str, int], str]:
    """Per-component bytes at `precision`: read from a local model folder's headers, else 2511's sizes."""
    if model is None:
        per = BYTES_PER_PARAM[precision] / 2
        return {n: int(b * per) for n, b in REAL_2511_BF16_BYTES.items()}, (
            REAL_SIZES_SOURCE if precision == "bfloat16" else f"{REAL_SIZES_SOURCE}, scaled to {precision}")
    from .loaders.pipeline import resolve_model_path
    from .loaders.weights import inspect_model_folder

    folder = inspect_model_folder(resolve_model_path(model))
    per_param = BYTES_PER_PARAM[precision]
    sizes = {name: folder.bytes_at(per_param, name) for name in folder.components}
    kind = "Edit-2511" if folder.zero_cond_t else "Edit-2509"
    return sizes, f"{folder.path} ({kind}, read from its safetensors headers, at {precision})"


# -- ComfyUI's single model files -----------------------------------------------------------------


def comfy_file_folders(models_dir: Path | str | None = None) -> tuple[dict[str, list[Path]], str] | None:
    """ComfyUI's folders for each component's single files, and where that knowledge came from.

    Inside ComfyUI: its own `folder_paths` (extra_model_paths.yaml included). Otherwise
    `models_dir`/diffusion_models, /unet, /text_encoders, /clip and /vae (the command line passes
    ComfyUI/models when the pack sits in ComfyUI/custom_nodes). None when neither is known.
    """
    found: dict[str, list[Path]] = {}
    if comfy.in_comfyui():
        import folder_paths

        for role, names in FILE_FOLDERS.items():
            paths: list[Path] = []
            for name in names:
                try:
                    paths += [Path(p) for p in folder_paths.get_folder_paths(name)]
                except KeyError:
                    continue
            found[role] = paths
        source = "ComfyUI's model folders (folder_paths)"
    elif models_dir is not None:
        found = {role: [Path(models_dir) / name for name in names] for role, names in FILE_FOLDERS.items()}
        source = str(models_dir)
    else:
        return None
    for role, paths in found.items():  # unet/clip are often the same folders as diffusion_models/text_encoders
        unique: dict[str, Path] = {}
        for path in paths:
            unique.setdefault(str(path.expanduser().resolve()), path.expanduser())
        found[role] = list(unique.values())
    return found, source


def _candidate_files(folders: list[Path], role: str) -> list[tuple[str, Path]]:
    """(name as ComfyUI's combo shows it, path) of the files a loader of `role` could be given."""
    from .loaders.comfy_files import SUFFIXES

    files: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            suffix = path.suffix.lower()
            if not path.is_file() or any(part.startswith(".") for part in name.split("/")):
                continue
            if suffix in SUFFIXES[role] or (suffix in PICKLE_SUFFIXES + (".gguf",) and "qwen" in name.lower()):
                files.setdefault(name, path)  # the first folder wins, as in ComfyUI
    # Qwen-named files first, as the files loader's combos list them.
    return sorted(files.items(), key=lambda item: "qwen" not in item[0].lower())


def inspect_comfy_file(name: str, path: Path, role: str) -> dict[str, Any]:
    """One file as `inspect_file` reads its header; a file it refuses gets the refusal as `reason`."""
    from .loaders.comfy_files import inspect_file
    from .loaders.weights import ModelFolderError

    entry: dict[str, Any] = {"name": name, "path": str(path), "ok": False}
    try:
        entry["file_bytes"] = path.stat().st_size
        info = inspect_file(path, role)
    except Exception as exc:  # noqa: BLE001 - any failure is listed with its reason, never a crash
        message = str(exc).strip()
        entry["reason"] = message if isinstance(exc, ModelFolderError) else f"{type(exc).__name__}: {message}"
        return entry
    entry.update(ok=True, storage=info.storage, params=info.params, stored_bytes=info.stored_bytes,
                 quantized=info.quantized)
    if role == "transformer":
        entry.update(variant=info.variant, layers=info.num_layers)
    return entry


def comfy_files(models_dir: Path | str | None = None, precision: str = "bfloat16") -> dict[str, Any]:
    """The Qwen-Image-Edit files in ComfyUI's folders, each as its header describes it, and a set to plan with.

    Every loadable file of each role is listed, and any Qwen-named file that is refused (with the
    reason); other files are only counted. The set is the first loadable file of each role in the
    combos' order (what the files loader shows first); its sizes are what the loader plans with:
    fp8 and GGUF as stored (they stay quantized in memory), bf16 files at `precision`.
    """
    located = comfy_file_folders(models_dir)
    if located is None:
        return {"found": False, "detail": "ComfyUI's model folders are not known here: run from ComfyUI/custom_nodes/"
                                          "<this pack> or pass --comfyui PATH_TO_COMFYUI"}
    folders, source = located
    report: dict[str, Any] = {"found": True, "source": source, "roles": {}}
    for role, paths in folders.items():
        listed, others = [], 0
        for name, path in _candidate_files(paths, role):
            entry = inspect_comfy_file(name, path, role)
            if entry["ok"] or "qwen" in name.lower():
                listed.append(entry)
            else:
                others += 1
        report["roles"][role] = {"folders": [str(p) for p in paths], "files": listed, "others": others}
    chosen = {role: next((f for f in r["files"] if f["ok"]), None) for role, r in report["roles"].items()}
    report["set"] = None
    if all(chosen.values()):
        report["set"] = _file_set({role: f for role, f in chosen.items() if f}, precision)
    return report


def _file_set(chosen: dict[str, dict[str, Any]], precision: str) -> dict[str, Any]:
    """The loader's own view of three files: sizes at `precision` (quantized files as stored), variant."""
    from .loaders.from_files import inspect_files

    names = {role: f["name"] for role, f in chosen.items()}
    try:
        folder, _ = inspect_files(*(Path(chosen[r]["path"]) for r in ("transformer", "text_encoder", "vae")))
    except Exception as exc:  # noqa: BLE001 - reported, and the published sizes are used instead
        return {"files": names, "error": str(exc)}
    sizes = {name: folder.bytes_at(BYTES_PER_PARAM[precision], name) for name in folder.components}
    pre_quantized = sorted(n for n, c in folder.components.items() if c.pre_quantized)
    return {"files": names, "sizes_bytes": sizes, "pre_quantized": pre_quantized,
            "variant": "Edit-2511" if folder.zero_cond_t else "Edit-2509"}


def memory_options(sizes: dict[str, int], free_bytes: int | None,
                   quantized: tuple[str, ...] = QUANTIZED) -> list[dict[str, Any]]:
    """Every quantization x offload choice with the device memory it needs, in the planner's model."""
    rows = []
    for q in placement.QUANTIZATIONS:
        if q != "none" and not quantized:
            continue  # nothing left to quantize: the files already are
        for o in placement.OFFLOADS:
            need = placement.device_bytes_needed(placement.component_bytes(sizes, q, quantized), o)
            fits = None if free_bytes is None else need <= int(free_bytes * placement.SAFETY)
            rows.append({"quantization": q, "offload": o, "needed_bytes": need, "fits": fits})
    return rows


def recommend(sizes: dict[str, int], device: dict[str, Any], can_quantize: bool,
              quantized: tuple[str, ...] = QUANTIZED) -> dict[str, Any]:
    """What the loader's `auto` picks on `device` (an `accelerators()` entry), and the alternatives.

    `quantized`: the components bitsandbytes may quantize (not those stored fp8 / GGUF already).
    """
    plan = placement.plan_placement(sizes, device.get("free_bytes"), device["type"], "auto", "auto", quantized,
                                    can_quantize and device["type"] == "cuda" and bool(quantized))
    notes = []
    if device["type"] == "cuda" and not device.get("bf16"):
        notes.append("no native bf16 on this GPU: bfloat16 is emulated (slow); float16 can overflow on this model")
    if plan.quantization != "none" and not can_quantize:
        notes.append("needs bitsandbytes quantization, which does not work here")
    return {
        "device": device["device"], "name": device.get("name"), "free_bytes": device.get("free_bytes"),
        "settings": {"precision": "bfloat16", "quantization": plan.quantization, "offload": plan.offload},
        "needed_bytes": plan.needed_bytes, "reason": plan.reason, "notes": notes,
        "options": memory_options(sizes, device.get("free_bytes"), quantized),
    }


#: Common card sizes (GiB) for the reference table; ~0.6 GiB goes to the CUDA context on each.
CARD_SIZES_GIB = (80, 48, 24, 16, 12, 8)
CUDA_CONTEXT_BYTES = int(0.6 * placement.GiB)


def settings_by_card(sizes: dict[str, int], cards_gib: tuple[int, ...] = CARD_SIZES_GIB,
                     quantized: tuple[str, ...] = QUANTIZED) -> list[dict[str, Any]]:
    """What `auto` picks on an otherwise idle NVIDIA card of each size (with bitsandbytes working)."""
    rows = []
    for card in cards_gib:
        free = card * placement.GiB - CUDA_CONTEXT_BYTES
        plan = placement.plan_placement(sizes, free, "cuda", "auto", "auto", quantized, bool(quantized))
        rows.append({"card_gib": card, "quantization": plan.quantization, "offload": plan.offload,
                     "needed_bytes": plan.needed_bytes})
    return rows


def cpu_recommendation(sizes: dict[str, int], cpu: dict[str, Any]) -> dict[str, Any]:
    need = sum(sizes.values()) + placement.ACTIVATION_HEADROOM
    free = cpu.get("free_bytes")
    return {
        "device": "cpu", "settings": {"precision": "bfloat16", "quantization": "none", "offload": "none",
                                      "device": "cpu"},
        "needed_bytes": need, "free_bytes": free, "fits": None if free is None else need <= free,
        "reason": "no GPU: everything runs on the CPU in RAM; offload and transformer quantization need a GPU. "
                  "An edit at ~1 MP takes hours on a CPU (40 steps x 2 passes of a 20B-parameter transformer); "
                  "`python cli.py selftest` proves the install in seconds instead.",
    }


def diagnose(model: str | None = None, precision: str = "bfloat16", check_quantization: bool = True,
             comfy_models: Path | str | None = None) -> dict[str, Any]:
    """Everything `doctor` reports, as one JSON-serialisable dict.

    `comfy_models`: ComfyUI's models folder when known from outside (inside ComfyUI its own folders
    are used); its Qwen-Image-Edit single files are listed, and the memory advice uses their real
    sizes when a full set is found (unless `model` names a diffusers folder to plan with).
    """
    versions = package_versions()
    report: dict[str, Any] = {
        "versions": versions,
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()}), Python {sys.version.split()[0]}",
        "diffusers": diffusers_check(),
        "torchvision": torchvision_check(),
        "accelerators": accelerators(),
        "cpu": cpu_info(),
    }
    report["quantization"] = (quantization_checks() if check_quantization
                              else {"installed": versions["bitsandbytes"] is not None, "results": [],
                                    "detail": "not checked (--no-quantization-check)"})
    report["comfy_files"] = comfy_files(comfy_models, precision)
    file_set = report["comfy_files"].get("set") or {}
    quantized = QUANTIZED
    if model is None and "sizes_bytes" in file_set:
        sizes = dict(file_set["sizes_bytes"])
        files = file_set["files"]
        source = (f"ComfyUI files {files['transformer']} + {files['text_encoder']} + {files['vae']} ({file_set['variant']}, "
                  f"read from their headers; fp8 / GGUF as stored, the rest at {precision})")
        quantized = tuple(c for c in QUANTIZED if c not in file_set["pre_quantized"])
    else:
        sizes, source = model_sizes(model, precision)
    report["model"] = {"sizes_bytes": sizes, "source": source, "precision": precision,
                       "bitsandbytes_components": list(quantized)}
    can_quantize = bool(report["quantization"].get("transformer"))
    report["by_card"] = settings_by_card(sizes, quantized=quantized)
    report["recommendations"] = [recommend(sizes, d, can_quantize, quantized) for d in report["accelerators"]
                                 if d["type"] in ("cuda", "xpu")]
    if not report["recommendations"]:
        report["recommendations"] = [cpu_recommendation(sizes, report["cpu"])]
    problems = []
    if not report["diffusers"]["ok"]:
        problems.append(report["diffusers"]["detail"])
    if not report["torchvision"]["ok"]:
        problems.append(report["torchvision"]["detail"])
    for name in ("torch", "transformers", "accelerate", "safetensors"):
        if versions.get(name) is None:
            problems.append(f"{name} is not installed: pip install -r requirements.txt")
    report["problems"] = problems
    report["ok"] = not problems
    # Not an install problem, but the verdict must not contradict it: a model that cannot fit is said last.
    report["warnings"] = [
        f"{rec['device']}: the model needs ~{gib(rec['needed_bytes'])} and {gib(rec.get('free_bytes'))} is free, so "
        "it does not fit here" + (" even with the most frugal settings" if rec["device"] != "cpu" else "")
        for rec in report["recommendations"]
        if rec.get("fits") is False or str(rec.get("reason", "")).startswith("nothing fits")
    ]
    return report


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / placement.GiB:.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned plain text for a terminal."""
    lines: list[str] = []
    add = lines.append
    add("Qwen-Image-Edit doctor")
    add(f"  platform      {report['platform']}")
    versions = report["versions"]
    add("Packages")
    for name in ("torch", "diffusers", "transformers", "bitsandbytes", "accelerate", "torchvision", "safetensors",
                 "huggingface_hub", "peft"):
        add(f"  {name:<15} {versions.get(name) or 'not installed'}")
    mark = {True: "ok  ", False: "FAIL"}
    add("Checks")
    add(f"  [{mark[report['diffusers']['ok']]}] zero_cond_t (Edit-2511): {report['diffusers']['detail']}")
    add(f"  [{mark[report['torchvision']['ok']]}] torchvision: {report['torchvision']['detail']}")
    quant = report["quantization"]
    if not quant["results"]:
        add(f"  [{'--  '}] quantization: {quant['detail']}")
    for r in quant["results"]:
        add(f"  [{mark[r['works']]}] {r['kind']:<4} on {r['device']}: {r['detail']}")
    if quant["results"]:
        add(f"         {quant['detail']}")
    add("Devices")
    if not report["accelerators"]:
        add("  no GPU found (torch sees no CUDA, ROCm, XPU or MPS device)")
    for d in report["accelerators"]:
        extra = f", compute {d['capability']}" if d.get("capability") else ""
        add(f"  {d['device']:<7} {d['name']}: {gib(d['free_bytes'])} free of {gib(d['total_bytes'])}, "
            f"bf16 {'yes' if d['bf16'] else 'no'}{extra}")
    cpu = report["cpu"]
    add(f"  cpu     {cpu['cores']} cores, {gib(cpu['free_bytes'])} RAM free of {gib(cpu['total_bytes'])}")
    _format_comfy_files(report.get("comfy_files") or {"found": False, "detail": "not checked"}, add)
    model = report["model"]
    sizes = model["sizes_bytes"]
    add(f"Model sizes: {model['source']}")
    add("  " + ", ".join(f"{n} {gib(b)}" for n, b in sizes.items()))
    add("Recommended loader settings (what quantization/offload 'auto' picks)")
    for rec in report["recommendations"]:
        s = rec["settings"]
        add(f"  {rec['device']}: precision {s['precision']}, quantization {s['quantization']}, offload {s['offload']}"
            f" - needs ~{gib(rec['needed_bytes'])}")
        add(f"    {rec['reason']}")
        if rec.get("fits") is False:
            add(f"    RAM: needs ~{gib(rec['needed_bytes'])}, {gib(rec['free_bytes'])} free: "
                "the full model does not fit here")
        for note in rec.get("notes", []):
            add(f"    note: {note}")
        if rec.get("options"):
            add("    all settings (device memory needed at ~1 MP; * = fits now):")
            for row in rec["options"]:
                star = "*" if row["fits"] else " "
                add(f"     {star} quantization {row['quantization']:<4}  offload {row['offload']:<10} "
                    f"{gib(row['needed_bytes']):>9}")
    if not report["accelerators"]:
        add("For reference: what 'auto' picks on an idle NVIDIA card")
        for row in report["by_card"]:
            add(f"  {row['card_gib']:>3} GB card: quantization {row['quantization']:<4} offload {row['offload']:<10} "
                f"needs ~{gib(row['needed_bytes'])}")
    if report["warnings"]:
        add("Warnings")
        for w in report["warnings"]:
            add(f"  - {w}")
    if report["problems"]:
        add("Problems")
        for p in report["problems"]:
            add(f"  - {p}")
    warned = f"; {len(report['warnings'])} warning(s) above" if report["warnings"] else ""
    add(f"{len(report['problems'])} problem(s) found{warned}." if report["problems"] else
        f"The install is fine{warned}.")
    return "\n".join(lines)



_ROLE_TITLES = {"transformer": "diffusion models", "text_encoder": "text encoders", "vae": "VAEs"}


def _size(n: int) -> str:
    return gib(n) if n >= placement.GiB else f"{n / 2**20:.1f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _format_comfy_files(files: dict[str, Any], add: Any) -> None:
    if not files.get("found"):
        add(f"ComfyUI model files: {files.get('detail', 'not found')}")
        return
    add(f"ComfyUI model files, from {files['source']}")
    for role, found in files["roles"].items():
        folders = ", ".join(found["folders"]) or "none"
        add(f"  {_ROLE_TITLES[role]} ({folders})")
        if not found["files"]:
            add("    no Qwen-Image-Edit file here")
        for f in found["files"]:
            if f["ok"]:
                variant = f" {f['variant']}," if f.get("variant") else ""
                add(f"    {f['name']}: {f['storage']},{variant} {_params(f['params'])} params, {_size(f['stored_bytes'])}")
            else:
                add(f"    {f['name']}: cannot be loaded: {f['reason']}")
        if found["others"]:
            add(f"    (and {found['others']} other file(s) that are not Qwen-Image-Edit {_ROLE_TITLES[role]})")
    file_set = files.get("set")
    if file_set is None:
        add("  no complete set (a diffusion model, a text encoder and a VAE that all load): the advice below "
            "uses the published bf16 sizes")
    elif "error" in file_set:
        add(f"  the first set ({', '.join(file_set['files'].values())}) does not load together: {file_set['error']}")
