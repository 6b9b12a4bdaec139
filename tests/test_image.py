"""Image conversion, input checks, sizing and the Image Scale node (CPU; one GPU test)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PACK = "qwen_edit_pack"


def _import(name: str) -> types.ModuleType:
    """Import ``qwen_edit_pack.<name>``, registering the repo as that package if no one has."""
    if PACK not in sys.modules:
        init = REPO / "__init__.py"
        if init.exists():
            spec = importlib.util.spec_from_file_location(PACK, init, submodule_search_locations=[str(REPO)])
        else:
            spec = importlib.machinery.ModuleSpec(PACK, None, is_package=True)
        module = importlib.util.module_from_spec(spec)
        module.__path__ = [str(REPO)]
        sys.modules[PACK] = module
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(PACK, None)
            raise
    return importlib.import_module(f"{PACK}.{name}")


@pytest.fixture(scope="module")
def U() -> types.ModuleType:
    return _import("utils.image")


@pytest.fixture(scope="module")
def S() -> types.ModuleType:
    return _import("utils.scale")


@pytest.fixture(scope="module")
def node_module() -> types.ModuleType:
    return _import("nodes.image")


def _random_uint8(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ------------------------------------------------------------------------------------------------
# IMAGE <-> PIL
# ------------------------------------------------------------------------------------------------


def test_uint8_round_trip_is_exact(U):
    original = _random_uint8(3, 37, 53, 3)
    tensor = torch.from_numpy(original).float() / 255
    images = U.tensor_to_pil(tensor)
    assert len(images) == 3
    for image, expected in zip(images, original):
        assert image.size == (53, 37)
        np.testing.assert_array_equal(_pixels(image), expected)
    back = U.pil_to_tensor(images)
    assert back.dtype == torch.float32 and back.shape == (3, 37, 53, 3)
    assert torch.equal(back, tensor)


def test_pil_to_tensor_matches_comfyui_loadimage(U):
    array = _random_uint8(20, 30, 3, seed=1)
    expected = torch.from_numpy(array.astype(np.float32) / 255.0)[None]
    assert torch.equal(U.pil_to_tensor(Image.fromarray(array)), expected)


def test_rounding_is_round_of_clamped_times_255(U):
    values = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 254.4 / 255, 1.0, 7.0])
    image = values.view(1, 1, -1, 1).expand(1, 1, -1, 3)
    got = _pixels(U.tensor_to_pil(image)[0])[0, :, 0]
    expected = np.round(np.clip(values.numpy(), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_single_image_without_batch_dimension(U):
    images = U.tensor_to_pil(torch.zeros(4, 5, 3))
    assert len(images) == 1 and images[0].size == (5, 4)


def test_rgba_composited_on_background(U):
    rgba = torch.tensor([1.0, 0.0, 0.0, 0.25]).view(1, 1, 1, 4).expand(1, 2, 2, 4)
    blue = _pixels(U.tensor_to_pil(rgba, background=(0.0, 0.0, 1.0))[0])
    # 0.25 * red + 0.75 * blue
    np.testing.assert_array_equal(blue[0, 0], [64, 0, 191])
    white = _pixels(U.tensor_to_pil(rgba)[0])
    np.testing.assert_array_equal(white[0, 0], [255, 191, 191])


def test_rgba_alpha_dropped(U):
    rgba = torch.tensor([0.2, 0.4, 0.6, 0.0]).view(1, 1, 1, 4)
    np.testing.assert_array_equal(_pixels(U.tensor_to_pil(rgba, background=None)[0])[0, 0], [51, 102, 153])


def test_grayscale_one_channel(U):
    gray = torch.from_numpy(_random_uint8(2, 6, 7, 1, seed=2)).float() / 255
    for image, frame in zip(U.tensor_to_pil(gray), gray):
        pixels = _pixels(image)
        expected = np.round(frame.numpy()[..., 0] * 255).astype(np.uint8)
        for c in range(3):
            np.testing.assert_array_equal(pixels[..., c], expected)


def test_grayscale_with_alpha(U):
    la = torch.tensor([0.8, 0.5]).view(1, 1, 1, 2)
    np.testing.assert_array_equal(_pixels(U.tensor_to_pil(la, background=(0.0, 0.0, 0.0))[0])[0, 0], [102] * 3)
    np.testing.assert_array_equal(_pixels(U.tensor_to_pil(la, background=(1.0, 0.0, 0.0))[0])[0, 0], [230, 102, 102])
    np.testing.assert_array_equal(_pixels(U.tensor_to_pil(la, background=None)[0])[0, 0], [204] * 3)


def test_to_rgb(U):
    rgba = torch.tensor([1.0, 0.0, 0.0, 0.5]).view(1, 1, 1, 4)
    out = U.to_rgb(rgba, background=(0.0, 0.0, 1.0))
    assert out.shape == (1, 1, 1, 3) and out.is_contiguous()
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5, 0.0, 0.5]))
    gray = torch.rand(2, 3, 4, 1)
    assert torch.equal(U.to_rgb(gray), gray.expand(2, 3, 4, 3))
    rgb = torch.rand(1, 3, 4, 3)
    assert U.to_rgb(rgb) is rgb
    assert U.to_rgb(torch.rand(3, 4, 2)).shape == (1, 3, 4, 3)


def test_non_contiguous_input(U):
    base = torch.from_numpy(_random_uint8(2, 3, 40, 60, seed=3)).float() / 255
    permuted = base.permute(0, 2, 3, 1)  # a channels-first buffer seen channels-last
    sliced = permuted[:, ::2, 1::3]
    for view in (permuted, sliced, permuted.transpose(1, 2)):
        assert not view.is_contiguous()
        got = np.stack([_pixels(image) for image in U.tensor_to_pil(view)])
        np.testing.assert_array_equal(got, np.round(view.contiguous().numpy() * 255).astype(np.uint8))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0), (torch.bfloat16, 1), (torch.float64, 0)])
def test_other_float_dtypes(U, dtype, tolerance):
    original = _random_uint8(2, 9, 11, 3, seed=4)
    tensor = (torch.from_numpy(original).float() / 255).to(dtype)
    got = np.stack([_pixels(image) for image in U.tensor_to_pil(tensor)]).astype(int)
    assert np.abs(got - original).max() <= tolerance


def test_uint8_tensor_is_read_as_0_to_255(U):
    original = _random_uint8(1, 5, 5, 3, seed=5)
    np.testing.assert_array_equal(_pixels(U.tensor_to_pil(torch.from_numpy(original))[0]), original[0])


@pytest.mark.gpu
def test_gpu_tensor(U, S):
    original = _random_uint8(2, 33, 65, 4, seed=6)
    cpu = torch.from_numpy(original).float() / 255
    gpu = cpu.cuda().to(torch.bfloat16).float()
    cpu = gpu.cpu()
    for background in ((1.0, 1.0, 1.0), None):
        on_gpu = [_pixels(image) for image in U.tensor_to_pil(gpu.permute(0, 2, 1, 3), background)]
        on_cpu = [_pixels(image) for image in U.tensor_to_pil(cpu.permute(0, 2, 1, 3), background)]
        for a, b in zip(on_gpu, on_cpu):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert U.to_rgb(gpu).device.type == "cuda"
    scaled = S.scale_image(gpu, 48, 32, "bicubic", "crop")
    assert scaled.device.type == "cuda" and scaled.shape == (2, 32, 48, 3)
    assert S.scale_image(gpu, 48, 32, "lanczos", "pad").device.type == "cuda"
    with pytest.raises(ValueError, match="NaN"):
        U.tensor_to_pil(torch.full((1, 2, 2, 3), float("nan"), device="cuda"))


# ------------------------------------------------------------------------------------------------
# PIL -> IMAGE modes
# ------------------------------------------------------------------------------------------------


def test_pil_rgba_composited_or_dropped(U):
    image = Image.new("RGBA", (3, 2), (255, 0, 0, 64))
    white = U.pil_to_tensor(image)
    a = 64 / 255
    torch.testing.assert_close(white[0, 0, 0], torch.tensor([1.0, 1 - a, 1 - a]))
    dropped = U.pil_to_tensor(image, background=None)
    assert torch.equal(dropped[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_pil_modes(U):
    gray = Image.fromarray(_random_uint8(4, 6, seed=7))
    out = U.pil_to_tensor(gray)
    assert out.shape == (1, 4, 6, 3)
    assert torch.equal(out[..., 0], out[..., 2])
    la = Image.new("LA", (2, 2), (100, 0))
    torch.testing.assert_close(U.pil_to_tensor(la)[0, 0, 0], torch.ones(3))
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    torch.testing.assert_close(U.pil_to_tensor(palette)[0, 0, 0], torch.ones(3))
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    torch.testing.assert_close(U.pil_to_tensor(sixteen), torch.ones(1, 2, 2, 3))
    mixed = U.pil_to_tensor([Image.new("RGB", (2, 2), (255, 0, 0)), sixteen])
    assert mixed.shape == (2, 2, 2, 3) and mixed.dtype == torch.float32


def test_pil_sizes_must_match(U):
    with pytest.raises(ValueError, match=r"share a size; got 4x4, 5x4"):
        U.pil_to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])
    with pytest.raises(ValueError, match="empty"):
        U.pil_to_tensor([])
    with pytest.raises(TypeError, match="not a PIL image"):
        U.pil_to_tensor([np.zeros((2, 2, 3))])


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8, 8, 3), (1, 0, 8, 3), (1, 8, 0, 3), (0, 0, 3)])
def test_empty_refused(U, shape):
    with pytest.raises(ValueError, match=r"is empty .*check the node that produced it"):
        U.tensor_to_pil(torch.zeros(shape))
    with pytest.raises(ValueError, match="is empty"):
        U.validate_image(torch.zeros(shape), "image")


def test_nan_refused(U, S):
    image = torch.rand(2, 16, 16, 3)
    image[1, 3, 4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^image contains NaN values; check the node that produced it$"):
        U.tensor_to_pil(image)
    with pytest.raises(ValueError, match=r"^reference contains NaN values"):
        U.validate_image(image, "reference")
    with pytest.raises(ValueError, match="NaN"):
        S.scale_image(image, 32, 32)
    image[1, 3, 4, 2] = float("inf")
    with pytest.raises(ValueError, match="infinite values"):
        U.validate_image(image)
    assert _pixels(U.tensor_to_pil(image)[1])[3, 4, 2] == 255


def test_nan_in_dropped_alpha_is_harmless(U):
    rgba = torch.rand(1, 4, 4, 4)
    rgba[..., 3] = float("nan")
    assert len(U.tensor_to_pil(rgba, background=None)) == 1


@pytest.mark.parametrize(
    "value, error, message",
    [
        (torch.rand(1, 8, 8, 5), ValueError, "has 5 channels"),
        (torch.rand(1, 3, 16, 16), ValueError, "channels-first"),
        (torch.rand(1, 64, 64), ValueError, "looks like a MASK"),
        (torch.rand(8, 8), ValueError, "2 dimensions"),
        (torch.rand(1, 1, 8, 8, 3), ValueError, "5 dimensions"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.int32), TypeError, "dtype torch.int32"),
        (np.zeros((1, 8, 8, 3)), TypeError, "got ndarray"),
    ],
)
def test_malformed_refused(U, S, value, error, message):
    for call in (U.tensor_to_pil, U.validate_image, U.to_rgb, lambda x: S.scale_image(x, 16, 16)):
        with pytest.raises(error, match=message):
            call(value)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_validate_accepts_every_channel_count(U, channels):
    U.validate_image(torch.rand(2, 16, 24, channels))
    U.validate_image(torch.rand(16, 24, channels))
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.bool):
        U.validate_image(torch.ones(1, 16, 24, channels, dtype=dtype))


def test_one_by_one(U, node_module):
    """Converted as is; refused by validate_image with the fix; scaled up by the node."""
    pixel = torch.tensor([0.2, 0.4, 0.6]).view(1, 1, 1, 3)
    np.testing.assert_array_equal(_pixels(U.tensor_to_pil(pixel)[0]), [[[51, 102, 153]]])
    with pytest.raises(ValueError, match=r"1x1 pixels.*at least 8 px.*Qwen-Image-Edit Image Scale"):
        U.validate_image(pixel, "image")
    U.validate_image(torch.rand(1, 8, 8, 3))
    with pytest.raises(ValueError, match="7x8"):
        U.validate_image(torch.rand(1, 8, 7, 3))
    image, width, height = node_module.QwenImageEditImageScale().scale(pixel, 1.0, "16", "lanczos", "crop")
    assert (width, height) == (1024, 1024) and image.shape == (1, 1024, 1024, 3)
    torch.testing.assert_close(image, pixel.expand(1, 1024, 1024, 3))
    U.validate_image(image)


def test_extreme_aspect_refused(U):
    with pytest.raises(ValueError, match=r"aspect ratio of 1:40\.0.*at most 1:32\."):
        U.validate_image(torch.rand(1, 10, 400, 3))
    U.validate_image(torch.rand(1, 10, 400, 3), max_aspect=None)


# ------------------------------------------------------------------------------------------------
# Sizing
# ------------------------------------------------------------------------------------------------

SIZES = [(1024, 1024), (4032, 3024), (3024, 4032), (1920, 1080), (6000, 4000), (640, 480), (3840, 1600), (13, 7), (1, 1)]


@pytest.mark.parametrize("width, height", SIZES)
@pytest.mark.parametrize("megapixels", [0.25, 1.0, 2.0])
@pytest.mark.parametrize("multiple", [16, 32])
def test_scaled_size_properties(U, width, height, megapixels, multiple):
    w, h = U.scaled_size(width, height, megapixels, multiple)
    assert w % multiple == 0 and h % multiple == 0 and w >= multiple and h >= multiple
    area = megapixels * 1024 * 1024
    side = math.sqrt(area)
    # Within one multiple per side of the exact answer.
    assert abs(math.log(w * h / area)) <= 2.2 * multiple / side
    assert abs(math.log(w / h / (width / height))) <= 2.2 * multiple / side


@pytest.mark.parametrize("width, height", SIZES + [(1000, 1333), (2000, 1000), (1000, 3000)])
@pytest.mark.parametrize("multiple", [16, 32])
def test_scaled_size_match_pipeline(U, width, height, multiple):
    w, h = U.scaled_size(width, height, 1.0, multiple, match_pipeline=True)
    assert w % multiple == 0 and h % multiple == 0
    assert U.pipeline_reference_size(w, h) == (w, h)
    assert abs(math.log(w / h / (width / height))) <= 0.06
    assert abs(math.log(w * h / 1024**2)) <= 0.06
    assert U.scaled_size(width, height, 2.0, multiple, match_pipeline=True) == U.scaled_size(width, height, 2.0, multiple)


def test_scaled_size_known_values(U):
    assert U.scaled_size(1024, 1024, 1.0, 16) == (1024, 1024)
    assert U.scaled_size(4032, 3024, 1.0, 16) == (1184, 880)
    # 1184x880 would be re-encoded by the pipeline at 1184x896, stretched 1.8%.
    assert U.pipeline_reference_size(1184, 880) == (1184, 896)
    assert U.scaled_size(4032, 3024, 1.0, 16, match_pipeline=True) == (1184, 896)
    assert U.scaled_size(6000, 4000, 1.0, 16) == (1248, 832)
    assert U.scaled_size(100, 100, 0.0001, 16) == (16, 16)


def test_pipeline_reference_size_matches_diffusers(U):
    plus = pytest.importorskip("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus")
    for width in range(32, 4000, 97):
        for height in range(32, 4000, 89):
            expected = plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, width / height)
            assert U.pipeline_reference_size(width, height) == expected


@pytest.mark.parametrize("args", [(0, 10, 1.0, 16), (10, 10, 0.0, 16), (10, 10, float("nan"), 16), (10, 10, 1.0, 0), (10.5, 10, 1.0, 16)])
def test_scaled_size_refuses_nonsense(U, args):
    with pytest.raises(ValueError, match="must be"):
        U.scaled_size(*args)


# ------------------------------------------------------------------------------------------------
# Scaling
# ------------------------------------------------------------------------------------------------

METHODS = ["lanczos", "bicubic", "area", "bilinear", "nearest"]
FITS = ["crop", "pad", "stretch"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("source, target", [((45, 70), (64, 48)), ((301, 200), (96, 80)), ((3, 1), (32, 32))])
def test_scale_image_shape_and_range(S, method, fit, source, target):
    torch.manual_seed(0)
    image = torch.rand(2, source[1], source[0], 3)
    before = image.clone()
    out = S.scale_image(image, target[0], target[1], method, fit)
    assert out.shape == (2, target[1], target[0], 3)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(image, before)


@pytest.mark.parametrize("method", METHODS)
def test_scale_to_same_size_is_identity(S, method):
    image = torch.rand(1, 32, 48, 3)
    for fit in FITS:
        assert torch.equal(S.scale_image(image, 48, 32, method, fit), image)


def _marker_image(width: int, height: int, side: int) -> torch.Tensor:
    image = torch.zeros(1, height, width, 3)
    top, left = (height - side) // 2, (width - side) // 2
    image[:, top : top + side, left : left + side] = 1.0
    return image


def _centroid(image: torch.Tensor) -> tuple[float, float]:
    weight = image[0, ..., 0].double()
    ys = torch.arange(weight.shape[0], dtype=torch.float64) + 0.5
    xs = torch.arange(weight.shape[1], dtype=torch.float64) + 0.5
    total = weight.sum()
    return float((weight.sum(0) * xs).sum() / total), float((weight.sum(1) * ys).sum() / total)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fit", ["crop", "pad"])
@pytest.mark.parametrize(
    "source, target",
    [((300, 200), (256, 256)), ((200, 300), (256, 256)), ((900, 600), (160, 128)), ((600, 900), (128, 160)), ((120, 80), (96, 96))],
)
def test_crop_and_pad_keep_content_centred(S, method, fit, source, target):
    image = _marker_image(source[0], source[1], side=40)
    out = S.scale_image(image, target[0], target[1], method, fit)
    cx, cy = _centroid(out)
    assert abs(cx - target[0] / 2) < 0.05 and abs(cy - target[1] / 2) < 0.05


def test_pad_bars_are_symmetric_and_coloured(S):
    image = torch.full((1, 100, 200, 3), 0.5)
    out = S.scale_image(image, 128, 128, "bilinear", "pad", pad_color=(1.0, 0.0, 0.0))
    column = out[0, :, 64]
    bar = (column == torch.tensor([1.0, 0.0, 0.0])).all(-1)
    top = int(bar[:64].sum())
    assert top == int(bar[64:].sum()) == 32
    torch.testing.assert_close(out[0, 64, 64], torch.full((3,), 0.5))


def test_crop_cuts_equally(S):
    """A 6x4 stripe pattern cropped to 4x4 at scale 1 loses one column each side."""
    image = torch.arange(6, dtype=torch.float32).div(10).view(1, 1, 6, 1).expand(1, 4, 6, 3)
    for method in ("bicubic", "nearest", "area", "bilinear"):
        out = S.scale_image(image, 4, 4, method, "crop")
        torch.testing.assert_close(out, image[:, :, 1:5])


def test_scale_image_refuses_nonsense(S):
    image = torch.rand(1, 8, 8, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        S.scale_image(image, 8, 8, "cubic")
    with pytest.raises(ValueError, match="fit must be one of"):
        S.scale_image(image, 8, 8, "bicubic", "fill")
    with pytest.raises(ValueError, match="width must be"):
        S.scale_image(image, 0, 8)
    with pytest.raises(ValueError, match="pad_color"):
        S.scale_image(image, 8, 8, "bicubic", "pad", pad_color=(2, 0, 0))


def test_scale_image_converts_channels(S):
    rgba = torch.zeros(1, 8, 8, 4)
    out = S.scale_image(rgba, 16, 16, "nearest", "stretch")
    assert out.shape == (1, 16, 16, 3)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_shrinking_is_antialiased_outside_comfyui(S):
    """A 1-px checkerboard shrunk 2.5x averages to flat gray, not to a moire pattern."""
    board = (torch.arange(100).view(-1, 1) + torch.arange(100)).remainder(2).float()
    image = board.view(1, 100, 100, 1).expand(1, 100, 100, 3)
    for method in ("bilinear", "bicubic"):
        assert float(S.scale_image(image, 40, 40, method, "stretch").std()) < 0.02, method


# ------------------------------------------------------------------------------------------------
# Inside ComfyUI: common_upscale
# ------------------------------------------------------------------------------------------------


def _photo_like(width: int, height: int, seed: int = 0) -> torch.Tensor:
    """8-bit values (as LoadImage gives): smooth shading plus a few hard edges."""
    ys = torch.linspace(0, 1, height).view(-1, 1)
    xs = torch.linspace(0, 1, width).view(1, -1)
    r = 0.5 + 0.4 * torch.sin(7 * xs + 3 * ys)
    g = 0.5 + 0.4 * torch.cos(4 * xs - 9 * ys)
    b = ((xs * 5).floor() + (ys * 3).floor()).remainder(2) * 0.8 + 0.1
    image = torch.stack([r, g, b.expand(height, width)], -1).unsqueeze(0)
    return image.mul(255).round().div(255)


#: (source, target, the fits that shrink the source along some axis)
PARITY_CASES = [
    ((301, 200), (96, 80), set(FITS)),
    ((64, 48), (160, 128), set()),
    ((45, 70), (64, 48), {"pad", "stretch"}),  # crop keeps 45x34 and enlarges it
    ((4, 1), (16, 16), set()),  # a crop ComfyUI's own crop="center" cannot do: it leaves 0 px
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("source, target, shrinking", PARITY_CASES)
def test_comfyui_and_standalone_agree(S, request, method, fit, source, target, shrinking):
    """Same size always; the same pixels on 8-bit input, except that ComfyUI's bilinear and bicubic
    do not antialias a shrink (there only hard edges differ, a few 1/255 on average)."""
    noise = torch.from_numpy(_random_uint8(2, source[1], source[0], 3, seed=8)).float() / 255
    photo = _photo_like(*source)
    standalone = [S.scale_image(x, *target, method, fit) for x in (noise, photo)]
    request.getfixturevalue("comfyui")
    inside = [S.scale_image(x, *target, method, fit) for x in (noise, photo)]
    for a, b in zip(standalone, inside):
        assert a.shape == b.shape == (a.shape[0], target[1], target[0], 3)
        assert b.dtype == torch.float32 and b.is_contiguous()
    if method in ("bilinear", "bicubic") and fit in shrinking:
        assert float((standalone[1] - inside[1]).abs().mean()) < 3 / 255
    else:
        assert torch.equal(standalone[0], inside[0]) and torch.equal(standalone[1], inside[1])


def test_inside_comfyui_every_resize_is_common_upscale(S, comfyui, monkeypatch):
    calls = []
    upscale = comfyui["comfy.utils"].common_upscale

    def recording(samples, width, height, upscale_method, crop):
        calls.append((tuple(samples.shape), width, height, upscale_method, crop))
        return upscale(samples, width, height, upscale_method, crop)

    monkeypatch.setattr(comfyui["comfy.utils"], "common_upscale", recording)
    image = torch.rand(2, 30, 40, 3)
    for method in METHODS:
        for fit in FITS:
            S.scale_image(image, 24, 24, method, fit)
    comfy_names = {"nearest": "nearest-exact"}
    expected = [((2, 3, 30, 30), 24, 24, comfy_names.get(m, m), "disabled") if fit == "crop"
                else ((2, 3, 30, 40), 24, 18, comfy_names.get(m, m), "disabled") if fit == "pad"
                else ((2, 3, 30, 40), 24, 24, comfy_names.get(m, m), "disabled")
                for m in METHODS for fit in FITS]
    assert calls == expected
    calls.clear()
    assert torch.equal(S.scale_image(image, 40, 30), image)
    assert calls == []


def test_node_gives_the_same_image_inside_comfyui(S, node_module, request):
    image = _photo_like(640, 480)
    node = node_module.QwenImageEditImageScale()
    standalone = node.scale(image, 1.0, "16", "lanczos", "crop")
    request.getfixturevalue("comfyui")
    inside = node.scale(image, 1.0, "16", "lanczos", "crop")
    assert standalone[1:] == inside[1:] == (1184, 896)
    assert torch.equal(standalone[0], inside[0])


# ------------------------------------------------------------------------------------------------
# The node
# ------------------------------------------------------------------------------------------------


def test_node_definition(node_module):
    cls = node_module.QwenImageEditImageScale
    inputs = cls.INPUT_TYPES()["required"]
    assert list(inputs) == ["image", "megapixels", "multiple_of", "method", "fit"]
    for name, (_, options) in inputs.items():
        assert options.get("tooltip"), name
    assert inputs["image"][0] == "IMAGE"
    assert inputs["megapixels"][0] == "FLOAT"
    assert {k: inputs["megapixels"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01}
    assert inputs["multiple_of"][0] == ["16", "32"] and inputs["multiple_of"][1]["default"] == "16"
    assert inputs["method"][0] == METHODS and inputs["method"][1]["default"] == "lanczos"
    assert inputs["fit"][0] == FITS and inputs["fit"][1]["default"] == "crop"
    assert cls.RETURN_TYPES == ("IMAGE", "INT", "INT")
    assert cls.RETURN_NAMES == ("image", "width", "height")
    assert len(cls.OUTPUT_TOOLTIPS) == 3
    assert cls.FUNCTION == "scale" and cls.CATEGORY == "Qwen-Image-Edit"
    assert "match" in cls.DESCRIPTION
    assert node_module.NODE_CLASS_MAPPINGS == {"QwenImageEditImageScale": cls}
    assert node_module.NODE_DISPLAY_NAME_MAPPINGS == {"QwenImageEditImageScale": "Qwen-Image-Edit Image Scale"}


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("multiple_of", ["16", "32"])
def test_node_scale(U, node_module, fit, multiple_of):
    image = torch.rand(2, 300, 400, 3)
    out, width, height = node_module.QwenImageEditImageScale().scale(image, 0.5, multiple_of, "bicubic", fit)
    assert isinstance(width, int) and isinstance(height, int)
    assert out.shape == (2, height, width, 3) and out.device.type == "cpu"
    assert width % int(multiple_of) == 0 and height % int(multiple_of) == 0
    assert abs(width * height / (0.5 * 1024**2) - 1) < 0.1


def test_node_output_is_what_the_pipeline_encodes(U, node_module):
    out, width, height = node_module.QwenImageEditImageScale().scale(torch.rand(1, 3024, 4032, 3), 1.0, "16", "area", "crop")
    assert U.pipeline_reference_size(width, height) == (width, height) == (1184, 896)
    U.validate_image(out)


def test_importing_is_cheap():
    """The module pulls in neither diffusers nor transformers."""
    code = (
        "import importlib, importlib.machinery, importlib.util, sys\n"
        f"spec = importlib.machinery.ModuleSpec({PACK!r}, None, is_package=True)\n"
        "pkg = importlib.util.module_from_spec(spec)\n"
        f"pkg.__path__ = [{str(REPO)!r}]\n"
        f"sys.modules[{PACK!r}] = pkg\n"
        f"importlib.import_module('{PACK}.utils.image')\n"
        f"importlib.import_module('{PACK}.utils.scale')\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
