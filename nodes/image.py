"""Image nodes: scaling to the sizes Qwen-Image-Edit works at."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch, numpy and PIL load when the node first runs, not when ComfyUI imports the pack
    import torch


class QwenImageEditImageScale:
    """Scale an IMAGE to a megapixel count with both sides a multiple of 16 or 32.

    ``multiple_of`` is a COMBO of the strings "16" and "32" rather than an INT: those are the only
    values that make sense for this model (16 = VAE factor 8 x patch 2, the pipeline floors an
    explicit size to it; 32 is what it rounds its own sizes to), ComfyUI checks a COMBO value
    against the list when a workflow is queued (an INT's step is never checked, so 20 or 8 would
    slip through and come back floored, off by a few pixels), and a saved workflow keeps a value
    that reads the same in the widget and in the JSON.
    """

    MULTIPLES = ("16", "32")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        from ..utils.scale import FIT_MODES, SCALE_METHODS

        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image (or batch) to scale."}),
                "megapixels": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.01,
                        "max": 16.0,
                        "step": 0.01,
                        "tooltip": "Target area in megapixels of 1024x1024 px; the aspect ratio "
                        "is kept. 1.0 is what the model works at: there the size is one the "
                        "pipeline encodes as is, so the edit lines up exactly with this image.",
                    },
                ),
                "multiple_of": (
                    list(cls.MULTIPLES),
                    {
                        "default": "16",
                        "tooltip": "Both sides become a multiple of this. 16 is what the model "
                        "needs; 32 matches the sizes the pipeline picks on its own. At 1.0 "
                        "megapixels both give the same size.",
                    },
                ),
                "method": (
                    list(SCALE_METHODS),
                    {
                        "default": "lanczos",
                        "tooltip": "lanczos: sharpest, best for photos. bicubic / bilinear: "
                        "smoother, but ComfyUI's are not antialiased, so shrinking a lot can alias. "
                        "area: box average, good for large reductions. nearest: hard pixels, for "
                        "pixel art and masks.",
                    },
                ),
                "fit": (
                    list(FIT_MODES),
                    {
                        "default": "crop",
                        "tooltip": "How the rounding to multiples is absorbed. crop: cut a few "
                        "pixels equally from both edges. pad: add thin black bars equally on both "
                        "edges. stretch: resize exactly, changing the aspect very slightly.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("IMAGE", "INT", "INT")
    RETURN_NAMES = ("image", "width", "height")
    OUTPUT_TOOLTIPS = (
        "The scaled image, centred: crop and pad take the same amount from or add it to both sides.",
        "Its width in pixels, a multiple of multiple_of.",
        "Its height in pixels, a multiple of multiple_of.",
    )
    FUNCTION = "scale"
    CATEGORY = "Qwen-Image-Edit"
    DESCRIPTION = (
        "Scales an image to about the given megapixels with both sides a multiple of 16 (or 32), "
        "keeping its aspect ratio. Qwen-Image-Edit works at about 1 megapixel with sides that are "
        "multiples of 16; given anything else it resizes the input and picks an output size of its "
        "own, which is why edits elsewhere come out shifted, zoomed or cropped against the input. "
        "Scale the input here, feed this image to the sampler and set its size mode to 'match': "
        "the output then has exactly this image's width and height and keeps its framing. At "
        "1.0 megapixels the size is also one the pipeline VAE-encodes without resizing it again "
        "(other sizes come back stretched by up to ~3.5% inside the pipeline), at the cost of a "
        "few more pixels cropped or padded. Any size from 1x1 up is accepted, so this is also "
        "the fix for images too small to edit."
    )

    def scale(
        self, image: torch.Tensor, megapixels: float, multiple_of: str, method: str, fit: str
    ) -> tuple[torch.Tensor, int, int]:
        from ..utils.scale import scale_to_megapixels

        return scale_to_megapixels(image, float(megapixels), int(multiple_of), method, fit)


NODE_CLASS_MAPPINGS = {"QwenImageEditImageScale": QwenImageEditImageScale}
NODE_DISPLAY_NAME_MAPPINGS = {"QwenImageEditImageScale": "Qwen-Image-Edit Image Scale"}
