"""The command line: `python cli.py edit | doctor | selftest`, as the README shows them.

`edit` and `doctor` run in-process on the tiny random model (fast, and the result is compared with the
nodes' own); `selftest`, `doctor --json` and Ctrl-C run as real subprocesses from another directory,
exactly as a user types them. Nothing here reaches the network (conftest sets the Hugging Face
libraries offline, and subprocesses inherit that).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_comfy_files import exported  # noqa: F401 - the exported ComfyUI files fixture

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "cli.py"


@pytest.fixture(scope="module")
def cli() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("qwen_edit_cli_under_test", CLI)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_main(cli, pack, capsys):
    """Call cli.main(argv) in-process; leave logging as it was (main configures the pack's logger)."""
    logger = logging.getLogger("qwen_image_edit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    loader = importlib.import_module(f"{pack.__name__}.loaders.pipeline")

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    loader.release_pipeline()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from tinykit.tiny_pipeline import make_test_image

    folder = tmp_path_factory.mktemp("cli-inputs")
    first, second = folder / "scene.png", folder / "object.jpg"
    make_test_image(80, 48, seed=1).save(first)
    make_test_image(64, 64, seed=2).save(second, quality=95)
    return {"image": first, "image2": second}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


# -- options come from the nodes -------------------------------------------------------------------


def _node_inputs(node: type) -> dict:
    spec = node.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_every_node_setting_is_an_option_with_the_node_default(cli, pack):
    parser = cli.build_parser(pack)
    args = parser.parse_args(["edit", "--image", "a.png", "--output", "b.png", "--prompt", "x"])
    for node_name in ("QwenImageEditLoader", "QwenImageEditSampler"):
        for name, entry in _node_inputs(pack.NODE_CLASS_MAPPINGS[node_name]).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if kind in ("IMAGE",):
                assert hasattr(args, name), f"no --{name} option"
            elif isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                assert hasattr(args, name), f"{node_name}.{name} has no command-line option"
                if name != "prompt":
                    assert getattr(args, name) == options.get("default"), f"--{name} default differs from the node"


def test_defaults_follow_the_node_when_it_changes(cli, pack, monkeypatch):
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]
    spec = node.INPUT_TYPES()
    kind, options = spec["required"]["steps"]
    spec["required"]["steps"] = (kind, {**options, "default": 28})
    monkeypatch.setattr(node, "INPUT_TYPES", classmethod(lambda cls: spec))
    args = cli.build_parser(pack).parse_args(["edit", "--image", "a.png", "-o", "b.png", "--prompt", "x"])
    assert args.steps == 28


@pytest.mark.parametrize("bad", [
    ["--steps", "1"], ["--steps", "many"], ["--true-cfg-scale", "21"], ["--quantization", "int3"],
    ["--device", "tpu"], ["--size-mode", "stretch"],
])
def test_out_of_range_values_are_refused_like_the_node_would(cli, pack, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser(pack).parse_args(["edit", "--image", "a.png", "-o", "b.png", "--prompt", "x", *bad])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_device_takes_what_the_loader_takes(cli, pack):
    args = cli.build_parser(pack).parse_args(["edit", "--image", "a", "-o", "b", "--prompt", "x", "--device", "cuda:1"])
    assert args.device == "cuda:1"


def test_help_is_cheap():
    """Importing the CLI and building its options loads neither diffusers nor transformers."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(CLI)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "m.build_parser(m.load_pack()).format_help()\n"
        "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'diffusers', 'transformers', 'bitsandbytes', "
        "'accelerate', 'huggingface_hub'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- images in and out -----------------------------------------------------------------------------


def test_images_load_like_comfyui_loadimage(cli, tmp_path):
    """EXIF orientation applied, alpha dropped (not composited), /255: ComfyUI 0.8.0 LoadImage."""
    rgba = Image.new("RGBA", (6, 4), (200, 100, 50, 0))
    rgba.save(tmp_path / "a.png")
    image = cli.load_image(tmp_path / "a.png")
    assert tuple(image.shape) == (1, 4, 6, 3)
    assert np.allclose(image[0, 0, 0].numpy(), np.array([200, 100, 50]) / 255)

    rotated = Image.new("RGB", (6, 4), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(tmp_path / "r.jpg", exif=exif)
    assert tuple(cli.load_image(tmp_path / "r.jpg").shape) == (1, 6, 4, 3)

    with pytest.raises(cli.CliError, match="image not found"):
        cli.load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(cli.CliError, match="cannot read"):
        cli.load_image(tmp_path / "bad.png")


def test_masks_load_as_comfyui_masks(cli, tmp_path):
    """White = edit; an image with alpha: 1 - alpha, as ComfyUI's Load Image makes its MASK."""
    gray = np.zeros((4, 6), np.uint8)
    gray[:, :3] = 255
    Image.fromarray(gray).save(tmp_path / "gray.png")
    mask = cli.load_mask(tmp_path / "gray.png")
    assert tuple(mask.shape) == (1, 4, 6) and str(mask.dtype) == "torch.float32"
    assert mask[0, 0, 0] == 1 and mask[0, 0, 5] == 0

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :, 3] = 255
    rgba[:, :3, 3] = 0  # transparent = edit
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert np.array_equal(cli.load_mask(tmp_path / "alpha.png").numpy(), mask.numpy())
    with pytest.raises(cli.CliError, match="mask not found"):
        cli.load_mask(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(cli.CliError, match="cannot read the mask"):
        cli.load_mask(tmp_path / "bad.png")


def test_output_numbering(cli):
    assert cli.output_paths(Path("o/out.png"), 1) == [Path("o/out.png")]
    assert cli.output_paths(Path("out.png"), 2) == [Path("out_1.png"), Path("out_2.png")]
    assert cli.output_paths(Path("out.png"), 10)[0] == Path("out_01.png")


# -- edit ------------------------------------------------------------------------------------------


def _saveimage_uint8(images) -> np.ndarray:
    """ComfyUI 0.8.0 SaveImage's conversion."""
    return np.clip(255.0 * images.cpu().numpy(), 0, 255).astype(np.uint8)


def test_edit_gives_what_the_nodes_give(cli, pack, run_main, tiny_2511_dir, inputs, tmp_path):
    sampling = importlib.import_module(f"{pack.__name__}.loaders.edit")
    run_edit = sampling.run_edit
    out = tmp_path / "result" / "edited.png"
    code, stdout, stderr = run_main(
        "edit", "--image", inputs["image"], "--prompt", "Make the sky purple", "--output", out,
        "--model", tiny_2511_dir, "--steps", 2, "--size-mode", "match", "--seed", 7,
    )
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert "Editing" in stderr and "2/2" in stderr, "no progress bar"
    assert sampling.run_edit is run_edit, "the progress hook was left installed"
    saved = np.array(Image.open(out))
    assert saved.shape == (48, 80, 3)

    # The same edit through the nodes themselves, as a ComfyUI workflow runs them.
    loader_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]
    sampler_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]
    defaults = cli.node_defaults(loader_node)
    (handle,) = loader_node().load(**{**defaults, "model": cli.resolve_model(str(tiny_2511_dir))})
    settings = {**cli.node_defaults(sampler_node), "prompt": "Make the sky purple", "steps": 2,
                "size_mode": "match", "seed": 7}
    (expected,) = sampler_node().edit(handle, cli.load_image(inputs["image"]), **settings)
    assert np.array_equal(saved, _saveimage_uint8(expected)[0])

    # The PNG carries the API prompt of what ran: dropped on ComfyUI it opens these nodes and values.
    from tests.test_workflows import node_specs, validate_prompt

    prompt = json.loads(Image.open(out).text["prompt"])
    classes = sorted(node["class_type"] for node in prompt.values())
    assert classes == ["LoadImage", "QwenImageEditLoader", "QwenImageEditSampler", "SaveImage"]
    sampler = next(n for n in prompt.values() if n["class_type"] == "QwenImageEditSampler")["inputs"]
    assert {k: sampler[k] for k in settings} == settings
    specs = node_specs(pack)
    specs["LoadImage"].inputs["image"] = ("required", [inputs["image"].name], {"image_upload": True})
    model = next(n for n in prompt.values() if n["class_type"] == "QwenImageEditLoader")["inputs"]["model"]
    specs["QwenImageEditLoader"].inputs["model"] = ("required", [model], {})
    assert validate_prompt(prompt, specs) == []


