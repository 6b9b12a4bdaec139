"""Masked edits without a model: the mask's checks, its seam, the context window and the stitch.

A masked edit cuts a window around the mask out of the image, edits only that window (scaled to the
model's ~1 MP), scales the edit back and stitches it in through a blend mask:

* `region` is the mask above 0.5, grown by `grow` pixels (square dilation);
* `blend` is 1 deep inside the region and falls to 0 over the last `feather` pixels of its edge, so
  it is 0 everywhere outside the region: those pixels are the input's, bit for bit;
* `context_window` is the box of the region enlarged `context` times (at least `MIN_WINDOW_SIDE`
  px a side, the image permitting), moved inside the image: what the model sees around the mask.

All functions take and return float tensors on the CPU; masks are `[H, W]`, images `[H, W, C]`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import QwenEditError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qwen_image_edit")

#: Below this many pixels a side the window would give the model too little of the picture.
MIN_WINDOW_SIDE = 512
#: A window is never narrower than 1:MAX_WINDOW_ASPECT (a thin mask still gets surroundings).
MAX_WINDOW_ASPECT = 3.0
#: Aspect ratios within this (relative) difference count as equal when a mask is resized to its image.
ASPECT_TOLERANCE = 0.02
THRESHOLD = 0.5


class MaskError(QwenEditError, ValueError):
    """A mask the edit cannot use; the message says what to change."""


@dataclass(frozen=True)
class MaskOptions:
    """The seam and surroundings of a masked edit (the sampler's grow, feather and context)."""

    grow: int = 0
    feather: int = 8
    context: float = 2.0

    def __post_init__(self) -> None:
        if self.grow < 0 or self.feather < 0:
            raise MaskError(f"grow and feather are pixel counts, 0 or more (got {self.grow} and {self.feather}).")
        if not self.context >= 1:
            raise MaskError(f"context must be at least 1.0, the mask's own size (got {self.context}).")


Box = tuple[int, int, int, int]
"""(left, top, right, bottom), right and bottom exclusive."""


def check_masks(mask: torch.Tensor, batch: int, width: int, height: int) -> torch.Tensor:
    """A ComfyUI MASK (`[H, W]` or `[B, H, W]`, 1 = edit) as `[1 or batch, height, width]` float32.

    A mask of another size is resized to the image (bilinear) when its aspect ratio matches; a batch
    of masks follows the rule for image2: one mask for every image, or exactly one per image.
    """
    import torch

    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"mask must be a MASK tensor [batch, height, width]; got {type(mask).__name__}.")
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or mask.numel() == 0:
        raise MaskError(
            f"mask must be a MASK shaped [batch, height, width]; got shape {tuple(mask.shape)}. An IMAGE can be "
            "turned into a mask with ComfyUI's 'Convert Image to Mask' node."
        )
    if mask.shape[0] not in (1, batch):
        raise MaskError(
            f"mask has a batch of {mask.shape[0]} but image has {batch}. Give one mask (used for every image) or "
            f"exactly {batch} (matched one to one)."
        )
    mask = mask.detach().float().cpu()
    if not torch.isfinite(mask).all():
        raise MaskError("mask contains NaN or infinite values; check the node that produced it.")
    mask_h, mask_w = mask.shape[-2:]
    if not (mask > THRESHOLD).any():
        # Load Image gives a 64x64 empty mask for an image without alpha: empty, whatever its shape.
        return torch.zeros(mask.shape[0], height, width)
    if (mask_w, mask_h) != (width, height):
        image_aspect, mask_aspect = width / height, mask_w / mask_h
        if abs(mask_aspect / image_aspect - 1) > ASPECT_TOLERANCE:
            raise MaskError(
                f"The mask is {mask_w}x{mask_h} but the image is {width}x{height}: their shapes differ, so the mask "
                "cannot say which pixels to edit. Draw the mask on this image (right-click Load Image -> Open in "
                "MaskEditor) or scale the mask with the same crop as the image."
            )
        log.info("Qwen-Image-Edit: mask %dx%d resized to the image's %dx%d.", mask_w, mask_h, width, height)
        mask = torch.nn.functional.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear",
                                               align_corners=False).squeeze(1)
    return mask.clamp(0, 1)


