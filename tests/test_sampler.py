"""The edit node on the tiny pipeline: shapes, seeds, sizes, batches, progress, cancel, bad input."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from tinykit.tiny_pipeline import make_test_image

STEPS = 2


@pytest.fixture
def mods(pack):
    L = importlib.import_module(f"{pack.__name__}.loaders.pipeline")
    S = importlib.import_module(f"{pack.__name__}.utils.sampling")
    C = importlib.import_module(f"{pack.__name__}.utils.comfy")
    I = importlib.import_module(f"{pack.__name__}.utils.image")
    return L, S, C, I


def image(w=64, h=64, seed=0, batch=1):
    I_ = [make_test_image(w, h, seed=seed + b) for b in range(batch)]
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255 for i in I_]))


def edit(sampler, handle, img, **kw):
    args = dict(prompt="make it red", negative_prompt=" ", seed=0, steps=STEPS, true_cfg_scale=4.0,
                size_mode="match", width=1024, height=1024, images_per_prompt=1)
    args.update(kw)
    return sampler.edit(handle, img, **args)[0]


def test_node_declaration(pack):
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["QwenImageEditSampler"] == "Qwen-Image-Edit"
    spec = node.INPUT_TYPES()
    assert list(spec["required"]) == ["pipe", "image", "prompt", "negative_prompt", "seed", "steps",
                                      "true_cfg_scale", "size_mode", "width", "height", "images_per_prompt"]
    assert list(spec["optional"]) == ["image2", "image3", "mask", "grow", "feather", "context"]
    req = spec["required"]
    assert req["steps"][1]["default"] == 40 and req["true_cfg_scale"][1]["default"] == 4.0
    assert req["negative_prompt"][1]["default"] == " "
    for section in spec.values():
        for name, (_, opts) in section.items():
            assert opts.get("tooltip"), name
    assert node.RETURN_TYPES == ("IMAGE",)


def test_output_shape_dtype_range(sampler, handle):
    out = edit(sampler, handle, image(64, 48))
    assert out.shape == (1, 48, 64, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1 and out.is_contiguous()


@pytest.mark.slow
def test_seed_reproduces_bit_for_bit_and_changes_output(sampler, handle):
    a = edit(sampler, handle, image(), seed=7)
    b = edit(sampler, handle, image(), seed=7)
    c = edit(sampler, handle, image(), seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.slow
def test_node_equals_direct_pipeline_call(sampler, handle, mods, tiny_2511_dir):
    """The node adds no hidden change: same pixels as QwenImageEditPlusPipeline with the same arguments."""
    L = mods[0]
    pipe = L.get_pipeline(handle.settings).pipe
    img = image(64, 64)
    pil = make_test_image(64, 64, seed=0)
    direct = pipe(image=[pil], prompt="make it red", negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64,
                  num_inference_steps=STEPS, num_images_per_prompt=1, generator=torch.Generator("cpu").manual_seed(3),
                  output_type="pt").images
    node = edit(sampler, handle, img, seed=3)
    assert torch.equal(node, direct.permute(0, 2, 3, 1).float())


@pytest.mark.slow
def test_auto_size_matches_pipeline_default(sampler, handle, mods):
    S = mods[1]
    out = edit(sampler, handle, image(64, 32), size_mode="auto", steps=2)
    assert tuple(out.shape[1:3]) == (S.auto_size(64, 32)[1], S.auto_size(64, 32)[0])
    assert S.auto_size(1024, 1024) == (1024, 1024)
    w, h = S.auto_size(1920, 1080)
    assert w % 32 == 0 and h % 32 == 0 and abs(w * h - 2**20) / 2**20 < 0.05


def test_match_size_is_exact_even_off_grid(sampler, handle):
    out = edit(sampler, handle, image(70, 50), size_mode="match", steps=2)
    assert tuple(out.shape[1:3]) == (50, 70)


def test_custom_size_floors_to_16(sampler, handle):
    out = edit(sampler, handle, image(), size_mode="custom", width=100, height=40, steps=2)
    assert tuple(out.shape[1:3]) == (32, 96)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_two_and_three_images(sampler, handle, n):
    extra = {"image2": image(48, 48, seed=5)}
    if n == 3:
        extra["image3"] = image(32, 64, seed=9)
    out = edit(sampler, handle, image(), **extra)
    one = edit(sampler, handle, image())
    assert out.shape == one.shape and not torch.equal(out, one)


@pytest.mark.slow
def test_batch_gives_one_edit_each_with_seed_plus_index(sampler, handle):
    batch = image(batch=3)
    out = edit(sampler, handle, batch, seed=10)
    assert out.shape == (3, 64, 64, 3)
    alone = edit(sampler, handle, batch[2:3], seed=12)
    assert torch.equal(out[2:3], alone)


@pytest.mark.slow
def test_batched_image2_shared_and_matched(sampler, handle):
    shared = edit(sampler, handle, image(batch=2), image2=image(seed=4))
    matched = edit(sampler, handle, image(batch=2), image2=image(seed=4, batch=2))
    assert shared.shape == matched.shape == (2, 64, 64, 3)
    assert torch.equal(shared[0], matched[0]) and not torch.equal(shared[1], matched[1])


def test_mismatched_batch_is_refused(sampler, handle, mods):
    with pytest.raises(mods[1].EditError, match="image2 has a batch of 2 but image has 3"):
        edit(sampler, handle, image(batch=3), image2=image(batch=2))


@pytest.mark.slow
def test_images_per_prompt(sampler, handle):
    out = edit(sampler, handle, image(batch=2), images_per_prompt=2, steps=2)
    assert out.shape == (4, 64, 64, 3)
    assert not torch.equal(out[0], out[1])


def test_cfg_off_passes_no_negative_prompt(mods):
    S = mods[1]
    off = S.pipeline_kwargs(S.EditRequest("x", " ", true_cfg_scale=1.0), [], 64, 64, 0)
    on = S.pipeline_kwargs(S.EditRequest("x", "", true_cfg_scale=4.0), [], 64, 64, 0)
    assert off["negative_prompt"] is None and on["negative_prompt"] == " "
    assert "guidance_scale" not in on and on["true_cfg_scale"] == 4.0
    assert on["generator"].device.type == "cpu"


@pytest.mark.slow
def test_cfg_scale_changes_result(sampler, handle):
    assert not torch.equal(edit(sampler, handle, image(), true_cfg_scale=1.0),
                           edit(sampler, handle, image(), true_cfg_scale=4.0))


# -- progress and cancel ---------------------------------------------------------------------------


@pytest.mark.slow
def test_progress_fires_once_per_step(sampler, handle, comfyui, mods):
    updates = []
    comfyui["comfy.utils"].set_progress_bar_global_hook(lambda v, t, p, node_id=None: updates.append((v, t)))
    edit(sampler, handle, image(batch=2), steps=3)
    assert updates == [(i, 6) for i in range(1, 7)]


@pytest.mark.slow
def test_cancel_stops_without_decode_and_pipeline_still_works(sampler, handle, comfyui, mods, monkeypatch):
    L = mods[0]
    pipe = L.get_pipeline(handle.settings).pipe
    mm = comfyui["comfy.model_management"]
    steps_seen, decodes = [], []
    real_decode = pipe.vae.decode

    def counting_decode(*a, **kw):
        decodes.append(1)
        return real_decode(*a, **kw)

    monkeypatch.setattr(pipe.vae, "decode", counting_decode)

    def hook(value, total, preview, node_id=None):
        steps_seen.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)

    comfyui["comfy.utils"].set_progress_bar_global_hook(hook)
    with pytest.raises(mm.InterruptProcessingException):
        edit(sampler, handle, image(), steps=10)
    assert steps_seen == [1, 2] and decodes == []
    assert L.current_pipeline() is not None
    comfyui["comfy.utils"].set_progress_bar_global_hook(None)
    out = edit(sampler, handle, image(), steps=2)
    assert out.shape == (1, 64, 64, 3) and decodes == [1]


def test_cancel_outside_comfyui(sampler, handle, mods):
    C = mods[2]
    C.request_cancel()
    with pytest.raises(C.Cancelled):
        edit(sampler, handle, image())
    assert edit(sampler, handle, image(), steps=2).shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_out_of_memory_while_sampling(sampler, handle, mods, monkeypatch):
    """Failure injection: the transformer runs out of memory; the message says what to change."""
    L, S = mods[0], mods[1]
    pipe = L.get_pipeline(handle.settings).pipe

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipe.transformer, "forward", oom)
    with pytest.raises(S.EditError, match="Out of memory.*nf4.*offload"):
        edit(sampler, handle, image())
    monkeypatch.undo()
    assert L.current_pipeline() is not None
    assert edit(sampler, handle, image(), steps=2).shape == (1, 64, 64, 3)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_refused(sampler, handle, mods, prompt):
    with pytest.raises(mods[1].EditError, match="prompt is empty"):
        edit(sampler, handle, image(), prompt=prompt)


def test_too_large_refused_before_weights_move(sampler, mods, tiny_2511_dir, load_counter):
    L, S = mods[0], mods[1]
    L.release_pipeline()
    handle = L.PipeHandle(L.LoadSettings(str(tiny_2511_dir), device="cpu", quantization="none", offload="none"))
    with pytest.raises(S.EditError, match="MP.*Image Scale"):
        edit(sampler, handle, image(), size_mode="custom", width=4096, height=4096)
    assert L.current_pipeline() is None and load_counter == []


def test_nan_image_refused(sampler, handle):
    bad = image()
    bad[0, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        edit(sampler, handle, bad)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_other_channel_counts_accepted(sampler, handle, channels):
    img = torch.rand(1, 64, 64, channels)
    assert edit(sampler, handle, img, steps=2).shape == (1, 64, 64, 3)


def test_empty_image_refused(sampler, handle):
    with pytest.raises(ValueError, match="empty"):
        edit(sampler, handle, torch.zeros(0, 64, 64, 3))


def test_tiny_image_handled(sampler, handle):
    try:
        out = edit(sampler, handle, torch.rand(1, 1, 1, 3), size_mode="auto", steps=2)
    except ValueError as exc:
        assert "Scale" in str(exc) or "small" in str(exc)
    else:
        assert out.shape[-1] == 3


def test_match_warns_when_the_pipeline_will_resize_the_reference(sampler, handle, mods, caplog):
    I = mods[3]
    assert I.pipeline_reference_size(1184, 896) == (1184, 896)
    with caplog.at_level("WARNING", logger="qwen_image_edit"):
        edit(sampler, handle, image(64, 48))
    assert any("re-encodes this 64x48 image" in r.getMessage() for r in caplog.records)