@pytest.mark.slow
def test_edit_two_images_and_several_results(run_main, tiny_2511_dir, inputs, tmp_path):
    out = tmp_path / "two.png"
    code, stdout, stderr = run_main(
        "edit", "--image", inputs["image"], "--image2", inputs["image2"], "--output", out,
        "--prompt", "Put the object from Picture 2 into Picture 1", "--model", tiny_2511_dir, "--steps", 2,
        "--size-mode", "custom", "--width", 64, "--height", 32, "--images-per-prompt", 2,
    )
    assert code == 0, stderr
    paths = [Path(line) for line in stdout.split()]
    assert paths == [tmp_path / "two_1.png", tmp_path / "two_2.png"] and not out.exists()
    first, second = (np.array(Image.open(p)) for p in paths)
    assert first.shape == second.shape == (32, 64, 3)
    assert not np.array_equal(first, second), "the two variations are identical"


@pytest.mark.slow
def test_edit_with_a_mask_changes_only_the_masked_pixels(run_main, tiny_2511_dir, inputs, tmp_path, load_counter):
    source = np.array(Image.open(inputs["image"]).convert("RGB"))  # 80x48
    mask = np.zeros(source.shape[:2], np.uint8)
    mask[8:40, 10:40] = 255  # edit a box on the left; grow 0, so everything else must stay as it was
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "masked.png"
    code, stdout, stderr = run_main(
        "edit", "--image", inputs["image"], "--mask", tmp_path / "mask.png", "--prompt", "Make it red",
        "--output", out, "--model", tiny_2511_dir, "--steps", 2, "--size-mode", "custom", "--width", 32,
        "--height", 32, "--grow", 0, "--feather", 0)
    assert code == 0, stderr
    result = np.array(Image.open(out))
    assert result.shape == source.shape, "a masked edit keeps the image's size"
    outside = mask == 0
    assert np.array_equal(result[outside], source[outside]), "pixels outside the mask changed"
    assert (result[~outside] != source[~outside]).any(), "nothing was edited inside the mask"

    # A mask of another shape is refused before any model load, in one line.
    Image.fromarray(np.zeros((10, 40), np.uint8) + 255).save(tmp_path / "wide.png")
    load_counter.clear()
    code, stdout, stderr = run_main("edit", "--image", inputs["image"], "--mask", tmp_path / "wide.png",
                                    "--prompt", "x", "--output", tmp_path / "no.png", "--model", tiny_2511_dir)
    assert code == 1 and "mask is 40x10" in stderr and "Traceback" not in stderr, stderr
    assert load_counter == [] and not (tmp_path / "no.png").exists()
    code, stdout, stderr = run_main("edit", "--image", inputs["image"], "--mask", tmp_path / "none.png",
                                    "--prompt", "x", "--output", tmp_path / "no.png", "--model", tiny_2511_dir)
    assert code == 2 and "mask not found" in stderr


