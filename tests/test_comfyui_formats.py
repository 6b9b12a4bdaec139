"""ComfyUI's own loaders accept the files the kit exports: the formats are ComfyUI's, not our invention.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout (0.8.0 is what this was written against).
``COMFYUI_PYTHON`` names the Python that has ComfyUI's requirements (default: this one; ComfyUI's
loaders need at least einops, torchsde, scipy and comfy-kitchen beside torch / transformers).

ComfyUI's Qwen modules have fixed widths: for the transformer it detects only ``in_channels`` and
``num_layers`` (24 heads x 128, joint_attention_dim 3584 are built in), the WanVAE only its base width,
and the text encoder's Qwen2.5-VL-7B config (and its 32-block vision tower) is fixed. The tiny kit's
shapes cannot fit those modules, so this builds the three components from the real classes at the REAL
widths of the pack's shipped configs (loaders/configs/Qwen-Image-Edit-2511) with the least depth,
random weights: a 1-block transformer (~380M parameters), the full VAE (127M) and a 1-layer text model
with the full vision tower (~1.45B, the 152064 x 3584 embedding shared with lm_head, which ComfyUI's
files drop anyway), built by tinykit/real_shapes.py (as tests/test_real_shapes.py's pipeline). They are
exported with the kit's exporters (tinykit/tiny_pipeline.py), then ComfyUI
loads each file the way its loader nodes do:

* transformer (bf16, fp8, scaled_fp8, comfy_quant; bf16 without the 2511 marker and with a
  ``model.diffusion_model.`` prefix): ``comfy.sd.load_diffusion_model`` (UNETLoader);
* GGUF Q8_0 / Q4_0: ComfyUI itself cannot read GGUF; city96's ComfyUI-GGUF pack does
  (``loader.gguf_sd_loader`` + ``comfy.sd.load_diffusion_model_state_dict`` with its ``GGMLOps``, as
  its UnetLoaderGGUF node). Skipped unless that pack is in ``COMFYUI_PATH/custom_nodes`` (or at
  ``COMFYUI_GGUF_PATH``). (This test found that the kit wrote the GGUF 2511 marker with one element
  where ComfyUI's buffer has none; the ``_empty_marker`` copies rewrite it and must load the same);
* VAE: ``comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))`` (VAELoader);
* text encoder (bf16, fp8_scaled): ``comfy.sd.load_clip(..., clip_type=CLIPType.QWEN_IMAGE)``
  (CLIPLoader, type qwen_image). The only help it gets is ComfyUI's own per-model config override,
  ``model_options["qwen25_7b_model_config"] = {"num_hidden_layers": 1}`` (sd1_clip.SDClipModel reads
  it; comfy/text_encoders/long_clipl.py uses the same hook): without it ComfyUI builds 28 layers,
  and its quantized ops refuse a file without the 27 layers we did not make.

For every file: ComfyUI detects the right model (QwenImage with num_layers 1; Edit-2511's
``index_timestep_zero`` reference method exactly when the marker is there; WanVAE; the Qwen2.5-VL-7B
text encoder), logs no missing / unexpected / left-over keys, holds exactly the file's weights under
the same names, and every weight it holds equals what our file means (bf16 as is, fp8 as is, scaled
fp8 and comfy_quant as fp8 x scale, GGUF as the ``gguf`` package dequantizes it): a fingerprint of
every tensor, and a few tensors compared whole. The quantized formats stay quantized in ComfyUI.

ComfyUI runs in a subprocess, so its real ``comfy`` package never meets the stand-in
(tests/comfy_standin.py) that other tests put in ``sys.modules``. The whole module takes a few
minutes and ~10 GB of temporary files, removed at the end.

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfyui_formats.py -v
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

COMFYUI = os.environ.get("COMFYUI_PATH")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to load the exported files "
                                           "with ComfyUI's own loaders"),
]

REPO = Path(__file__).resolve().parent.parent
MARKER = "__index_timestep_zero__"
PREFIX = "model.diffusion_model."
#: Keys that describe a format rather than hold a weight (ComfyUI folds them into the weight it loads).
BOOKKEEPING_SUFFIXES = (".scale_weight", ".weight_scale", ".comfy_quant", ".scale_input", ".input_scale")
BOOKKEEPING_KEYS = ("scaled_fp8", MARKER)
#: What ComfyUI logs when a file's keys do not fit its model (comfy/sd.py, comfy/model_base.py).
KEY_PROBLEMS = ("missing", "unexpected", "leftover", "left over", "not loaded", "size mismatch")

#: Transformer files: name -> (kit format, export keywords, file suffix).
TRANSFORMERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "bf16": ("bf16", {}, ".safetensors"),
    "bf16_no_marker": ("bf16", {"marker": False}, ".safetensors"),
    "bf16_prefixed": ("bf16", {"prefix": PREFIX}, ".safetensors"),
    "fp8": ("fp8", {}, ".safetensors"),
    "scaled_fp8": ("scaled_fp8", {}, ".safetensors"),
    "comfy_quant": ("comfy_quant", {}, ".safetensors"),
    "gguf_q8_0": ("gguf_q8_0", {}, ".gguf"),
    "gguf_q4_0": ("gguf_q4_0", {}, ".gguf"),
    # The same GGUF files with only the 2511 marker rewritten as ComfyUI's own buffer is, 0 elements (see
    # GGUF_MARKER_BUG): they show that everything else in the GGUF files is what ComfyUI-GGUF reads.
    "gguf_q8_0_empty_marker": ("gguf_q8_0", {"empty_marker": True}, ".gguf"),
    "gguf_q4_0_empty_marker": ("gguf_q4_0", {"empty_marker": True}, ".gguf"),
}
TEXT_ENCODERS = ("bf16", "fp8_scaled")
#: Tensors compared whole (the rest by fingerprint): linears (quantized in the quantized formats) and others.
TRANSFORMER_DUMPS = ("transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.img_mlp.net.2.weight",
                     "proj_out.weight", "txt_norm.weight", "transformer_blocks.0.attn.norm_added_k.weight",
                     "img_in.bias")
TEXT_ENCODER_DUMPS = ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.bias",
                      "model.norm.weight", "visual.blocks.31.mlp.down_proj.weight", "visual.merger.mlp.2.weight",
                      "visual.patch_embed.proj.weight")
VAE_DUMPS = ("decoder.middle.0.residual.0.gamma", "decoder.head.2.weight", "encoder.conv1.weight", "conv2.weight")
#: How close the weight ComfyUI holds is to the model we exported (relative L2 error), per format: the
#: quantization error of the format, with room to spare. Plain (unscaled) fp8 is the coarsest: weights under
#: 2**-6 are e4m3 subnormals (measured 0.11 on the 12288-wide img_mlp.net.2; scaled fp8 ~0.03).
MAX_RELATIVE_ERROR = {"bf16": 0.0, "fp8": 0.2, "scaled_fp8": 0.06, "comfy_quant": 0.06, "fp8_scaled": 0.06,
                      "gguf_q8_0": 0.01, "gguf_q4_0": 0.2}


def _gguf_pack() -> Path | None:
    """city96's ComfyUI-GGUF: ``COMFYUI_GGUF_PATH``, else ``COMFYUI_PATH/custom_nodes/ComfyUI-GGUF``."""
    candidates = [os.environ.get("COMFYUI_GGUF_PATH")] + [
        str(Path(COMFYUI or ".") / "custom_nodes" / name) for name in ("ComfyUI-GGUF", "comfyui-gguf")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "loader.py").is_file() and (Path(candidate) / "ops.py").is_file():
            return Path(candidate).resolve()
    return None