def mask_box(mask: torch.Tensor, grow: int = 0) -> Box | None:
    """The box of the pixels above 0.5, grown by `grow` and kept inside the mask; None if there are none."""
    import torch

    inside = mask > THRESHOLD
    rows = torch.nonzero(inside.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(inside.any(dim=0)).flatten()
    height, width = mask.shape
    return (max(int(cols[0]) - grow, 0), max(int(rows[0]) - grow, 0),
            min(int(cols[-1]) + 1 + grow, width), min(int(rows[-1]) + 1 + grow, height))


def _fit(start: float, size: int, limit: int) -> tuple[int, int]:
    """An interval of `size` (at most `limit`) starting near `start`, moved to lie inside [0, limit)."""
    size = min(size, limit)
    left = min(max(round(start), 0), limit - size)
    return left, left + size


def context_window(box: Box, width: int, height: int, context: float) -> Box:
    """The part of a `width` x `height` image the model sees for a mask whose region has this box.

    The box enlarged `context` times about its centre, at least `MIN_WINDOW_SIDE` px a side and no
    thinner than 1:`MAX_WINDOW_ASPECT`, then moved (not shrunk) to lie inside the image; it is cut
    only where the image itself is smaller. It always contains `box`.
    """
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    win_w = max(box_w * context, MIN_WINDOW_SIDE)
    win_h = max(box_h * context, MIN_WINDOW_SIDE)
    win_w = max(win_w, win_h / MAX_WINDOW_ASPECT)
    win_h = max(win_h, win_w / MAX_WINDOW_ASPECT)
    x0, x1 = _fit((left + right - win_w) / 2, max(box_w, int(round(win_w))), width)
    y0, y1 = _fit((top + bottom - win_h) / 2, max(box_h, int(round(win_h))), height)
    return x0, y0, x1, y1


def _pool(x: torch.Tensor, radius: int, kind: str) -> torch.Tensor:
    """Separable max or mean over a (2r+1)-square of `[H, W]`, edges replicated."""
    import torch.nn.functional as F

    if radius <= 0:
        return x
    size = 2 * radius + 1
    y = x[None, None]
    for kernel, pad in (((1, size), (radius, radius, 0, 0)), ((size, 1), (0, 0, radius, radius))):
        y = F.pad(y, pad, mode="replicate")
        y = F.max_pool2d(y, kernel, stride=1) if kind == "max" else F.avg_pool2d(y, kernel, stride=1)
    return y[0, 0]


def edit_region(mask: torch.Tensor, grow: int) -> torch.Tensor:
    """1 where the edit may change pixels: the mask above 0.5 grown by `grow` px, else 0."""
    return _pool((mask > THRESHOLD).float(), grow, "max")


def blend_mask(region: torch.Tensor, feather: int) -> torch.Tensor:
    """How much of the edit each pixel takes: 1 inside `region`, ramping to 0 over its last `feather` px.

    `2 * box_blur(region) - 1` is exactly 0 outside the region and reaches 1 `feather` px inside it;
    multiplying by the region keeps every pixel outside it at 0 whatever the rounding.
    """
    if feather <= 0:
        return region.clone()
    ramp = (2 * _pool(region, feather, "mean") - 1).clamp_(0, 1)
    return ramp * region


def window_blend(mask: torch.Tensor, window: Box, grow: int, feather: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`edit_region(mask, grow)` and its `blend_mask(..., feather)` over `window`, as if computed on the
    whole mask: on the window plus a margin of the mask around it, so a window edge inside the image
    behaves like the mask there and only an image edge is extended (replicated)."""
    left, top, right, bottom = window
    height, width = mask.shape
    margin = grow + feather + 1
    outer = (max(left - margin, 0), max(top - margin, 0), min(right + margin, width), min(bottom + margin, height))
    region = edit_region(crop(mask, outer), grow)
    inner = (left - outer[0], top - outer[1], right - outer[0], bottom - outer[1])
    return crop(region, inner), crop(blend_mask(region, feather), inner)


def crop(image: torch.Tensor, box: Box) -> torch.Tensor:
    left, top, right, bottom = box
    return image[top:bottom, left:right]


def stitch(image: torch.Tensor, edited: torch.Tensor, blend: torch.Tensor, box: Box) -> torch.Tensor:
    """`image` `[H, W, C]` with `edited` (the window's size) blended in through `blend` over `box`.

    Pixels whose blend is 0 are copied from `image` (not computed), so they are identical to it; those
    whose blend is 1 are the edit's.
    """
    import torch

    left, top, right, bottom = box
    out = image.clone()
    window = image[top:bottom, left:right]
    weight = blend.unsqueeze(-1)
    mixed = window * (1 - weight) + edited.to(window.dtype) * weight  # exact at weights 0 and 1
    out[top:bottom, left:right] = torch.where(weight > 0, mixed, window)
    return out
