"""Shared helpers for the benchmark scripts: importing the pack, machine facts, timing, the table.

Only the standard library is imported at module level, so a child process that measures import
cost or memory starts clean. Everything heavy (torch, diffusers...) is imported inside functions.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from cli import OFFLINE_ENV, PACK_NAME, load_pack  # noqa: E402, F401 - the pack is imported the one way ComfyUI does; run.py takes PACK_NAME from here

BENCH_DIR = REPO_ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
#: Where a run writes its JSON unless told to save it: outside the working tree, so a run leaves git clean.
LOCAL_RESULTS_DIR = Path(tempfile.gettempdir()) / "qwen-image-edit-benchmarks"

#: Modules the pack must not pull in at import time (ComfyUI start-up stays fast).
HEAVY_MODULES = ("diffusers", "transformers", "accelerate", "bitsandbytes", "peft", "huggingface_hub")

_OFFLINE_ENV = {**OFFLINE_ENV, "TOKENIZERS_PARALLELISM": "false"}


def setup() -> None:
    """Offline mode for the Hugging Face libraries (never download) and the repo root on sys.path."""
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # `tinykit.tiny_pipeline`, `benchmarks.*`


def pack_module(relative: str) -> types.ModuleType:
    """A sub-module of the pack, e.g. ``pack_module("loaders.pipeline")``."""
    pack = load_pack()
    return importlib.import_module(f"{pack.__name__}.{relative}")


# -- machine -----------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(gpu: bool = False) -> dict[str, Any]:
    """What produced the figures: CPU, cores, RAM, library versions, date (and the GPU if asked)."""
    flags = _cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    ram = _ram_bytes()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": usable,
        "avx512_bf16": "avx512_bf16" in flags,
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "bitsandbytes": _version("bitsandbytes"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            info["commit"] = commit.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if gpu:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
        else:
            info["gpu"] = None
    return info


def machine_line(info: dict[str, Any]) -> str:
    parts = [f"{info['cpu']}, {info['cores']} cores", f"{info.get('ram_gb')} GB RAM"]
    if info.get("gpu"):
        parts.insert(0, f"{info['gpu']} ({info.get('gpu_memory_gb')} GB)")
    parts.append(f"torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}, "
                 f"bitsandbytes {info['bitsandbytes']}")
    parts.append(info["date"])
    return "; ".join(parts)


# -- measuring ---------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def current_rss() -> int:
    """Resident memory of this process now, in bytes (Linux /proc; psutil elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # pragma: no cover - non-Linux

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSS:
    """Peak resident memory inside a ``with`` block, in bytes (``.peak()`` may be read inside it too).

    Linux: the kernel's high-water mark (VmHWM) is reset on entry by writing 5 to
    /proc/self/clear_refs, so earlier peaks (imports) do not count. Elsewhere a thread samples the
    RSS every millisecond (a shorter spike can be missed).
    """

    def __init__(self) -> None:
        self._thread: Any = None
        self._max = 0
        self._stop = False
        self.method = ""

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
            return self
        except OSError:
            pass
        import threading

        self.method = "sampled"
        self._max = current_rss()

        def sample() -> None:
            while not self._stop:
                self._max = max(self._max, current_rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def peak(self) -> int:
        if self.method == "VmHWM":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return max(self._max, current_rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join()


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(f"*{suffix}"))


def run_child(script: Path, args: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``python script args`` in a fresh interpreter; it prints one JSON object on its last line."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- figures, table, JSON ----------------------------------------------------------------------------


def figure(fid: str, name: str, value: Any, unit: str, target: str, met: bool | None, notes: str = "",
           **details: Any) -> dict[str, Any]:
    """One figure: ``met`` is None where the target could not be checked on this machine."""
    return {"id": fid, "name": name, "value": value, "unit": unit, "target": target, "met": met,
            "notes": notes, "details": details}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def status(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def figures_table(figures: list[dict[str, Any]]) -> str:
    rows = [[f["id"], f["name"], f"{_fmt(f['value'])} {f['unit']}".strip(), f["target"], status(f["met"])]
            for f in figures]
    return table(rows, ["#", "figure", "value", "target", "status"])


def json_path(name: str, explicit: Path | None, save: bool) -> Path:
    """--json PATH if given; --save: benchmarks/results/<name> (tracked: what the README quotes); else an
    untracked copy under the temporary folder, so that running a benchmark leaves the working tree clean."""
    if explicit is not None:
        return Path(explicit)
    return (RESULTS_DIR if save else LOCAL_RESULTS_DIR) / name


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def log(message: str) -> None:
    """Progress on stderr, flushed at once (stdout carries the table)."""
    print(message, file=sys.stderr, flush=True)


def quiet() -> None:
    """No download/loading progress bars or info logs from the Hugging Face libraries in the output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
