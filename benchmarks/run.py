"""CPU benchmarks (figures 1-6 and 8-11): where time and memory go, side by side with plain diffusers.

    python benchmarks/run.py                 # full run (~4 min on 2 cores), JSON to $TMPDIR/qwen-image-edit-benchmarks/
    python benchmarks/run.py --save          # the same, JSON to benchmarks/results/cpu.json (what the README quotes)
    python benchmarks/run.py --quick         # smoke run (~1.5 min)
    python benchmarks/run.py --only 2,8      # some figures only

Prints a table on stdout and writes the same figures as JSON. Progress goes to stderr. Figures that
compare two things measure both in this run, interleaved, and report a ratio from medians of
repeats (the machines are shared and noisy). Import cost and peak memory are measured in fresh interpreters.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402 - the repo root must be on sys.path first
    HEAVY_MODULES,
    LOCAL_RESULTS_DIR,
    PACK_NAME,
    PeakRSS,
    current_rss,
    dir_bytes,
    figure,
    figures_table,
    json_path,
    load_pack,
    log,
    machine_info,
    machine_line,
    median,
    pack_module,
    peak_rss,
    quiet,
    run_child,
    setup,
    table,
    write_json,
)

SCRIPT = Path(__file__).resolve()
MB = 1e6

ALL_FIGURES = ("1", "2", "3", "4", "5", "6", "8", "9", "10", "11")  # 7 is gpu.py's
FULL = dict(import_runs=7, edit_size=128, edit_steps=4, edit_pairs=9, warm_repeats=2000, convert_runs=9,
            load_layers=4, edit_threads=1, files_layers=2, files_repeats=7, file_rows=None,
            batch_rows=12, batch_order=(1, 2, 2, 1), masked_pairs=3, release_layers=8)
QUICK = dict(import_runs=2, edit_size=64, edit_steps=2, edit_pairs=2, warm_repeats=200, convert_runs=3,
             load_layers=1, edit_threads=1, files_layers=1, files_repeats=2,
             file_rows=("diffusers folder", "scaled fp8 + fp8 text encoder", "GGUF Q4_0"),
             batch_rows=4, batch_order=(1, 2), masked_pairs=1, release_layers=2)


# -- figure 1: import cost ---------------------------------------------------------------------------


def child_import(pycache: str) -> dict[str, Any]:
    """In a fresh interpreter: import torch, then time importing the pack as ComfyUI does."""
    start = time.perf_counter()
    import torch  # noqa: F401 - ComfyUI has imported torch before it loads custom nodes

    torch_seconds = time.perf_counter() - start
    # Byte-code cache for the pack only, in a private folder (this environment may disable .pyc
    # writing, and ComfyUI installs normally have a warm cache).
    sys.dont_write_bytecode = False
    sys.pycache_prefix = pycache
    before = set(sys.modules)
    start = time.perf_counter()
    pack = load_pack()
    seconds = time.perf_counter() - start
    new = set(sys.modules) - before
    top = sorted({name.split(".")[0] for name in new} - {PACK_NAME})
    return {"seconds": seconds, "torch_seconds": torch_seconds, "new_modules": len(new), "new_top_level": top,
            "heavy": [m for m in HEAVY_MODULES if m in sys.modules], "nodes": len(pack.NODE_CLASS_MAPPINGS)}


def fig_import(cfg: dict, tmp: Path) -> dict[str, Any]:
    pycache = str(tmp / "pycache")
    first = run_child(SCRIPT, ["--child", "import", "--pycache", pycache])  # compiles: no byte-code cache yet
    runs = [run_child(SCRIPT, ["--child", "import", "--pycache", pycache]) for _ in range(cfg["import_runs"])]
    ms = median(r["seconds"] for r in runs) * 1000
    heavy = sorted({m for r in runs + [first] for m in r["heavy"]})
    met = ms <= 50 and not heavy
    return figure(
        "1", "Import cost (pack, after torch)", round(ms, 1), "ms", "<= 50 ms, no heavy modules", met,
        f"median of {len(runs)} fresh interpreters with a warm byte-code cache; heavy modules pulled in: "
        f"{', '.join(heavy) or 'none'}; first import (compiling) {first['seconds'] * 1000:.0f} ms",
        runs_ms=[round(r["seconds"] * 1000, 1) for r in runs], first_import_ms=round(first["seconds"] * 1000, 1),
        heavy_modules=heavy, new_top_level_modules=runs[0]["new_top_level"], new_modules=runs[0]["new_modules"],
        torch_import_ms=round(median(r["torch_seconds"] for r in runs) * 1000),
    )


# -- figures 2 and 3: node overhead, cache --------------------------------------------------------


class Tiny:
    """The tiny pipeline folder, loaded once by the loader node and once by plain diffusers."""

    def __init__(self, tmp: Path) -> None:
        from tinykit.tiny_pipeline import save_tiny_pipeline

        self.dir = save_tiny_pipeline(tmp / "tiny")
        self.pack = load_pack()
        self.loader_node = self.pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]()
        self.sampler_node = self.pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]()
        # float32 on the CPU: the tiny pipeline's reference precision (bf16 matmuls are slow on most CPUs).
        self.load_args = (str(self.dir), "float32", "same", "none", "transformer+text_encoder", "cpu", "none")

    def load(self) -> Any:
        return self.loader_node.load(*self.load_args)[0]


def child_cache(folder: str, repeats: int) -> dict[str, Any]:
    """In a fresh interpreter that has imported torch (ComfyUI at its first queue run): the loader node cold, then warm."""
    import torch  # noqa: F401

    pack = load_pack()
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]()
    args = (folder, "float32", "same", "none", "transformer+text_encoder", "cpu", "none")
    start = time.perf_counter()
    node.load(*args)  # imports diffusers/transformers (the pack defers them) and loads
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        node.load(*args)
        warm.append(time.perf_counter() - start)
    L = pack_module("loaders.pipeline")
    L.release_pipeline()
    start = time.perf_counter()
    node.load(*args)  # cold again, libraries already imported: the load itself
    reload = time.perf_counter() - start
    L.release_pipeline()
    return {"cold": cold, "reload": reload, "warm": warm}


def fig_cache(cfg: dict, tiny: Tiny) -> dict[str, Any]:
    r = run_child(SCRIPT, ["--child", "cache", "--dir", str(tiny.dir), "--repeats", str(cfg["warm_repeats"])])
    warm = r["warm"]
    warm_us = median(warm) * 1e6
    return figure(
        "3", "Loader node warm (cache hit)", round(warm_us, 1), "us", "warm < 1 ms", warm_us < 1000,
        f"tiny pipeline, fresh interpreter with torch imported: cold (first load, importing diffusers and "
        f"transformers) {r['cold'] * 1000:.0f} ms, cold with the libraries imported {r['reload'] * 1000:.0f} ms; "
        f"warm = same settings again, median of {len(warm)} calls (max {max(warm) * 1e6:.0f} us)",
        cold_first_ms=round(r["cold"] * 1000, 1), cold_reload_ms=round(r["reload"] * 1000, 1),
        warm_median_us=round(warm_us, 2), warm_max_us=round(max(warm) * 1e6, 1), repeats=len(warm),
    )


def fig_overhead(cfg: dict, tiny: Tiny) -> dict[str, Any]:
    import torch
    from diffusers import QwenImageEditPlusPipeline

    from tinykit.tiny_pipeline import make_test_image

    S = pack_module("utils.sampling")
    I = pack_module("utils.image")  # noqa: E741
    size, steps, seed, prompt = cfg["edit_size"], cfg["edit_steps"], 0, "make it red"
    handle = tiny.load()
    plain = QwenImageEditPlusPipeline.from_pretrained(str(tiny.dir), dtype=torch.float32, local_files_only=True)
    plain.to("cpu")
    plain.set_progress_bar_config(disable=True)  # the loader disables it too

    pil = make_test_image(size, size, seed=1)
    image = I.pil_to_tensor(pil)  # exact: the node turns it back into this same PIL image
    direct_kwargs = dict(prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, height=size, width=size,
                         num_inference_steps=steps, num_images_per_prompt=1, output_type="pt")
    node_kwargs = S.pipeline_kwargs(S.EditRequest(prompt, " ", seed, steps, 4.0, "match", size, size, 1), [pil],
                                    size, size, seed)
    same_args = all(node_kwargs[k] == v for k, v in direct_kwargs.items()) and set(node_kwargs) == set(
        direct_kwargs) | {"image", "generator"}

    # Time spent inside the pipeline call during each node run: node time minus this is what the node
    # adds (input checks, conversions, progress, callbacks), measured without the other side's noise.
    inner: list[float] = []
    pipeline_call = QwenImageEditPlusPipeline.__call__

    def timed_call(self: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return pipeline_call(self, *a, **k)
        finally:
            inner[-1] += time.perf_counter() - start

    def node() -> Any:
        inner.append(0.0)
        QwenImageEditPlusPipeline.__call__ = timed_call  # only around the node's runs
        try:
            return tiny.sampler_node.edit(handle, image, prompt, " ", seed, steps, 4.0, "match", size, size, 1)[0]
        finally:
            QwenImageEditPlusPipeline.__call__ = pipeline_call

    def direct() -> Any:
        out = plain(image=[pil], generator=torch.Generator("cpu").manual_seed(seed), **direct_kwargs).images  # noqa: F821 - deleted only after the last call
        return out.permute(0, 2, 3, 1)

    cpu_times: dict[Any, list[float]] = {node: [], direct: []}

    def clock(fn: Any) -> tuple[float, Any]:
        # Wall time is the figure; process CPU time is kept beside it: with one torch thread it
        # barely moves when other jobs pre-empt this one, so it shows what noise does to the wall time.
        cpu, start = time.process_time(), time.perf_counter()
        out = fn()
        wall = time.perf_counter() - start
        cpu_times[fn].append(time.process_time() - cpu)
        return wall, out

    # One thread: on a shared 2-core machine a second thread waiting on a pre-empted peer adds more
    # noise than speed. Both sides run under the same setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["edit_threads"] or threads)
    try:
        node(), direct()  # warm-up: first-call allocations and lazy imports
        t_node, t_direct, ratios, identical = _pairs(cfg, node, direct, clock)
    finally:
        used = torch.get_num_threads()
        torch.set_num_threads(threads)
    ratio = median(t_node) / median(t_direct)
    timed_inner = inner[-len(t_node):]
    cpu_node, cpu_direct = cpu_times[node][-len(t_node):], cpu_times[direct][-len(t_node):]
    cpu_ratio = median(cpu_node) / median(cpu_direct)
    overhead_ms = median(n - i for n, i in zip(t_node, timed_inner)) * 1000
    del plain
    gc.collect()
    return figure(
        "2", "Sampler node / direct pipeline call", round(ratio, 3), "x", "<= 1.03, identical pixels",
        ratio <= 1.03 and identical and same_args,
        f"tiny pipeline fp32 on CPU (1 thread), {size}x{size} out, {steps} steps, true_cfg_scale 4; median of "
        f"{len(t_node)} interleaved runs each: node {median(t_node):.2f} s, direct {median(t_direct):.2f} s "
        f"(median per-pair ratio {median(ratios):.3f}; CPU-time ratio {cpu_ratio:.3f}); time the node spends outside the pipeline call "
        f"{overhead_ms:.1f} ms ({overhead_ms / 10 / median(t_direct):.2f}%); identical pixels: {identical}; "
        f"identical arguments: {same_args}",
        node_s=[round(t, 3) for t in t_node], direct_s=[round(t, 3) for t in t_direct],
        pair_ratios=[round(r, 4) for r in ratios], median_pair_ratio=round(median(ratios), 4),
        cpu_time_ratio=round(cpu_ratio, 4), node_cpu_s=[round(t, 3) for t in cpu_node],
        direct_cpu_s=[round(t, 3) for t in cpu_direct],
        node_outside_pipeline_ms=round(overhead_ms, 2), identical_pixels=identical, identical_arguments=same_args,
        size=size, steps=steps, torch_threads=used,
    )


def _pairs(cfg: dict, node: Any, direct: Any, clock: Any) -> tuple[list, list, list, bool]:
    """Node and direct runs back to back, alternating which goes first; per-pair time ratios."""
    import torch

    t_node, t_direct, ratios, identical = [], [], [], True
    for i in range(cfg["edit_pairs"]):
        order = (node, direct) if i % 2 == 0 else (direct, node)
        (ta, a), (tb, b) = clock(order[0]), clock(order[1])
        tn, out_n, td, out_d = (ta, a, tb, b) if i % 2 == 0 else (tb, b, ta, a)
        t_node.append(tn)
        t_direct.append(td)
        ratios.append(tn / td)
        identical &= bool(torch.equal(out_n, out_d))
        log(f"  figure 2: pair {i + 1}/{cfg['edit_pairs']}: node {tn:.2f} s, direct {td:.2f} s")
    return t_node, t_direct, ratios, identical


# -- figure 4: conversion ----------------------------------------------------------------------------


def fig_conversion(cfg: dict) -> dict[str, Any]:
    import numpy as np
    import torch

    I = pack_module("utils.image")  # noqa: E741
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1024, 1024, 3), generator=gen).float().div_(255)  # 8-bit values, as LoadImage gives

    def pack_round_trip() -> Any:
        return I.pil_to_tensor(I.tensor_to_pil(x))

    def numpy_round_trip() -> Any:
        u8 = np.rint(x.numpy() * 255).astype(np.uint8)
        return torch.from_numpy(u8.astype(np.float32) / 255)

    exact = torch.equal(pack_round_trip(), x) and torch.equal(numpy_round_trip(), x)
    t_pack, t_np = [], []
    for i in range(cfg["convert_runs"]):
        for fn, out in ((pack_round_trip, t_pack), (numpy_round_trip, t_np))[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    tp, tn = median(t_pack), median(t_np)
    ratio = tn / tp
    mpix = 4 * 1024 * 1024 / 1e6
    return figure(
        "4", "IMAGE->PIL->IMAGE throughput vs numpy", round(ratio, 2), "x", ">= 0.8x numpy", ratio >= 0.8,
        f"batch 4 x 1024x1024; pack {mpix / tp:.0f} MP/s ({tp * 1000:.0f} ms), plain numpy "
        f"round(x*255)->uint8->/255 {mpix / tn:.0f} MP/s ({tn * 1000:.0f} ms); median of {len(t_pack)}; both exact: {exact}",
        pack_ms=round(tp * 1000, 1), numpy_ms=round(tn * 1000, 1), pack_mp_s=round(mpix / tp), numpy_mp_s=round(mpix / tn),
        exact_round_trip=exact,
    )


# -- figure 5: peak memory while loading -------------------------------------------------------------


def child_load_memory(folder: str, warm: str, mode: str) -> dict[str, Any]:
    """In a fresh interpreter: peak RSS while loading `folder` in bf16 on the CPU, by the pack or plain diffusers."""
    import torch
    from diffusers import QwenImageEditPlusPipeline

    L = pack_module("loaders.pipeline")

    def load(path: str) -> Any:
        if mode == "pack":
            settings = L.LoadSettings(path, precision="bfloat16", quantization="none", device="cpu", offload="none")
            return L.get_pipeline(settings).pipe
        pipe = QwenImageEditPlusPipeline.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True)
        return pipe.to("cpu")

    pipe = load(warm)  # the tiny folder first: lazy imports and one-time allocations land in the baseline
    del pipe
    L.release_pipeline()
    gc.collect()
    baseline = current_rss()
    with PeakRSS() as window:
        start = time.perf_counter()
        pipe = load(folder)
        seconds = time.perf_counter() - start
        peak_load = window.peak()
        # safetensors weights are memory-mapped and paged in on first use: read every weight once, as
        # the first edit would, so the figure covers the memory the loaded weights really take.
        with torch.no_grad():
            for component in (pipe.transformer, pipe.text_encoder, pipe.vae):
                for tensor in itertools.chain(component.parameters(), component.buffers()):
                    tensor.sum()
        peak = window.peak()
    after = current_rss()
    params = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    return {"baseline": baseline, "peak_load": peak_load, "peak": peak, "after": after, "seconds": seconds,
            "transformer_param_bytes": params, "peak_method": window.method, "ru_maxrss": peak_rss()}


def fig_load_memory(cfg: dict, tmp: Path, tiny: Tiny) -> dict[str, Any]:
    from benchmarks import synthetic

    folder = tmp / "large"
    synthetic.save_pipeline(folder, synthetic.large_transformer_config(cfg["load_layers"]))
    disk = dir_bytes(folder)
    results = {}
    for mode in ("pack", "diffusers"):
        log(f"  figure 5: loading {disk / MB:.0f} MB in a fresh interpreter ({mode})")
        r = run_child(SCRIPT, ["--child", "load-memory", "--dir", str(folder), "--warm", str(tiny.dir), "--mode", mode])
        r["ratio"] = (r["peak"] - r["baseline"]) / disk
        results[mode] = r
    pack, plain = results["pack"], results["diffusers"]
    ratio = pack["ratio"]
    return figure(
        "5", "Peak RSS during load / weights on disk", round(ratio, 2), "x", "<= 1.25x (+ baseline)", ratio <= 1.25,
        f"{disk / MB:.0f} MB of bf16 safetensors ({cfg['load_layers']}-layer transformer, inner dim 1024) loaded bf16 "
        f"on CPU by the loader, then every weight read once: baseline {pack['baseline'] / MB:.0f} MB (torch+diffusers "
        f"imported, tiny pipeline loaded and released), peak {pack['peak'] / MB:.0f} MB ({pack['peak_load'] / MB:.0f} MB "
        f"before the weights are first read: they are memory-mapped), after {pack['after'] / MB:.0f} MB; plain "
        f"diffusers from_pretrained: {plain['ratio']:.2f}x",
        disk_mb=round(disk / MB, 1), pack={k: _mb(v) for k, v in pack.items()},
        diffusers={k: _mb(v) for k, v in plain.items()}, diffusers_ratio=round(plain["ratio"], 3),
    )


def _mb(value: Any) -> Any:
    if isinstance(value, int) and value > 10_000_000:
        return round(value / MB, 1)
    return round(value, 3) if isinstance(value, float) else value


# -- figure 6: quantized sizes ----------------------------------------------------------------------


def _linear_share(model: Any) -> float:
    import torch

    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    return linear / sum(p.numel() for p in model.parameters())


def _quantized_text_encoder(folder: Path) -> dict[str, Any]:
    from benchmarks import synthetic

    L = pack_module("loaders.pipeline")
    out: dict[str, Any] = {}
    for q in ("none", "nf4", "8bit"):
        L.release_pipeline()
        settings = L.LoadSettings(str(folder), precision="bfloat16", quantization=q, quantize="text_encoder",
                                  device="cpu", offload="none")
        te = L.get_pipeline(settings).pipe.text_encoder
        out[q] = {"bytes": synthetic.module_bytes(te), "footprint": int(te.get_memory_footprint()),
                  "layers": sorted({type(m).__name__ for m in te.modules() if "Linear" in type(m).__name__})}
        if q == "none":
            out["linear_share"] = round(_linear_share(te), 3)
            out["params"] = sum(p.numel() for p in te.parameters())
        del te
    L.release_pipeline()
    for q in ("nf4", "8bit"):
        out[q]["ratio"] = round(out[q]["bytes"] / out["none"]["bytes"], 3)
    return out


def _real_size_estimate(nf4_bytes_per_param: float) -> dict[str, float]:
    """NF4/bf16 for the real components from their layer make-up (meta-device models; arithmetic, not measured)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from benchmarks.synthetic import FULL_TRANSFORMER

    def ratio(model: Any, skip: tuple[str, ...]) -> float:
        total = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not any(n.endswith(s) for s in skip))
        return ((total - linear) * 2 + linear * nf4_bytes_per_param) / (total * 2)

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**FULL_TRANSFORMER)
        te_config = Qwen2_5_VLConfig(  # Qwen2.5-VL-7B-Instruct's published config (sizes only)
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               fullatt_block_indexes=[7, 15, 23, 31]),
            tie_word_embeddings=False,
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(te_config)
    lm_head = text_encoder.lm_head.weight.numel()
    te_total = sum(p.numel() for p in text_encoder.parameters())
    te_nf4 = ratio(text_encoder, ("lm_head",)) * te_total * 2
    return {"transformer": round(ratio(transformer, ("transformer_blocks.0.img_mod.1",)), 3),
            "text_encoder": round(ratio(text_encoder, ("lm_head",)), 3),
            # The pipeline reads hidden states only; lm_head (0.5B params) is loaded but never used.
            "text_encoder_without_lm_head": round((te_nf4 - lm_head * 2) / ((te_total - lm_head) * 2), 3),
            "transformer_params_b": round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2),
            "text_encoder_params_b": round(sum(p.numel() for p in text_encoder.parameters()) / 1e9, 2)}