# --------------------------------------------------------------------------------------------------
# Shared by both processes: the probe's source includes this function (inspect.getsource).
# --------------------------------------------------------------------------------------------------


def _fingerprint(tensor: Any) -> dict[str, Any]:
    """Shape, float64 sum and absolute sum (in chunks: no float copy of a 545M embedding) and 16 samples."""
    flat = tensor.detach().reshape(-1)
    total = absolute = 0.0
    for start in range(0, flat.numel(), 1 << 22):
        chunk = flat[start:start + (1 << 22)].double()
        total += float(chunk.sum())
        absolute += float(chunk.abs().sum())
    count = flat.numel()
    picks = [round(i * (count - 1) / 15) for i in range(16)] if count else []
    return {"shape": list(tensor.shape), "sum": total, "abs": absolute,
            "samples": [float(flat[i].double()) for i in picks]}


#: Runs with COMFYUI_PYTHON: loads each file with ComfyUI's code and writes what ComfyUI made of it.
PROBE = r'''
import gc, importlib, importlib.machinery, importlib.util, json, logging, sys, time, traceback

job = json.load(open(sys.argv[1]))
sys.path.insert(0, job["comfyui"])
from comfy.cli_args import args
args.cpu = True  # as ComfyUI's tests-unit do: parse no command line, run on the CPU (loading only)

records = []


class Collect(logging.Handler):
    def emit(self, record):
        records.append({"level": record.levelname, "message": record.getMessage()})


logging.getLogger().addHandler(Collect())
logging.getLogger().setLevel(logging.DEBUG)

import torch
import comfy.model_base
import comfy.quant_ops
import comfy.sd
import comfy.utils
from safetensors.torch import save_file

ggml = None
if job["gguf_pack"]:
    # ComfyUI-GGUF's loader and ops, imported as a package without its nodes (which need a running ComfyUI).
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("comfyui_gguf", None, is_package=True))
    package.__path__ = [job["gguf_pack"]]
    sys.modules["comfyui_gguf"] = package
    ggml = {name: importlib.import_module("comfyui_gguf." + name) for name in ("loader", "ops", "dequant")}


def held(tensor):
    """(the weight as ComfyUI computes with it, how ComfyUI stores it)."""
    if isinstance(tensor, comfy.quant_ops.QuantizedTensor):
        return tensor.dequantize(), "QuantizedTensor[%s]" % str(tensor.storage_dtype).replace("torch.", "")
    if ggml is not None and hasattr(tensor, "tensor_type"):
        kind = "GGUF[%s]" % getattr(tensor.tensor_type, "name", tensor.tensor_type)
        return ggml["dequant"].dequantize_tensor(tensor, torch.float32), kind
    return tensor, str(tensor.dtype).replace("torch.", "")


def tensors_of(module):
    """Parameters and persistent buffers, by name (what a state dict would hold, before quantization)."""
    out = dict(module.named_parameters())
    for prefix, sub in module.named_modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set and buffer is not None:
                out[(prefix + "." if prefix else "") + name] = buffer
    return out


def describe(module, dumps, dump_path):
    keys, dumped = {}, {}
    for name, tensor in tensors_of(module).items():
        if tensor.numel() == 0:
            continue
        dense, storage = held(tensor)
        keys[name] = {"storage": storage, "dtype": str(dense.dtype).replace("torch.", ""), **fingerprint(dense)}
        if name in dumps:
            dumped[name] = dense.detach().float().contiguous()
    save_file(dumped, dump_path)
    return keys


def load(entry):
    kind, path = entry["kind"], entry["path"]
    if kind == "diffusion_model":
        patcher = comfy.sd.load_diffusion_model(path)
    elif kind == "diffusion_model_gguf":
        state = ggml["loader"].gguf_sd_loader(path)
        patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"custom_operations": ggml["ops"].GGMLOps()})
        assert patcher is not None, "ComfyUI did not recognise the model"
    if kind.startswith("diffusion_model"):
        model = patcher.model
        net = model.diffusion_model
        info = {"class": type(model).__name__, "is_qwen_image": isinstance(model, comfy.model_base.QwenImage),
                "unet_config": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in model.model_config.unet_config.items()},
                "default_ref_method": net.default_ref_method, "blocks": len(net.transformer_blocks)}
        return info, net
    if kind == "vae":
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
        net = vae.first_stage_model
        return {"class": type(net).__module__ + "." + type(net).__name__, "latent_channels": vae.latent_channels}, net
    if kind == "text_encoder":
        clip = comfy.sd.load_clip(ckpt_paths=[path], clip_type=comfy.sd.CLIPType.QWEN_IMAGE,
                                  model_options={"qwen25_7b_model_config": {"num_hidden_layers": entry["layers"]}})
        net = clip.cond_stage_model.qwen25_7b.transformer
        return {"class": type(net).__name__, "tokenizer": type(clip.tokenizer).__name__,
                "te_class": type(clip.cond_stage_model).__mro__[1].__name__, "layers": len(net.model.layers),
                "vision_blocks": len(net.visual.blocks)}, net
    raise ValueError(kind)


answers = {}
for name, entry in job["entries"].items():
    del records[:]
    started = time.monotonic()
    answer = {"error": None}
    try:
        info, net = load(entry)
        answer.update(info=info, keys=describe(net, set(entry["dumps"]), entry["dump_path"]))
        del info, net
    except Exception:
        answer["error"] = traceback.format_exc()
    answer["seconds"] = round(time.monotonic() - started, 1)
    answer["log"] = [r for r in records if r["level"] in ("WARNING", "ERROR", "CRITICAL")
                     or any(word in r["message"].lower() for word in job["key_problems"])]
    answers[name] = answer
    gc.collect()
json.dump(answers, open(job["answers"], "w"), indent=1)
'''


