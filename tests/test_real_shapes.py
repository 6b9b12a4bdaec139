"""Real shapes without a GPU: one edit at the model's REAL widths, through the loader and sampler nodes.

The tiny kit's toy widths (4 latent channels, a 64-wide text model) hide shape bugs and skip ComfyUI's
latent preview (it exists only for 16-channel latents). Here the three models are built from the configs
the pack ships with only the depth cut (tinykit/real_shapes.py: a 1-block transformer with RoPE axes
(16, 56, 56), the real z_dim-16 VAE, Qwen2.5-VL-7B at full width with 1 text layer and 2 vision blocks),
saved as a diffusers folder under ComfyUI's models/diffusers, picked in the loader node's list and
edited at 512x384 by the sampler node, with ComfyUI's latent preview on (the stand-in mirrors ComfyUI
0.8.0's latent_preview; tests/test_comfyui_real.py runs the same edit in a real ComfyUI).

Measured on 2 CPU cores with AMX (shared with other jobs, load ~5-9): 25-30 s to write the folder (~3.7 GB,
removed afterwards), 75 s for the load and edit (the real VAE encoding the reference at ~1 MP is most of
it: ~45 s; decode ~20 s, transformer ~8 s a step), 4.2 GB peak RSS for the whole module.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tinykit.real_shapes import save_real_shapes_pipeline
from tinykit.tiny_pipeline import make_test_image

pytestmark = pytest.mark.slow

MODEL = "Qwen-Image-Edit-2511"
WIDTH, HEIGHT = 512, 384  # not square: a preview with width and height swapped fails
STEPS = 2


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("real-shapes") / MODEL
    try:
        yield save_real_shapes_pipeline(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~3.7 GB: do not leave it to pytest's kept temp dirs


def _image() -> torch.Tensor:
    pixels = np.asarray(make_test_image(WIDTH, HEIGHT, seed=3), dtype=np.float32) / 255
    return torch.from_numpy(pixels)[None]


def check_previews(updates: list[tuple[int, int, Any]], steps: int, width: int, height: int) -> None:
    """One progress update per step, each carrying ComfyUI's preview tuple with a real picture of the latents."""
    from PIL import Image

    assert [(value, total) for value, total, _ in updates] == [(i, steps) for i in range(1, steps + 1)]
    for _, _, preview in updates:
        assert preview is not None, "no latent preview reached ComfyUI's progress bar"
        kind, picture, max_size = preview
        assert kind == "JPEG" and max_size == 512
        assert isinstance(picture, Image.Image) and picture.mode == "RGB"
        assert picture.size == (width // 8, height // 8)  # one pixel per latent, the output's orientation
        low, high = np.asarray(picture).min(), np.asarray(picture).max()
        assert high > low, "the preview is one flat colour"


def test_an_edit_at_real_widths_runs_with_latent_previews(pack, comfyui, real_dir, tmp_path) -> None:
    loader = importlib.import_module(f"{pack.__name__}.loaders.pipeline")
    diffusers_dir = tmp_path / "models" / "diffusers"
    diffusers_dir.mkdir(parents=True)
    (diffusers_dir / MODEL).symlink_to(real_dir, target_is_directory=True)
    comfyui["latent_preview"].set_preview_method("auto")  # what ComfyUI does for each prompt from the frontend
    updates: list[tuple[int, int, Any]] = []
    comfyui["comfy.utils"].set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: updates.append((value, total, preview)))

    loader_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]
    assert MODEL in loader_node.INPUT_TYPES()["required"]["model"][0]
    (handle,) = loader_node().load(MODEL, "bfloat16", "same", "none", "transformer+text_encoder", "cpu", "none")
    pipe = loader.current_pipeline().pipe
    assert pipe.transformer.config.in_channels == 64 and pipe.vae.config.z_dim == 16
    assert pipe.text_encoder.config.text_config.hidden_size == 3584
    assert isinstance(pipe.text_encoder.lm_head, torch.nn.Identity)  # the 152064-wide head is dropped

    sampler = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]()
    # True CFG (the model card's 4.0): the negative prompt's shorter sequence goes through every part too.
    (out,) = sampler.edit(handle, _image(), prompt="Make the sky blue", negative_prompt=" ", seed=0, steps=STEPS,
                          true_cfg_scale=4.0, size_mode="match", width=1024, height=1024, images_per_prompt=1)
    assert out.shape == (1, HEIGHT, WIDTH, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and 0 <= float(out.min()) <= float(out.max()) <= 1
    check_previews(updates, STEPS, WIDTH, HEIGHT)


def test_previews_stay_off_when_comfyui_has_them_off(pack, comfyui) -> None:
    """ComfyUI's default (--preview-method none): no previewer, so no work per step."""
    bridge = importlib.import_module(f"{pack.__name__}.utils.comfy")
    assert bridge.latent_previewer("cpu", 16) is None
    comfyui["latent_preview"].set_preview_method("auto")
    previewer = bridge.latent_previewer("cpu", 16)
    assert previewer is not None and bridge.latent_previewer("cpu", 4) is None
    _, picture, _ = previewer(torch.randn(1, 16, 1, 6, 10))
    assert picture.size == (10, 6)
