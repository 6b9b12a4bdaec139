"""ComfyUI IMAGE tensors to and from PIL, input checks, and the sizes the pipeline works at.

A ComfyUI IMAGE is a float32 tensor ``[batch, height, width, channels]``, values 0..1, on the CPU.
The functions here are more lenient on input than that contract: a single image
``[height, width, channels]``, 1 to 4 channels (gray, gray + alpha, RGB, RGBA), any floating dtype
(uint8 is read as 0..255), any device and any strides. They always return RGB.

Alpha is straight (not premultiplied). By default it is composited on white, the same in every
direction (tensor to PIL, PIL to tensor, ``to_rgb``), so a transparent PNG gives the same pixels
whichever way it enters; ``background=None`` drops alpha instead, as ComfyUI's LoadImage does.

Conversions quantise with ``round(clamp(x, 0, 1) * 255)`` and read back with ``/ 255``, so an
8-bit image survives IMAGE -> PIL -> IMAGE exactly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .errors import ImageError, ImageTypeError

Color = Tuple[float, float, float]

WHITE: Color = (1.0, 1.0, 1.0)
BLACK: Color = (0.0, 0.0, 0.0)

MEGAPIXEL = 1024 * 1024
"""Pixels in one "megapixel", as ComfyUI's ImageScaleToTotalPixels and the diffusers pipeline
(``VAE_IMAGE_SIZE = 1024 * 1024``) count it."""

MIN_SIDE = 8
"""Smallest side :func:`validate_image` lets through by default.

The pipeline resizes every input to about 1 MP anyway, so a tiny image is not a crash but is almost
always a mistake upstream (an empty placeholder, a 1x1 mask turned into an image); its content would
be a few blurred blocks. It is refused with a pointer to the scale node, which accepts any size."""

MAX_ASPECT = 32.0
"""Widest aspect ratio :func:`validate_image` lets through by default.