# --------------------------------------------------------------------------------------------------
# The components at the real widths, and the exported files
# --------------------------------------------------------------------------------------------------


def _build_transformer() -> Any:
    from tinykit.real_shapes import build_real_transformer

    return build_real_transformer(num_layers=1)


def _build_vae() -> Any:
    from tinykit.real_shapes import build_real_vae

    return build_real_vae()


def _build_text_encoder() -> Any:
    from tinykit.real_shapes import build_real_text_encoder

    # 1 text layer; the vision tower keeps its 32 blocks (ComfyUI's is fixed and its quantized ops
    # refuse a missing layer); lm_head shares the embedding (ComfyUI's files have no lm_head).
    return build_real_text_encoder(num_layers=1, vision_depth=32, tie_word_embeddings=True)


def _with_empty_marker(source: Path, target: Path) -> Path:
    """A copy of a GGUF file whose 2511 marker has 0 elements, like ComfyUI's ``__index_timestep_zero__`` buffer."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), arch="qwen_image")
    for tensor in reader.tensors:
        if tensor.name == MARKER:
            writer.add_tensor(MARKER, np.zeros((0,), dtype=np.float32))
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _original_te_key(key: str) -> str:
    """transformers 5 names -> the original Qwen2.5-VL names ComfyUI's files use (as the exporter does)."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


