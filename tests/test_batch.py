"""`python cli.py batch`: many edits from a manifest, resumable, locally and through Ray Data.

Every edit runs on the tiny random model, float32 on the CPU, 2 steps at 32x32 (size_mode custom), so
a row takes about a second on 2 cores. The Ray tests start a local Ray instance (2 CPUs, no dashboard,
the node on 127.0.0.1) and are skipped where Ray is not installed. Nothing reaches the network.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import batch
import cli

REPO = Path(__file__).resolve().parent.parent
SETTINGS = ["--precision", "float32", "--steps", "2", "--size-mode", "custom", "--width", "32", "--height", "32"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def run_batch(pack, capsys):
    """`cli.main(["batch", ...])` in-process; leaves logging and the pipeline cache as they were."""
    logger = logging.getLogger("qwen_image_edit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    loader = importlib.import_module(f"{pack.__name__}.loaders.pipeline")

    def run(*argv: object) -> tuple[int, str]:
        code = cli.main(["batch", *map(str, argv)])
        return code, capsys.readouterr().err

    yield run
    logger.handlers[:], logger.level, logger.propagate = saved
    loader.release_pipeline()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Input images: p0..p5 (40x24 and 24x40), a 4x4 one (too small), and a non-image."""
    from tinykit.tiny_pipeline import make_test_image

    folder = tmp_path_factory.mktemp("batch-inputs")
    for i in range(6):
        make_test_image(40 if i % 2 == 0 else 24, 24 if i % 2 == 0 else 40, seed=i).save(folder / f"p{i}.png")
    make_test_image(4, 4, seed=9).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


GOOD = [  # image, image2, prompt, negative_prompt, seed, output
    ("p0.png", "", "Make the sky purple", "", "1", "sky.png"),
    ("p1.png", "", "Make it night", "blurry", "2", ""),
    ("p2.png", "p3.png", "Put Picture 2 into Picture 1", "", "3", "both.png"),
    ("p3.png", "", "Make it red", "", "", "red.png"),
    ("p4.png", "", "Make it snow", "", "5", "sub/snow.png"),
    ("p5.png", "", "Make it green", "", "6", "green"),
]
BAD = {  # output name -> (row, the message its record must carry)
    "missing.png": (("nope.png", "", "Make it blue", "", "7", "missing.png"), "image not found"),
    "empty.png": (("p0.png", "", "   ", "", "8", "empty.png"), "prompt is empty"),
    "small.png": (("small.png", "", "Make it blue", "", "9", "small.png"), "at least 8 px"),
    "seed.png": (("p1.png", "", "Make it blue", "", "abc", "seed.png"), "not a whole number"),
    "escape.png": (("p1.png", "", "Make it blue", "", "1", "../escape.png"), "inside the output folder"),
    "broken.png": (("broken.png", "", "Make it blue", "", "1", "broken.png"), "cannot read"),
}


def write_manifest(path: Path, images: Path, rows: list[tuple[str, ...]]) -> Path:
    """A CSV manifest; relative image paths are resolved from its folder, so give them absolute."""
    lines = ["image,image2,prompt,negative_prompt,seed,output"]
    for image, image2, prompt, negative, seed, output in rows:
        cells = [str(images / image), str(images / image2) if image2 else "", prompt, negative, seed, output]
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def records(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the in-process reference with a worker's thread count: torch's CPU kernels sum in another order
    with another number of threads (+-1 in a pixel now and then), so equal pixels need equal threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(batch.PARTIAL_SUFFIX)]


# -- fast: parsing, hashing, writing ---------------------------------------------------------------


