"""The edit node: a pipe, one to three images and a prompt in, the edited image out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..loaders import pipeline as loader
from ..utils import sampling
from .loader import PIPE_TYPE

if TYPE_CHECKING:  # torch loads when the node first runs, not when ComfyUI imports the pack
    import torch


class QwenImageEditSampler:
    DESCRIPTION = (
        "Edits images with Qwen-Image-Edit as the model card runs it: true classifier-free guidance "
        "(true_cfg_scale above 1 with a negative prompt), 40 steps, ~1 MP output. Up to three images can "
        "be referred to in the prompt as 'Picture 1', 'Picture 2', 'Picture 3'. A batch of images gives "
        "one edit each (item b uses seed + b). Cancel stops within one step. With a Lightning LoRA on the "
        "pipe, steps left at 40 and true_cfg_scale left at 4.0 become the LoRA's 4 or 8 steps and 1.0. "
        "With a mask (white = edit, e.g. painted in Load Image's MaskEditor) only the masked area changes: a "
        "window around it is edited at ~1 MP and stitched back, so the output keeps the image's full size and "
        "every pixel outside the grown mask."
    )
    CATEGORY = "Qwen-Image-Edit"
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The edited images: one per input image times images_per_prompt.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pipe": (PIPE_TYPE, {"tooltip": "From 'Load Qwen-Image-Edit (diffusers)'."}),
                "image": ("IMAGE", {"tooltip": "The image to edit ('Picture 1'). A batch gives one edit per image."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "The edit instruction, e.g. 'Replace the sky with a sunset'. With several images, "
                    "refer to them as Picture 1, Picture 2, Picture 3.",
                }),
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": " ",
                    "tooltip": "What to steer away from. The model card uses a single space; an empty box counts "
                    "as a space. Only used when true_cfg_scale is above 1.",
                }),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Noise seed, drawn on the CPU so the same seed gives the same "
                                 "noise on any device."}),
                "steps": ("INT", {"default": 40, "min": 2, "max": 200,
                                  "tooltip": "Denoising steps. The model card uses 40. With a Lightning LoRA, 40 "
                                  "means 'the LoRA's own' (4 or 8); any other value is used as set."}),
                "true_cfg_scale": ("FLOAT", {
                    "default": 4.0, "min": 0.0, "max": 20.0, "step": 0.1,
                    "tooltip": "Classifier-free guidance strength (the model card uses 4.0). 1 or below turns "
                    "guidance off: twice as fast, follows the prompt less. With a Lightning LoRA, 4.0 means "
                    "1.0 (Lightning runs without CFG); any other value is used as set.",
                }),
                "size_mode": (list(sampling.SIZE_MODES), {
                    "default": "auto",
                    "tooltip": "auto: ~1 MP at the first image's aspect (the pipeline's default). match: exactly "
                    "the first image's size, so the edit lines up with it (scale it to ~1 MP first). custom: "
                    "width x height, rounded down to multiples of 16.",
                }),
                "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Output width for size_mode 'custom'."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Output height for size_mode 'custom'."}),
                "images_per_prompt": ("INT", {"default": 1, "min": 1, "max": 16,
                                              "tooltip": "Variations per input image."}),
            },
            "optional": {
                "image2": ("IMAGE", {"tooltip": "Optional 'Picture 2'. Batch 1 is shared by every edit; "
                                     "a batch the size of image's is matched one to one."}),
                "image3": ("IMAGE", {"tooltip": "Optional 'Picture 3', batched like image2."}),
                "mask": ("MASK", {"tooltip": "Optional: edit only where the mask is white (above 0.5); every other "
                                  "pixel stays the input's. The output keeps the image's size; size_mode then sets "
                                  "the size the area around the mask is edited at. One mask for all images or "
                                  "one per image."}),
                "grow": ("INT", {"default": 0, "min": 0, "max": 512, "step": 1,
                                 "tooltip": "With a mask: widen it by this many pixels before editing."}),
                "feather": ("INT", {"default": 8, "min": 0, "max": 256, "step": 1,
                                    "tooltip": "With a mask: the edit fades out over this many pixels inside the "
                                    "mask's edge, so the seam does not show. 0 gives a hard edge."}),
                "context": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 8.0, "step": 0.1,
                                      "tooltip": "With a mask: how much of the picture around the mask the model "
                                      "sees, as a multiple of the mask's size (at least 512 px a side)."}),
            },
        }

    def edit(self, pipe: loader.PipeHandle, image: torch.Tensor, prompt: str, negative_prompt: str, seed: int,
             steps: int, true_cfg_scale: float, size_mode: str, width: int, height: int, images_per_prompt: int,
             image2: torch.Tensor | None = None, image3: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, grow: int = 0, feather: int = 8,
             context: float = 2.0) -> tuple[torch.Tensor]:
        req = sampling.EditRequest(prompt, negative_prompt, seed, steps, true_cfg_scale, size_mode, width, height,
                                   images_per_prompt)
        from ..loaders import edit
        from ..utils.mask import MaskOptions

        return (edit.edit(pipe, req, [image, image2, image3], mask=mask,
                          mask_options=MaskOptions(grow, feather, context)),)


NODE_CLASS_MAPPINGS = {"QwenImageEditSampler": QwenImageEditSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageEditSampler": "Qwen-Image-Edit"}