The pipeline shows each image to the text encoder at about 384x384 pixels of area: past 1:32 the
short side is under ~68 px there, and near 1:576 it rounds to 0 and the pipeline fails deep inside
with a shape error."""

SCALE_NODE = "Qwen-Image-Edit Image Scale"

_UPSTREAM_HINT = "check the node that produced it"


def _check_layout(images: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``images`` as a ``[B, H, W, C]`` view, refusing what no conversion can fix."""
    if not isinstance(images, torch.Tensor):
        raise ImageTypeError(
            f"{name} must be an IMAGE tensor [batch, height, width, channels]; "
            f"got {type(images).__name__}"
        )
    shape = tuple(images.shape)
    if images.ndim not in (3, 4):
        raise ImageError(
            f"{name} must be an IMAGE shaped [batch, height, width, channels]; "
            f"got {images.ndim} dimensions {shape}"
        )
    if images.numel() == 0:
        raise ImageError(f"{name} is empty (shape {shape}); {_UPSTREAM_HINT}")
    if images.ndim == 3:
        if not 1 <= shape[-1] <= 4:
            raise ImageError(
                f"{name} has shape {shape}, which looks like a MASK [batch, height, width], not an "
                "IMAGE; turn it into an image first (ComfyUI's 'Convert Mask to Image' node)"
            )
        images = images.unsqueeze(0)
    channels = images.shape[-1]
    if not 1 <= channels <= 4:
        if 1 <= images.shape[1] <= 4:
            hint = "it looks channels-first [batch, channels, height, width]; put channels last"
        else:
            hint = "an IMAGE has 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels"
        raise ImageError(f"{name} has {channels} channels (shape {shape}); {hint}")
    if not (images.is_floating_point() or images.dtype in (torch.uint8, torch.bool)):
        raise ImageTypeError(
            f"{name} has dtype {images.dtype}; an IMAGE holds floats 0..1 (uint8 0..255 also works)"
        )
    return images


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """float32 on the same device; uint8 is scaled from 0..255. May return ``images`` itself."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()


def check_color(color: Optional[Sequence[float]], name: str = "background") -> Optional[Color]:
    """``color`` (R, G, B floats 0..1, or one number for gray) as a :data:`Color`; None stays None."""
    if color is None:
        return None
    if isinstance(color, (int, float)):
        values = (float(color),) * 3
    else:
        values = tuple(float(v) for v in color)
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ImageError(f"{name} must be None or three floats 0..1 (R, G, B); got {color!r}")
    return values  # type: ignore[return-value]


def _rgb(images: torch.Tensor, background: Optional[Color]) -> torch.Tensor:
    """``[B, H, W, C]`` float with C in 1..4 to ``[B, H, W, 3]``; may be a view of the input."""
    channels = images.shape[-1]
    if channels == 3:
        return images
    if channels in (2, 4):
        color = images[..., : channels - 1]
        if background is not None:
            alpha = images[..., channels - 1 :].clamp(0, 1)
            bg = torch.tensor(background, dtype=images.dtype, device=images.device)
            return torch.lerp(bg, color, alpha)
        images = color
    if images.shape[-1] == 1:
        return images.expand(*images.shape[:-1], 3)
    return images


def to_rgb(images: torch.Tensor, background: Optional[Color] = WHITE) -> torch.Tensor:
    """Normalise a 1-, 2-, 3- or 4-channel IMAGE to ``[B, H, W, 3]`` float32 on its own device.

    Alpha is composited on ``background`` (RGB floats 0..1) or, with ``None``, dropped. A single
    ``[H, W, C]`` image gains a batch dimension. A 3-channel contiguous float32 input is returned
    as is, not copied.
    """
    rgb = _rgb(_as_float(_check_layout(images, "image")), check_color(background))
    return rgb.contiguous()


def validate_image(
    images: torch.Tensor,
    name: str = "image",
    *,
    min_side: int = MIN_SIDE,
    max_aspect: Optional[float] = MAX_ASPECT,
) -> None:
    """Raise a ``ValueError``/``TypeError`` that says what is wrong and what to do, or return None.

    Refuses: anything but a ``[B, H, W, C]`` / ``[H, W, C]`` tensor, channels outside 1..4, an
    empty tensor, NaN or infinite values, a side under ``min_side`` pixels, an aspect ratio past
    ``1:max_aspect`` (``None`` turns that check off). ``name`` is the input's name in the messages.
    """
    x = _check_layout(images, name)
    if x.is_floating_point():
        low, high = torch.aminmax(x.detach())  # one pass, no temporary; NaN propagates to both
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            what = "NaN" if bool(torch.isnan(low) | torch.isnan(high)) else "infinite"
            raise ImageError(f"{name} contains {what} values; {_UPSTREAM_HINT}")
    height, width = int(x.shape[1]), int(x.shape[2])
    if min(width, height) < min_side:
        raise ImageError(
            f"{name} is {width}x{height} pixels; each side must be at least {min_side} px. "
            f"Scale it up first with the '{SCALE_NODE}' node (for example to 1 megapixel)."
        )
    aspect = max(width, height) / min(width, height)
    if max_aspect is not None and aspect > max_aspect:
        raise ImageError(
            f"{name} is {width}x{height} pixels, an aspect ratio of 1:{aspect:.1f}; the model "
            f"handles at most 1:{max_aspect:g}. Crop it closer to square first."
        )


def _quantise(frames: np.ndarray) -> np.ndarray:
    """``round(clamp(x, 0, 1) * 255)`` of ``[B, H, W, 3]`` float32 (any strides) as contiguous uint8.

    Done in blocks of rows sized for the CPU cache: whole-array temporaries cost more in page
    faults than the arithmetic (about 2x slower at 4x1024x1024).
    """
    batch, height, width, channels = frames.shape
    out = np.empty(frames.shape, dtype=np.uint8)
    rows = max(1, _BLOCK_ELEMENTS // (width * channels))
    buffer = np.empty((min(rows, height), width, channels), dtype=np.float32)
    for b in range(batch):
        for top in range(0, height, rows):
            block = frames[b, top : top + rows]
            work = buffer[: block.shape[0]]
            np.multiply(block, np.float32(255), out=work)
            np.rint(work, out=work)
            np.clip(work, 0, 255, out=work)
            np.copyto(out[b, top : top + rows], work, casting="unsafe")
    return out


_BLOCK_ELEMENTS = 1 << 17


def tensor_to_pil(images: torch.Tensor, background: Optional[Color] = WHITE) -> list[Image.Image]:
    """IMAGE ``[B, H, W, C]`` or ``[H, W, C]`` to a list of B RGB PIL images.

    Alpha (2 or 4 channels) is composited on ``background`` or, with ``None``, dropped. On a GPU
    the quantising runs there and only uint8 crosses to the CPU.
    """
    rgb = _rgb(_as_float(_check_layout(images, "image")), check_color(background)).detach()
    if rgb.device.type == "cpu":
        frames = rgb.numpy()
        # max() propagates NaN; numpy's single thread is steadier than torch's pool on a busy CPU.
        if np.isnan(frames.max()):
            raise ImageError(f"image contains NaN values; {_UPSTREAM_HINT}")
        array = _quantise(frames)
    else:
        if bool(torch.isnan(rgb).any()):
            raise ImageError(f"image contains NaN values; {_UPSTREAM_HINT}")
        array = rgb.mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu().contiguous().numpy()
    return [Image.fromarray(frame) for frame in array]


_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _pil_to_array(image: Image.Image, background: Optional[Color]) -> np.ndarray:
    """One PIL image to ``[H, W, 3]``: uint8 0..255 when 8-bit and opaque, else float32 0..1."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        scale = 255.0 if image.mode == "F" else 65535.0
        gray = np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if background is not None and image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + np.asarray(background, dtype=np.float32) * (1 - alpha)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def pil_to_tensor(
    images: Union[Image.Image, Sequence[Image.Image]], background: Optional[Color] = WHITE
) -> torch.Tensor:
    """PIL image(s) of one size to an IMAGE ``[B, H, W, 3]`` float32 0..1 on the CPU.

    Transparency (RGBA, LA, P with a transparent index...) is composited on ``background`` or, with
    ``None``, dropped. 16-bit gray ("I;16", "I") is read as 0..65535 and "F" as 0..255, as PIL's
    own conversions do. EXIF orientation is not applied: do that when reading a file.
    """
    batch = [images] if isinstance(images, Image.Image) else list(images)
    if not batch:
        raise ImageError("no images to convert; the list is empty")
    for index, image in enumerate(batch):
        if not isinstance(image, Image.Image):
            raise ImageTypeError(f"item {index} is a {type(image).__name__}, not a PIL image")
    sizes = sorted({image.size for image in batch})
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise ImageError(
            f"images in one batch must share a size; got {listed}. Scale them to one size first "
            f"(for example with the '{SCALE_NODE}' node) or pass them separately."
        )
    width, height = sizes[0]
    if width == 0 or height == 0:
        raise ImageError(f"image is empty ({width}x{height}); {_UPSTREAM_HINT}")
    bg = check_color(background)
    out = np.empty((len(batch), height, width, 3), dtype=np.float32)
    for frame, image in zip(out, batch):
        array = _pil_to_array(image, bg)
        if array.dtype == np.uint8:
            np.divide(array, np.float32(255), out=frame)
        else:
            frame[...] = array
    return torch.from_numpy(out)


