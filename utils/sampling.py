"""The pure half of an edit: the request, its checks, the output size and the pipeline's arguments.

Everything the node adds to a plain `QwenImageEditPlusPipeline` call is decided here, without a model:
input checks, the output size and a CPU generator per batch item. `pipeline_kwargs` builds the exact
arguments, which tests use to compare the node against a direct pipeline call. Running the edit
(progress, cancel, previews, NaN checks) is `loaders.edit`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import QwenEditError

if TYPE_CHECKING:  # torch loads with the first edit, not with the pack
    import torch

log = logging.getLogger("qwen_image_edit")

SIZE_MODES = ("auto", "match", "custom")
MAX_MEGAPIXELS = 4.2
_SEED_MOD = 2**64
#: Qwen2.5-VL's chat-template and vision tokens: in a prompt they would restructure the template or
#: make the processor look for images that are not there.
TEMPLATE_TOKENS = re.compile(r"<\|(?:im_start|im_end|endoftext|vision_start|vision_end|vision_pad|image_pad|video_pad|"
                             r"object_ref_start|object_ref_end|box_start|box_end|quad_start|quad_end)\|>")
#: The transformer's RoPE table has 4096 positions; text positions start after the largest image's half-side
#: (in 16-px patches). Each reference image adds its vision tokens (~190 at the ~384x384 the encoder sees).
ROPE_POSITIONS = 4096
VISION_TOKENS_PER_IMAGE = 256
TEMPLATE_OVERHEAD_TOKENS = 32


class EditError(QwenEditError, ValueError):
    """Bad input for an edit; the message says what to change."""


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    negative_prompt: str = " "
    seed: int = 0
    steps: int = 40
    true_cfg_scale: float = 4.0
    size_mode: str = "auto"
    width: int = 1024
    height: int = 1024
    images_per_prompt: int = 1


#: The sampler's widget defaults, which are the model card's values. While a Lightning LoRA is active a
#: value still at its default is taken as "not chosen" and replaced by Lightning's (see
#: `with_lightning_defaults`); any other value is the user's choice and is kept.
MODEL_CARD_STEPS = 40
MODEL_CARD_TRUE_CFG = 4.0
LIGHTNING_TRUE_CFG = 1.0


def with_lightning_defaults(req: EditRequest, lightning_steps: int | None) -> EditRequest:
    """The request to run while a Lightning LoRA is active.

    ComfyUI widget defaults are static, so a Lightning LoRA cannot change the sampler's widgets. Instead:
    steps still at 40 become the LoRA's step count (4 or 8), and true_cfg_scale still at 4.0 becomes 1.0
    (Lightning is distilled without CFG; 4.0 would over-saturate and double the time). Each value is
    decided on its own, and a value the user changed is always respected.
    """
    if not lightning_steps:
        return req
    changes: dict[str, Any] = {}
    if req.steps == MODEL_CARD_STEPS and lightning_steps != MODEL_CARD_STEPS:
        changes["steps"] = int(lightning_steps)
    if req.true_cfg_scale == MODEL_CARD_TRUE_CFG:
        changes["true_cfg_scale"] = LIGHTNING_TRUE_CFG
    if changes:
        log.info("Qwen-Image-Edit: Lightning LoRA: %s (the sampler's values were the model-card defaults)",
                 ", ".join(f"{k} {getattr(req, k)} -> {v}" for k, v in changes.items()))
        req = dataclasses.replace(req, **changes)
    return req


def auto_size(width: int, height: int, area: int = 1024 * 1024) -> tuple[int, int]:
    """The pipeline's own default size for an image of this aspect: ~1 MP, sides multiples of 32.

    The same arithmetic as diffusers' `calculate_dimensions` (both sides from the unrounded width). The
    sampler applies it to Picture 1, the image being edited; diffusers alone follows the last picture.
    """
    ratio = width / height
    exact_width = math.sqrt(area * ratio)
    return max(round(exact_width / 32) * 32, 32), max(round(exact_width / ratio / 32) * 32, 32)


def output_size(req: EditRequest, first_width: int, first_height: int) -> tuple[int, int, tuple[int, int] | None]:
    """(width, height) to generate at, plus the exact size to resize to afterwards ('match' only).

    The pipeline floors sizes to multiples of 16, so 'match' on an image whose sides are not multiples
    of 16 generates at the nearest multiple-of-16 size and resizes back: the frame is kept whole and
    lines up with the input instead of being cropped or shifted.
    """
    if req.size_mode == "auto":
        w, h = auto_size(first_width, first_height)
        return w, h, None
    if req.size_mode == "match":
        w, h = max(16, round(first_width / 16) * 16), max(16, round(first_height / 16) * 16)
        exact = None if (w, h) == (first_width, first_height) else (first_width, first_height)
        return w, h, exact
    return req.width // 16 * 16, req.height // 16 * 16, None


def masked_edit_size(req: EditRequest, window_width: int, window_height: int) -> tuple[int, int]:
    """The size a masked edit generates its context window at; the result is scaled back to the window.

    auto: ~1 MP at the window's aspect (the pipeline's own reference size, so the edit lines up with
    it); match: the window's own size (multiples of 16); custom: width x height pixels of area at the
    window's aspect.
    """
    if req.size_mode == "match":
        w, h = max(16, round(window_width / 16) * 16), max(16, round(window_height / 16) * 16)
    elif req.size_mode == "custom":
        w, h = auto_size(window_width, window_height, area=req.width * req.height)
    else:
        w, h = auto_size(window_width, window_height)
    if w * h / 1e6 > MAX_MEGAPIXELS:
        raise EditError(
            f"The mask's context window is {window_width}x{window_height} and would be edited at {w}x{h} "
            f"({w * h / 1e6:.1f} MP), more than the {MAX_MEGAPIXELS} MP the model can take. Use size_mode 'auto' "
            "(the window is scaled to ~1 MP and back) or a smaller context."
        )
    return w, h


def validate(req: EditRequest, images: list[torch.Tensor | None], masked: bool = False) -> list[torch.Tensor]:
    """Check everything before any weights move; return the images that are present.

    A masked edit keeps the image's own size (only a window around the mask is edited at ~1 MP), so
    the output-size limit does not apply to it; `masked_edit_size` checks the window instead.
    """
    from .image import validate_image

    if req.size_mode not in SIZE_MODES:
        raise EditError(f"size_mode must be one of {', '.join(SIZE_MODES)}, not {req.size_mode!r}.")
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise EditError("The prompt is empty. Describe the edit, for example: 'Make the sky purple'.")
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt or "")):
        found = TEMPLATE_TOKENS.search(text)
        if found:
            raise EditError(
                f"The {name} contains {found.group(0)}, one of the model's chat-template tokens, which would change "
                "how the prompt is read. Remove it: images go in the image inputs, and the template is added for you."
            )
    if req.steps < 2:
        # One step with the model's scheduler (shift_terminal) gives a NaN sigma: an all-NaN image.
        raise EditError("steps must be at least 2 (the model card uses 40; Lightning LoRAs 4 or 8).")
    if req.images_per_prompt < 1:
        raise EditError("images_per_prompt must be at least 1.")
    if not math.isfinite(req.true_cfg_scale):
        raise EditError("true_cfg_scale must be a finite number (the model card uses 4.0).")
    present = [img for img in images if img is not None]
    names = ["image", "image2", "image3"]
    for name, img in zip(names, images):
        if img is not None:
            validate_image(img, name)
    batch = present[0].shape[0] if present[0].ndim == 4 else 1
    for name, img in zip(names[1:], images[1:]):
        if img is None:
            continue
        b = img.shape[0] if img.ndim == 4 else 1
        if b not in (1, batch):
            raise EditError(
                f"{name} has a batch of {b} but image has {batch}. Give {name} one image (shared by every "
                f"edit) or exactly {batch} (matched one to one)."
            )
    first = present[0]
    w, h, exact = output_size(req, first.shape[-2], first.shape[-3])
    if req.size_mode == "custom" and (w < 16 or h < 16):
        raise EditError(f"width and height must be at least 16 (got {req.width}x{req.height}).")
    if masked:
        return present
    out_w, out_h = exact or (w, h)
    megapixels = max(w * h, out_w * out_h) / 1e6
    if megapixels > MAX_MEGAPIXELS:
        raise EditError(
            f"The output would be {out_w}x{out_h} ({megapixels:.1f} MP). The model is made for ~1 MP and more than "
            f"{MAX_MEGAPIXELS} MP will not fit in memory or edit well. Put a 'Qwen-Image-Edit Image Scale' node "
            "before the sampler (1.0 megapixels) or use size_mode 'auto'."
        )
    return present


def _cpu_generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def pipeline_kwargs(req: EditRequest, pil_images: list[Any], width: int, height: int, seed: int) -> dict[str, Any]:
    """The exact arguments given to QwenImageEditPlusPipeline for one batch item."""
    use_cfg = req.true_cfg_scale > 1
    return {
        "image": pil_images,
        "prompt": req.prompt,
        "negative_prompt": (req.negative_prompt or " ") if use_cfg else None,
        "true_cfg_scale": req.true_cfg_scale,
        "height": height,
        "width": width,
        "num_inference_steps": req.steps,
        "num_images_per_prompt": req.images_per_prompt,
        "generator": _cpu_generator(seed % _SEED_MOD),
        "output_type": "pt",
    }


def check_prompt_length(tokenizer: Any, req: EditRequest, image_count: int, width: int, height: int) -> None:
    """Refuse, before the text encoder runs, a prompt longer than the transformer's positions allow."""
    largest_side = max(width, height, 1024) // 16  # condition images are encoded at ~1024x1024
    budget = ROPE_POSITIONS - largest_side // 2 - image_count * VISION_TOKENS_PER_IMAGE - TEMPLATE_OVERHEAD_TOKENS
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt or "")):
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count > budget:
            raise EditError(
                f"The {name} is {count} tokens; with {image_count} image(s) at {width}x{height} the model takes at "
                f"most {budget}. Shorten it (edit prompts work best in one or two sentences)."
            )


def nonfinite_message(precision: str, lora_names: tuple[str, ...]) -> str:
    """What most likely made an edit produce NaN/inf values, and what to do."""
    causes = []
    if precision == "float16":
        causes.append("float16 overflowed inside the model: choose precision 'bfloat16' in the loader")
    if lora_names:
        causes.append(f"a broken or incompatible LoRA: try without {', '.join(lora_names)}")
    causes.append("damaged weights: check the model files (doctor) or download them again")
    return ("The edit produced NaN/infinite values, which would be saved as a black image, so it was stopped. "
            "Likely cause: " + "; or ".join(causes) + ".")
