"""Scaling an IMAGE to an exact size, cropped, padded or stretched: the Image Scale node's work.

Resampling is ComfyUI's ``comfy.utils.common_upscale`` inside ComfyUI and torch / PIL elsewhere;
what this module adds is the fit: a crop or pad with equal margins on opposite edges, so content
stays centred to the pixel, and the output size from :func:`~.image.scaled_size`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import comfy
from .errors import ImageError
from .image import BLACK, Color, check_color, pil_to_tensor, scaled_size, tensor_to_pil, to_rgb, validate_image

SCALE_METHODS: tuple[str, ...] = ("lanczos", "bicubic", "area", "bilinear", "nearest")
FIT_MODES: tuple[str, ...] = ("crop", "pad", "stretch")

def scale_image(
    images: torch.Tensor,
    width: int,
    height: int,
    method: str = "lanczos",
    fit: str = "crop",
    pad_color: Color = BLACK,
) -> torch.Tensor:
    """Resize an IMAGE batch to exactly ``width x height``; returns ``[B, height, width, 3]`` 0..1.

    ``fit``: "crop" cuts the source to the target's aspect, equally from opposite edges, then
    resizes; "pad" resizes to fit inside and adds ``pad_color`` bars, equal on opposite edges;
    "stretch" resizes whatever the aspect. ``method``: one of :data:`SCALE_METHODS`, through
    ComfyUI's ``common_upscale`` inside ComfyUI ("nearest" is its "nearest-exact", which unlike
    torch's legacy "nearest" does not shift the image by half a pixel). Any input size from 1x1 up
    is accepted; the result is on the input's device and the input is not modified.
    """
    for label, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ImageError(f"{label} must be a whole number >= 1; got {value!r}")
    _check_scale_options(images, method, fit)
    return _scale(images, int(width), int(height), method, fit, pad_color)


def _check_scale_options(images: torch.Tensor, method: str, fit: str) -> None:
    if method not in SCALE_METHODS:
        raise ImageError(f"method must be one of {', '.join(SCALE_METHODS)}; got {method!r}")
    if fit not in FIT_MODES:
        raise ImageError(f"fit must be one of {', '.join(FIT_MODES)}; got {fit!r}")
    validate_image(images, "image", min_side=1, max_aspect=None)


def _scale(images: torch.Tensor, width: int, height: int, method: str, fit: str, pad_color: Color) -> torch.Tensor:
    pad = check_color(pad_color, "pad_color")
    if pad is None:
        raise ImageError("pad_color must be three floats 0..1 (R, G, B); got None")
    x = to_rgb(images).movedim(-1, 1)
    in_h, in_w = x.shape[-2:]
    if fit == "stretch":
        out = _resize(x, width, height, method)
    elif fit == "crop":
        left, keep_w = _centred(in_w, in_h * width / height)
        top, keep_h = _centred(in_h, in_w * height / width)
        out = _resize(x[..., top : top + keep_h, left : left + keep_w], width, height, method)
    else:
        scale = min(width / in_w, height / in_h)
        left, inner_w = _centred(width, in_w * scale)
        top, inner_h = _centred(height, in_h * scale)
        out = torch.tensor(pad, dtype=x.dtype, device=x.device).view(1, 3, 1, 1).repeat(x.shape[0], 1, height, width)
        out[..., top : top + inner_h, left : left + inner_w] = _resize(x, inner_w, inner_h, method)
    return out.movedim(1, -1).contiguous().clamp_(0, 1)


def scale_to_megapixels(
    images: torch.Tensor,
    megapixels: float = 1.0,
    multiple: int = 16,
    method: str = "lanczos",
    fit: str = "crop",
    pad_color: Color = BLACK,
    match_pipeline: bool = True,
) -> tuple[torch.Tensor, int, int]:
    """:func:`scaled_size` (with ``match_pipeline``) then :func:`scale_image`; ``(image, width, height)``."""
    _check_scale_options(images, method, fit)
    in_h, in_w = int(images.shape[-3]), int(images.shape[-2])
    width, height = scaled_size(in_w, in_h, megapixels, multiple, match_pipeline=match_pipeline)
    return _scale(images, width, height, method, fit, pad_color), width, height


_COMFY_METHODS = {"nearest": "nearest-exact"}
"""The node's method names that ComfyUI's ``common_upscale`` spells differently; the rest are the same."""


def _resize(planar: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    """``[B, C, H, W]`` to exactly ``width x height``: ComfyUI's ``common_upscale`` inside ComfyUI.

    Elsewhere the same resamplers: PIL's lanczos on 8-bit frames (rounded where ComfyUI truncates,
    so they differ by about 1/255) and torch's ``interpolate``, except that bilinear and bicubic are
    antialiased when shrinking (ComfyUI's are not).
    """
    in_h, in_w = planar.shape[-2:]
    if (in_h, in_w) == (height, width):
        return planar.clone()
    upscale = comfy.comfy_upscale()
    if upscale is not None:
        return upscale(planar, width, height, _COMFY_METHODS.get(method, method), "disabled")
    if method == "lanczos":
        frames = tensor_to_pil(planar.movedim(1, -1))
        resized = [frame.resize((width, height), Image.Resampling.LANCZOS) for frame in frames]
        return pil_to_tensor(resized).movedim(-1, 1).to(planar.device)
    mode = _COMFY_METHODS.get(method, method)
    antialias = mode in ("bilinear", "bicubic") and (height < in_h or width < in_w)
    return F.interpolate(planar, size=(height, width), mode=mode, antialias=antialias)


def _centred(outer: int, ideal: float) -> tuple[int, int]:
    """``(margin, inner)`` with ``inner + 2 * margin == outer`` and ``inner`` nearest ``ideal``.

    Equal margins keep content centred to the pixel. ``inner`` never drops under 1 px (2 when
    ``outer`` is even). ComfyUI's ``crop="center"`` cuts by the same rule but leaves 0 px for some
    very wide images (4x1 to a square fails there), which is why the crop is done here.
    """
    margin = min(max(0, round((outer - ideal) / 2)), (outer - 1) // 2)
    return margin, outer - 2 * margin