def fig_quantized(cfg: dict, tmp: Path, tiny: Tiny) -> dict[str, Any]:
    import importlib.util

    import torch

    from benchmarks import synthetic

    if importlib.util.find_spec("bitsandbytes") is None:
        return figure("6", "NF4 text encoder / bf16", None, "x", "NF4 <= 0.35x", None, "skipped: bitsandbytes not installed")
    folder = tmp / "wide-text-encoder"
    te = synthetic.REPRESENTATIVE_TEXT_ENCODER
    transformer = {**synthetic.large_transformer_config(1, te["hidden"]), "attention_head_dim": 16,
                   "num_attention_heads": 4, "axes_dims_rope": (8, 4, 4)}
    synthetic.save_pipeline(folder, transformer, text_encoder=te)
    log("  figure 6: tiny text encoder")
    tiny_q = _quantized_text_encoder(tiny.dir)
    log("  figure 6: representative text encoder (linear layers dominate)")
    wide_q = _quantized_text_encoder(folder)
    nf4, int8 = wide_q["nf4"]["ratio"], wide_q["8bit"]["ratio"]
    # What one NF4 weight costs here (4-bit codes + absmax per block), applied to the real layer make-up.
    per_param = _nf4_bytes_per_linear_param(wide_q)
    try:
        real = _real_size_estimate(per_param)
    except Exception as exc:  # noqa: BLE001 - an estimate only
        real = {"error": f"{type(exc).__name__}: {exc}"}
    transformer_note = "transformer: skipped, needs CUDA (diffusers refuses to quantize it on CPU; gpu.py measures it)"
    if torch.cuda.is_available():
        transformer_note = "transformer: run benchmarks/gpu.py on this CUDA machine for its NF4 size"
    return figure(
        "6", "NF4 text encoder / bf16", nf4, "x", "NF4 <= 0.35x", nf4 <= 0.35,
        f"text encoder quantized on CPU by the loader (bitsandbytes): representative ({wide_q['params'] / 1e6:.0f}M "
        f"params, {wide_q['linear_share']:.0%} in linear layers) NF4 {nf4:.3f}x, 8-bit {int8:.3f}x; the kit's tiny "
        f"one ({tiny_q['linear_share']:.0%} linear) NF4 {tiny_q['nf4']['ratio']:.3f}x, 8-bit {tiny_q['8bit']['ratio']:.3f}x; "
        f"{transformer_note}; estimate from the real layer make-up at {per_param:.3f} B per NF4 weight: transformer "
        f"{real.get('transformer')}x, Qwen2.5-VL-7B text encoder {real.get('text_encoder')}x (embedding and the "
        f"unused lm_head stay bf16; {real.get('text_encoder_without_lm_head')}x without lm_head)",
        representative=wide_q, tiny=tiny_q, nf4_bytes_per_linear_param=round(per_param, 4), real_size_estimate=real,
        transformer="skipped: needs CUDA" if not torch.cuda.is_available() else "see gpu.py",
    )


