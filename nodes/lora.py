"""The LoRA node: a pipe in, the same pipe plus one LoRA out (chain several for several LoRAs)."""

from __future__ import annotations

import dataclasses

from ..loaders import lora
from ..loaders import pipeline as loader
from .loader import PIPE_TYPE


class QwenImageEditLoRA:
    DESCRIPTION = (
        "Adds a LoRA to the Qwen-Image-Edit pipe: style or concept LoRAs, or the lightx2v Lightning LoRAs "
        "that edit in 4 or 8 steps. Chain several nodes for several LoRAs. The LoRA is loaded with diffusers "
        "when the sampler runs; changing LoRAs or strengths never reloads the base model, and a pipe without "
        "LoRA nodes runs the base model exactly. With a Lightning LoRA the sampler switches to the Lightning "
        "scheduler and, where steps/true_cfg_scale are left at 40/4.0, uses the LoRA's 4 or 8 steps and CFG 1."
    )
    CATEGORY = "Qwen-Image-Edit"
    FUNCTION = "apply"
    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The pipe with this LoRA added; connect it to the sampler or to another LoRA node.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pipe": (PIPE_TYPE, {"tooltip": "From 'Load Qwen-Image-Edit (diffusers)' or another LoRA node."}),
                "lora_name": (lora.list_lora_files(), {
                    "tooltip": "A Qwen-Image-Edit (or Qwen-Image) LoRA in ComfyUI/models/loras. Only .safetensors "
                    "files are listed; diffusers, ComfyUI, kohya and lightx2v key formats all load.",
                }),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                    "tooltip": "How strongly the LoRA applies: 1.0 as trained, 0 turns it off (nothing is loaded), "
                    "negative values push away from it.",
                }),
                "lightning": (list(lora.LIGHTNING_CHOICES), {
                    "default": "auto",
                    "tooltip": "Is this a Lightning (few-step) LoRA? auto: recognised by a file name with "
                    "'Lightning' and '4steps'/'8steps'. A Lightning LoRA switches the sampler to the Lightning "
                    "scheduler (shift 3) and its step count. off: never; 4-step / 8-step: always.",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, lora_name: str = "", **_: object) -> str:
        """Re-run when the file is replaced (size or modification time changes)."""
        try:
            return lora.file_identity(lora.resolve_lora_path(lora_name))
        except (lora.LoraError, OSError):
            return "missing"

    def apply(self, pipe: loader.PipeHandle, lora_name: str, strength: float,
              lightning: str = "auto") -> tuple[loader.PipeHandle]:
        spec = lora.make_spec(lora_name, strength, lightning)
        return (dataclasses.replace(pipe, loras=(*pipe.loras, spec)),)


NODE_CLASS_MAPPINGS = {"QwenImageEditLoRA": QwenImageEditLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageEditLoRA": "Qwen-Image-Edit LoRA"}
