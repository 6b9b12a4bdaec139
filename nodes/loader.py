"""The loader node: settings in, a cached pipeline handle out."""

from __future__ import annotations

from ..loaders import pipeline as loader

PIPE_TYPE = "QWEN_IMAGE_EDIT_PIPE"


class QwenImageEditLoader:
    DESCRIPTION = (
        "Loads Qwen-Image-Edit-2511 (or 2509) with diffusers and keeps it loaded between runs. "
        "Changing a setting unloads the old pipeline before loading the new one. With quantization "
        "and offload on 'auto' it picks what fits your GPU: everything on the GPU where it fits, "
        "bf16 with model offload on 48 GB cards, NF4 with offload on 16-24 GB cards. The console log "
        "says what it chose and why."
    )
    CATEGORY = "Qwen-Image-Edit"
    FUNCTION = "load"
    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The loaded Qwen-Image-Edit pipeline; connect it to the Qwen-Image-Edit sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        models = loader.list_models()
        return {
            "required": {
                "model": (models, {
                    "default": models[0],
                    "tooltip": "A diffusers folder under ComfyUI/models/diffusers (one holding model_index.json), "
                    "or a Hugging Face id already in your HF cache. Nothing is downloaded here.",
                }),
                "precision": (list(loader.PRECISIONS), {
                    "default": "bfloat16",
                    "tooltip": "Weight precision. bfloat16 is the model's own; float16 can overflow on this "
                    "model; float32 doubles memory.",
                }),
                "vae_precision": (list(loader.VAE_PRECISIONS), {
                    "default": "same",
                    "tooltip": "Override the VAE's precision ('same' follows precision). float32 costs ~0.5 GB "
                    "and can remove banding in smooth gradients.",
                }),
                "quantization": (list(loader.QUANTIZATIONS), {
                    "default": "auto",
                    "tooltip": "bitsandbytes quantization. auto: none where bf16 fits, else nf4. nf4 cuts the "
                    "transformer to ~0.3x its size at a small quality cost; 8bit ~0.53x and slower. "
                    "The transformer quantizes only on an NVIDIA GPU.",
                }),
                "quantize": (list(loader.QUANTIZE_COMPONENTS), {
                    "default": "transformer+text_encoder",
                    "tooltip": "Which components quantization applies to.",
                }),
                "device": (loader.device_choices(), {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's device (else cuda, mps, xpu, cpu). cuda:N picks a GPU.",
                }),
                "offload": (list(loader.OFFLOADS), {
                    "default": "auto",
                    "tooltip": "Keep weights in RAM and move them to the GPU when used. model: whole "
                    "components (little slowdown); group: block by block (slower, ~4 GB VRAM); "
                    "sequential: layer by layer (slowest, least VRAM). auto decides from free memory.",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, device: str) -> bool | str:
        """Only `device` is checked here (it accepts cuda:N); ComfyUI checks every other input itself."""
        return loader.device_problem(device) or True

    def load(self, model: str, precision: str, vae_precision: str, quantization: str, quantize: str,
             device: str, offload: str) -> tuple[loader.PipeHandle]:
        settings = loader.LoadSettings(model, precision, vae_precision, quantization, quantize, device, offload)
        loader.get_pipeline(settings)
        return (loader.PipeHandle(settings),)


def _file_input(role: str, tooltip: str) -> tuple[list[str], dict]:
    files = loader.list_files(role)
    return (files, {"default": files[0], "tooltip": tooltip} if files else {"tooltip": tooltip})


class QwenImageEditFilesLoader:
    DESCRIPTION = (
        "Loads Qwen-Image-Edit-2511 (or 2509) from the single files ComfyUI uses: a diffusion model "
        "(bf16, fp8, scaled fp8 or GGUF), the Qwen2.5-VL text encoder and the Qwen-Image VAE. No diffusers "
        "folder is needed. The file itself tells 2511 from 2509. fp8 and GGUF stay quantized in memory. "
        "Shares the one cached pipeline and the settings of the diffusers loader."
    )
    CATEGORY = "Qwen-Image-Edit"
    FUNCTION = "load"
    RETURN_TYPES = (PIPE_TYPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = QwenImageEditLoader.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        settings = dict(QwenImageEditLoader.INPUT_TYPES()["required"])
        del settings["model"]
        return {
            "required": {
                "diffusion_model": _file_input("transformer", "The diffusion model from models/diffusion_models or "
                                               "models/unet: qwen_image_edit_2511_bf16 / _fp8mixed, "
                                               "qwen_image_edit_2509_fp8_e4m3fn, or a GGUF (Q4_K_M, Q8_0 ...)."),
                "text_encoder": _file_input("text_encoder", "The Qwen2.5-VL-7B text encoder from models/text_encoders: "
                                            "qwen_2.5_vl_7b_fp8_scaled or qwen_2.5_vl_7b (bf16)."),
                "vae": _file_input("vae", "The Qwen-Image VAE from models/vae: qwen_image_vae."),
                **settings,
            }
        }

    VALIDATE_INPUTS = QwenImageEditLoader.VALIDATE_INPUTS

    def load(self, diffusion_model: str, text_encoder: str, vae: str, precision: str, vae_precision: str,
             quantization: str, quantize: str, device: str, offload: str) -> tuple[loader.PipeHandle]:
        settings = loader.LoadSettings(diffusion_model, precision, vae_precision, quantization, quantize, device,
                                       offload, text_encoder=text_encoder, vae=vae)
        loader.get_pipeline(settings)
        return (loader.PipeHandle(settings),)


NODE_CLASS_MAPPINGS = {"QwenImageEditLoader": QwenImageEditLoader, "QwenImageEditFilesLoader": QwenImageEditFilesLoader}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenImageEditLoader": "Load Qwen-Image-Edit (diffusers)",
    "QwenImageEditFilesLoader": "Load Qwen-Image-Edit (ComfyUI files)",
}