def test_manifest_csv_and_jsonl_read_alike(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("image1,prompt,seed,caption\na.png, Make it red ,3,x\nb.png,,,\n")
    (tmp_path / "m.jsonl").write_text(
        '{"images": ["a.png"], "prompt": "Make it red", "seed": 3}\n\n{"image": "b.png"}\nnot json\n')
    csv_rows, jsonl_rows = batch.read_manifest(tmp_path / "m.csv"), batch.read_manifest(tmp_path / "m.jsonl")
    assert csv_rows[0] == {**dict.fromkeys(batch.COLUMNS), "image": "a.png", "prompt": "Make it red", "seed": "3"}
    assert jsonl_rows[0] == {**csv_rows[0], "seed": 3}
    assert csv_rows[1] == jsonl_rows[1] == {**dict.fromkeys(batch.COLUMNS), "image": "b.png"}
    assert "line 4" in jsonl_rows[2]["_error"]
    assert "ignoring manifest columns caption" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("picture,prompt\na.png,x\n")
    with pytest.raises(batch.BatchError, match="no 'image' column"):
        batch.read_manifest(tmp_path / "bad.csv")
    with pytest.raises(batch.BatchError, match="manifest not found"):
        batch.read_manifest(tmp_path / "none.csv")


def test_row_hash_follows_every_setting():
    base = {"loader": {"model": "m", "precision": "bfloat16"}, "sampler": {"prompt": "a", "seed": 1, "steps": 40},
            "images": ["x.png"], "mask": None, "output": "o.png"}
    digest = batch.row_hash(base)
    assert digest == batch.row_hash(json.loads(json.dumps(base)))  # order and copies do not matter
    changed = [{**base, "sampler": {**base["sampler"], "seed": 2}}, {**base, "sampler": {**base["sampler"], "prompt": "b"}},
               {**base, "loader": {**base["loader"], "precision": "float32"}}, {**base, "images": ["y.png"]},
               {**base, "mask": "m.png"}, {**base, "output": "p.png"}]
    assert len({digest, *map(batch.row_hash, changed)}) == 1 + len(changed)


def test_outputs_are_written_atomically_with_their_text(tmp_path):
    array = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    batch.write_png(array, tmp_path / "a" / "out.png", {"parameters": json.dumps({"row_hash": "abc"})})
    assert np.array_equal(pixels(tmp_path / "a" / "out.png"), array)
    assert batch.stored_hash(tmp_path / "a" / "out.png") == "abc"
    assert os.listdir(tmp_path / "a") == ["out.png"]

    # A failure while writing (here: the array cannot be encoded) leaves neither the output nor a temp file.
    with pytest.raises(Exception):
        batch.write_png(np.zeros((2, 2, 7), np.uint8), tmp_path / "a" / "bad.png", {})
    assert os.listdir(tmp_path / "a") == ["out.png"]

    # What a killed worker leaves is swept; foreign files are not done.
    (tmp_path / "a" / f".x.png.1234{batch.PARTIAL_SUFFIX}").write_bytes(b"half")
    assert batch.sweep_partials(tmp_path) == 1 and partials(tmp_path) == []
    Image.new("RGB", (2, 2)).save(tmp_path / "foreign.png")
    assert batch.stored_hash(tmp_path / "foreign.png") is None
    assert batch.stored_hash(tmp_path / "none.png") is None


def test_the_pack_never_imports_batch_or_ray():
    """ComfyUI imports the pack; Ray and this application must never come with it."""
    offenders = []
    for path in [REPO / "__init__.py", *(p for d in ("nodes", "loaders", "utils") for p in (REPO / d).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("ray", "batch", "cli")]
    assert offenders == []


def test_batch_help_answers_without_torch():
    code = ("import runpy, sys\nsys.argv = ['cli.py', 'batch', '--help']\n"
            "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch', 'ray', 'PIL'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    assert "--manifest" in done.stdout and "--ray-address" in done.stdout and "--gpus" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_command_problems_are_one_line(run_batch, tiny_2511_dir, images, tmp_path, monkeypatch):
    code, err = run_batch("--manifest", tmp_path / "none.csv", "-o", tmp_path / "out", "--model", tiny_2511_dir)
    assert code == 2 and err.strip() == f"error: manifest not found: {tmp_path / 'none.csv'}"
    code, err = run_batch("--input-dir", images, "-o", tmp_path / "out", "--model", tiny_2511_dir)
    assert code == 2 and "--input-dir needs --prompt" in err
    code, err = run_batch("--input-dir", images, "--prompt", "x", "-o", tmp_path / "out", "--workers", "2",
                          "--gpus", "1")
    assert code == 2 and "not both" in err

    code, err = run_batch("--input-dir", images, "--prompt", "x", "-o", "s3://bucket/out")
    assert code == 2 and "give --results PATH" in err and "Traceback" not in err
    code, err = run_batch("--input-dir", images, "--prompt", "x", "-o", "nope://bucket/out", "--results",
                          tmp_path / "r.jsonl")
    assert code == 2 and err.strip().startswith("error: --output nope://bucket/out: ") and len(err.splitlines()) == 1
    code, err = run_batch("--manifest", "s3://bucket/m.csv", "-o", tmp_path / "out")
    assert code == 2 and "mount the bucket" in err

    # Without Ray installed: one actionable line, nothing loaded, no traceback.
    monkeypatch.setitem(sys.modules, "ray", None)
    manifest = write_manifest(tmp_path / "m.csv", images, GOOD[:1])
    code, err = run_batch("--manifest", manifest, "-o", tmp_path / "out", "--model", tiny_2511_dir, "--ray")
    assert code == 2 and 'pip install "ray[data]"' in err and "Traceback" not in err


def test_a_uri_output_writes_checks_and_sweeps_through_pyarrow_fs(tmp_path):
    """file:// goes through pyarrow's FileSystem.from_uri like s3:// and gs://; only the class differs."""
    pytest.importorskip("pyarrow.fs", reason="a URI output needs pyarrow (it comes with ray[data])")
    store = batch.RemoteOutput(f"file://{tmp_path}/out")
    store.check()
    assert (tmp_path / "out").is_dir()
    array = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    store.write_png(array, "sub/a.png", {"parameters": json.dumps({"row_hash": "abc"}), "prompt": "x" * 300_000})
    assert np.array_equal(pixels(tmp_path / "out" / "sub" / "a.png"), array)
    assert os.listdir(tmp_path / "out" / "sub") == ["a.png"]
    assert store.stored_hash("sub/a.png") == "abc", "a text past the first 256 KiB is read too"
    store.write_png(array, "b.png", {"parameters": json.dumps({"row_hash": "def"})})
    assert store.stored_hash("b.png") == "def" and store.stored_hash("none.png") is None
    Image.new("RGB", (2, 2)).save(tmp_path / "out" / "foreign.png")
    assert store.stored_hash("foreign.png") is None

    with pytest.raises(Exception):  # cannot be encoded: no output, no temporary key
        store.write_png(np.zeros((2, 2, 7), np.uint8), "bad.png", {})
    assert partials(tmp_path / "out") == [] and not (tmp_path / "out" / "bad.png").exists()
    (tmp_path / "out" / "sub" / f".x.png.1234{batch.PARTIAL_SUFFIX}").write_bytes(b"half")
    assert store.sweep_partials() == 1 and partials(tmp_path / "out") == []


@pytest.mark.slow
def test_s3_without_credentials_or_network_is_one_line(images, tmp_path):
    """A real `python cli.py batch -o s3://...`: the endpoint is a closed port on 127.0.0.1 and every AWS
    credential source that could reach the network (instance metadata) is off, so nothing leaves the machine."""
    pytest.importorskip("pyarrow.fs", reason="a URI output needs pyarrow (it comes with ray[data])")
    env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    uri = "s3://bucket/out?region=us-east-1&scheme=http&endpoint_override=127.0.0.1:9"
    done = subprocess.run([sys.executable, str(REPO / "cli.py"), "batch", "--input-dir", str(images), "--prompt", "x",
                           "-o", uri, "--results", str(tmp_path / "r.jsonl")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: --output {uri}: cannot write there: ") and "127.0.0.1:9" in done.stderr
    assert not (tmp_path / "r.jsonl").exists()


# -- local ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_uri_output_runs_and_resumes(run_batch, tiny_2511_dir, images, tmp_path, load_counter):
    pytest.importorskip("pyarrow.fs", reason="a URI output needs pyarrow (it comes with ray[data])")
    manifest = write_manifest(tmp_path / "m.csv", images, [*GOOD[:3], BAD["small.png"][0]])
    out, results = tmp_path / "out", tmp_path / "results.jsonl"
    argv = ["--manifest", manifest, "-o", f"file://{out}", "--results", results, "--model", tiny_2511_dir, *SETTINGS]
    code, err = run_batch(*argv)
    assert code == 1 and "not locked" in err, err
    first = records(results)
    assert collections.Counter(r["status"] for r in first) == {"done": 3, "failed": 1}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["00002_p1.png", "both.png",
                                                                                  "sky.png"]
    assert not (out / batch.RESULTS_NAME).exists() and not (out / batch.LOCK_NAME).exists() and partials(out) == []
    assert json.loads(Image.open(out / "sky.png").info["parameters"])["row_hash"] == \
        next(r["hash"] for r in first if r["outputs"] == ["sky.png"])

    load_counter.clear()
    code, err = run_batch(*argv)
    assert code == 1 and "3 already done" in err, err
    assert collections.Counter(r["status"] for r in records(results)[len(first):]) == {"skipped": 3, "failed": 1}
    assert load_counter == [], "the hashes were read back from the URI: nothing to run, nothing loaded"


@pytest.mark.slow
def test_manifest_good_and_bad_rows_then_resume(run_batch, pack, tiny_2511_dir, images, tmp_path, load_counter):
    rows = [*GOOD, *(row for row, _ in BAD.values())]
    manifest = write_manifest(tmp_path / "m.csv", images, rows)
    out = tmp_path / "out"
    code, err = run_batch("--manifest", manifest, "-o", out, "--model", tiny_2511_dir, *SETTINGS)
    assert code == 1, err  # some rows failed
    assert "rows/min" in err and f"done {len(GOOD)}, failed {len(BAD)}" in err
    by_row = {r["row"]: r for r in records(out / "results.jsonl")}
    assert sorted(by_row) == list(range(1, len(rows) + 1)), "every row has exactly one record"
    expected = ["sky.png", "00002_p1.png", "both.png", "red.png", "sub/snow.png", "green.png"]
    for number, name in enumerate(expected, start=1):
        record = by_row[number]
        assert record["status"] == "done" and record["outputs"] == [name] and record["error"] is None, record
        assert record["seconds"] > 0 and pixels(out / name).shape == (32, 32, 3)
    for number, (name, (_, message)) in enumerate(BAD.items(), start=len(GOOD) + 1):
        assert by_row[number]["status"] == "failed" and message in by_row[number]["error"], by_row[number]
        assert not (out / name).exists()
    assert not (tmp_path / "escape.png").exists() and partials(out) == []
    assert len(load_counter) == 1, "the pipeline is loaded once for the whole batch"

    # One row is exactly what `edit` (the sampler node) gives, and its PNG carries its settings.
    loader_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]
    sampler_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]
    (handle,) = loader_node().load(**{**cli.node_defaults(loader_node), "model": str(tiny_2511_dir),
                                      "precision": "float32"})
    settings = {**cli.node_defaults(sampler_node), "prompt": "Make it night", "negative_prompt": "blurry", "seed": 2,
                "steps": 2, "size_mode": "custom", "width": 32, "height": 32}
    (expected_image,) = sampler_node().edit(handle, cli.load_image(images / "p1.png"), **settings)
    assert np.array_equal(pixels(out / "00002_p1.png"),
                          np.clip(255.0 * expected_image[0].numpy(), 0, 255).astype(np.uint8))
    text = Image.open(out / "00002_p1.png").info
    parameters = json.loads(text["parameters"])
    assert {k: parameters["sampler"][k] for k in settings} == settings
    assert parameters["loader"]["precision"] == "float32" and parameters["row_hash"] == by_row[2]["hash"]
    workflow = json.loads(text["prompt"])
    assert sorted(n["class_type"] for n in workflow.values()) == [
        "LoadImage", "QwenImageEditLoader", "QwenImageEditSampler", "SaveImage"]
    assert by_row[4]["hash"] and json.loads(Image.open(out / "red.png").info["parameters"])["sampler"]["seed"] == 0

    # Again: done rows are skipped (the failed ones are tried again), and nothing is written twice.
    before = {name: (out / name).stat().st_mtime_ns for name in expected}
    seen = len(records(out / "results.jsonl"))
    code, err = run_batch("--manifest", manifest, "-o", out, "--model", tiny_2511_dir, *SETTINGS)
    assert code == 1 and f"{len(GOOD)} already done" in err
    assert {name: (out / name).stat().st_mtime_ns for name in expected} == before
    again = records(out / "results.jsonl")[seen:]
    assert collections.Counter(r["status"] for r in again) == {"skipped": len(GOOD), "failed": len(BAD)}

    # With only done rows nothing is even loaded; a changed prompt runs exactly the row it changes.
    write_manifest(manifest, images, GOOD)
    load_counter.clear()
    code, err = run_batch("--manifest", manifest, "-o", out, "--model", tiny_2511_dir, *SETTINGS)
    assert code == 0 and load_counter == [], err
    rows = [("p0.png", "", "Make the sky orange", "", "1", "sky.png"), *GOOD[1:]]
    write_manifest(manifest, images, rows)
    seen = len(records(out / "results.jsonl"))
    code, err = run_batch("--manifest", manifest, "-o", out, "--model", tiny_2511_dir, *SETTINGS)
    assert code == 0, err
    changed = [(r["row"], r["status"]) for r in records(out / "results.jsonl")[seen:] if r["status"] != "skipped"]
    assert changed == [(1, "done")]
    assert json.loads(Image.open(out / "sky.png").info["parameters"])["sampler"]["prompt"] == "Make the sky orange"



@pytest.mark.slow
def test_folder_and_one_prompt(run_batch, tiny_2511_dir, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("p0.png", "p1.png"):
        (folder / name).write_bytes((images / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    code, err = run_batch("--input-dir", folder, "--prompt", "Make it red", "-o", tmp_path / "out",
                          "--model", tiny_2511_dir, "--images-per-prompt", "2", *SETTINGS)
    assert code == 0, err
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").glob("*.png"))
    assert names == ["p0_1.png", "p0_2.png", "p1_1.png", "p1_2.png"]
    assert [r["outputs"] for r in records(tmp_path / "out" / "results.jsonl")] == [names[:2], names[2:]]


@pytest.mark.slow
def test_a_mask_row_edits_only_inside_the_mask(pack, run_batch, tiny_2511_dir, images, tmp_path):
    if "mask" not in pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"].INPUT_TYPES().get("optional", {}):
        pytest.skip("the sampler node has no 'mask' input yet (it is being added); the batch passes mask= then")
    mask = np.zeros((24, 40), np.uint8)
    mask[:, :12] = 255  # edit the left part only
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(images / "p0.png"), "prompt": "Make it red",
                                                  "mask": "mask.png", "output": "masked.png"}) + "\n")
    code, err = run_batch("--manifest", tmp_path / "m.jsonl", "-o", tmp_path / "out", "--model", tiny_2511_dir,
                          "--feather", "0", *SETTINGS)
    assert code == 0, err
    result, source = pixels(tmp_path / "out" / "masked.png").astype(int), pixels(images / "p0.png").astype(int)
    assert result.shape == source.shape, "a masked edit keeps the image's size"
    assert np.abs(result[:, 20:] - source[:, 20:]).max() <= 1, "pixels outside the mask changed"
    assert np.abs(result[:, :12] - source[:, :12]).max() > 1, "nothing was edited inside the mask"
    assert json.loads(Image.open(tmp_path / "out" / "masked.png").info["parameters"])["mask"] == str(tmp_path / "mask.png")


@pytest.mark.slow
def test_ctrl_c_then_resume_gives_every_output_once(run_batch, tiny_2511_dir, images, tmp_path):
    """A real Ctrl-C (SIGINT) to `python cli.py batch`, then the same command again."""
    rows = [(f"p{i % 6}.png", "", f"Make it colour {i}", "", str(i), f"o{i}.png") for i in range(8)]
    manifest = write_manifest(tmp_path / "m.csv", images, rows)
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "cli.py"), "batch", "--manifest", str(manifest), "-o", str(out),
            "--model", str(tiny_2511_dir), *SETTINGS, "--steps", "6"]
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("o*.png")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the batch ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Run the same command again to resume" in err and "Traceback" not in err
    first = records(out / "results.jsonl")
    assert 1 <= len(first) < len(rows) and all(r["status"] == "done" for r in first)
    assert partials(out) == []

    code, err = run_batch(*argv[3:])
    assert code == 0, err
    second = records(out / "results.jsonl")[len(first):]
    done = collections.Counter(r["row"] for r in first + second if r["status"] == "done")
    assert done == {n: 1 for n in range(1, len(rows) + 1)}, "each row is edited exactly once over both runs"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"o{i}.png" for i in range(8))


