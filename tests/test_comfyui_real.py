"""The pack inside a real ComfyUI: start the server, queue the example API workflows, read the results.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout (0.8.0 is what this was written against).
``COMFYUI_PYTHON`` names the Python that has ComfyUI's requirements and the pack's (default: this
one). Everything runs on this machine: the server listens on 127.0.0.1 only, with a throw-away base
directory (``--base-directory``) holding the pack (a symlink in custom_nodes/), a tiny random model
in models/diffusers/ and a test image in input/, so the checkout itself is not touched.

The test process itself stays off the network (conftest blocks sockets); it talks to the server
through a small client subprocess.

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python \\
        python -m pytest tests/test_comfyui_real.py -v
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
API_DIR = REPO / "example_workflows" / "api"
COMFYUI = os.environ.get("COMFYUI_PATH")
PACK_FOLDER = "qwen-image-edit-diffusers"
MODEL_FOLDER = "Qwen-Image-Edit-2511-tiny"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run the pack in real ComfyUI"),
]

#: Runs in a subprocess: one HTTP request to the local server, the answer as JSON on stdout.
CLIENT = r"""
import json, sys, urllib.request, urllib.error
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
data = body.encode() if body else None
request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        status, text = response.status, response.read().decode()
except urllib.error.HTTPError as exc:
    status, text = exc.code, exc.read().decode()
except OSError as exc:
    status, text = 0, str(exc)