class _Components:
    """What the exporters read: ``.transformer``, ``.text_encoder``, ``.vae`` (one at a time, to save memory)."""

    transformer: Any = None
    text_encoder: Any = None
    vae: Any = None


def _export_all(pack: Any, folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Write every file; returns the probe's entries and the original weights of the compared tensors."""
    from tinykit import tiny_pipeline as tp

    to_wan = importlib.import_module(f"{pack.__name__}.loaders.comfy_files").diffusers_to_wan_vae_key
    entries: dict[str, dict[str, Any]] = {}
    originals: dict[str, Any] = {}
    parts = _Components()

    def entry(name: str, kind: str, path: Path, dumps: tuple[str, ...], **more: Any) -> None:
        entries[name] = {"kind": kind, "path": str(path), "dumps": list(dumps),
                         "dump_path": str(folder / f"{name}.comfy.safetensors"), **more}

    parts.transformer = _build_transformer()
    state = parts.transformer.state_dict()
    originals["transformer"] = {k: state[k].detach().float().clone() for k in TRANSFORMER_DUMPS}
    for name, (fmt, extra, suffix) in TRANSFORMERS.items():
        if extra.get("empty_marker"):
            path = _with_empty_marker(folder / f"transformer_{fmt}{suffix}", folder / f"transformer_{name}{suffix}")
        else:
            path = tp.export_comfy_transformer(parts, folder / f"transformer_{name}{suffix}", fmt, **extra)
        entry(f"transformer_{name}", "diffusion_model_gguf" if suffix == ".gguf" else "diffusion_model", path,
              TRANSFORMER_DUMPS)
    parts.transformer = state = None

    parts.vae = _build_vae()
    blocks = parts.vae.config.num_res_blocks
    originals["vae"] = {to_wan(k, blocks): v.detach().float().clone() for k, v in parts.vae.state_dict().items()
                        if to_wan(k, blocks) in VAE_DUMPS}
    entry("vae", "vae", tp.export_comfy_vae(parts, folder / "vae.safetensors", to_wan_key=to_wan), VAE_DUMPS)
    parts.vae = None

    parts.text_encoder = _build_text_encoder()
    state = {_original_te_key(k): v for k, v in parts.text_encoder.state_dict().items()}
    originals["text_encoder"] = {k: state[k].detach().float().clone() for k in TEXT_ENCODER_DUMPS}
    for fmt in TEXT_ENCODERS:
        path = tp.export_comfy_text_encoder(parts, folder / f"text_encoder_{fmt}.safetensors", fmt)
        entry(f"text_encoder_{fmt}", "text_encoder", path, TEXT_ENCODER_DUMPS, layers=1)
    parts.text_encoder = state = None
    return entries, originals


# --------------------------------------------------------------------------------------------------
# What our files mean (read back in this process)
# --------------------------------------------------------------------------------------------------


def _is_bookkeeping(name: str) -> bool:
    return name in BOOKKEEPING_KEYS or name.endswith(BOOKKEEPING_SUFFIXES)


def _our_weights(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, weight) for every weight of one of our files: fp8 x its scale (1 without one), GGUF dequantized
    with the ``gguf`` package, prefixes stripped; the format's bookkeeping keys are left out."""
    import torch

    if path.suffix == ".gguf":
        import gguf

        for tensor in gguf.GGUFReader(str(path)).tensors:
            if not _is_bookkeeping(tensor.name):
                yield tensor.name, torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            name = key.removeprefix(PREFIX)
            if _is_bookkeeping(name):
                continue
            tensor = f.get_tensor(key)
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                layer = key[: -len(".weight")]
                scale = next((f.get_tensor(layer + s) for s in (".scale_weight", ".weight_scale") if layer + s in keys),
                             torch.tensor(1.0))
                tensor = tensor.float() * scale.float()
            yield name, tensor


# --------------------------------------------------------------------------------------------------
# Fixture: export, then one ComfyUI subprocess loads everything
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy(pack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    comfyui = Path(COMFYUI).expanduser().resolve()
    assert (comfyui / "comfy" / "sd.py").is_file(), f"COMFYUI_PATH={COMFYUI} has no comfy/sd.py"
    folder = tmp_path_factory.mktemp("comfyui-formats")
    try:
        entries, originals = _export_all(pack, folder)
        gguf_pack = _gguf_pack()
        if gguf_pack is None:
            entries = {k: v for k, v in entries.items() if v["kind"] != "diffusion_model_gguf"}
        job = {"comfyui": str(comfyui), "gguf_pack": str(gguf_pack) if gguf_pack else None, "entries": entries,
               "answers": str(folder / "answers.json"), "key_problems": list(KEY_PROBLEMS)}
        (folder / "job.json").write_text(json.dumps(job))
        probe = folder / "probe.py"
        probe.write_text("from __future__ import annotations\n\nimport torch\n\n" + textwrap.dedent(inspect.getsource(_fingerprint)).replace(
            "def _fingerprint", "def fingerprint") + PROBE)
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        done = subprocess.run([python, str(probe), str(folder / "job.json")], cwd=folder, capture_output=True,
                              text=True, timeout=1800, check=False)
        assert done.returncode == 0, f"the ComfyUI probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        answers = json.loads((folder / "answers.json").read_text())
        yield {"entries": entries, "answers": answers, "originals": originals, "gguf_pack": gguf_pack}
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~10 GB: do not leave it to pytest's 3 kept base temps


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _answer(comfy: dict[str, Any], name: str) -> dict[str, Any]:
    answer = comfy["answers"][name]
    assert answer["error"] is None, f"ComfyUI refused {Path(comfy['entries'][name]['path']).name}:\n{answer['error']}"
    problems = [r["message"][:2000] for r in answer["log"] if any(w in r["message"].lower() for w in KEY_PROBLEMS)]
    assert not problems, "ComfyUI's log reports keys that do not fit:\n" + "\n".join(problems)
    return answer


def _tolerance(held: dict[str, Any]) -> float:
    """Relative tolerance for 'equal': the precision ComfyUI computes the weight in. bf16 for the text encoder
    (fp8 x scale rounded to bf16); ComfyUI-GGUF multiplies a block's fp16 scale by its quants in fp16
    (dequant.py, without a dequant_dtype), where the ``gguf`` package uses float32."""
    if held["storage"].startswith("GGUF["):
        return 2.0 ** -10
    return {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}.get(held["dtype"], 1e-6)


def _same_weights(comfy: dict[str, Any], name: str, fmt: str, role: str) -> None:
    """ComfyUI holds exactly our file's weights, by name, each equal to what the file means."""
    import torch
    from safetensors.torch import load_file

    entry, answer = comfy["entries"][name], comfy["answers"][name]
    held: dict[str, Any] = answer["keys"]
    ours = {}
    whole = {}
    for key, tensor in _our_weights(Path(entry["path"])):
        if tensor.numel():
            ours[key] = _fingerprint(tensor)
        if key in entry["dumps"]:
            whole[key] = tensor.float()
    assert sorted(held) == sorted(ours), (
        f"ComfyUI's model and our file differ in names: only ComfyUI {sorted(set(held) - set(ours))[:10]}, "
        f"only ours {sorted(set(ours) - set(held))[:10]}")
    wrong = []
    for key, theirs in held.items():
        mine, rtol = ours[key], _tolerance(theirs)
        scale = mine["abs"] / max(1, math.prod(mine["shape"])) + 1e-12
        if (theirs["shape"] != mine["shape"]
                or abs(theirs["sum"] - mine["sum"]) > rtol * mine["abs"] + 1e-9
                or abs(theirs["abs"] - mine["abs"]) > rtol * mine["abs"] + 1e-9
                or any(abs(a - b) > rtol * abs(b) + 1e-3 * scale for a, b in zip(theirs["samples"], mine["samples"]))):
            wrong.append(f"{key}: ComfyUI {theirs} vs ours {mine}")
    assert not wrong, f"{len(wrong)} weight(s) differ from our file, e.g.:\n" + "\n".join(wrong[:3])

    dumped = load_file(entry["dump_path"])
    assert sorted(dumped) == sorted(entry["dumps"])
    for key, theirs in dumped.items():
        rtol = _tolerance(held[key])
        torch.testing.assert_close(theirs, whole[key], rtol=rtol, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")
        original = comfy["originals"][role][key]
        error = float((theirs - original).norm() / original.norm().clamp(min=1e-12))  # (biases start at 0)
        assert error <= MAX_RELATIVE_ERROR[fmt] + 1e-6, f"{key}: {fmt} is {error:.3f} away from the model's weight"


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_comfyuis_diffusion_model_loader_accepts_the_transformer(comfy, name) -> None:
    fmt, extra, suffix = TRANSFORMERS[name]
    if suffix == ".gguf" and comfy["gguf_pack"] is None:
        pytest.skip("ComfyUI itself has no GGUF reader (comfy.utils.load_torch_file reads safetensors and torch "
                    "pickles only); put city96's ComfyUI-GGUF in COMFYUI_PATH/custom_nodes or set COMFYUI_GGUF_PATH")
    answer = _answer(comfy, f"transformer_{name}")
    info = answer["info"]
    assert info["is_qwen_image"] and info["class"] == "QwenImage", info
    config = info["unet_config"]
    assert (config["image_model"], config["num_layers"], config["in_channels"], info["blocks"]) == ("qwen_image", 1, 64, 1)
    marker = extra.get("marker", True)
    assert config.get("default_ref_method", "index") == info["default_ref_method"]
    assert info["default_ref_method"] == ("index_timestep_zero" if marker else "index"), info
    storage = answer["keys"]["transformer_blocks.0.attn.to_q.weight"]["storage"]
    expected_storage = {"scaled_fp8": "QuantizedTensor[float8_e4m3fn]", "comfy_quant": "QuantizedTensor[float8_e4m3fn]",
                        "gguf_q8_0": "GGUF[Q8_0]", "gguf_q4_0": "GGUF[Q4_0]"}.get(fmt)
    if expected_storage:  # plain fp8 and bf16 are cast to ComfyUI's compute dtype, which depends on the device
        assert storage == expected_storage
    _same_weights(comfy, f"transformer_{name}", fmt, "transformer")


def test_comfyuis_vae_loader_accepts_the_vae(comfy) -> None:
    answer = _answer(comfy, "vae")
    assert answer["info"] == {"class": "comfy.ldm.wan.vae.WanVAE", "latent_channels": 16}
    _same_weights(comfy, "vae", "bf16", "vae")


@pytest.mark.parametrize("fmt", TEXT_ENCODERS)
def test_comfyuis_clip_loader_accepts_the_text_encoder(comfy, fmt) -> None:
    answer = _answer(comfy, f"text_encoder_{fmt}")
    assert answer["info"] == {"class": "Qwen25_7BVLI", "tokenizer": "QwenImageTokenizer", "te_class": "QwenImageTEModel",
                              "layers": 1, "vision_blocks": 32}
    keys = answer["keys"]
    assert keys["model.embed_tokens.weight"]["storage"] == "bfloat16"  # dtype_llama: the file's, not fp16
    if fmt == "fp8_scaled":
        assert keys["model.layers.0.mlp.up_proj.weight"]["storage"] == "QuantizedTensor[float8_e4m3fn]"
        assert keys["visual.blocks.0.attn.qkv.weight"]["storage"] == "QuantizedTensor[float8_e4m3fn]"
    _same_weights(comfy, f"text_encoder_{fmt}", fmt, "text_encoder")