@pytest.mark.slow
def test_two_local_workers_give_the_same_pixels(run_batch, tiny_2511_dir, images, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", images, [*GOOD[:4], BAD["small.png"][0]])
    with torch_threads(max(1, (os.cpu_count() or 1) // 2)):  # what each of 2 workers uses
        code, err = run_batch("--manifest", manifest, "-o", tmp_path / "one", "--model", tiny_2511_dir, *SETTINGS)
    assert code == 1, err
    code, err = run_batch("--manifest", manifest, "-o", tmp_path / "two", "--workers", "2", "--model",
                          tiny_2511_dir, *SETTINGS)
    assert code == 1, err
    one, two = records(tmp_path / "one" / "results.jsonl"), records(tmp_path / "two" / "results.jsonl")
    assert {r["worker"] for r in two if r["status"] == "done"} == {"local-0", "local-1"}, "both workers edited"
    key = lambda r: (r["row"], r["status"], r["outputs"], r["hash"])  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two))
    for record in one:
        for name in record["outputs"]:
            assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)), name


# -- Ray ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance: 2 CPUs, no dashboard, on 127.0.0.1, in a short private temp folder."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'ray[data]'")
    temp = tempfile.mkdtemp(prefix="qray-")  # short: Ray's unix socket paths must stay under 108 bytes
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


