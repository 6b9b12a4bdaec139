"""One edit, start to end, in one place: the only entry point the sampler node calls.

`edit(handle, request, images)` checks the input, then, holding the pipeline lock for the whole edit
(so another thread can never load, release or change the pipeline mid-run): gets the cached pipeline ->
applies the handle's LoRAs -> Lightning's step/CFG defaults -> speed options -> runs it, retrying once
without a speed option that failed, and releasing a pipeline whose very first edit fails.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

import torch

from ..utils import comfy
from ..utils.image import pipeline_reference_size, tensor_to_pil
from ..utils.sampling import (
    EditError,
    EditRequest,
    check_prompt_length,
    nonfinite_message,
    output_size,
    pipeline_kwargs,
    validate,
    with_lightning_defaults,
)
from . import compat, lora, speed
from .pipeline import LoadedPipeline, PipeHandle, get_pipeline, pipeline_lock, run_on

log = logging.getLogger("qwen_image_edit")


def edit(handle: PipeHandle, req: EditRequest, images: list[torch.Tensor | None],
         printer: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The edit the sampler node runs; IMAGE `[B*images_per_prompt, H, W, 3]` float32 on the CPU."""
    validate(req, images)
    with pipeline_lock():
        loaded = get_pipeline(handle.settings)
        applied = lora.apply_loras(loaded, handle.loras)
        req = with_lightning_defaults(req, applied.lightning_steps)
        speed.apply_speed(loaded, handle.speed)
        names = tuple(spec.name for spec in handle.loras if spec.strength != 0)

        def run() -> torch.Tensor:
            return run_edit(loaded, req, images, printer, names)

        return run_on(loaded, lambda: speed.run_with_fallback(loaded, run))


def _item(images: torch.Tensor, index: int) -> torch.Tensor:
    if images.ndim == 3:
        return images
    return images[index if images.shape[0] > 1 else 0]


def _resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[N,3,H,W] to an exact size with antialiased bicubic, values kept in 0..1."""
    resized = torch.nn.functional.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                                              align_corners=False)
    return resized.clamp(0, 1)


def _oom_message(device: str, width: int, height: int, placement: Any) -> str:
    return (
        f"Out of memory on {device} while editing at {width}x{height} (quantization={placement.quantization}, "
        f"offload={placement.offload}). Edit at ~1 MP (size_mode 'auto' or the Image Scale node), or in the "
        "loader choose quantization 'nf4' and offload 'model' (16-24 GB cards) or 'group' (8-12 GB cards)."
    )


def run_edit(
    loaded: LoadedPipeline,
    req: EditRequest,
    images: list[torch.Tensor | None],
    printer: Callable[[int, int], None] | None = None,
    lora_names: tuple[str, ...] = (),
) -> torch.Tensor:
    """Run the edit on a loaded pipeline; returns IMAGE `[B*images_per_prompt, H, W, 3]` float32 on CPU.

    Batch item b uses seed + b, so any single item can be reproduced alone. Cancelling raises
    ComfyUI's InterruptProcessingException (or `comfy.Cancelled` outside ComfyUI) from the step
    callback, which stops at once without the VAE decode and leaves the pipeline reusable.
    """
    present = validate(req, images)
    pipe = loaded.pipe
    batch = max(img.shape[0] if img.ndim == 4 else 1 for img in present)
    first = present[0]
    width, height, exact = output_size(req, first.shape[-2], first.shape[-3])
    if req.size_mode == "match" and pipeline_reference_size(first.shape[-2], first.shape[-3]) != (first.shape[-2], first.shape[-3]):
        ref_w, ref_h = pipeline_reference_size(first.shape[-2], first.shape[-3])
        log.warning(
            "Qwen-Image-Edit: the pipeline re-encodes this %dx%d image at %dx%d, so the edit may drift slightly "
            "against it. For an exact overlay scale it first with 'Qwen-Image-Edit Image Scale' at 1.0 megapixels.",
            first.shape[-2], first.shape[-3], ref_w, ref_h,
        )
    check_prompt_length(pipe.tokenizer, req, len(present), width, height)
    progress = comfy.Progress(batch * req.steps, printer)
    previewer = comfy.latent_previewer(loaded.device, pipe.vae.config.z_dim)

    outputs = []
    for b in range(batch):
        comfy.throw_if_interrupted()
        pil = [tensor_to_pil(_item(img, b))[0] for img in present]
        offset = b * req.steps

        def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict, offset: int = offset) -> dict:
            if not torch.isfinite(kwargs["latents"]).all():
                raise EditError(nonfinite_message(loaded.settings.precision, lora_names))
            preview = None
            if previewer is not None:
                try:
                    preview = previewer(compat.unpack_latents(_pipe, kwargs["latents"], height, width).float())
                except Exception:  # noqa: BLE001 - a preview is a nicety; never fail an edit for it
                    log.debug("Qwen-Image-Edit: latent preview failed", exc_info=True)
            progress.update(offset + i + 1, preview)
            comfy.throw_if_interrupted()
            return {}

        kwargs = pipeline_kwargs(req, pil, width, height, req.seed + b)
        try:
            result = pipe(**kwargs, callback_on_step_end=on_step).images
        except torch.OutOfMemoryError as exc:
            traceback.clear_frames(exc.__traceback__)
            comfy.empty_cache()
            raise EditError(_oom_message(loaded.device, width, height, loaded.placement)) from None
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)
            # A cancel or failure skips the pipeline's own cleanup: put offloaded components back on the CPU.
            pipe.maybe_free_model_hooks()
            raise
        result = result.float()
        if not torch.isfinite(result).all():  # the VAE decode itself can overflow in float16
            raise EditError(nonfinite_message(loaded.settings.precision, lora_names))
        if exact is not None:
            result = _resize(result, *exact)
        outputs.append(result.permute(0, 2, 3, 1).cpu())
    return torch.cat(outputs).contiguous()