def test_bad_request_fails_before_any_load(run_main, tiny_2511_dir, inputs, tmp_path, load_counter):
    code, _, stderr = run_main("edit", "--image", inputs["image"], "--prompt", "   ", "--output", tmp_path / "o.png",
                               "--model", tiny_2511_dir)
    assert code == 1 and "prompt is empty" in stderr
    assert load_counter == [], "the model was loaded for a request that could never run"
    assert not (tmp_path / "o.png").exists()


def test_missing_inputs_say_what_to_do(run_main, inputs, tmp_path):
    code, _, stderr = run_main("edit", "--image", tmp_path / "nope.png", "--prompt", "x",
                               "--output", tmp_path / "o.png")
    assert code == 2 and "image not found" in stderr

    code, _, stderr = run_main("edit", "--image", inputs["image"], "--prompt", "x", "--output", tmp_path / "o.png",
                               "--model", "Qwen/Qwen-Image-Edit-2511")
    assert code == 1
    assert "hf download Qwen/Qwen-Image-Edit-2511" in stderr, stderr


def test_model_name_finds_the_comfyui_models_folder(cli, monkeypatch, tmp_path):
    """Inside ComfyUI/custom_nodes, a folder name or the hub id finds ComfyUI/models/diffusers/<name>."""
    comfy = tmp_path / "ComfyUI"
    pack_dir = comfy / "custom_nodes" / "qwen-image-edit-diffusers"
    model = comfy / "models" / "diffusers" / "Qwen-Image-Edit-2511"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    monkeypatch.setattr(cli, "REPO", pack_dir)
    assert cli.resolve_model("Qwen-Image-Edit-2511") == str(model)
    assert cli.resolve_model("Qwen/Qwen-Image-Edit-2511") == str(model)
    assert cli.resolve_model("Qwen/Qwen-Image-Edit-2509") == "Qwen/Qwen-Image-Edit-2509"