print(json.dumps({"status": status, "text": text}))
"""


@dataclass
class Server:
    url: str
    base: Path
    log: Path
    process: subprocess.Popen

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        payload = json.dumps(body) if body is not None else ""
        done = subprocess.run([sys.executable, "-c", CLIENT, method, self.url + path, payload],
                              capture_output=True, text=True, timeout=60)
        answer = json.loads(done.stdout)
        try:
            return answer["status"], json.loads(answer["text"]) if answer["text"] else None
        except json.JSONDecodeError:
            return answer["status"], answer["text"]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log_text())) >= count:
                return
            time.sleep(0.5)
        pytest.fail(f"ComfyUI never logged {pattern!r} x{count}; log tail:\n{self.log_text()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """POST /prompt, then poll /history until it finishes; returns the history entry."""
        status, answer = self.request("POST", "/prompt", {"prompt": prompt, "client_id": "qwen-edit-test"})
        assert status == 200, f"/prompt refused the workflow: {answer}"
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, history = self.request("GET", f"/history/{prompt_id}")
            if history and prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_text()[-3000:]}"
            time.sleep(1)
        pytest.fail(f"the prompt did not finish in {timeout} s; log tail:\n{self.log_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tinykit.tiny_pipeline import make_test_image, save_tiny_pipeline

    comfyui = Path(COMFYUI).expanduser().resolve()
    assert (comfyui / "main.py").is_file(), f"COMFYUI_PATH={COMFYUI} has no main.py"
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    save_tiny_pipeline(base / "models" / "diffusers" / MODEL_FOLDER, zero_cond_t=True)
    (base / "input").mkdir()
    make_test_image(64, 48, seed=1).save(base / "input" / "test.png")
    make_test_image(48, 48, seed=2).save(base / "input" / "reference.png")

    port = _free_port()
    log = base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [python, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=comfyui, stdout=sink, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", base, log, process)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, f"ComfyUI exited at start-up:\n{srv.log_text()[-4000:]}"
            status, _ = srv.request("GET", "/system_stats")
            if status == 200:
                break
            time.sleep(1)
        else:
            pytest.fail(f"ComfyUI did not answer in 300 s:\n{srv.log_text()[-4000:]}")
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _example(name: str, steps: int = 2) -> dict:
    """An example API twin, pointed at the tiny model and the test images, 2 steps, tiny scale."""
    prompt = json.loads((API_DIR / f"{name}.json").read_text())
    images = iter(["test.png", "reference.png"])
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            inputs["image"] = next(images)
        elif node["class_type"] == "QwenImageEditLoader":
            inputs["model"] = MODEL_FOLDER
        elif node["class_type"] == "QwenImageEditSampler":
            inputs["steps"] = steps
        elif node["class_type"] == "QwenImageEditImageScale":
            inputs["megapixels"] = 0.01  # ~96x80: the tiny model edits it in seconds on a CPU
    return prompt


def _saved_images(server: Server, entry: dict) -> list[Path]:
    paths = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            paths.append(server.base / image["type"] / image.get("subfolder", "") / image["filename"])
    return paths


def test_the_pack_loads_in_comfyui(server: Server):
    text = server.log_text()
    assert "IMPORT FAILED" not in text or PACK_FOLDER not in text.split("IMPORT FAILED")[-1][:300], text[-3000:]
    status, info = server.request("GET", "/object_info/QwenImageEditLoader")
    assert status == 200 and "QwenImageEditLoader" in info, info
    models = info["QwenImageEditLoader"]["input"]["required"]["model"][0]
    assert MODEL_FOLDER in models, f"models/diffusers was not listed: {models}"


def test_the_template_browser_lists_the_examples(server: Server):
    status, templates = server.request("GET", "/workflow_templates")
    assert status == 200
    assert sorted(templates.get(PACK_FOLDER, [])) == sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


def test_single_image_example_runs(server: Server):
    entry = server.run(_example("qwen_image_edit_2511_single_image"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    [path] = _saved_images(server, entry)
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] % 16 == 0 and image.size[1] % 16 == 0 and image.size[0] > image.size[1]
    assert "Qwen-Image-Edit: loading" in server.log_text()


def test_two_image_example_reuses_the_loaded_pipeline(server: Server):
    before = server.log_text().count("Qwen-Image-Edit: loading")
    entry = server.run(_example("qwen_image_edit_2511_two_images"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(_saved_images(server, entry)) == 1
    assert server.log_text().count("Qwen-Image-Edit: loading") == before, "the cached pipeline was loaded again"


def test_free_releases_the_pipeline(server: Server):
    """The UI's "Unload models" posts /free: the pipeline is released, and the next run loads it again."""
    loads = server.log_text().count("Qwen-Image-Edit: loading")
    releases = server.log_text().count("Qwen-Image-Edit: released")
    status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    server.wait_for_log("Qwen-Image-Edit: released", count=releases + 1)
    prompt = _example("qwen_image_edit_2511_single_image")
    next(n for n in prompt.values() if n["class_type"] == "QwenImageEditSampler")["inputs"]["seed"] = 1
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert server.log_text().count("Qwen-Image-Edit: loading") == loads + 1


def test_a_bad_value_is_refused_at_queue_time(server: Server):
    prompt = _example("qwen_image_edit_2511_single_image")
    next(n for n in prompt.values() if n["class_type"] == "QwenImageEditSampler")["inputs"]["steps"] = 1
    status, answer = server.request("POST", "/prompt", {"prompt": prompt})
    assert status == 400 and "node_errors" in answer
    assert "steps" in json.dumps(answer["node_errors"])


def test_low_memory_example_on_a_cpu_says_what_to_change(server: Server):
    """--cpu has no CUDA: NF4 on the transformer cannot run, and the error says so instead of crashing."""
    entry = server.run(_example("qwen_image_edit_2511_low_memory_nf4"))
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert "quantization" in messages and "CUDA" in messages, messages


