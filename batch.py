"""`python cli.py batch`: thousands of edits from a manifest, resumable, on one machine or a Ray cluster.

    python cli.py batch --manifest edits.csv --output out/ --model Qwen/Qwen-Image-Edit-2511
    python cli.py batch --input-dir photos/ --prompt "Remove the background" --output out/ --gpus all
    python cli.py batch --manifest /shared/edits.jsonl --output /shared/out --ray --ray-address auto

An application beside the pack, like cli.py: the pack (nodes/, loaders/, utils/) never imports this file
or Ray. Every row runs through the sampler node exactly as `edit` does, on the pack's one cached pipeline,
held by each worker (a process per GPU locally, an actor per GPU under Ray) and loaded once per worker.

Safety: each output is written to a temporary file and renamed into place, so an output either exists
whole or not at all; its PNG text carries a hash of the row's settings, and a re-run skips a row only when
every output exists with the current hash (a changed prompt, seed or setting runs it again). A bad row
(missing image, bad size, empty prompt) is recorded as failed with its message and the rest go on.

Only the standard library is imported here at start; torch, PIL and Ray load when a batch runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import json
import os
import queue
import re
import signal
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
#: Columns a manifest row may have. `image` (alias `image1`) is Picture 1; the rest are optional.
COLUMNS = ("image", "image2", "image3", "prompt", "negative_prompt", "seed", "mask", "output")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: Suffix of an output being written; never left behind (removed on failure and swept at start and end).
PARTIAL_SUFFIX = ".qwen-edit-partial"
#: PNG text key holding the row's settings (JSON) beside ComfyUI's "prompt" (the API workflow).
PARAMETERS_KEY = "parameters"
RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".qwen-edit-batch.lock"
#: Test hook, harmless when unset: the first worker to reach the point between writing an output's
#: temporary file and renaming it creates this marker file and dies (os._exit), exactly once per marker.
#: The tests use it to kill a Ray actor mid-row and check that Ray's retry still writes every row once.
CRASH_ONCE_ENV = "QWEN_EDIT_BATCH_TEST_CRASH_ONCE"
RAY_INSTALL = 'pip install "ray[data]"'


class BatchError(Exception):
    """A row that cannot run; recorded as failed with this message while the others go on."""


# --------------------------------------------------------------------------------------------------
# Command-line options (registered by cli.py)
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, not {value}")
    return value


def _gpus(text: str) -> int | str:
    return "all" if text == "all" else _positive_int(text)


#: `scheme://...` (s3://, gs://, file://, ...): an object-store or file-system URI, not a local path. A
#: Windows drive (C:/) has a one-letter scheme and does not match.
URI_PATTERN = re.compile(r"[A-Za-z][\w+.-]+:/")


def is_uri(text: str) -> bool:
    return bool(URI_PATTERN.match(text))


def _location(text: str) -> Path | str:
    """--output: a local folder (Path) or a URI, kept as given (Path would fold s3://b to s3:/b)."""
    return text if is_uri(text) else Path(text)


def _cli() -> types.ModuleType:
    """cli.py, imported by name (also in worker processes and Ray actors, where REPO is on the path)."""
    import cli

    return cli


def add_arguments(parser: argparse.ArgumentParser, pack: types.ModuleType) -> None:
    """The `batch` subcommand's options: input, output, workers, Ray; the model and edit settings of `edit`."""
    cli = _cli()
    source = parser.add_argument_group("input (one of)")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--manifest", type=Path, metavar="PATH",
                       help="a CSV (with a header) or JSONL file, one edit per row; columns: image (Picture 1), "
                            "image2, image3, prompt, negative_prompt, seed, mask, output. Relative paths are read "
                            "from the manifest's folder; empty cells take the options below")
    which.add_argument("--input-dir", type=Path, metavar="DIR",
                       help="edit every image in DIR (not sub-folders) with --prompt; outputs keep the file names")
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", required=True, type=_location, metavar="DIR|URI",
                     help="folder for the PNGs (one per row; several per row are numbered), or a URI pyarrow.fs "
                          "reads (s3://bucket/out, gs://bucket/out; needs pyarrow, which ray[data] brings). With "
                          "--ray, a path every node sees (a shared or mounted file system) or such a URI")
    out.add_argument("--results", type=Path, metavar="PATH",
                     help=f"the results file, one JSON line per row and run (default: OUTPUT/{RESULTS_NAME}; "
                          "a local file, required when --output is a URI)")
    out.add_argument("--overwrite", action="store_true",
                     help="run every row again, even those already done with the same settings")
    run = parser.add_argument_group("workers")
    run.add_argument("--gpus", type=_gpus, metavar="N|all",
                     help="one worker per GPU, each holding its own pipeline: N GPUs or all (locally: this machine's; "
                          "with --ray: one actor per GPU in the cluster)")
    run.add_argument("--workers", type=_positive_int, metavar="N",
                     help="N workers on the CPU (or on the one device --device names); with --ray, N CPU actors. "
                          "Default 1; each holds its own pipeline, so memory grows with N")
    run.add_argument("--ray", action="store_true",
                     help=f"run the rows through Ray Data (needs {RAY_INSTALL}); without --ray-address a local Ray "
                          "instance is started (or RAY_ADDRESS is used)")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="the Ray cluster to join, e.g. 'auto' on a cluster node or HOST:6379 (implies --ray)")
    cli.add_model_options(parser, pack)
    sampler_node = pack.NODE_CLASS_MAPPINGS[cli.SAMPLER_NODE]
    sample = parser.add_argument_group("edit (the sampler node's settings; prompt, negative prompt and seed are the "
                                       "defaults for rows that leave them empty)")
    cli.add_node_options(sample, sampler_node, overrides={"prompt": {"default": None}})


