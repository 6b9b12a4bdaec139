"""The speed node: attention backend, regional torch.compile and step cache for the pipe."""

from __future__ import annotations

import dataclasses

from ..loaders import pipeline as loader
from ..loaders import speed
from .loader import PIPE_TYPE


class QwenImageEditSpeed:
    DESCRIPTION = (
        "Speed options for the Qwen-Image-Edit pipe, all off by default. attention_backend swaps the attention "
        "kernel; compile 'regional' compiles the 60 identical transformer blocks with torch.compile (the first "
        "edit is slower while it compiles); cache skips transformer work on steps that change little (First "
        "Block Cache or TaylorSeer: faster, slightly different images). An option this machine cannot run "
        "falls back with a warning in the console. Removing the node turns them all off again."
    )
    CATEGORY = "Qwen-Image-Edit"
    FUNCTION = "apply"
    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The pipe with these speed options; connect it to the sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        installed = ", ".join(speed.installed_attention_backends())
        return {
            "required": {
                "pipe": (PIPE_TYPE, {"tooltip": "From the loader or a LoRA node."}),
                "attention_backend": (list(speed.ATTENTION_BACKENDS), {
                    "default": "native",
                    "tooltip": "native: PyTorch SDPA (works everywhere). flash: flash-attn 2; flash3: flash-attn 3 "
                    "(Hopper); sage: SageAttention; xformers. The others need their package and an NVIDIA GPU; "
                    f"without them native is used. Installed here: {installed}.",
                }),
                "compile": (list(speed.COMPILE_MODES), {
                    "default": "off",
                    "tooltip": "regional: torch.compile of the repeated transformer blocks. The first edit (and "
                    "the first after a change of size or LoRAs) compiles; later edits are faster. Needs Triton "
                    "on NVIDIA GPUs.",
                }),
                "cache": (list(speed.CACHE_MODES), {
                    "default": "off",
                    "tooltip": "Reuse transformer work between steps. first_block: skip the remaining blocks when "
                    "the first block's output changed less than cache_threshold. taylorseer: compute every "
                    "cache_interval-th step and predict the others. Little use with 4-8 step Lightning LoRAs.",
                }),
                "cache_threshold": ("FLOAT", {
                    "default": 0.05, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "First Block Cache only: higher skips more steps (faster, further from the uncached "
                    "image). diffusers' default 0.05.",
                }),
                "cache_interval": ("INT", {
                    "default": 5, "min": 1, "max": 20,
                    "tooltip": "TaylorSeer only: one full step every cache_interval steps after 3 warm-up steps; "
                    "diffusers' default 5.",
                }),
            }
        }

    def apply(self, pipe: loader.PipeHandle, attention_backend: str, compile: str, cache: str,
              cache_threshold: float, cache_interval: int) -> tuple[loader.PipeHandle]:
        options = speed.SpeedOptions(attention_backend, compile, cache, cache_threshold, cache_interval)
        return (dataclasses.replace(pipe, speed=options),)


NODE_CLASS_MAPPINGS = {"QwenImageEditSpeed": QwenImageEditSpeed}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageEditSpeed": "Qwen-Image-Edit Speed"}
