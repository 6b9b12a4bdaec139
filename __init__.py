"""Qwen-Image-Edit-2511 for ComfyUI through diffusers.

ComfyUI imports this folder as a package at start-up; only the node mappings load here. diffusers,
transformers, accelerate and bitsandbytes are imported when a node first runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