# --------------------------------------------------------------------------------------------------
# Rows: the manifest read, checked and hashed on the driver
# --------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What every worker needs besides its rows (JSON-able: it travels to processes and Ray actors)."""

    loader_node: str
    loader: dict[str, Any]
    output_dir: str
    crash_marker: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


@dataclass
class Plan:
    tasks: list[dict[str, Any]] = field(default_factory=list)  # rows to run
    records: list[dict[str, Any]] = field(default_factory=list)  # rows settled on the driver (failed, skipped)
    total: int = 0


def _cell(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        return value if value else None
    return value


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV (header row) or JSONL manifest, as dicts with the known columns (absent ones None).

    A row that cannot be read (bad JSON) becomes {"_error": message}; a missing or unreadable manifest
    raises `BatchError`.
    """
    if not path.is_file():
        raise BatchError(f"manifest not found: {path}")
    rows: list[dict[str, Any]] = []
    unknown: set[str] = set()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchError(f"cannot read the manifest {path}: {exc}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if not isinstance(item, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                rows.append({"_error": f"line {number} of {path.name} is not a JSON object: {exc}"})
                continue
            images = item.pop("images", None)
            if isinstance(images, list):
                for key, value in zip(("image", "image2", "image3"), images):
                    item.setdefault(key, value)
            rows.append(item)
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise BatchError(f"the manifest {path} is empty: it needs a header row ({', '.join(COLUMNS)})")
        rows = [dict(row) for row in reader]
    if not rows:
        raise BatchError(f"the manifest {path} has no rows")
    if not any(key in row for row in rows for key in ("image", "image1", "_error")):
        raise BatchError(f"the manifest {path} has no 'image' column (Picture 1); columns: {', '.join(COLUMNS)}")
    out = []
    for row in rows:
        if "_error" in row:
            out.append(row)
            continue
        if "image1" in row and not row.get("image"):
            row["image"] = row.pop("image1")
        unknown.update(str(k) for k in row if k is not None and k not in COLUMNS and k != "image1")
        out.append({key: _cell(row.get(key)) for key in COLUMNS})
    if unknown:
        print(f"note: ignoring manifest columns {', '.join(sorted(unknown))} (known: {', '.join(COLUMNS)})",
              file=sys.stderr)
    return out


def folder_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per image file in `folder` (sorted by name); outputs keep the names, as .png."""
    if not folder.is_dir():
        raise BatchError(f"--input-dir: no such folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BatchError(f"--input-dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [{**dict.fromkeys(COLUMNS), "image": str(p), "output": p.stem + ".png"} for p in files]


def row_hash(settings: dict[str, Any]) -> str:
    """A short stable hash of everything that decides a row's output (loader, sampler, inputs, output name)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resolve(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _output_name(value: str | None, number: int, image: str | None) -> str:
    if value is None:
        stem = Path(image).stem if image else "row"
        return f"{number:05d}_{stem}.png"
    path = Path(value)
    if path.is_absolute() or ".." in path.parts:
        raise BatchError(f"output {value!r} must be a name inside the output folder (no absolute path, no '..')")
    if path.suffix.lower() != ".png":
        if path.suffix:
            raise BatchError(f"output {value!r}: outputs are PNG files (name it {path.stem}.png)")
        path = path.with_suffix(".png")
    return path.as_posix()


def plan_rows(cli: types.ModuleType, pack: types.ModuleType, rows: list[dict[str, Any]], base: Path, job: Job,
              defaults: dict[str, Any], overwrite: bool,
              hash_of: Callable[[str], str | None] | None = None) -> Plan:
    """Check every row, give it its sampler settings, output name and hash, and set done rows aside.

    `hash_of(name)` gives the row hash stored in the output `name` (default: read from the local folder).
    """
    output_dir = Path(job.output_dir)
    if hash_of is None:
        def hash_of(name: str) -> str | None:
            return stored_hash(output_dir / name)
    plan = Plan(total=len(rows))
    claimed: dict[str, int] = {}
    for number, raw in enumerate(rows, start=1):
        record = {"row": number, "status": "failed", "outputs": [], "seconds": None, "error": None, "hash": None}
        try:
            if "_error" in raw:
                raise BatchError(raw["_error"])
            images = [_resolve(base, str(raw[k])) for k in ("image", "image2", "image3") if raw.get(k) is not None]
            if not images:
                raise BatchError("no image: the 'image' column (Picture 1) is empty")
            if raw.get("image") is None:
                raise BatchError("image2/image3 given without 'image' (Picture 1)")
            seed = raw.get("seed")
            if seed is None:
                seed = defaults["seed"]
            try:
                seed = int(str(seed))
            except ValueError:
                raise BatchError(f"seed {seed!r} is not a whole number") from None
            if not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
                raise BatchError(f"seed {seed} is out of range (0 to 2^64-1)")
            prompt = raw.get("prompt") if raw.get("prompt") is not None else defaults.get("prompt")
            negative = raw.get("negative_prompt") if raw.get("negative_prompt") is not None \
                else defaults["negative_prompt"]
            sampler = {**defaults, "prompt": "" if prompt is None else str(prompt), "negative_prompt": str(negative),
                       "seed": seed}
            if not sampler["prompt"].strip():
                raise BatchError("the prompt is empty: give the row a prompt (or --prompt for rows without one)")
            mask = _resolve(base, str(raw["mask"])) if raw.get("mask") is not None else None
            for kind, path in [*(("image", p) for p in images), ("mask", mask)]:
                if path is not None and not Path(path).is_file():  # refused here: no model load for it
                    raise BatchError(f"{kind} not found: {path}")
            output = _output_name(raw.get("output"), number, raw.get("image"))
            record["outputs"] = [output]
            if output in claimed:
                raise BatchError(f"output {output} is also row {claimed[output]}'s: give each row its own output name")
            claimed[output] = number
            settings = {"loader_node": job.loader_node, "loader": job.loader, "sampler": sampler, "images": images,
                        "mask": mask, "output": output}
            digest = row_hash(settings)
            outputs = [p.as_posix() for p in cli.output_paths(Path(output), int(sampler["images_per_prompt"]))]
            record.update(hash=digest, outputs=outputs)
        except BatchError as exc:
            record["error"] = str(exc)
            plan.records.append(record)
            continue
        if not overwrite and all(hash_of(o) == digest for o in outputs):
            plan.records.append({**record, "status": "skipped"})
            continue
        names = {"image": Path(images[0]).name}
        for key, value in zip(("image2", "image3"), images[1:]):
            names[key] = Path(value).name
        parameters = {**settings, "row": number, "row_hash": digest}
        workflow = cli.api_prompt(job.loader, sampler, names, job.loader_node)
        plan.tasks.append({"row": number, "images": images, "mask": mask, "sampler": sampler, "output": output,
                           "outputs": outputs, "hash": digest,
                           "text": {"prompt": json.dumps(workflow), PARAMETERS_KEY: json.dumps(parameters)}})
    return plan


def stored_hash(path: Path | Any) -> str | None:
    """The row hash in an output PNG's text, or None (no file, not ours, unreadable). Reads no pixels.

    `path` is a local path, or an open binary file (the start of a remote PNG, in a BytesIO).
    """
    if isinstance(path, Path) and not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.info.get(PARAMETERS_KEY)
        return json.loads(text).get("row_hash") if text else None
    except Exception:  # noqa: BLE001 - a damaged or foreign file is simply not done
        return None


# --------------------------------------------------------------------------------------------------
# Outputs and the results file
# --------------------------------------------------------------------------------------------------


def _crash_point(marker: str | None) -> None:
    """The CRASH_ONCE_ENV test hook (see there); does nothing unless a marker path is set."""
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(1)


def write_png(array: Any, path: Path, text: dict[str, str], crash_marker: str | None = None) -> None:
    """Write a uint8 `[H, W, 3]` array as PNG with `text` chunks, atomically: a temporary file in the same
    folder, flushed to disk, then renamed over `path`. Readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(_png_bytes(array, text))
            handle.flush()
            os.fsync(handle.fileno())
        _crash_point(crash_marker)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _png_bytes(array: Any, text: dict[str, str]) -> bytes:
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class RemoteOutput:
    """An output folder given as a URI (s3://, gs://, file://, ...), read and written through `pyarrow.fs`.

    The same steps as a local folder, with these differences (object stores have no rename and no append):

    * write: the PNG goes to a temporary key beside its output (PARTIAL_SUFFIX), then `fs.move` puts it in
      place. On S3 and GCS a move is a server-side copy + delete: the final key still only ever holds a
      whole PNG (a copy lands at once), and a worker killed in between leaves only a temporary key, swept
      at start and end as locally. One code path for every file system, so file:// tests cover it; the
      cost is one copy and one delete request per output.
    * resume: the row hash is read from the first 256 KiB of each output (PNG text comes before the
      pixels), not the whole file.
    * no lock: an object store has no reliable lock file, so two batches on one URI are not refused.
    * the results JSONL stays a local file (`--results`): an object cannot be appended to.
    """

    HEAD_BYTES = 1 << 18

    def __init__(self, uri: str) -> None:
        try:
            import pyarrow.fs
        except ImportError:
            raise BatchError(f"--output {uri}: a URI output is written through pyarrow.fs, which is not installed: "
                             f"{RAY_INSTALL} (or pip install pyarrow)") from None
        self.uri = uri
        self.pafs = pyarrow.fs
        try:
            self.fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        except Exception as exc:  # noqa: BLE001 - unknown scheme, no credentials, no network: one line
            raise BatchError(f"--output {uri}: {_one_line(exc)}") from None
        self.base = path.rstrip("/")
        self.local = self.fs.type_name == "local"

    def key(self, name: str) -> str:
        return f"{self.base}/{name}"

    def check(self) -> None:
        """Create the folder (a no-op on object stores) and list it once: fails early, in one line."""
        try:
            self.fs.create_dir(self.base, recursive=True)
            self.fs.get_file_info(self.pafs.FileSelector(self.base, recursive=False, allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise BatchError(f"--output {self.uri}: cannot write there: {_one_line(exc)}") from None

    def stored_hash(self, name: str) -> str | None:
        import io

        try:
            with self.fs.open_input_file(self.key(name)) as handle:
                head = handle.read(self.HEAD_BYTES)
                digest = stored_hash(io.BytesIO(head))
                if digest is None and len(head) == self.HEAD_BYTES:  # text after the pixels: read it all
                    digest = stored_hash(io.BytesIO(head + handle.read()))
            return digest
        except (OSError, ValueError):  # not there (FileNotFoundError), unreadable: not done
            return None

    def write_png(self, array: Any, name: str, text: dict[str, str], crash_marker: str | None = None) -> None:
        data = _png_bytes(array, text)
        final = self.key(name)
        folder, _, leaf = final.rpartition("/")
        temporary = f"{folder}/.{leaf}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
        if self.local:  # a local file system needs the folder; object stores have none (no marker objects)
            self.fs.create_dir(folder, recursive=True)
        try:
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            _crash_point(crash_marker)
            self.fs.move(temporary, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.delete_file(temporary)
            raise

    def sweep_partials(self) -> int:
        count = 0
        try:
            infos = self.fs.get_file_info(self.pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
        except OSError:
            return 0
        for info in infos:
            if info.type == self.pafs.FileType.File and info.base_name.endswith(PARTIAL_SUFFIX):
                with contextlib.suppress(OSError):
                    self.fs.delete_file(info.path)
                    count += 1
        return count


def sweep_partials(folder: Path) -> int:
    """Remove temporary files left by a worker that was killed mid-write. Returns how many."""
    count = 0
    if folder.is_dir():
        for path in folder.rglob(f"*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()
                count += 1
    return count


class Results:
    """The results JSONL: one line per row and run, appended and fsynced as each row settles."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        record.setdefault("worker", None)  # rows settled on the driver (refused, skipped) have no worker
        record.setdefault("time", round(time.time(), 3))
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """One batch per output folder at a time (an advisory lock; where fcntl is missing, none)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BatchError(f"another batch is writing to {folder}; wait for it or choose another --output") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# The worker: one cached pipeline, rows through the sampler node
# --------------------------------------------------------------------------------------------------


class Worker:
    """Holds the pack's one cached pipeline (loaded in __init__) and runs rows through the sampler node."""

    def __init__(self, cli: types.ModuleType, job: Job, name: str = "local") -> None:
        self.cli = cli
        self.job = job
        self.name = name
        self.pack = cli.load_pack()
        self.errors = cli.submodule(self.pack, "utils.errors")
        self.bridge = cli.submodule(self.pack, "utils.comfy")
        for library in ("transformers", "diffusers"):  # one row bar, not a loading bar per worker
            with contextlib.suppress(Exception):
                importlib.import_module(f"{library}.utils.logging").disable_progress_bar()
        self.remote = RemoteOutput(job.output_dir) if is_uri(job.output_dir) else None
        self.handle, _ = cli._load(self.pack, dict(job.loader), job.loader_node)

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        """Edit one row and write its outputs; a bad row gives a failed record, Cancelled propagates."""
        cli = self.cli
        start = time.perf_counter()
        record = {"row": task["row"], "status": "done", "outputs": task["outputs"], "seconds": None, "error": None,
                  "hash": task["hash"], "worker": self.name}
        try:
            images = {name: cli.load_image(Path(p)) for name, p in zip(("image", "image2", "image3"), task["images"])}
            kwargs: dict[str, Any] = {"pipe": self.handle, **images, **task["sampler"]}
            if task.get("mask"):
                kwargs["mask"] = cli.load_mask(Path(task["mask"]))
            result = cli.run_sampler(self.pack, kwargs)
            output_dir = Path(self.job.output_dir)
            for image, name in zip(result, task["outputs"]):
                array = cli.image_array(image)
                if self.remote is not None:
                    self.remote.write_png(array, name, task["text"], self.job.crash_marker)
                else:
                    write_png(array, output_dir / name, task["text"], self.job.crash_marker)
        except self.bridge.Cancelled:
            raise
        except (BatchError, cli.CliError, self.errors.QwenEditError) as exc:
            record.update(status="failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop thousands; the message is kept
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["time"] = round(time.time(), 3)
        if record["status"] == "failed":
            record["outputs"] = []
        return record


# --------------------------------------------------------------------------------------------------
# Local: in this process, or one spawned process per GPU / worker
# --------------------------------------------------------------------------------------------------


class StopRequested:
    """First Ctrl-C: stop after the current step (the row is left for the next run). Second: at once."""

    def __init__(self, on_stop: Callable[[], None]) -> None:
        self.on_stop = on_stop
        self.stopping = False

    def __enter__(self) -> StopRequested:
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.stopping:
            raise KeyboardInterrupt
        self.stopping = True
        print("\nStopping after the current step; finished rows are kept (Ctrl-C again to stop at once)...",
              file=sys.stderr, flush=True)
        self.on_stop()

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run_in_process(cli: types.ModuleType, job: Job, tasks: list[dict[str, Any]],
                   on_result: Callable[[dict[str, Any]], None], on_ready: Callable[[], None] = lambda: None) -> bool:
    """Run every task here, on this process's cached pipeline. Returns False when stopped by Ctrl-C."""
    worker = Worker(cli, job)
    on_ready()
    bridge = worker.bridge
    bridge.clear_cancel()
    with StopRequested(bridge.request_cancel) as stop:
        try:
            for task in tasks:
                if stop.stopping:
                    return False
                on_result(worker.run(task))
        except bridge.Cancelled:
            return False
        finally:
            bridge.clear_cancel()
    return not stop.stopping


def _worker_process(index: int, job_json: str, env: dict[str, str], threads: int | None, tasks: Any, results: Any,
                    stop: Any) -> None:
    """A local worker process: its own pipeline, rows from `tasks` until a None, records to `results`."""
    os.environ.update(env)
    stopping = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if worker is not None:
            worker.bridge.request_cancel()

    worker: Worker | None = None
    signal.signal(signal.SIGINT, on_sigint)
    try:
        cli = _cli()
        if threads:
            import torch

            torch.set_num_threads(threads)
        cli._setup_logging()
        worker = Worker(cli, Job.from_json(job_json), name=f"local-{index}")
    except BaseException as exc:  # noqa: BLE001 - the driver shows it in one line and stops
        results.put(("fatal", index, str(exc) or type(exc).__name__))
        return
    results.put(("ready", index, None))
    while not (stopping or stop.is_set()):
        task = tasks.get()
        if task is None:
            break
        results.put(("start", index, task["row"]))
        try:
            record = worker.run(task)
        except worker.bridge.Cancelled:
            break
        results.put(("result", index, record))
    results.put(("exit", index, None))


def run_local_workers(cli: types.ModuleType, job: Job, tasks: list[dict[str, Any]], count: int,
                      devices: list[str] | None, on_result: Callable[[dict[str, Any]], None],
                      on_ready: Callable[[], None] = lambda: None) -> bool:
    """`count` spawned processes, each with its own pipeline (on GPU i when `devices` lists them).

    A worker that dies (out of memory, killed) fails the row it held; the others go on. Returns False when
    stopped by Ctrl-C.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    task_queue, result_queue, stop = context.Queue(), context.Queue(), context.Event()
    for task in tasks:
        task_queue.put(task)
    for _ in range(count):
        task_queue.put(None)
    task_queue.cancel_join_thread()  # rows left in the queue after a Ctrl-C must not hold up the exit
    threads = None if devices else max(1, (os.cpu_count() or 1) // count)
    processes = []
    for index in range(count):
        env = dict(cli.OFFLINE_ENV)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[index]
        process = context.Process(target=_worker_process, name=f"qwen-edit-worker-{index}", daemon=True,
                                  args=(index, job.to_json(), env, threads, task_queue, result_queue, stop))
        process.start()
        processes.append(process)

    holding: dict[int, int] = {}
    finished: set[int] = set()
    fatal: str | None = None

    def forward_stop() -> None:
        stop.set()
        for p in processes:
            if p.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGINT)

    with StopRequested(forward_stop) as stopper:
        try:
            while len(finished) < count:
                try:
                    kind, index, payload = result_queue.get(timeout=0.5)
                except queue.Empty:
                    for index, process in enumerate(processes):
                        if index not in finished and not process.is_alive():
                            finished.add(index)
                            row = holding.pop(index, None)
                            if row is not None:
                                on_result({"row": row, "status": "failed", "outputs": [], "seconds": None,
                                           "error": f"worker {index} died (exit code {process.exitcode}) while "
                                                    "editing this row; run the same command again to retry it",
                                           "hash": None, "worker": f"local-{index}"})
                    continue
                if kind == "ready":
                    on_ready()
                elif kind == "start":
                    holding[index] = payload
                elif kind == "result":
                    holding.pop(index, None)
                    on_result(payload)
                elif kind == "fatal":
                    fatal = fatal or payload
                    finished.add(index)
                    stop.set()
                elif kind == "exit":
                    finished.add(index)
        except KeyboardInterrupt:
            for process in processes:
                process.terminate()
            raise
        finally:
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.terminate()
    if fatal is not None:
        raise BatchError(fatal)
    return not stopper.stopping


def cuda_devices(gpus: int | str) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each local GPU worker."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise BatchError("--gpus: no CUDA GPU found on this machine; use --workers N to run N workers on the CPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(available)]
    ids = ids[:available]
    count = len(ids) if gpus == "all" else int(gpus)
    if count > len(ids):
        raise BatchError(f"--gpus {gpus}: this machine has {len(ids)} GPU(s) visible")
    return ids[:count]


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------


class EditActor:
    """A Ray Data actor: loads the pipeline once in __init__, then edits its rows (batch_size=1).

    Rows arrive as JSON strings (column "task") and leave as result records (column "result"). Ray
    restarts an actor that dies and retries its row; the atomic write makes a retried row idempotent.
    """

    def __init__(self, job_json: str) -> None:
        cli = _cli()
        job = Job.from_json(job_json)
        cli._setup_logging()
        self.worker = Worker(cli, job, name=f"ray-{os.getpid()}")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        records = [json.dumps(self.worker.run(json.loads(str(text)))) for text in batch["task"]]
        return {"result": np.array(records, dtype=object)}


def _cause(exc: BaseException) -> str:
    """The innermost error Ray wrapped (an actor's LoadError, say), as one line: `LoadError: message`.

    Ray puts the actor's traceback text in the message of the error it raises (ActorDiedError,
    RayTaskError) and may chain message-less wrappers to it, so the deepest non-empty text wins.
    """
    found, seen = type(exc).__name__, set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines = [line.strip() for line in str(current).splitlines() if line.strip()]
        if lines:
            found = lines[-1]
        inner = getattr(current, "cause", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=\w+: )", "", found)  # pkg.module.LoadError: -> LoadError:


def ray_env(job: Job) -> dict[str, str]:
    """Environment of every actor: offline Hugging Face libraries, and this folder importable (as `cli`)."""
    cli = _cli()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**cli.OFFLINE_ENV, "PYTHONPATH": path}
    if job.crash_marker:
        env[CRASH_ONCE_ENV] = job.crash_marker
    return env


def run_ray(cli: types.ModuleType, job: Job, tasks: list[dict[str, Any]], address: str | None,
            gpus: int | str | None, workers: int | None, on_result: Callable[[dict[str, Any]], None]) -> bool:
    """Run the tasks through `ray.data ... map_batches(EditActor)`, one actor per GPU (or CPU worker)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchError(f"--ray needs Ray Data, which is not installed: {RAY_INSTALL}") from None
    env = ray_env(job)
    started = False
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        started = True
    try:
        resources = ray.cluster_resources()
        if gpus is not None:
            cluster_gpus = int(resources.get("GPU", 0))
            if cluster_gpus == 0:
                raise BatchError("--gpus: the Ray cluster has no GPUs; use --workers N for N CPU actors")
            actors = cluster_gpus if gpus == "all" else int(gpus)
            placement: dict[str, Any] = {"num_gpus": 1}
        else:
            actors = workers or 1
            placement = {"num_cpus": 1}
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        dataset = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        dataset = dataset.map_batches(
            EditActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs={"job_json": job.to_json()},
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(tasks))), runtime_env={"env_vars": env},
            **placement,
        )
        for row in dataset.iter_rows():
            on_result(json.loads(str(row["result"])))
    except BatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's error; show its one-line cause
        raise BatchError(f"the Ray run stopped: {_cause(exc)}") from None
    finally:
        if started:
            ray.shutdown()
    return True


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


class Progress:
    """Rows done / total, rows per minute and ETA on stderr (tqdm)."""

    def __init__(self, total: int, done_before: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="Batch", unit="row", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]")
        self.start = time.perf_counter()
        self.count = 0
        if done_before:
            self.bar.set_postfix_str(f"{done_before} done before", refresh=False)

    def ready(self) -> None:
        """The first worker has its pipeline: rows per minute count from here (loading is not editing)."""
        if not self.count:
            self.start = time.perf_counter()

    def update(self) -> None:
        self.count += 1
        minutes = (time.perf_counter() - self.start) / 60
        if minutes > 0.05:
            self.bar.set_postfix_str(f"{self.count / minutes:.1f} rows/min", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run(pack: types.ModuleType, args: argparse.Namespace) -> int:
    """The `batch` command. Exit code 0 when every row is done, 1 when some failed, 130 when stopped.

    A problem with the command as a whole (no manifest, no GPU, no Ray) raises `BatchError`; the pack's
    own errors (a model that cannot load) propagate as they are.
    """
    cli = _cli()
    try:
        return _run(cli, pack, args)
    except cli.CliError as exc:
        raise BatchError(str(exc)) from None


def _run(cli: types.ModuleType, pack: types.ModuleType, args: argparse.Namespace) -> int:
    sampler_node = pack.NODE_CLASS_MAPPINGS[cli.SAMPLER_NODE]
    loader, loader_node = cli.loader_settings(pack, args)
    defaults = {name: getattr(args, name) for name in cli.node_defaults(sampler_node)}
    for option, value in (("--manifest", args.manifest), ("--input-dir", args.input_dir)):
        if value is not None and is_uri(str(value)):  # s3://b (Path keeps s3:/b)
            raise BatchError(f"{option} {value}: inputs are not read from URIs; mount the bucket (e.g. s3fs, "
                             "gcsfuse) and give its path, the same on every node (--output may be a URI)")
    remote: RemoteOutput | None = None
    output_dir: Path | None = None  # a local output folder; None for a URI
    if isinstance(args.output, str):  # a URI (see _location)
        if args.results is None:
            raise BatchError(f"--output {args.output} is a URI: give --results PATH, a local file for the results "
                             "(an object store cannot append to one)")
        remote = RemoteOutput(args.output)
        remote.check()
    else:
        output_dir = args.output.expanduser().resolve()
    use_ray = bool(args.ray or args.ray_address)
    if args.gpus is not None and args.workers is not None:
        raise BatchError("give --gpus (one worker per GPU) or --workers (CPU workers), not both")
    if args.gpus is not None and loader.get("device") not in ("auto", "cuda"):
        raise BatchError(f"--gpus gives each worker one GPU as its device; leave --device on auto, not {args.device}")
    job = Job(loader_node, loader, str(output_dir) if remote is None else remote.uri,
              os.environ.get(CRASH_ONCE_ENV) or None)
    if args.manifest is not None:
        manifest = args.manifest.expanduser().resolve()
        rows, base = read_manifest(manifest), manifest.parent
    else:
        if not defaults.get("prompt"):
            raise BatchError("--input-dir needs --prompt (the edit applied to every image)")
        rows, base = folder_rows(args.input_dir.expanduser().resolve()), Path.cwd()

    results_path = args.results.expanduser().resolve() if args.results else output_dir / RESULTS_NAME
    if remote is not None:
        print(f"note: {remote.uri} is not locked (an object store has no reliable lock): run one batch at a time "
              "on it", file=sys.stderr)

    def sweep() -> None:
        if output_dir is None:
            remote.sweep_partials()
        else:
            sweep_partials(output_dir)

    with contextlib.nullcontext() if output_dir is None else output_lock(output_dir):
        sweep()
        plan = plan_rows(cli, pack, rows, base, job, defaults, args.overwrite,
                         remote.stored_hash if remote is not None else None)
        results = Results(results_path)
        counts = {"done": 0, "failed": 0, "skipped": 0}
        try:
            for record in plan.records:
                counts[record["status"]] += 1
                results.write(record)
            skipped = counts["skipped"]
            print(f"{plan.total} rows: {skipped} already done, {counts['failed']} refused, {len(plan.tasks)} to run",
                  file=sys.stderr)
            finished = True
            if plan.tasks:
                progress = Progress(len(plan.tasks), skipped)

                def on_result(record: dict[str, Any]) -> None:
                    counts[record["status"]] += 1
                    results.write(record)
                    progress.update()

                started = time.perf_counter()
                try:
                    if use_ray:
                        finished = run_ray(cli, job, plan.tasks, args.ray_address, args.gpus, args.workers, on_result)
                    else:
                        devices = cuda_devices(args.gpus) if args.gpus is not None else None
                        count = len(devices) if devices else (args.workers or 1)
                        count = min(count, len(plan.tasks))
                        if count == 1 and not devices:
                            finished = run_in_process(cli, job, plan.tasks, on_result, progress.ready)
                        else:
                            finished = run_local_workers(cli, job, plan.tasks, count, devices, on_result,
                                                         progress.ready)
                except KeyboardInterrupt:  # a second Ctrl-C, or the first one under Ray: finished rows stay
                    finished = False
                finally:
                    progress.close()
                    seconds = time.perf_counter() - started
                if progress.count:
                    print(f"{progress.count} rows in {seconds:.1f} s ({60 * progress.count / seconds:.1f} rows/min)",
                          file=sys.stderr)
        finally:
            results.close()
            sweep()
    print(f"done {counts['done']}, failed {counts['failed']}, already done {counts['skipped']}; results: {results_path}",
          file=sys.stderr)
    if not finished:
        left = plan.total - sum(counts.values())
        print(f"Stopped: {left} rows left. Run the same command again to resume.", file=sys.stderr)
        return 130
    return 1 if counts["failed"] else 0
