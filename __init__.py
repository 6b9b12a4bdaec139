"""Qwen-Image-Edit-2511 for ComfyUI through diffusers.

ComfyUI imports this folder as a package at start-up; only the node mappings load here. diffusers,
transformers, accelerate and bitsandbytes are imported when a node first runs.
"""

# pytest also imports this file, as a plain module named "__init__", when the folder's name is not a
# Python identifier (e.g. "ComfyUI-Qwen-Image-Edit"); only a package import has the nodes to offer.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