RAY_ROWS = [*GOOD[:4], BAD["small.png"][0], BAD["missing.png"][0]]


@pytest.mark.slow
def test_ray_gives_the_same_pixels_as_the_local_run(local_ray, run_batch, tiny_2511_dir, images, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", images, RAY_ROWS)
    with torch_threads(1):  # a Ray actor with num_cpus=1 runs torch on one thread (OMP_NUM_THREADS=1)
        code, err = run_batch("--manifest", manifest, "-o", tmp_path / "local", "--model", tiny_2511_dir, *SETTINGS)
    assert code == 1, err
    code, err = run_batch("--manifest", manifest, "-o", tmp_path / "ray", "--ray", "--workers", "2",
                          "--model", tiny_2511_dir, *SETTINGS)
    assert code == 1, err
    local, ray = records(tmp_path / "local" / "results.jsonl"), records(tmp_path / "ray" / "results.jsonl")
    key = lambda r: (r["row"], r["status"], r["outputs"], r["hash"])  # noqa: E731
    assert sorted(map(key, local)) == sorted(map(key, ray))
    assert len({r["worker"] for r in ray if r["status"] == "done"}) == 2, "two actors edited"
    for record in local:
        for name in record["outputs"]:
            assert np.array_equal(pixels(tmp_path / "local" / name), pixels(tmp_path / "ray" / name)), name


@pytest.mark.slow
def test_a_ray_actor_killed_mid_row_still_gives_every_row_once(local_ray, run_batch, tiny_2511_dir, images,
                                                               tmp_path, monkeypatch):
    """The first actor to reach a row's rename dies (os._exit) with its temp file written; Ray restarts
    it and retries the row. Every row ends up done exactly once, with no half-written file left."""
    marker = tmp_path / "crashed"
    monkeypatch.setenv(batch.CRASH_ONCE_ENV, str(marker))
    manifest = write_manifest(tmp_path / "m.csv", images, GOOD)
    code, err = run_batch("--manifest", manifest, "-o", tmp_path / "out", "--ray", "--workers", "2",
                          "--model", tiny_2511_dir, *SETTINGS)
    assert code == 0, err
    assert marker.is_file(), "no actor was killed: the test hook never ran"
    results = records(tmp_path / "out" / "results.jsonl")
    assert collections.Counter(r["row"] for r in results) == {n: 1 for n in range(1, len(GOOD) + 1)}
    assert all(r["status"] == "done" for r in results)
    assert len(list((tmp_path / "out").rglob("*.png"))) == len(GOOD) and partials(tmp_path / "out") == []


@pytest.mark.slow
def test_ray_writes_to_a_uri_output_even_when_an_actor_dies(local_ray, run_batch, tiny_2511_dir, images, tmp_path,
                                                            monkeypatch):
    """Actors write through pyarrow.fs (file://, the code path of s3:// and gs://); one dies between the
    temporary key and the move, Ray retries its row, and every row lands once with no temporary key left."""
    pytest.importorskip("pyarrow.fs")
    marker = tmp_path / "crashed"
    monkeypatch.setenv(batch.CRASH_ONCE_ENV, str(marker))
    manifest = write_manifest(tmp_path / "m.csv", images, GOOD[:3])
    out = tmp_path / "out"
    code, err = run_batch("--manifest", manifest, "-o", f"file://{out}", "--results", tmp_path / "r.jsonl", "--ray",
                          "--workers", "2", "--model", tiny_2511_dir, *SETTINGS)
    assert code == 0, err
    assert marker.is_file(), "no actor was killed: the test hook never ran"
    results = records(tmp_path / "r.jsonl")
    assert collections.Counter(r["row"] for r in results) == {1: 1, 2: 1, 3: 1}
    assert all(r["status"] == "done" and r["worker"].startswith("ray-") for r in results)
    assert sorted(p.name for p in out.rglob("*.png")) == ["00002_p1.png", "both.png", "sky.png"]
    assert partials(out) == []
    for record in results:
        assert json.loads(Image.open(out / record["outputs"][0]).info["parameters"])["row_hash"] == record["hash"]


def test_ray_is_an_extra_never_a_requirement():
    """ComfyUI-Manager installs requirements.txt: Ray must not come with it; the `cluster` extra brings it."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {Requirement(r).name for r in project["dependencies"]}
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert "ray" not in names and not any(Requirement(line).name == "ray" for line in lines if line)
    assert [Requirement(r).name for r in project["optional-dependencies"]["cluster"]] == ["ray"]
    assert "data" in Requirement(project["optional-dependencies"]["cluster"][0]).extras


@pytest.mark.slow
def test_a_ray_load_failure_is_one_line(local_ray, run_batch, images, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", images, GOOD[:1])
    code, err = run_batch("--manifest", manifest, "-o", tmp_path / "out", "--ray", "--model", tmp_path / "no-model",
                          *SETTINGS)
    assert code == 2, err
    # Ray logs its own report of the actor's death; the command ends with one line naming the cause.
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: the Ray run stopped: LoadError: Model folder not found:") and "no-model" in last

