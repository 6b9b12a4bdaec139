"""The benchmark scripts run and write the JSON their README table comes from (no timing assertions).

`benchmarks/run.py --quick` (figures 1-6 and 8-11 with few repeats, ~1.5 min on 2 cores) and
`benchmarks/gpu.py --tiny` (figure 7's code path on the tiny config; GPU-only configs are skipped on
CPU) each run in a subprocess, as a user runs them. Only the presence and shape of the figures and
the deterministic facts (identical pixels, exact round trip, no heavy imports) are checked: wall
times on shared machines are not test material.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIGURE_KEYS = {"id", "name", "value", "unit", "target", "met", "notes", "details"}
MACHINE_KEYS = {"cpu", "cores", "ram_gb", "torch", "diffusers", "transformers", "bitsandbytes", "date"}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_cpu_benchmarks_quick(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    proc = _run("run.py", "--quick", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["kind"] == "cpu" and data["quick"] is True
    assert MACHINE_KEYS <= set(data["machine"])
    figures = {f["id"]: f for f in data["figures"]}
    assert sorted(figures, key=int) == ["1", "2", "3", "4", "5", "6", "8", "9", "10", "11"]
    for fid, fig in figures.items():
        assert FIGURE_KEYS <= set(fig), fid
        assert not fig["notes"].startswith("error"), fig["notes"]
        assert fig["met"] in (True, False, None)
        assert f"| {fid} " in proc.stdout  # the printed table has the same figures

    assert figures["1"]["details"]["heavy_modules"] == []
    assert figures["2"]["details"]["identical_pixels"] is True
    assert figures["2"]["details"]["identical_arguments"] is True
    assert figures["3"]["details"]["repeats"] > 0
    assert figures["4"]["details"]["exact_round_trip"] is True
    assert figures["9"]["details"]["max_pixel_difference"] <= 1  # 1 and 2 batch workers edit alike
    assert figures["10"]["details"]["untouched_outside"] is True  # the 24 MP photo outside the mask
    for side in ("pack", "no_trim"):  # figure 11: RSS before load, loaded, after release, in one run
        assert {"before", "loaded", "after"} <= set(figures["11"]["details"][side])
        assert figures["11"]["details"][side]["released"] is True
    for side in ("pack", "diffusers"):
        assert {"baseline", "peak", "after"} <= set(figures["5"]["details"][side])
    assert figures["5"]["details"]["disk_mb"] > 0
    six = figures["6"]["details"]
    if "representative" in six:  # bitsandbytes installed
        for q in ("nf4", "8bit"):
            assert 0 < six["representative"][q]["ratio"] < 1
            assert 0 < six["tiny"][q]["ratio"] < 1

    # Figure 8, quick: the diffusers folder and two file sets, each loaded through the loader in a process
    # of its own. Byte counts of the loaded weights are deterministic; times and RSS are only present.
    rows = {row["set"]: row for row in figures["8"]["details"]["rows"]}
    assert list(rows) == ["diffusers folder", "GGUF Q4_0", "scaled fp8 + fp8 text encoder"]
    for row in rows.values():
        assert row["load_s"] > 0 and row["peak_mb"] > 0 and row["disk_mb"] > 0, row
        assert set(row["loaded_mb"]) == {"transformer", "text_encoder", "vae"}
    folder, gguf, fp8 = rows["diffusers folder"], rows["GGUF Q4_0"], rows["scaled fp8 + fp8 text encoder"]
    assert folder["peak_ratio"] == folder["transformer_ratio"] == 1.0
    assert folder["transformer_bytes_per_param"] == 2.0  # bf16
    assert 0.45 < fp8["transformer_ratio"] < 0.55 and 0.45 < fp8["text_encoder_ratio"] < 0.55  # ~1 byte/param
    assert 0.25 < gguf["transformer_ratio"] < 0.32 and gguf["text_encoder_ratio"] == 1.0  # 4.5 bits/param
    assert gguf["transformer_weight"].startswith("GGUFParameter")
    assert figures["8"]["details"]["quantized_kept_smaller"] is True
    assert "Figure 8" in proc.stdout and "| GGUF Q4_0 " in proc.stdout


def test_results_stay_out_of_the_working_tree_unless_saved() -> None:
    """Issue 12: a plain run writes its JSON outside the repository; --save writes benchmarks/results/."""
    from benchmarks.common import RESULTS_DIR, json_path

    assert REPO not in json_path("cpu.json", None, save=False).resolve().parents
    assert json_path("cpu.json", None, save=True) == RESULTS_DIR / "cpu.json"
    assert json_path("cpu.json", Path("x.json"), save=True) == Path("x.json")


def test_saving_some_figures_keeps_the_others(tmp_path: Path) -> None:
    """`run.py --only 8 --save` replaces figure 8 in the saved JSON; the rest stay, each saying when it was measured."""
    from benchmarks import run

    machine = {"cpu": "CPU", "cores": 2, "ram_gb": 8, "torch": "t", "diffusers": "d", "transformers": "tr",
               "bitsandbytes": "b", "date": "2026-11-27 03:55 UTC", "commit": "8cf9408"}
    saved = tmp_path / "cpu.json"
    saved.write_text(json.dumps({"command": "python benchmarks/run.py", "machine": machine,
                                 "figures": [{"id": "1", "value": 26.2}, {"id": "8", "value": 9.9}]}))
    payload = {"figures": [{"id": "8", "value": 1.3, "measured": {"date": "now"}}]}
    assert run._merge_saved(payload, saved) == ["1"]
    assert [(f["id"], f["value"]) for f in payload["figures"]] == [("1", 26.2), ("8", 1.3)]
    assert payload["figures"][0]["measured"]["date"] == machine["date"]
    assert payload["figures"][0]["measured"]["commit"] == "8cf9408"
    assert run._merge_saved({"figures": []}, tmp_path / "missing.json") == []


@pytest.mark.slow
def test_gpu_benchmark_tiny_code_path(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "gpu-tiny.json"
    proc = _run("gpu.py", "--tiny", "--json", str(out), "--steps", "3", "--warmup", "1")
    data = json.loads(out.read_text())
    assert data["kind"] == "gpu-tiny" and MACHINE_KEYS <= set(data["machine"])
    assert data["figure"]["id"] == "7"
    runs = {(r["config"], r["side"]): r for r in data["runs"]}
    assert set(runs) == {(c, s) for c in ("bf16", "nf4", "model-offload", "group-offload")
                         for s in ("pack", "diffusers")}
    must_run = ["bf16", "group-offload"] + (["nf4", "model-offload"] if torch.cuda.is_available() else [])
    for config in must_run:
        for side in ("pack", "diffusers"):
            run = runs[(config, side)]
            assert "error" not in run, run
            assert {"load_s", "s_per_step", "s_per_image", "transformer_gb"} <= set(run)
    if not torch.cuda.is_available():
        assert runs[("nf4", "pack")]["skipped"] == "needs CUDA"
    summary = {row["config"]: row for row in data["summary"]}
    assert summary["bf16"]["identical_pixels"] is True or torch.cuda.is_available()
    assert "time_ratio" in summary["bf16"]
    assert "bf16" in proc.stdout and "group-offload" in proc.stdout
