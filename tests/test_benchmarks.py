"""The benchmark scripts run and write the JSON their README table comes from (no timing assertions).

`benchmarks/run.py --quick` (figures 1-6 with few repeats, ~1 min on 2 cores) and
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
    assert sorted(figures) == ["1", "2", "3", "4", "5", "6"]
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
    for side in ("pack", "diffusers"):
        assert {"baseline", "peak", "after"} <= set(figures["5"]["details"][side])
    assert figures["5"]["details"]["disk_mb"] > 0
    six = figures["6"]["details"]
    if "representative" in six:  # bitsandbytes installed
        for q in ("nf4", "8bit"):
            assert 0 < six["representative"][q]["ratio"] < 1
            assert 0 < six["tiny"][q]["ratio"] < 1


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