def _nf4_bytes_per_linear_param(q: dict[str, Any]) -> float:
    """Bytes per quantized weight: (NF4 size - unquantized rest) / linear parameters."""
    linear = q["linear_share"] * q["params"]
    rest = q["none"]["bytes"] - linear * 2
    return (q["nf4"]["bytes"] - rest) / linear


# -- figure 8: ComfyUI single files beside the diffusers folder ---------------------------------------

#: (label, transformer format, text encoder format); None: the diffusers folder itself (the reference).
FILE_ROWS = (
    ("diffusers folder", None, None),
    ("bf16 files", "bf16", "bf16"),
    ("fp8", "fp8", "bf16"),
    ("scaled fp8", "scaled_fp8", "bf16"),
    ("comfy_quant fp8", "comfy_quant", "bf16"),
    ("GGUF Q8_0", "gguf_q8_0", "bf16"),
    ("GGUF Q4_0", "gguf_q4_0", "bf16"),
    ("scaled fp8 + fp8 text encoder", "scaled_fp8", "fp8_scaled"),
)
_FOLDERS = {"diffusers": "diffusers", "diffusion_models": "diffusion_models", "unet": "diffusion_models",
            "text_encoders": "text_encoders", "clip": "text_encoders", "vae": "vae", "loras": "loras"}


