"""Masked edits: only the (grown) mask changes, the seam follows feather, any image size, crop and stitch."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch

from tinykit.tiny_pipeline import make_test_image

STEPS = 2


@pytest.fixture
def M(pack):
    return importlib.import_module(f"{pack.__name__}.utils.mask")


@pytest.fixture
def L(pack):
    return importlib.import_module(f"{pack.__name__}.loaders.pipeline")


def image(w: int, h: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    frames = [np.asarray(make_test_image(w, h, seed=seed + b), dtype=np.float32) / 255 for b in range(batch)]
    return torch.from_numpy(np.stack(frames))


def rect(w: int, h: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    mask = torch.zeros(h, w)
    mask[box[1]:box[3], box[0]:box[2]] = 1
    return mask


def disc(w: int, h: int, cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r).float()


def ell(w: int, h: int) -> torch.Tensor:
    """An L shape: two bars meeting in a corner, so the region is not its own box."""
    return torch.maximum(rect(w, h, (5, 5, 12, h - 6)), rect(w, h, (5, h - 14, w - 8, h - 6)))


def masked(sampler, handle, img, mask, **kw):
    args = dict(prompt="make it red", negative_prompt=" ", seed=0, steps=STEPS, true_cfg_scale=1.0,
                size_mode="custom", width=64, height=64, images_per_prompt=1, mask=mask)
    args.update(kw)
    return sampler.edit(handle, img, **args)[0]


# ------------------------------------------------------------------------------------------------
# Pure functions: the mask's checks, box, window, region, blend and stitch
# ------------------------------------------------------------------------------------------------


def test_masks_are_checked_resized_and_batched(M):
    assert M.check_masks(torch.ones(48, 64), 1, 64, 48).shape == (1, 48, 64)
    assert M.check_masks(torch.ones(2, 48, 64), 2, 64, 48).shape == (2, 48, 64)
    assert M.check_masks(torch.ones(1, 48, 64), 3, 64, 48).shape == (1, 48, 64)  # one mask for every image
    half = M.check_masks(rect(32, 24, (8, 6, 24, 18)), 1, 64, 48)  # same aspect, half the size
    assert half.shape == (1, 48, 64)
    assert M.mask_box(half[0]) == (16, 12, 48, 36)
    empty = M.check_masks(torch.zeros(1, 64, 64), 1, 64, 48)  # Load Image's mask for an image without alpha
    assert empty.shape == (1, 48, 64) and M.mask_box(empty[0]) is None
    with pytest.raises(M.MaskError, match="batch of 3 but image has 2"):
        M.check_masks(torch.ones(3, 48, 64), 2, 64, 48)
    with pytest.raises(M.MaskError, match="shapes differ"):
        M.check_masks(torch.ones(64, 64), 1, 64, 48)
    with pytest.raises(M.MaskError, match="NaN"):
        M.check_masks(torch.full((48, 64), float("nan")), 1, 64, 48)
    with pytest.raises(M.MaskError, match="Convert Image to Mask"):
        M.check_masks(torch.ones(1, 48, 64, 3), 1, 64, 48)
    with pytest.raises(M.MaskError, match="at least 1.0"):
        M.MaskOptions(context=0.5)
    with pytest.raises(M.MaskError, match="0 or more"):
        M.MaskOptions(grow=-1)


def test_mask_box_grows_inside_the_image(M):
    assert M.mask_box(torch.zeros(10, 20)) is None
    assert M.mask_box(torch.full((10, 20), 0.5)) is None  # 0.5 is not above the threshold
    mask = rect(20, 10, (3, 2, 7, 9))
    assert M.mask_box(mask) == (3, 2, 7, 9)
    assert M.mask_box(mask, grow=4) == (0, 0, 11, 10)


@pytest.mark.parametrize("box, size", [
    ((2900, 1900, 3100, 2100), (6000, 4000)),  # small mask in the middle of a big photo
    ((0, 0, 40, 30), (6000, 4000)),  # in a corner: the window moves inside, it does not shrink
    ((5950, 3980, 6000, 4000), (6000, 4000)),  # the other corner
    ((100, 100, 1900, 300), (6000, 4000)),  # a long thin mask: the window gets height
    ((10, 10, 50, 40), (300, 200)),  # an image smaller than the minimum window: all of it
    ((0, 0, 6000, 4000), (6000, 4000)),  # all of it
])
def test_context_window_arithmetic(M, box, size):
    width, height = size
    x0, y0, x1, y1 = M.context_window(box, width, height, 2.0)
    assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1] and box[2] <= x1 <= width and box[3] <= y1 <= height
    win_w, win_h = x1 - x0, y1 - y0
    assert win_w >= min(M.MIN_WINDOW_SIDE, width) and win_h >= min(M.MIN_WINDOW_SIDE, height)
    assert win_w >= min(2 * (box[2] - box[0]), width) and win_h >= min(2 * (box[3] - box[1]), height)
    assert max(win_w, win_h) / min(win_w, win_h) <= M.MAX_WINDOW_ASPECT + 0.01 or width / height > 1.5
    if box == (2900, 1900, 3100, 2100):
        assert (x0, y0, x1, y1) == (2744, 1744, 3256, 2256)  # 512 px, centred on the mask
    if box == (0, 0, 40, 30):
        assert (x0, y0, x1, y1) == (0, 0, 512, 512)
    if box == (5950, 3980, 6000, 4000):
        assert (x0, y0, x1, y1) == (5488, 3488, 6000, 4000)
    if box == (10, 10, 50, 40):
        assert (x0, y0, x1, y1) == (0, 0, 300, 200)


def test_context_scales_the_window(M):
    box = (2000, 1000, 3000, 1600)  # 1000x600
    assert M.context_window(box, 6000, 4000, 1.0) == box
    x0, y0, x1, y1 = M.context_window(box, 6000, 4000, 3.0)
    assert (x1 - x0, y1 - y0) == (3000, 1800) and (x0 + x1) / 2 == 2500 and (y0 + y1) / 2 == 1300


def test_blend_is_zero_outside_the_region_and_ramps_over_feather(M):
    mask = rect(80, 60, (20, 15, 60, 45))
    region = M.edit_region(mask, grow=3)
    assert M.mask_box(region) == (17, 12, 63, 48)
    blend = M.blend_mask(region, feather=6)
    assert torch.equal(blend[region == 0], torch.zeros_like(blend[region == 0]))
    assert (blend[region == 1] > 0).float().mean() > 0.95  # only the corners round off (by ~feather)
    row = blend[30]  # across the left edge of the region, far from the corners
    assert row[16] == 0 and 0 < row[17] < row[18] < row[19] < row[22] and row[23] == 1 and row[40] == 1
    assert torch.equal(M.blend_mask(region, 0), region)
    full = M.blend_mask(M.edit_region(torch.ones(30, 40), 5), 8)
    assert torch.equal(full, torch.ones(30, 40))  # an image edge is not a mask edge


def test_window_blend_is_the_whole_mask_blend_cut_to_the_window(M):
    mask = disc(200, 150, 90, 70, 30) + rect(200, 150, (0, 0, 10, 150))
    whole = M.blend_mask(M.edit_region(mask, 4), 12)
    for window in ((40, 20, 150, 130), (0, 10, 120, 140)):  # inside the image; at its left edge, on the bar
        region, blend = M.window_blend(mask, window, 4, 12)
        assert torch.equal(region, M.crop(M.edit_region(mask, 4), window))
        assert torch.allclose(blend, M.crop(whole, window), atol=1e-6)


def test_stitch_copies_every_pixel_the_blend_leaves_out(M):
    img = image(50, 40)[0]
    edited = torch.rand(20, 30, 3)
    blend = torch.zeros(20, 30)
    blend[5:15, 10:20] = 0.5
    blend[8:12, 12:18] = 1
    out = M.stitch(img, edited, blend, (10, 10, 40, 30))
    keep = torch.ones(40, 50, dtype=torch.bool)
    keep[10:30, 10:40] = blend == 0
    assert torch.equal(out[keep], img[keep])
    assert torch.equal(out[18:22, 22:28], edited[8:12, 12:18])
    assert torch.allclose(out[15, 20], (img[15, 20] + edited[5, 10]) / 2)


# ------------------------------------------------------------------------------------------------
# The sampler with a mask, on the tiny model
# ------------------------------------------------------------------------------------------------


def test_sampler_declares_the_mask_after_the_saved_inputs(pack):
    spec = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"].INPUT_TYPES()
    assert list(spec["optional"]) == ["image2", "image3", "mask", "grow", "feather", "context"]
    assert spec["optional"]["mask"][0] == "MASK"


@pytest.mark.parametrize("shape, size", [("rect", (64, 48)), ("disc", (75, 53)), ("ell", (61, 70))])
def test_only_the_grown_mask_changes(sampler, handle, M, shape, size):
    w, h = size
    img = image(w, h)
    mask = {"rect": rect(w, h, (20, 10, 44, 30)), "disc": disc(w, h, w / 2, h / 2, 12), "ell": ell(w, h)}[shape]
    out = masked(sampler, handle, img, mask, grow=2, feather=4)
    assert out.shape == (1, h, w, 3) and out.dtype == torch.float32
    region = M.edit_region(mask, 2).bool()
    assert torch.equal(out[0][~region], img[0][~region])  # bit for bit
    inside = M.edit_region(mask, -0).bool() & (M.blend_mask(M.edit_region(mask, 2), 4) == 1)
    assert (out[0][inside] - img[0][inside]).abs().mean() > 0.02  # the model did edit there


@pytest.mark.slow
def test_large_photo_with_a_small_mask(sampler, handle, M, caplog):
    """Crop and stitch: a photo far past the 4.2 MP limit edits through a window around its mask."""
    w, h = 2600, 1800
    img = torch.rand(1, h, w, 3)
    mask = rect(w, h, (1200, 800, 1330, 910))
    with caplog.at_level(logging.INFO, logger="qwen_image_edit"):
        out = masked(sampler, handle, img, mask, size_mode="custom", width=96, height=96)
    assert "window 512x512 at (1009, 599), edited at 96x96" in caplog.text
    region = M.edit_region(mask, 0).bool()
    assert torch.equal(out[0][~region], img[0][~region])
    assert not torch.equal(out[0][region], img[0][region])


@pytest.mark.slow
def test_feather_only_changes_the_seam(sampler, handle, M):
    """The same raw edit blended through a hard and a feathered mask: out = in + (edit - in) * blend."""
    img = image(64, 64)
    mask = disc(64, 64, 30, 34, 16)
    hard = masked(sampler, handle, img, mask, feather=0, seed=5)[0]
    soft = masked(sampler, handle, img, mask, feather=6, seed=5)[0]
    blend = M.blend_mask(M.edit_region(mask, 0), 6).unsqueeze(-1)
    assert torch.allclose(soft, img[0] + (hard - img[0]) * blend, atol=1e-5)
    seam = ((blend > 0) & (blend < 1)).squeeze(-1)
    assert seam.sum() > 50 and not torch.allclose(soft[seam], hard[seam])


def test_empty_mask_returns_the_input_without_loading(sampler, pack, tiny_2511_dir, L, caplog):
    L.release_pipeline()
    handle = L.PipeHandle(L.LoadSettings(str(tiny_2511_dir), precision="float32", device="cpu"))
    img = image(64, 48, batch=2)
    with caplog.at_level(logging.INFO, logger="qwen_image_edit"):
        out = masked(sampler, handle, img, torch.zeros(48, 64), images_per_prompt=2)
    assert L.current_pipeline() is None and "mask is empty" in caplog.text
    assert torch.equal(out, img.repeat_interleave(2, dim=0))


@pytest.mark.slow
def test_full_mask_equals_an_unmasked_edit_of_the_same_crop(sampler, handle, pack):
    E = importlib.import_module(f"{pack.__name__}.loaders.edit")
    S = importlib.import_module(f"{pack.__name__}.utils.sampling")
    img = image(75, 53)
    full = masked(sampler, handle, img, torch.ones(53, 75), size_mode="custom", width=96, height=64, seed=3)
    w, h = S.masked_edit_size(S.EditRequest("x", size_mode="custom", width=96, height=64), 75, 53)
    assert (w, h) == (96, 64)  # 96x64 px of area at 75:53, sides multiples of 32
    plain = sampler.edit(handle, img, prompt="make it red", negative_prompt=" ", seed=3, steps=STEPS,
                         true_cfg_scale=1.0, size_mode="custom", width=w, height=h, images_per_prompt=1)[0]
    expected = E._resize(plain.permute(0, 3, 1, 2), 75, 53).permute(0, 2, 3, 1)
    assert torch.equal(full, expected)


@pytest.mark.slow
def test_batched_masks_follow_the_image2_rule(sampler, handle, M):
    img = image(64, 48, batch=2)
    masks = torch.stack([torch.zeros(48, 64), rect(64, 48, (10, 10, 40, 30))])
    out = masked(sampler, handle, img, masks, images_per_prompt=2)
    assert out.shape == (4, 48, 64, 3)
    assert torch.equal(out[0], img[0]) and torch.equal(out[1], img[0])  # its mask is empty
    assert not torch.equal(out[2], img[1]) and not torch.equal(out[2], out[3])  # two variations
    shared = masked(sampler, handle, img, rect(64, 48, (10, 10, 40, 30)))
    assert shared.shape == (2, 48, 64, 3) and not torch.equal(shared[0], img[0])  # one mask for both
    with pytest.raises(M.MaskError, match="batch of 3"):
        masked(sampler, handle, img, torch.ones(3, 48, 64))


@pytest.mark.slow
def test_reference_images_and_true_cfg_with_a_mask(sampler, handle, M):
    img, ref = image(64, 48), image(40, 40, seed=9)
    mask = rect(64, 48, (8, 8, 30, 30))
    a = masked(sampler, handle, img, mask, image2=ref, true_cfg_scale=4.0)
    b = masked(sampler, handle, img, mask, true_cfg_scale=4.0)
    region = M.edit_region(mask, 0).bool()
    assert torch.equal(a[0][~region], img[0][~region]) and not torch.equal(a, b)


def test_denoising_pins_the_latents_outside_the_mask(sampler, handle, L, monkeypatch):
    """After every step the latents outside the region are the window's own latents noised to the new
    sigma with the pipeline's initial noise (so after the last step: exactly the window's latents)."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = L.current_pipeline().pipe
    img = image(64, 64)
    mask = rect(64, 64, (0, 0, 32, 64))  # the left half: latent columns 0-3 free, 4-7 pinned
    seen: list[tuple[torch.Tensor, float]] = []
    real = QwenImageEditPlusPipeline.__call__

    def spy(self, *args, callback_on_step_end=None, **kwargs):
        def wrapped(p, i, t, step):
            out = callback_on_step_end(p, i, t, step)
            seen.append((out.get("latents", step["latents"]).clone(), float(p.scheduler.sigmas[p.scheduler.step_index])))
            return out
        return real(self, *args, callback_on_step_end=wrapped, **kwargs)

    monkeypatch.setattr(QwenImageEditPlusPipeline, "__call__", spy)
    masked(sampler, handle, img, mask, feather=0, size_mode="custom", width=64, height=64, seed=11)
    assert len(seen) == STEPS and seen[-1][1] == 0

    window = pipe.image_processor.preprocess(make_test_image(64, 64, seed=0), 64, 64).unsqueeze(2)
    latents = pipe.vae.encode(window).latent_dist.mode()
    shape = (1, pipe.vae.config.z_dim, 1, 1, 1)
    latents = (latents - torch.tensor(pipe.vae.config.latents_mean).view(shape)) / torch.tensor(
        pipe.vae.config.latents_std).view(shape)
    reference = QwenImageEditPlusPipeline._pack_latents(latents, 1, latents.shape[1], 8, 8)
    noise = QwenImageEditPlusPipeline._pack_latents(
        torch.randn((1, latents.shape[1], 1, 8, 8), generator=torch.Generator("cpu").manual_seed(11)),
        1, latents.shape[1], 8, 8)
    pinned = torch.tensor([(token % 4) >= 2 for token in range(16)])  # packed 2x2: 4 tokens a row
    for got, sigma in seen:
        expected = sigma * noise + (1 - sigma) * reference
        assert torch.allclose(got[:, pinned], expected[:, pinned], atol=1e-5)
        assert not torch.allclose(got[:, ~pinned], expected[:, ~pinned], atol=1e-3)
    assert torch.equal(seen[-1][0][:, pinned], reference[:, pinned])


@pytest.mark.slow
def test_cancelled_masked_edit_leaves_the_pipeline_reusable(sampler, handle, pack):
    C = importlib.import_module(f"{pack.__name__}.utils.comfy")
    img, mask = image(64, 48), rect(64, 48, (10, 10, 40, 30))

    def cancel(value: int, total: int) -> None:
        C.request_cancel()

    E = importlib.import_module(f"{pack.__name__}.loaders.edit")
    S = importlib.import_module(f"{pack.__name__}.utils.sampling")
    M_ = importlib.import_module(f"{pack.__name__}.utils.mask")
    req = S.EditRequest("make it red", " ", 0, STEPS, 1.0, "custom", 64, 64, 1)
    with pytest.raises(C.Cancelled):
        E.edit(handle, req, [img, None, None], printer=cancel, mask=mask, mask_options=M_.MaskOptions())
    C.clear_cancel()
    again = E.edit(handle, req, [img, None, None], mask=mask)
    assert torch.equal(again, masked(sampler, handle, img, mask))