def pipeline_reference_size(width: int, height: int) -> tuple[int, int]:
    """The size diffusers' QwenImageEdit(Plus)Pipeline resizes an input of ``width x height`` to
    before VAE-encoding it as the reference: about 1024x1024 px of area, sides rounded to 32.

    The same formula as diffusers' ``calculate_dimensions(1024 * 1024, width / height)``, kept here
    so it costs no diffusers import. A side can come out 0 for an extreme aspect ratio, as there.
    """
    ratio = width / height
    ref_w = math.sqrt(MEGAPIXEL * ratio)
    ref_h = ref_w / ratio
    return round(ref_w / 32) * 32, round(ref_h / 32) * 32


_STABLE_ASPECT_SLACK = 0.06
"""Largest aspect error (log) ``scaled_size`` accepts to get a size the pipeline keeps as is."""


def scaled_size(
    width: int, height: int, megapixels: float, multiple: int, *, match_pipeline: bool = False
) -> tuple[int, int]:
    """Width and height near ``megapixels`` (of 1024x1024 px) at the aspect ratio of ``width x height``.

    Both sides are multiples of ``multiple`` and at least ``multiple``. Among nearby multiples it
    picks the pair with the smallest aspect error, area error weighing half as much, so crop or
    pad to the result trims or adds only a few pixels.

    ``match_pipeline=True`` at 1.0 MP instead picks, among the sizes the pipeline VAE-encodes as
    they are (see :func:`pipeline_reference_size`), the one nearest in aspect. At any other size the
    pipeline resizes its reference to one of those, often with sides rounded the other way, and the
    model then sees the reference stretched by up to ~3.5% against the output: the output comes
    out zoomed or shifted against the input. The price is a larger aspect error against the
    original, so a few more pixels cropped or padded: median ~1% and at most ~3.6% for aspect
    ratios within 1:2, ~5.5% within 1:4, never past 6% (past that, as for very wide images, it
    falls back to the plain choice). At other megapixels the pipeline still encodes its reference
    at 1.0 MP whatever this returns, so the flag changes nothing there.
    """
    for label, value in (("width", width), ("height", height), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ImageError(f"{label} must be a whole number >= 1; got {value!r}")
    if not (isinstance(megapixels, (int, float)) and math.isfinite(megapixels) and megapixels > 0):
        raise ImageError(f"megapixels must be a finite number > 0; got {megapixels!r}")
    area = float(megapixels) * MEGAPIXEL
    ratio = width / height
    ideal_w = math.sqrt(area * ratio) / multiple
    ideal_h = math.sqrt(area / ratio) / multiple
    stable = match_pipeline and math.isclose(area, MEGAPIXEL)
    reach = max(3, math.ceil(96 / multiple)) if stable else 0

    def near(value: float) -> set[int]:
        return {max(1, k) for k in range(math.floor(value) - reach, math.ceil(value) + reach + 1)}

    ws, hs = near(ideal_w), near(ideal_h)
    ws |= {max(1, round(k * ratio)) for k in hs}
    hs |= {max(1, round(k / ratio)) for k in ws}

    def cost(pair: tuple[int, int]) -> tuple[bool, float, float, int, int]:
        kw, kh = pair
        aspect_error = abs(math.log(kw / kh / ratio))
        area_error = abs(math.log(kw * kh * multiple * multiple / area))
        size = (kw * multiple, kh * multiple)
        kept = stable and aspect_error <= _STABLE_ASPECT_SLACK and pipeline_reference_size(*size) == size
        return (not kept, round(2 * aspect_error + area_error, 12), area_error, kw, kh)

    kw, kh = min(((kw, kh) for kw in ws for kh in hs), key=cost)
    return kw * multiple, kh * multiple