def _touch_weights(pipe: Any) -> None:
    """Read one byte of every page of every weight (memory-mapped weights are paged in on first use)."""
    import torch

    for component in (pipe.transformer, pipe.text_encoder, pipe.vae):
        for tensor in itertools.chain(component.parameters(), component.buffers()):
            if tensor.numel() == 0:
                continue
            raw = tensor.detach()
            if type(raw) is not torch.Tensor:  # GGUFParameter and other subclasses: their plain storage
                raw = torch.Tensor._make_subclass(torch.Tensor, raw)
            raw.reshape(-1).view(torch.uint8)[::4096].sum()


def child_files_loads(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Peak RSS of each row's load in a process of its own, then load times, through the pack's loader.

    This interpreter imports the libraries and loads the tiny model exported the same way once per row
    (lazy imports and one-time allocations land in the baseline); then each row's peak RSS is measured
    in a process forked from it (without fork, here one after the other), so every measured load
    starts from the same state and the ~6 s of imports is paid once. The load times are taken here
    afterwards, in rounds. ComfyUI's folders are the test stand-in's (`tests/comfy_standin.py`),
    pointed at the tiny or the measured model.
    """
    from tests import comfy_standin

    L = pack_module("loaders.pipeline")
    modules = comfy_standin.install(Path(spec["warm_root"]))
    pack_module("utils.comfy").refresh()
    folders = modules["folder_paths"].folder_names_and_paths

    def settings(root: str, row: dict[str, Any], model: str) -> Any:
        for name, sub in _FOLDERS.items():
            folders[name] = [str(Path(root) / sub)]
        return L.LoadSettings(row[model], precision="bfloat16", quantization="none", device="cpu", offload="none",
                              text_encoder=row["text_encoder"], vae=row["vae"])

    for row in spec["rows"]:
        L.get_pipeline(settings(spec["warm_root"], row, "warm_model"))
        L.release_pipeline()
    gc.collect()
    results = []
    for row in spec["rows"]:
        def measure(row: dict[str, Any] = row) -> dict[str, Any]:
            # The tiny load once more in this process: a forked process shares the libraries' code pages
            # without counting them in its RSS until it runs them, which would add them to the peak.
            L.get_pipeline(settings(spec["warm_root"], row, "warm_model"))
            L.release_pipeline()
            return _measure_load(L, settings(spec["measured_root"], row, "model"))

        results.append(_in_fork(measure) if hasattr(os, "fork") else measure())
    # Load times: here, every set once per round, the order rotating, so that the machine's drift
    # (shared cores) spreads over all of them; the cache is released before each load.
    rows = spec["rows"]
    for result in results:
        result["load_s"] = []
    for i in range(spec["repeats"]):
        for k in range(len(rows)):
            j = (i + k) % len(rows)
            measured = settings(spec["measured_root"], rows[j], "model")
            L.release_pipeline()
            gc.collect()
            start = time.perf_counter()
            L.get_pipeline(measured)
            results[j]["load_s"].append(time.perf_counter() - start)
    L.release_pipeline()
    return results


def _in_fork(fn: Any) -> Any:
    """fn() in a forked child process; its JSON-able result (or its error) comes back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            os.close(read)
            out = json.dumps(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out, code = json.dumps({"error": f"{type(exc).__name__}: {exc}"}), 1
        with os.fdopen(write, "w") as pipe:
            pipe.write(out)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(data) if data else {"error": "the forked process died without a result"}
    if "error" in result:
        raise RuntimeError(f"measuring a load failed: {result['error']}")
    return result


def _measure_load(L: Any, settings: Any) -> dict[str, Any]:
    """Peak RSS of one load (every weight then read once) and the bytes it keeps."""
    from benchmarks.synthetic import module_bytes

    gc.collect()
    baseline = current_rss()
    with PeakRSS() as window:
        start = time.perf_counter()
        pipe = L.get_pipeline(settings).pipe
        seconds = time.perf_counter() - start
        peak_load = window.peak()
        _touch_weights(pipe)
        peak = window.peak()
    after = current_rss()
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    result = {"baseline": baseline, "peak_load": peak_load, "peak": peak, "after": after,
              "bytes": {c: module_bytes(getattr(pipe, c)) for c in ("transformer", "text_encoder", "vae")},
              "transformer_weight": f"{type(weight).__name__} {str(weight.dtype).removeprefix('torch.')}",
              "transformer_numel": sum(p.numel() for p in pipe.transformer.parameters()),
              "text_encoder_weight": str(pipe.text_encoder.model.language_model.layers[0].mlp.up_proj.weight.dtype
                                         ).removeprefix("torch."),
              "peak_method": window.method, "first_load_s": seconds}
    del pipe, weight
    L.release_pipeline()
    return result


def fig_files(cfg: dict, tmp: Path, tiny: Tiny) -> dict[str, Any]:
    from benchmarks import synthetic

    to_wan = pack_module("loaders.comfy_files").diffusers_to_wan_vae_key
    rows = [r for r in FILE_ROWS if cfg["file_rows"] is None or r[0] in cfg["file_rows"]]
    t_formats = list(dict.fromkeys(r[1] for r in rows if r[1]))
    te_formats = list(dict.fromkeys(r[2] for r in rows if r[2]))
    te = synthetic.REPRESENTATIVE_TEXT_ENCODER
    log(f"  figure 8: building the medium model ({cfg['files_layers']}-layer transformer at inner width 1024, "
        f"text encoder hidden {te['hidden']}) and exporting {len(t_formats)} + {len(te_formats)} + 1 files")
    start = time.perf_counter()
    medium = synthetic.save_pipeline(tmp / "files-medium",
                                     synthetic.large_transformer_config(cfg["files_layers"], te["hidden"]),
                                     text_encoder=te)
    medium_models = synthetic.export_comfy_files(medium, tmp / "files-medium-models", t_formats, te_formats, to_wan)
    tiny_models = synthetic.export_comfy_files(tiny.dir, tmp / "files-tiny-models", t_formats, te_formats, to_wan)
    export_s = time.perf_counter() - start

    specs, disks = [], []
    for label, t_fmt, te_fmt in rows:
        if t_fmt is None:  # the diffusers folder: model is its path
            specs.append({"model": str(medium), "warm_model": str(tiny.dir), "text_encoder": "", "vae": ""})
            disks.append(dir_bytes(medium))
            continue
        files = {"diffusion_models": synthetic.COMFY_TRANSFORMER_FILES[t_fmt],
                 "text_encoders": synthetic.COMFY_TEXT_ENCODER_FILES[te_fmt], "vae": synthetic.COMFY_VAE_FILE}
        specs.append({"model": files["diffusion_models"], "warm_model": files["diffusion_models"],
                      "text_encoder": files["text_encoders"], "vae": files["vae"]})
        disks.append(sum((medium_models / sub / name).stat().st_size for sub, name in files.items()))
    log(f"  figure 8: loading {len(rows)} sets, each in a process of its own ({', '.join(r[0] for r in rows)})")
    measured = run_child(SCRIPT, ["--child", "files-load", "--spec", json.dumps(
        {"warm_root": str(tiny_models), "measured_root": str(medium_models), "repeats": cfg["files_repeats"],
         "rows": specs})])
    results: list[dict[str, Any]] = []
    for (label, t_fmt, te_fmt), disk, r in zip(rows, disks, measured):
        loaded = r["bytes"]
        results.append({"set": label, "transformer_format": t_fmt or "diffusers bf16",
                        "text_encoder_format": te_fmt or "diffusers bf16", "disk": disk,
                        "load_s": median(r["load_s"]), "load_runs_s": [round(t, 3) for t in r["load_s"]],
                        "first_load_s": round(r["first_load_s"], 3),
                        "peak": r["peak"] - r["baseline"], "peak_load": r["peak_load"] - r["baseline"],
                        "baseline": r["baseline"], "after": r["after"] - r["baseline"], "loaded": loaded,
                        "kept": sum(loaded.values()), "transformer_weight": r["transformer_weight"],
                        "transformer_numel": r["transformer_numel"],
                        "text_encoder_weight": r["text_encoder_weight"]})
    ref = results[0]
    for row in results:
        # Per round, this set's load over the folder's in the same round: the machine's drift cancels.
        row["load_ratio"] = round(median(t / f for t, f in zip(row["load_runs_s"], ref["load_runs_s"])), 3)
        row["peak_ratio"] = round(row["peak"] / ref["peak"], 3)
        row["peak_per_kept"] = round(row["peak"] / row["kept"], 3)
        # Per parameter of the model (the folder's count: a GGUF tensor's numel counts its packed bytes).
        row["transformer_bytes_per_param"] = round(row["loaded"]["transformer"] / ref["transformer_numel"], 3)
        for c in ("transformer", "text_encoder"):
            row[f"{c}_ratio"] = round(row["loaded"][c] / ref["loaded"][c], 3)
    # Headline: the worst peak RSS of a load per byte it keeps (1.0 = no transient copy at all).
    worst = max(results, key=lambda row: row["peak_per_kept"])
    quantized_smaller = all(row["transformer_ratio"] < 0.6 for row in results
                            if row["transformer_format"] not in ("bf16", "diffusers bf16"))
    met = worst["peak_per_kept"] <= 1.25 and quantized_smaller
    summary = "; ".join(
        f"{row['set']} {row['load_s'] * 1000:.0f} ms ({row['load_ratio']:.2f}x), peak {row['peak'] / MB:.0f} MB "
        f"({row['peak_ratio']:.2f}x), transformer {row['transformer_ratio']:.2f}x" for row in results[1:])
    return figure(
        "8", "ComfyUI files: peak RSS of a load / bytes kept (worst)", worst["peak_per_kept"], "x",
        "<= 1.25x; fp8/GGUF kept quantized (< 0.6x bf16)", met,
        f"a {cfg['files_layers']}-layer transformer at inner width 1024 ({ref['loaded']['transformer'] / MB:.0f} MB "
        f"bf16) + a {ref['loaded']['text_encoder'] / MB:.0f} MB text encoder, loaded bf16 on CPU through the "
        f"loader, each set in a process of its own forked from one fresh interpreter (libraries imported, the tiny "
        f"model loaded and released), every weight then read once; load time = median of {cfg['files_repeats']} "
        f"loads of each set in rounds (in one interpreter, the order rotating), ratios = median of the per-round "
        f"ratios to the folder; diffusers folder "
        f"{ref['load_s'] * 1000:.0f} ms, peak {ref['peak'] / MB:.0f} MB above a {ref['baseline'] / MB:.0f} MB "
        f"baseline; {summary}; worst peak/kept: {worst['set']}; exports {export_s:.0f} s",
        rows=[_files_row_json(row) for row in results],
        layers=cfg["files_layers"], repeats=cfg["files_repeats"], export_s=round(export_s, 1),
        quantized_kept_smaller=quantized_smaller,
    )


def _files_row_json(row: dict[str, Any]) -> dict[str, Any]:
    """A figure 8 row for the JSON: byte counts in MB (keys ending in _mb)."""
    out = {}
    for key, value in row.items():
        if key in ("disk", "peak", "peak_load", "baseline", "after", "kept"):
            out[f"{key}_mb"] = round(value / MB, 2)
        elif key == "loaded":
            out["loaded_mb"] = {c: round(b / MB, 3) for c, b in value.items()}
        else:
            out[key] = round(value, 4) if isinstance(value, float) else value
    return out


def files_table(rows: list[dict[str, Any]]) -> str:
    """Figure 8's JSON rows as a table: MB, and the ratio to the diffusers folder."""
    out = []
    for row in rows:
        loaded = row["loaded_mb"]
        out.append([row["set"], f"{row['transformer_bytes_per_param']:.2f} B/param ({row['transformer_weight'].split()[-1]})",
                    f"{row['disk_mb']:.0f}",
                    f"{row['load_s'] * 1000:.0f} ms ({row['load_ratio']:.2f}x)",
                    f"{row['peak_mb']:.0f} ({row['peak_ratio']:.2f}x)",
                    f"{loaded['transformer']:.1f} ({row['transformer_ratio']:.2f}x)",
                    f"{loaded['text_encoder']:.1f} ({row['text_encoder_ratio']:.2f}x)"])
    return table(out, ["set", "transformer kept as", "on disk MB", "load (x folder)",
                       "peak RSS MB (x folder)", "transformer MB (x bf16)", "text encoder MB (x bf16)"])


# -- figure 9: batch throughput with 1 and 2 local workers --------------------------------------------


def _batch_run(manifest: Path, out: Path, model: Path, workers: int, steps: int, size: int) -> dict[str, Any]:
    """`python cli.py batch ... --workers N` as a user runs it; rows per minute from its results file."""
    import subprocess

    cmd = [sys.executable, str(SCRIPT.parent.parent / "cli.py"), "batch", "--manifest", str(manifest), "-o", str(out),
           "--model", str(model), "--precision", "float32", "--steps", str(steps), "--size-mode", "custom",
           "--width", str(size), "--height", str(size), "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"batch --workers {workers} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    times = sorted(r["time"] for r in records if r["status"] == "done")
    # Steady state: rows finished after the first one, over the time since it (the model loads are before).
    steady = 60 * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"workers": workers, "rows": len(times), "wall_s": round(wall, 2),
            "rows_per_min_wall": round(60 * len(times) / wall, 2),
            "rows_per_min": round(steady, 2) if steady else None}


def fig_batch_workers(cfg: dict, tmp: Path, tiny: Tiny) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from tinykit.tiny_pipeline import make_test_image

    size, steps, rows = cfg["edit_size"] // 2, cfg["edit_steps"], cfg["batch_rows"]
    folder = tmp / "batch-inputs"
    folder.mkdir(exist_ok=True)
    lines = ["image,prompt,seed,output"]
    for i in range(rows):
        make_test_image(size, size, seed=i).save(folder / f"in{i}.png")
        lines.append(f"in{i}.png,Make the sky colour {i},{i},out{i}.png")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    runs = []
    for k, workers in enumerate(cfg["batch_order"]):
        log(f"  figure 9: run {k + 1}/{len(cfg['batch_order'])}: {rows} rows, --workers {workers}")
        runs.append({**_batch_run(manifest, tmp / f"batch-out-{k}", tiny.dir, workers, steps, size), "out": k})
    by = {w: [r for r in runs if r["workers"] == w] for w in (1, 2)}
    one, two = (median([r["rows_per_min"] for r in by[w]]) for w in (1, 2))
    one_wall, two_wall = (median([r["rows_per_min_wall"] for r in by[w]]) for w in (1, 2))
    first = {w: by[w][0]["out"] for w in (1, 2)}
    differences = [np.abs(np.array(Image.open(tmp / f"batch-out-{first[1]}" / f"out{i}.png")).astype(int)
                          - np.array(Image.open(tmp / f"batch-out-{first[2]}" / f"out{i}.png")).astype(int)).max()
                   for i in range(rows)]
    largest = int(max(differences))
    ratio = round(two / one, 2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return figure(
        "9", "Batch rows per minute, 2 local workers / 1 (tiny kit, CPU)", ratio, "x", "> 1x", ratio > 1,
        f"`cli.py batch --workers 1` {one:.1f} rows/min, `--workers 2` {two:.1f} rows/min once loaded "
        f"(with start-up and model loads: {one_wall:.1f} and {two_wall:.1f}); {rows} rows, {size}x{size}, "
        f"{steps} steps, float32, medians of {len(by[1])} runs each, interleaved; load average at the end "
        f"{load if load is None else round(load, 1)}; largest pixel difference between the two {largest}/255 (one "
        "worker's torch uses every core, each of two workers half: CPU sums in another order, +-1 at most)",
        runs=runs, rows=rows, size=size, steps=steps, one_worker=one, two_workers=two, one_worker_wall=one_wall,
        two_workers_wall=two_wall, max_pixel_difference=largest, load_average=load,
    )


# -- figure 10: masked edit of a large photo ----------------------------------------------------------


def fig_masked(cfg: dict, tiny: Tiny) -> dict[str, Any]:
    """A 6000x4000 photo with a 512x512 mask against an unmasked ~1 MP edit, same steps, interleaved."""
    import torch

    M = pack_module("utils.mask")
    steps, prompt = cfg["edit_steps"], "make it red"
    handle = tiny.load()
    generator = torch.Generator().manual_seed(0)
    photo = torch.rand(1, 4000, 6000, 3, generator=generator)
    mask = torch.zeros(4000, 6000)
    mask[1744:2256, 2744:3256] = 1
    small = torch.rand(1, 816, 1224, 3, generator=generator)  # 1 MP at the photo's 3:2
    side = 1024 if cfg["masked_pairs"] > 1 else cfg["edit_size"]  # --quick: both sides edit ~64x64 px of area
    args = (prompt, " ", 0, steps, 1.0, "auto" if side == 1024 else "custom", side, side, 1)
    region = M.edit_region(mask, 0).bool()

    def masked() -> Any:
        return tiny.sampler_node.edit(handle, photo, *args, mask=mask)[0]

    def plain() -> Any:
        return tiny.sampler_node.edit(handle, small, *args)[0]

    masked(), plain()  # warm-up
    t_masked, t_plain, untouched = [], [], True
    for i in range(cfg["masked_pairs"]):
        for fn in ((masked, plain) if i % 2 == 0 else (plain, masked)):
            start = time.perf_counter()
            out = fn()
            (t_masked if fn is masked else t_plain).append(time.perf_counter() - start)
            if fn is masked:
                untouched &= out.shape == photo.shape and bool(torch.equal(out[0][~region], photo[0][~region]))
        log(f"  figure 10: pair {i + 1}/{cfg['masked_pairs']}: masked {t_masked[-1]:.2f} s, 1 MP {t_plain[-1]:.2f} s")
    ratio = round(median(t_masked) / median(t_plain), 2)
    window = M.context_window(M.mask_box(mask), 6000, 4000, 2.0)
    return figure(
        "10", "Masked edit of a 6000x4000 photo (512x512 mask) / unmasked 1 MP edit", ratio, "x", "<= 1.5x",
        ratio <= 1.5 and untouched,
        f"tiny pipeline fp32 on CPU, {steps} steps, true_cfg_scale 1, size_mode {args[5]} ({side}x{side} px of area):"
        f" masked {median(t_masked):.2f} s (window {window[2] - window[0]}x{window[3] - window[1]}, stitched into "
        f"the 24 MP photo), unmasked 1224x816 {median(t_plain):.2f} s; medians of "
        f"{len(t_masked)} interleaved runs; every pixel outside the mask identical: {untouched}",
        masked_s=[round(t, 3) for t in t_masked], plain_s=[round(t, 3) for t in t_plain], steps=steps,
        untouched_outside=untouched,
    )


# -- figure 11: host RSS before load, loaded, after release ------------------------------------------


def child_release_memory(folder: str, warm: str, mode: str) -> dict[str, Any]:
    """In a fresh interpreter: RSS before the loader loads `folder` (bf16, CPU), once every weight has been read,
    and after `release_pipeline`; mode "no-trim" skips its malloc_trim, to show what that gives back."""
    L = pack_module("loaders.pipeline")
    if mode == "no-trim":
        pack_module("utils.comfy").trim_host_memory = lambda: None

    def load(path: str) -> Any:
        return L.get_pipeline(L.LoadSettings(path, precision="bfloat16", quantization="none", device="cpu",
                                             offload="none")).pipe

    load(warm)  # the tiny folder first: lazy imports and one-time allocations land in the baseline
    L.release_pipeline()
    gc.collect()
    before = current_rss()
    pipe = load(folder)
    _touch_weights(pipe)  # as the first edit would: memory-mapped weights are paged in
    loaded = current_rss()
    del pipe
    released = L.release_pipeline()
    after = current_rss()
    return {"before": before, "loaded": loaded, "after": after, "released": released}


def fig_release_memory(cfg: dict, tmp: Path, tiny: Tiny) -> dict[str, Any]:
    from benchmarks import synthetic

    folder = tmp / "release"
    synthetic.save_pipeline(folder, synthetic.large_transformer_config(cfg["release_layers"]))
    disk = dir_bytes(folder)
    results = {}
    for mode in ("pack", "no-trim"):
        log(f"  figure 11: {disk / MB:.0f} MB loaded and released in a fresh interpreter ({mode})")
        results[mode] = run_child(SCRIPT, ["--child", "release-memory", "--dir", str(folder), "--warm", str(tiny.dir),
                                           "--mode", mode])
    pack, plain = results["pack"], results["no-trim"]
    grown = max(1, pack["loaded"] - pack["before"])
    kept = (pack["after"] - pack["before"]) / grown
    kept_plain = (plain["after"] - plain["before"]) / max(1, plain["loaded"] - plain["before"])
    return figure(
        "11", "Host RSS kept after release / RSS the load added", round(kept, 3), "x", "<= 0.1x",
        kept <= 0.1 and pack["released"],
        f"{disk / MB:.0f} MB of bf16 safetensors ({cfg['release_layers']}-layer transformer, inner dim 1024) loaded "
        f"bf16 on CPU by the loader, every weight read once, then release_pipeline: RSS before load "
        f"{pack['before'] / MB:.0f} MB, loaded {pack['loaded'] / MB:.0f} MB, after release {pack['after'] / MB:.0f} MB; "
        f"without its malloc_trim: {plain['before'] / MB:.0f} / {plain['loaded'] / MB:.0f} / {plain['after'] / MB:.0f} "
        f"MB ({kept_plain:.2f}x kept)",
        disk_mb=round(disk / MB, 1), pack={k: _mb(v) for k, v in pack.items()},
        no_trim={k: _mb(v) for k, v in plain.items()}, no_trim_ratio=round(kept_plain, 3),
    )


# -- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (smoke run)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the JSON (default {LOCAL_RESULTS_DIR / 'cpu.json'}, outside the working tree)")
    parser.add_argument("--save", action="store_true",
                        help="write the JSON to benchmarks/results/cpu.json (the figures the README quotes)")
    parser.add_argument("--only", default=",".join(ALL_FIGURES),
                        help="comma-separated figure numbers (with --save, the others stay in the saved JSON)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pycache", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup()

    if args.child == "import":
        print(json.dumps(child_import(args.pycache)))
        return 0
    if args.child == "cache":
        print(json.dumps(child_cache(args.dir, args.repeats)))
        return 0
    if args.child == "load-memory":
        quiet()
        print(json.dumps(child_load_memory(args.dir, args.warm, args.mode)))
        return 0
    if args.child == "release-memory":
        quiet()
        print(json.dumps(child_release_memory(args.dir, args.warm, args.mode)))
        return 0
    if args.child == "files-load":
        quiet()
        print(json.dumps(child_files_loads(json.loads(args.spec))))
        return 0

    quiet()
    cfg = QUICK if args.quick else FULL
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    destination = json_path("cpu.json", args.json, args.save)
    machine = machine_info()
    log(f"machine: {machine_line(machine)}")
    started = time.perf_counter()
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qwen-edit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tiny: Tiny | None = None

        def need_tiny() -> Tiny:
            nonlocal tiny
            if tiny is None:
                tiny = Tiny(tmp)
            return tiny

        steps = [
            ("1", "import cost", lambda: fig_import(cfg, tmp)),
            ("3", "loader cache", lambda: fig_cache(cfg, need_tiny())),
            ("2", "node overhead", lambda: fig_overhead(cfg, need_tiny())),
            ("4", "image conversion", lambda: fig_conversion(cfg)),
            ("5", "load memory", lambda: fig_load_memory(cfg, tmp, need_tiny())),
            ("6", "quantized sizes", lambda: fig_quantized(cfg, tmp, need_tiny())),
            ("8", "ComfyUI files vs the diffusers folder", lambda: fig_files(cfg, tmp, need_tiny())),
            ("9", "batch rows per minute, 1 vs 2 local workers", lambda: fig_batch_workers(cfg, tmp, need_tiny())),
            ("10", "masked edit of a 6000x4000 photo", lambda: fig_masked(cfg, need_tiny())),
            ("11", "host RSS before load, loaded, after release", lambda: fig_release_memory(cfg, tmp, need_tiny())),
        ]
        for fid, title, fn in steps:
            if fid not in wanted:
                continue
            log(f"figure {fid}: {title}...")
            t0 = time.perf_counter()
            try:
                figures.append(fn())
            except Exception as exc:  # noqa: BLE001 - one broken figure must not hide the others
                log(f"figure {fid} failed: {type(exc).__name__}: {exc}")
                figures.append(figure(fid, title, None, "", "", False, f"error: {type(exc).__name__}: {exc}"))
            log(f"figure {fid}: done in {time.perf_counter() - t0:.1f} s")
        pack_module("loaders.pipeline").release_pipeline() if PACK_NAME in sys.modules else None
    figures.sort(key=lambda f: f["id"])
    payload = {"kind": "cpu", "quick": args.quick, "machine": machine,
               "command": "python benchmarks/run.py" + (" --quick" if args.quick else "")
               + (f" --only {args.only}" if wanted != set(ALL_FIGURES) else "") + (" --save" if args.save else ""),
               "seconds": round(time.perf_counter() - started, 1), "figures": figures}
    for f in figures:
        f["measured"] = {"date": machine["date"], "commit": machine.get("commit"), "command": payload["command"],
                         "machine": machine_line(machine)}
    kept = _merge_saved(payload, destination) if args.save and args.json is None and wanted != set(ALL_FIGURES) else []
    print(f"Machine: {machine_line(machine)}")
    print(figures_table(figures))
    for f in figures:
        print(f"  {f['id']}. {f['notes']}")
    for f in figures:
        if f["id"] == "8" and f["details"].get("rows"):
            print("\nFigure 8: ComfyUI single files beside the diffusers folder of the same model")
            print(files_table(f["details"]["rows"]))
    write_json(destination, payload)
    print(f"JSON: {destination}" + (f" (figures {', '.join(kept)} kept from its previous run)" if kept else ""))
    return 0


def _merge_saved(payload: dict[str, Any], destination: Path) -> list[str]:
    """`--save --only ...`: the figures not run this time stay in the saved file, each with its own `measured`."""
    try:
        old = json.loads(destination.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    ran = {f["id"] for f in payload["figures"]}
    kept = [f for f in old.get("figures", []) if f["id"] not in ran]
    for f in kept:
        f.setdefault("measured", {"date": old["machine"].get("date"), "commit": old["machine"].get("commit"),
                                  "command": old.get("command"), "machine": machine_line(old["machine"])})
    payload["figures"] = sorted(payload["figures"] + kept, key=lambda f: f["id"])
    return [f["id"] for f in kept]


if __name__ == "__main__":
    sys.exit(main())