#: Runs with COMFYUI_PYTHON: ComfyUI's own model_management with the pack's hook on it, no server.
EVICTION_PROBE = r"""
import importlib, json, sys
comfyui, repo, folder = sys.argv[1:4]
sys.path.insert(0, comfyui)
from comfy.cli_args import args
args.cpu = True
import comfy.model_management as mm
sys.path.insert(0, repo)
from cli import load_pack
from tinykit.tiny_pipeline import save_tiny_pipeline
pack = load_pack()
loader = importlib.import_module(pack.__name__ + ".loaders.pipeline")
loader.get_pipeline(loader.LoadSettings(str(save_tiny_pipeline(folder)), precision="float32", device="cpu",
                                        quantization="none", offload="none"))
device = mm.get_torch_device()
free = mm.get_free_memory(device)
mm.free_memory(free // 2, device)  # a native load that fits in what is free
kept = loader.current_pipeline() is not None
mm.free_memory(free * 4, device)  # a native load that needs more than is free
print(json.dumps({"kept": kept, "released": loader.current_pipeline() is None}))
"""


def test_comfyuis_memory_manager_evicts_the_pipeline_for_a_native_load(tmp_path):
    """ComfyUI calls model_management.free_memory(needed, device) before loading one of its models."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    result = subprocess.run([python, "-c", EVICTION_PROBE, COMFYUI, str(REPO), str(tmp_path / "tiny")],
                            capture_output=True, text=True, timeout=600, cwd=COMFYUI,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"kept": True, "released": True}


#: Runs with COMFYUI_PYTHON: the pack's scaling outside ComfyUI, then inside it (its own common_upscale),
#: and the test stand-in's common_upscale against ComfyUI's.
SCALE_PROBE = r"""
import importlib.util, json, sys
import torch
comfyui, repo = sys.argv[1:3]
sys.path[:] = [repo] + [p for p in sys.path if p not in ("", comfyui)]  # no ComfyUI until asked for
from cli import load_pack
pack = load_pack()
scale = importlib.import_module(pack.__name__ + ".utils.scale")
bridge = importlib.import_module(pack.__name__ + ".utils.comfy")
gen = torch.Generator().manual_seed(0)
cases = [((301, 200), (96, 80)), ((64, 48), (160, 128)), ((4, 1), (16, 16))]
images = [torch.randint(0, 256, (2, h, w, 3), generator=gen).float() / 255 for (w, h), _ in cases]
def run():
    return {f"{c}-{m}-{f}": scale.scale_image(x, *target, m, f)
            for c, (x, (_, target)) in enumerate(zip(images, cases)) for m in scale.SCALE_METHODS for f in scale.FIT_MODES}
standalone = run()
sys.path.insert(0, comfyui)
from comfy.cli_args import args
args.cpu = True
import comfy.model_management, comfy.utils, folder_paths
bridge.refresh()
inside = run()
real_modules = {name: sys.modules[name] for name in ("comfy", "comfy.model_management", "comfy.utils", "folder_paths")}
spec = importlib.util.spec_from_file_location("comfy_standin", repo + "/tests/comfy_standin.py")
standin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(standin)
standin_upscale = standin.install(__import__("pathlib").Path(repo) / "models")["comfy.utils"].common_upscale
sys.modules.update(real_modules)
standin_differs = []
for x, (_, (w, h)) in zip(images, cases):
    for method in ("nearest-exact", "bilinear", "area", "bicubic", "lanczos"):
        for crop in ("disabled", "center"):
            planar = x.movedim(-1, 1)
            try:
                real = comfy.utils.common_upscale(planar, w, h, method, crop)
            except RuntimeError:
                real = None  # ComfyUI's crop="center" leaves 0 px for 4x1 to a square
            if real is not None and not torch.equal(real, standin_upscale(planar, w, h, method, crop)):
                standin_differs.append(f"{tuple(planar.shape)} {method} {crop}")
