"""One edit, start to end, in one place: the only entry point the sampler node calls.

`edit(handle, request, images)` checks the input, then, holding the pipeline lock for the whole edit
(so another thread can never load, release or change the pipeline mid-run): gets the cached pipeline ->
applies the handle's LoRAs -> Lightning's step/CFG defaults -> speed options -> runs it, retrying once
without a speed option that failed, and releasing a pipeline whose very first edit fails.

With a mask, each image is edited only in a window around its mask (`utils.mask`), the latents
outside the mask are pinned to the image's own at every step, and the result is stitched back into
the untouched full-size image.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

import torch

from ..utils import comfy
from ..utils import mask as masking
from ..utils.image import pipeline_reference_size, tensor_to_pil, to_rgb
from ..utils.mask import MaskOptions
from ..utils.sampling import (
    EditError,
    EditRequest,
    check_prompt_length,
    masked_edit_size,
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
         printer: Callable[[int, int], None] | None = None, mask: torch.Tensor | None = None,
         mask_options: MaskOptions = MaskOptions()) -> torch.Tensor:
    """The edit the sampler node runs; IMAGE `[B*images_per_prompt, H, W, 3]` float32 on the CPU.

    With `mask` (1 = edit) the output keeps each image's size and every pixel outside the grown mask.
    """
    present = validate(req, images, masked=mask is not None)
    masks = None
    if mask is not None:
        first = present[0]
        batch = _batch_size(present)
        masks = masking.check_masks(mask, batch, first.shape[-2], first.shape[-3])
        if all(masking.mask_box(m) is None for m in masks):
            log.info("Qwen-Image-Edit: the mask is empty, so the image is returned unchanged without running "
                     "the model. Paint the area to edit (right-click Load Image -> Open in MaskEditor).")
            return _unchanged(first, batch, req.images_per_prompt)
    with pipeline_lock():
        loaded = get_pipeline(handle.settings)
        applied = lora.apply_loras(loaded, handle.loras)
        req = with_lightning_defaults(req, applied.lightning_steps)
        speed.apply_speed(loaded, handle.speed)
        names = tuple(spec.name for spec in handle.loras if spec.strength != 0)

        def run() -> torch.Tensor:
            if masks is None:
                return run_edit(loaded, req, images, printer, names)
            return run_masked_edit(loaded, req, images, masks, mask_options, printer, names)

        return run_on(loaded, lambda: speed.run_with_fallback(loaded, run))


def _unchanged(image: torch.Tensor, batch: int, copies: int) -> torch.Tensor:
    rgb = to_rgb(image).cpu()
    return rgb.expand(batch, *rgb.shape[1:]).repeat_interleave(copies, dim=0).contiguous()


def _batch_size(present: list[torch.Tensor]) -> int:
    """Edits to make: the largest batch among the images (validate() allows only 1 or that size)."""
    return max(img.shape[0] if img.ndim == 4 else 1 for img in present)


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


class _Run:
    """One batch item's pipeline call: progress, previews, NaN checks and cancel in its step callback."""

    def __init__(self, loaded: LoadedPipeline, progress: comfy.Progress, lora_names: tuple[str, ...]) -> None:
        self.loaded = loaded
        self.progress = progress
        self.lora_names = lora_names
        self.previewer = comfy.latent_previewer(loaded.device, loaded.pipe.vae.config.z_dim)

    def __call__(self, kwargs: dict[str, Any], offset: int,
                 blend: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The pipeline's images `[N, 3, h, w]` float32; `blend` may replace the latents after each step."""
        loaded, pipe = self.loaded, self.loaded.pipe
        width, height = kwargs["width"], kwargs["height"]

        def on_step(_pipe: Any, i: int, _t: Any, step: dict) -> dict:
            latents = step["latents"]
            if not torch.isfinite(latents).all():
                raise EditError(nonfinite_message(loaded.settings.precision, self.lora_names))
            if blend is not None:
                latents = blend(latents)
            preview = None
            if self.previewer is not None:
                try:
                    preview = self.previewer(compat.unpack_latents(_pipe, latents, height, width).float())
                except Exception:  # noqa: BLE001 - a preview is a nicety; never fail an edit for it
                    log.debug("Qwen-Image-Edit: latent preview failed", exc_info=True)
            self.progress.update(offset + i + 1, preview)
            comfy.throw_if_interrupted()
            return {} if blend is None else {"latents": latents}

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
            raise EditError(nonfinite_message(loaded.settings.precision, self.lora_names))
        return result


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
    batch = _batch_size(present)
    first = present[0]
    width, height, exact = output_size(req, first.shape[-2], first.shape[-3])
    if req.size_mode == "match" and pipeline_reference_size(first.shape[-2], first.shape[-3]) != (first.shape[-2], first.shape[-3]):
        ref_w, ref_h = pipeline_reference_size(first.shape[-2], first.shape[-3])
        log.warning(
            "Qwen-Image-Edit: the pipeline re-encodes this %dx%d image at %dx%d, so the edit may drift slightly "
            "against it. For an exact overlay scale it first with 'Qwen-Image-Edit Image Scale' at 1.0 megapixels.",
            first.shape[-2], first.shape[-3], ref_w, ref_h,
        )
    check_prompt_length(loaded.pipe.tokenizer, req, len(present), width, height)
    run = _Run(loaded, comfy.Progress(batch * req.steps, printer), lora_names)
    outputs = []
    for b in range(batch):
        comfy.throw_if_interrupted()
        pil = [tensor_to_pil(_item(img, b))[0] for img in present]
        result = run(pipeline_kwargs(req, pil, width, height, req.seed + b), b * req.steps)
        if exact is not None:
            result = _resize(result, *exact)
        outputs.append(result.permute(0, 2, 3, 1).cpu())
    return torch.cat(outputs).contiguous()


def run_masked_edit(
    loaded: LoadedPipeline,
    req: EditRequest,
    images: list[torch.Tensor | None],
    masks: torch.Tensor,
    options: MaskOptions = MaskOptions(),
    printer: Callable[[int, int], None] | None = None,
    lora_names: tuple[str, ...] = (),
) -> torch.Tensor:
    """A masked edit on a loaded pipeline: IMAGE `[B*images_per_prompt, H, W, 3]` at the image's size.

    For each item: the window around its mask (`masks[b]`, or `masks[0]` for all) is cut out and edited
    at `masked_edit_size`, with the latents outside the grown mask replaced at every step by the
    window's own latents noised to the step's sigma; the edit is scaled back to the window and blended
    in through the feathered mask. Everything outside the grown mask is the input, bit for bit. An item
    with an empty mask is returned unchanged without running the model.
    """
    present = validate(req, images, masked=True)
    batch = _batch_size(present)
    height, width = present[0].shape[-3], present[0].shape[-2]
    run = _Run(loaded, comfy.Progress(batch * req.steps, printer), lora_names)
    outputs = []
    for b in range(batch):
        comfy.throw_if_interrupted()
        image = to_rgb(_item(present[0], b))[0].cpu()
        item_mask = masks[b if masks.shape[0] > 1 else 0]
        box = masking.mask_box(item_mask, options.grow)
        if box is None:
            log.info("Qwen-Image-Edit: the mask of image %d is empty; it is returned unchanged.", b + 1)
            run.progress.update((b + 1) * req.steps)
            outputs.append(image.expand(req.images_per_prompt, *image.shape))
            continue
        window = masking.context_window(box, width, height, options.context)
        win_w, win_h = window[2] - window[0], window[3] - window[1]
        edit_w, edit_h = masked_edit_size(req, win_w, win_h)
        region, blend = masking.window_blend(item_mask, window, options.grow, options.feather)
        log.info("Qwen-Image-Edit: masked edit of image %d: window %dx%d at (%d, %d), edited at %dx%d.",
                 b + 1, win_w, win_h, window[0], window[1], edit_w, edit_h)
        pil = [tensor_to_pil(masking.crop(image, window))[0]]
        pil += [tensor_to_pil(_item(img, b))[0] for img in present[1:]]
        check_prompt_length(loaded.pipe.tokenizer, req, len(pil), edit_w, edit_h)
        kwargs = pipeline_kwargs(req, pil, edit_w, edit_h, req.seed + b)
        pin = _LatentPin(loaded, pil[0], region, kwargs["generator"], req.images_per_prompt, edit_w, edit_h)
        result = run(kwargs, b * req.steps, None if pin.free_everywhere else pin)
        edited = _resize(result, win_w, win_h).permute(0, 2, 3, 1).cpu()
        outputs.append(torch.stack([masking.stitch(image, e, blend, window) for e in edited]))
    return torch.cat(outputs).contiguous()


class _LatentPin:
    """The inpainting step of diffusers' Qwen-Image inpaint pipelines, as a step callback: after each
    step the latents outside the region are set to the window's own latents noised to the new sigma
    (`scheduler.scale_noise`), with the very noise the pipeline started from, so the edit grows into
    surroundings that match the image instead of being pasted on it."""

    def __init__(self, loaded: LoadedPipeline, window: Any, region: torch.Tensor, generator: torch.Generator,
                 copies: int, width: int, height: int) -> None:
        import torch.nn.functional as F

        pipe = self.pipe = loaded.pipe
        self.copies = copies
        self.noise_state = generator.get_state()  # the pipeline's first draw from it is its initial noise
        factor = pipe.vae_scale_factor
        lat_h, lat_w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
        region = F.interpolate(region[None, None], size=(height, width), mode="nearest")
        region = F.adaptive_max_pool2d(region, (lat_h, lat_w))  # a latent is free if any of its pixels is
        self.free_everywhere = bool(region.min() == 1)
        channels = pipe.vae.config.z_dim
        self.mask = compat.pack_latents(pipe, region.expand(1, channels, lat_h, lat_w).unsqueeze(2))
        self.size, self.latent_size = (width, height), (channels, lat_h, lat_w)
        # Encoded before the run: under model offload, encoding mid-run would swap the transformer out.
        self.reference = None if self.free_everywhere else self._encode(window, loaded.device)
        self.noise: torch.Tensor | None = None

    def _encode(self, window: Any, device: str) -> torch.Tensor:
        """The window at the edit size in the pipeline's own preprocessing, VAE-encoded and normalised."""
        pipe, (width, height) = self.pipe, self.size
        pixels = pipe.image_processor.preprocess(window, height, width).unsqueeze(2)
        vae = pipe.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return compat.pack_latents(pipe, (latents - mean) / std)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        if self.noise is None:
            self.reference = self.reference.to(latents.device, latents.dtype).expand_as(latents)
            generator = torch.Generator("cpu")
            generator.set_state(self.noise_state)
            noise = randn_tensor((self.copies, self.latent_size[0], 1, *self.latent_size[1:]), generator=generator,
                                 device=latents.device, dtype=latents.dtype)
            self.noise = compat.pack_latents(self.pipe, noise)
            self.mask = self.mask.to(latents.device) > 0
        scheduler = self.pipe.scheduler
        step = torch.full((1,), float(scheduler.timesteps[0]))  # ignored: scale_noise uses the step index
        pinned = scheduler.scale_noise(self.reference, step, self.noise)
        return torch.where(self.mask, latents, pinned)