@pytest.mark.slow
def test_ctrl_c_cancels_cleanly(tiny_2511_dir, inputs, tmp_path):
    """First Ctrl-C stops at the end of the current step: exit 130, a clear message, no file written."""
    out = tmp_path / "cancelled.png"
    process = subprocess.Popen(
        [sys.executable, str(CLI), "edit", "--image", str(inputs["image"]), "--prompt", "x", "--output", str(out),
         "--model", str(tiny_2511_dir), "--steps", "200", "--size-mode", "match", "--true-cfg-scale", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    err = b""
    try:
        deadline = time.monotonic() + 240
        os.set_blocking(process.stderr.fileno(), False)
        while time.monotonic() < deadline and process.poll() is None:
            err += process.stderr.read() or b""
            if re.search(rb"Editing:.*\b[1-9]\d*/200", err):
                break
            time.sleep(0.2)
        assert process.poll() is None, err.decode(errors="replace")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    os.set_blocking(process.stderr.fileno(), True)
    err += process.stderr.read()
    text = err.decode(errors="replace")
    assert process.returncode == 130, text
    assert "Cancelling at the end of this step" in text and "Cancelled: nothing was written." in text
    assert "Traceback" not in text
    assert not out.exists()


# -- doctor ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_doctor_json_from_another_directory(tmp_path):
    """`python cli.py doctor --json` as a user runs it: versions, checks, devices, recommendations."""
    import importlib.metadata

    import torch

    done = subprocess.run([sys.executable, str(CLI), "doctor", "--json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for name in ("diffusers", "transformers", "bitsandbytes", "torch"):
        assert report["versions"][name] == importlib.metadata.version(name)
    assert report["diffusers"]["zero_cond_t"] is True and report["diffusers"]["ok"] is True
    assert report["torchvision"]["ok"] is True
    kinds = {(r["kind"], r["device"]) for r in report["quantization"]["results"]}
    assert {("nf4", "cpu"), ("8bit", "cpu")} <= kinds
    assert all(isinstance(r["works"], bool) for r in report["quantization"]["results"])
    gpus = [d for d in report["accelerators"] if d["type"] == "cuda"]
    assert len(gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for rec in report["recommendations"]:
        assert rec["settings"]["quantization"] in ("none", "nf4") and rec["needed_bytes"] > 0
    if not gpus:
        assert [r["device"] for r in report["recommendations"]] == ["cpu"]
        assert "hours" in report["recommendations"][0]["reason"]


def test_doctor_text_and_a_local_model(run_main, tiny_2511_dir):
    code, out, _ = run_main("doctor", "--model", tiny_2511_dir, "--no-quantization-check")
    assert code == 0
    for needle in ("diffusers", "transformers", "bitsandbytes", "torch", "zero_cond_t", "torchvision",
                   "Recommended loader settings", str(tiny_2511_dir), "Edit-2511"):
        assert needle in out, needle


@pytest.fixture
def doctor(pack) -> types.ModuleType:
    return importlib.import_module(f"{pack.__name__}.doctor")


def test_recommendations_are_the_loader_plan(doctor, pack):
    placement = importlib.import_module(f"{pack.__name__}.loaders.placement")
    sizes = doctor.REAL_2511_BF16_BYTES
    gpu = {"device": "cuda:0", "type": "cuda", "name": "test card", "free_bytes": int(23.4 * placement.GiB),
           "bf16": True}
    rec = doctor.recommend(sizes, gpu, can_quantize=True)
    plan = placement.plan_placement(sizes, gpu["free_bytes"], "cuda")
    chosen_settings = (rec["settings"]["quantization"], rec["settings"]["offload"])
    assert chosen_settings == (plan.quantization, plan.offload) == ("nf4", "none")
    assert rec["needed_bytes"] == plan.needed_bytes
    assert len(rec["options"]) == 12
    chosen = next(o for o in rec["options"] if (o["quantization"], o["offload"]) == ("nf4", "none"))
    assert chosen["fits"] is True and chosen["needed_bytes"] == plan.needed_bytes
    assert next(o for o in rec["options"] if (o["quantization"], o["offload"]) == ("none", "none"))["fits"] is False

    without = doctor.recommend(sizes, gpu, can_quantize=False)
    assert without["settings"]["quantization"] == "none"

    old = doctor.recommend(sizes, {**gpu, "bf16": False}, can_quantize=True)
    assert any("bf16" in note for note in old["notes"])


def test_settings_by_card_match_the_placement_table(doctor):
    table = doctor.settings_by_card(doctor.REAL_2511_BF16_BYTES)
    rows = {r["card_gib"]: (r["quantization"], r["offload"]) for r in table}
    assert rows == {80: ("none", "none"), 48: ("none", "model"), 24: ("nf4", "none"), 16: ("nf4", "model"),
                    12: ("nf4", "group"), 8: ("nf4", "group")}


def test_sizes_are_read_from_a_local_model(doctor, pack, tiny_2511_dir):
    weights = importlib.import_module(f"{pack.__name__}.loaders.weights")
    folder = weights.inspect_model_folder(tiny_2511_dir)
    sizes, source = doctor.model_sizes(str(tiny_2511_dir), "float32")
    assert sizes == {name: folder.bytes_at(4, name) for name in folder.components}
    assert str(tiny_2511_dir) in source and "Edit-2511" in source
    real, real_source = doctor.model_sizes(None, "float32")
    assert real["transformer"] == 2 * doctor.REAL_2511_BF16_BYTES["transformer"] and "float32" in real_source


def test_quantization_is_really_tried(doctor):
    """bitsandbytes 0.50 quantizes on the CPU (NF4 and int8); an unknown kind is reported, not raised."""
    nf4 = doctor.quantization_check("nf4", "cpu")
    int8 = doctor.quantization_check("8bit", "cpu")
    assert nf4["works"] and int8["works"], (nf4, int8)
    assert nf4["kernel_error"] < 0.05 and nf4["weight_error"] < 0.2
    bogus = doctor.quantization_check("fp3", "cpu")
    assert bogus["works"] is False and "fp3" in bogus["detail"]
    nowhere = doctor.quantization_check("nf4", "cuda:7")
    assert nowhere["works"] is False and nowhere["detail"]


def test_old_diffusers_is_caught(doctor, monkeypatch):
    """A diffusers whose transformer has no zero_cond_t parameter (< 0.37) is reported with the fix."""
    import diffusers

    def old_init(self, patch_size: int = 2, in_channels: int = 64) -> None:  # the pre-0.37 signature, shortened
        raise AssertionError("never called")

    monkeypatch.setattr(diffusers.QwenImageTransformer2DModel, "__init__", old_init)
    check = doctor.diffusers_check()
    assert check["ok"] is False and check["zero_cond_t"] is False
    assert "pip install -U 'diffusers>=0.37'" in check["detail"]
    report = doctor.diagnose(check_quantization=False)
    assert report["ok"] is False and check["detail"] in report["problems"]


# -- doctor: ComfyUI's single files ----------------------------------------------------------------

T_FP8 = "qwen_image_edit_2511_fp8_e4m3fn_scaled.safetensors"
T_GGUF = "qwen-image-edit-2511-Q4_0.gguf"
T_2509 = "qwen_image_edit_2509_bf16.safetensors"
T_BROKEN = "qwen_image_edit_2511_bf16.safetensors"  # truncated download
TE_FP8 = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"


@pytest.fixture(scope="module")
def comfy_models(pack, tmp_path_factory) -> Path:
    """A ComfyUI models folder of the tiny model's single files, as users keep them (plus a broken one and a stranger)."""
    from tinykit import tiny_pipeline as kit

    comfy_files = importlib.import_module(f"{pack.__name__}.loaders.comfy_files")
    models = tmp_path_factory.mktemp("ComfyUI") / "models"
    for sub in ("diffusion_models", "unet", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True)
    pipe = kit.build_tiny_pipeline(zero_cond_t=True)
    kit.export_comfy_transformer(pipe, models / "diffusion_models" / T_FP8, "scaled_fp8")
    kit.export_comfy_transformer(pipe, models / "diffusion_models" / T_GGUF, "gguf_q4_0")
    kit.export_comfy_transformer(pipe, models / "unet" / T_2509, "bf16", marker=False)
    whole = kit.export_comfy_transformer(pipe, models / "diffusion_models" / T_BROKEN, "bf16")
    whole.write_bytes(whole.read_bytes()[:-1000])
    kit.export_comfy_text_encoder(pipe, models / "text_encoders" / TE_FP8, "fp8_scaled")
    kit.export_comfy_vae(pipe, models / "vae" / VAE, to_wan_key=comfy_files.diffusers_to_wan_vae_key)
    # Another model's file in diffusion_models (here: a VAE) is counted, not listed.
    (models / "diffusion_models" / "flux1-dev.safetensors").write_bytes((models / "vae" / VAE).read_bytes())
    return models


def _by_name(report: dict, role: str) -> dict[str, dict]:
    return {f["name"]: f for f in report["comfy_files"]["roles"][role]["files"]}


def test_doctor_lists_the_comfyui_files_it_finds(cli, run_main, monkeypatch, comfy_models):
    """Inside ComfyUI/custom_nodes, `doctor` lists each Qwen file with what its header says, and plans with the set."""
    monkeypatch.setattr(cli, "REPO", comfy_models.parent / "custom_nodes" / "qwen-image-edit-diffusers")
    code, out, _ = run_main("doctor", "--json", "--no-quantization-check")
    assert code == 0
    report = json.loads(out)
    files = report["comfy_files"]
    assert files["found"] is True and str(comfy_models) in files["source"]
    assert files["roles"]["transformer"]["folders"] == [str(comfy_models / "diffusion_models"),
                                                        str(comfy_models / "unet")]

    transformers = _by_name(report, "transformer")
    assert list(transformers) == [T_GGUF, T_BROKEN, T_FP8, T_2509]  # combo order: diffusion_models, then unet
    gguf, fp8, old = transformers[T_GGUF], transformers[T_FP8], transformers[T_2509]
    assert (gguf["storage"], gguf["variant"]) == ("GGUF Q4_0", "Edit-2511")
    assert (fp8["storage"], fp8["variant"]) == ("scaled fp8", "Edit-2511")
    assert (old["storage"], old["variant"]) == ("bf16", "Edit-2509")
    assert old["stored_bytes"] == 2 * old["params"]
    assert fp8["stored_bytes"] < 0.6 * old["stored_bytes"] and gguf["stored_bytes"] < fp8["stored_bytes"]
    broken = transformers[T_BROKEN]
    assert broken["ok"] is False and "truncated" in broken["reason"] and "download it again" in broken["reason"].lower()
    assert files["roles"]["transformer"]["others"] == 1  # flux1-dev: counted, not listed
    te, vae = _by_name(report, "text_encoder")[TE_FP8], _by_name(report, "vae")[VAE]
    assert te["storage"] == "scaled fp8" and vae["storage"] == "bf16"

    # The memory advice uses the set's real sizes: GGUF and fp8 as stored, and nothing left for bitsandbytes.
    assert files["set"]["files"] == {"transformer": T_GGUF, "text_encoder": TE_FP8, "vae": VAE}
    assert report["model"]["sizes_bytes"] == {"transformer": gguf["stored_bytes"], "text_encoder": te["stored_bytes"],
                                              "vae": vae["stored_bytes"]}
    assert T_GGUF in report["model"]["source"] and report["model"]["bitsandbytes_components"] == []
    assert all(row["quantization"] == "none" for row in report["by_card"])


def test_doctor_text_shows_files_and_refusals(cli, run_main, monkeypatch, comfy_models):
    code, out, _ = run_main("doctor", "--comfyui", comfy_models.parent, "--no-quantization-check")
    assert code == 0
    for needle in ("ComfyUI model files", T_FP8, "scaled fp8, Edit-2511", T_GGUF, "GGUF Q4_0", T_2509,
                   "bf16, Edit-2509", f"{T_BROKEN}: cannot be loaded:", "truncated", TE_FP8, VAE,
                   "1 other file(s) that are not Qwen-Image-Edit diffusion models",
                   f"Model sizes: ComfyUI files {T_GGUF} + {TE_FP8} + {VAE}"):
        assert needle in out, needle
    assert "Traceback" not in out


def test_doctor_inside_comfyui_uses_its_folders(doctor, comfyui, comfy_models, tmp_path):
    """Inside ComfyUI the folders come from folder_paths; with a bf16 text encoder only it stays bitsandbytes'."""
    models = tmp_path / "models"
    for sub, name in (("diffusion_models", T_FP8), ("text_encoders", TE_FP8), ("vae", VAE)):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(comfy_models / sub / name, models / sub / name)
    (models / "text_encoders" / "qwen_3_4b.safetensors").write_bytes((comfy_models / "vae" / VAE).read_bytes())
    files = doctor.comfy_files()  # no folder given: ComfyUI's own
    assert files["found"] and "folder_paths" in files["source"]
    assert [f["name"] for f in files["roles"]["transformer"]["files"]] == [T_FP8]
    wrong = {f["name"]: f for f in files["roles"]["text_encoder"]["files"]}["qwen_3_4b.safetensors"]
    assert wrong["ok"] is False and "Wan 2.1 / Qwen-Image VAE" in wrong["reason"]  # named what it appears to be
    fp8 = files["roles"]["transformer"]["files"][0]
    assert files["set"]["sizes_bytes"]["transformer"] == fp8["stored_bytes"]  # ~1 byte/param, not 2
    assert files["set"]["pre_quantized"] == ["text_encoder", "transformer"]
    report = doctor.diagnose(check_quantization=False)
    assert report["model"]["sizes_bytes"] == files["set"]["sizes_bytes"]


def test_doctor_plans_bitsandbytes_only_for_bf16_files(doctor):
    """An fp8 / GGUF file is not quantized again: only the bf16 components count for NF4 / 8-bit."""
    sizes = {"transformer": int(20.5e9), "text_encoder": int(16.6e9), "vae": int(0.25e9)}  # fp8 + bf16 encoder
    options = {(o["quantization"], o["offload"]): o["needed_bytes"]
               for o in doctor.memory_options(sizes, None, quantized=("text_encoder",))}
    saved = options[("none", "none")] - options[("nf4", "none")]
    fraction = doctor.placement.QUANTIZED_FRACTION["nf4"]["text_encoder"]
    assert saved == sizes["text_encoder"] - int(sizes["text_encoder"] * fraction)  # the text encoder only
    gpu = {"device": "cuda:0", "type": "cuda", "name": "test", "free_bytes": 24 * 2**30, "bf16": True}
    options = doctor.recommend(sizes, gpu, True, quantized=())["options"]
    assert {o["quantization"] for o in options} == {"none"}  # nothing left to quantize: no nf4/8bit rows


def test_doctor_without_comfyui(doctor, cli, run_main, tmp_path):
    files = doctor.comfy_files(None)
    assert files["found"] is False and "--comfyui" in files["detail"]
    code, _, err = run_main("doctor", "--comfyui", tmp_path / "nowhere", "--no-quantization-check")
    assert code == 2 and "no such folder" in err


# -- selftest --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_selftest_from_another_directory(tmp_path):
    """`python cli.py selftest` on a CPU-only machine, end to end, from a directory outside the repo."""
    done = subprocess.run([sys.executable, str(CLI), "selftest"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "zero_cond_t honoured" in done.stdout
    assert "shape (1, 64, 64, 3)" in done.stdout
    assert "OK - the output is noise from a random tiny model; this only proves the install works" in done.stdout
    assert not list(tmp_path.iterdir()), "selftest left files in the current directory"


def test_selftest_fails_loudly_when_the_kit_is_missing(cli, monkeypatch, tmp_path, run_main):
    monkeypatch.setattr(cli, "REPO", tmp_path)
    monkeypatch.delitem(sys.modules, "qwen_edit_tiny_pipeline", raising=False)
    code, _, err = run_main("selftest")
    assert code == 2 and "tiny_pipeline.py" in err and "Reinstall" in err


# -- README ----------------------------------------------------------------------------------------


def test_readme_commands_parse(cli, pack):
    """Every `python cli.py ...` line in the README is a valid command line (CI runs them above)."""
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md yet")
    joined = re.sub(r"\\\n\s*", " ", readme.read_text(encoding="utf-8"))  # shell line continuations
    commands = [line.strip().removeprefix("$ ") for line in joined.splitlines()
                if line.strip().removeprefix("$ ").startswith("python cli.py ")]
    if not commands:
        pytest.skip("the README shows no `python cli.py` command yet")
    import shlex

    parser = cli.build_parser(pack)
    for command in commands:
        argv = shlex.split(command.split(" #")[0])[2:]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"README command does not parse: {command} (exit {exc.code})")


def test_a_bad_image_gets_one_line_not_a_traceback(run_main, tiny_2511_dir, tmp_path):
    from tinykit.tiny_pipeline import make_test_image

    tiny = tmp_path / "tiny.png"
    make_test_image(4, 4).save(tiny)
    code, stdout, stderr = run_main("edit", "--image", tiny, "--prompt", "Make the sky purple",
                                    "--output", tmp_path / "out.png", "--model", tiny_2511_dir, "--steps", 2)
    assert code == 1 and stdout == ""
    assert "Traceback" not in stderr and stderr.strip().startswith("error: ") and "4" in stderr
    assert not (tmp_path / "out.png").exists()


def test_edit_with_comfyui_files_takes_configs_from_the_hf_cache(run_main, exported, tiny_2511_dir, inputs, tmp_path):
    """Outside ComfyUI the files' configs and tokenizer come from the HF cache (`hf download --exclude`)."""
    from tinykit.tiny_pipeline import save_config_folder

    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--Qwen--Qwen-Image-Edit-2511"
    args = ("edit", "--image", inputs["image"], "--prompt", "Make the sky purple", "--output", tmp_path / "out.png",
            "--model", exported / "diffusion_models" / "tiny_2511_scaled_fp8.safetensors",
            "--text-encoder", exported / "text_encoders" / "tiny_te_fp8_scaled.safetensors",
            "--vae", exported / "vae" / "tiny_vae.safetensors", "--steps", 2, "--size-mode", "match")
    code, _, stderr = run_main(*args)
    assert code == 1 and 'hf download Qwen/Qwen-Image-Edit-2511 --exclude "*.safetensors"' in stderr
    assert "--local-dir" not in stderr and "Traceback" not in stderr
    try:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        save_config_folder(tiny_2511_dir, repo / "snapshots" / ("0" * 40))
        code, stdout, stderr = run_main(*args)
        assert code == 0, stderr
        assert Path(stdout.strip()).is_file()
        prompt = json.loads(Image.open(stdout.strip()).text["prompt"])
        assert prompt["10"]["class_type"] == "QwenImageEditFilesLoader"
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_doctor_verdict_follows_its_findings(run_main):
    """The real 2511 (~58 GB) does not fit this machine's RAM: the last line must not say all is well."""
    code, stdout, _ = run_main("doctor", "--no-quantization-check")
    assert code == 0 and "No problems found" not in stdout
    last = stdout.strip().splitlines()[-1]
    if "does not fit here" in stdout:
        assert "Warnings" in stdout and last == "The install is fine; 1 warning(s) above."
    else:  # a machine with room for the whole model
        assert last == "The install is fine."


def test_selftest_keep_leaves_a_model_comfyui_can_list_and_the_images(run_main, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        code, stdout, stderr = run_main("selftest", "--keep", tmp_path / "kept")
    assert code == 0, stderr
    kept = tmp_path / "kept"
    assert (kept / "Qwen-Image-Edit-2511-tiny" / "model_index.json").is_file()
    assert Image.open(kept / "output.png").size == (64, 64) and Image.open(kept / "input.png").size == (64, 64)
    assert "re-encodes" not in stderr + stdout and not [r for r in caplog.records if "re-encodes" in r.getMessage()]


def test_help_answers_without_importing_torch():
    """`python cli.py --help` (and `edit --help`) must not wait seconds for torch (issue 12)."""
    code = ("import runpy, sys\n"
            "for argv in (['cli.py', '--help'], ['cli.py', 'edit', '--help']):\n"
            "    sys.argv = argv\n"
            "    try:\n"
            "        runpy.run_path('cli.py', run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=CLI.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"