print(json.dumps({
    "uses_comfyui": bridge.comfy_upscale() is comfy.utils.common_upscale,
    "sizes_differ": [k for k in standalone if standalone[k].shape != inside[k].shape],
    "pixels_differ": sorted(k for k in standalone if not torch.equal(standalone[k], inside[k])),
    "standin_differs": standin_differs,
}))
"""


def test_scaling_inside_comfyui_uses_its_common_upscale_and_agrees_with_the_standalone_path():
    """Also keeps the stand-in honest: its common_upscale gives ComfyUI's pixels exactly."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    result = subprocess.run([python, "-c", SCALE_PROBE, COMFYUI, str(REPO)], capture_output=True, text=True,
                            timeout=300, cwd=COMFYUI, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    # Only bilinear / bicubic shrinks differ (ComfyUI does not antialias them); case 0 shrinks, 1 and 2 enlarge.
    shrinks = sorted(f"0-{m}-{f}" for m in ("bicubic", "bilinear") for f in ("crop", "pad", "stretch"))
    assert answer == {"uses_comfyui": True, "sizes_differ": [], "pixels_differ": shrinks, "standin_differs": []}


#: Runs with COMFYUI_PYTHON: the real-widths edit (tests/test_real_shapes.py) with ComfyUI's own latent_preview,
#: progress bar and model folders, no server.
PREVIEW_PROBE = r"""
import importlib, json, sys
import numpy as np
comfyui, repo, models = sys.argv[1:4]
sys.path.insert(0, comfyui)
from comfy.cli_args import args
args.cpu = True
import comfy.utils, folder_paths, latent_preview
sys.path.insert(0, repo)
from cli import load_pack
from tinykit.real_shapes import save_real_shapes_pipeline
from tinykit.tiny_pipeline import make_test_image
import torch
save_real_shapes_pipeline(models + "/diffusers/Qwen-Image-Edit-2511")
folder_paths.add_model_folder_path("diffusers", models + "/diffusers", is_default=True)
pack = load_pack()
latent_preview.set_preview_method("auto")  # as ComfyUI does for a prompt from the frontend
updates = []

def hook(value, total, preview, node_id=None):
    kind, picture, max_size = preview if preview is not None else (None, None, None)
    pixels = np.asarray(picture) if picture is not None else np.zeros(1)
    updates.append({"value": value, "total": total, "kind": kind, "max_size": max_size,
                    "picture": type(picture).__module__ + "." + type(picture).__name__,
                    "size": list(picture.size) if picture is not None else None,
                    "mode": getattr(picture, "mode", None), "flat": bool(pixels.min() == pixels.max())})

comfy.utils.set_progress_bar_global_hook(hook)
loader_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]
listed = "Qwen-Image-Edit-2511" in loader_node.INPUT_TYPES()["required"]["model"][0]
(handle,) = loader_node().load("Qwen-Image-Edit-2511", "bfloat16", "same", "none", "transformer+text_encoder", "cpu", "none")
image = torch.from_numpy(np.asarray(make_test_image(512, 384, seed=3), dtype=np.float32) / 255)[None]
(out,) = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]().edit(
    handle, image, prompt="Make the sky blue", negative_prompt=" ", seed=0, steps=2, true_cfg_scale=1.0,
    size_mode="match", width=1024, height=1024, images_per_prompt=1)
print(json.dumps({"listed": listed, "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                  "updates": updates}))
"""


def test_real_widths_edit_sends_comfyuis_latent_previews(tmp_path):
    """The edit of tests/test_real_shapes.py with ComfyUI's own latent_preview (Wan21 Latent2RGB) and progress bar:
    every step reaches the progress hook with a preview picture of the 16-channel latents."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    result = subprocess.run([python, "-c", PREVIEW_PROBE, COMFYUI, str(REPO), str(tmp_path / "models")],
                            capture_output=True, text=True, timeout=900, cwd=COMFYUI,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["listed"] and answer["shape"] == [1, 384, 512, 3] and answer["finite"]
    assert [(u["value"], u["total"]) for u in answer["updates"]] == [(1, 2), (2, 2)]
    for update in answer["updates"]:
        assert update["kind"] == "JPEG" and update["max_size"] == 512, update
        assert update["picture"].startswith("PIL.") and update["mode"] == "RGB", update
        assert update["size"] == [512 // 8, 384 // 8] and not update["flat"], update
