"""A stand-in for the parts of ComfyUI's runtime the pack touches, for CI.

ComfyUI is not a pip package, so CI cannot import the real thing. This reproduces, with the same
names and behaviour as ComfyUI 0.8.0's source, exactly the API `utils/comfy.py` uses:
`comfy.model_management` (device, interrupt flag and exception, free_memory / unload_all_models /
get_free_memory, soft_empty_cache),
`comfy.utils.ProgressBar` with its global hook, `comfy.utils.common_upscale`, and `folder_paths`.
`tests/test_comfyui_real.py` runs the same checks against a real ComfyUI checkout when COMFYUI_PATH is set.

The latent preview path is there too: `latent_preview.get_previewer` / `Latent2RGBPreviewer` /
`set_preview_method`, `comfy.latent_formats.Wan21` with its real RGB factors and
`comfy.cli_args.args.preview_method`. Previews are off (ComfyUI's `--preview-method none` default) until a
test calls `set_preview_method("auto")`, as ComfyUI does for each prompt the frontend sends.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import types
from pathlib import Path


def install(models_dir: Path) -> dict[str, types.ModuleType]:
    import torch

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupt_processing_mutex = threading.RLock()
    mm.interrupt_processing = False
    mm.free_memory_calls = []
    mm.free_bytes = 64 * 2**30  # what get_free_memory reports; tests lower it to force evictions
    mm.DISABLE_SMART_MEMORY = False

    def interrupt_current_processing(value: bool = True) -> None:
        with mm.interrupt_processing_mutex:
            mm.interrupt_processing = value

    def throw_exception_if_processing_interrupted() -> None:
        with mm.interrupt_processing_mutex:
            if mm.interrupt_processing:
                mm.interrupt_processing = False
                raise InterruptProcessingException()

    def free_memory(memory_required, device, keep_loaded=[]):  # noqa: B006 - ComfyUI's own signature
        mm.free_memory_calls.append((memory_required, device))
        return []

    def unload_all_models() -> None:
        # As ComfyUI: a module-global lookup, so a wrapper installed on the module is what runs.
        mm.free_memory(1e30, mm.get_torch_device())

    mm.free_memory = free_memory
    mm.get_free_memory = lambda dev=None, torch_free_too=False: (
        (mm.free_bytes, mm.free_bytes) if torch_free_too else mm.free_bytes)

    mm.interrupt_current_processing = interrupt_current_processing
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.unload_all_models = unload_all_models
    mm.get_torch_device = lambda: torch.device("cpu")
    # ComfyUI ships its Qwen2.5 tokenizer beside this module: comfy/text_encoders/qwen25_tokenizer/.
    mm.__file__ = str(models_dir.parent / "comfy" / "model_management.py")
    mm.soft_empty_cache = lambda force=False: None
    mm.directml_enabled = False
    mm.device_supports_non_blocking = lambda device: False

    utils = types.ModuleType("comfy.utils")
    utils.PROGRESS_BAR_HOOK = None

    class ProgressBar:
        def __init__(self, total: int, node_id: str | None = None) -> None:
            self.total, self.current, self.hook, self.node_id = total, 0, utils.PROGRESS_BAR_HOOK, node_id

        def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            if self.hook is not None:
                self.hook(self.current, self.total, preview, node_id=self.node_id)

    utils.ProgressBar = ProgressBar

    def set_progress_bar_global_hook(hook) -> None:
        utils.PROGRESS_BAR_HOOK = hook

    utils.set_progress_bar_global_hook = set_progress_bar_global_hook

    def common_upscale(samples, width, height, upscale_method, crop):
        # ComfyUI's semantics for 4-D samples [B, C, H, W]: crop="center" trims the longer side by
        # round(excess / 2) at each end, lanczos is PIL's on 8-bit frames (truncated, not rounded),
        # every other method is F.interpolate without antialias; no bislerp here.
        if crop == "center":
            h, w = samples.shape[-2:]
            aspect, target = w / h, width / height
            if aspect > target:
                cut = round((w - w * (target / aspect)) / 2)
                samples = samples[..., :, cut : w - cut]
            elif aspect < target:
                cut = round((h - h * (aspect / target)) / 2)
                samples = samples[..., cut : h - cut, :]
        if upscale_method == "bislerp":
            raise NotImplementedError("the stand-in has no bislerp")
        if upscale_method != "lanczos":
            return torch.nn.functional.interpolate(samples, size=(height, width), mode=upscale_method)
        import numpy as np
        from PIL import Image

        frames = np.clip(255.0 * samples.movedim(1, -1).cpu().numpy(), 0, 255).astype(np.uint8)
        resized = [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS)) for f in frames]
        out = torch.from_numpy(np.stack(resized).astype(np.float32) / 255.0).movedim(-1, 1)
        return out.to(samples.device, samples.dtype)

    utils.common_upscale = common_upscale

    folder_paths = types.ModuleType("folder_paths")
    folders = {name: [str(models_dir / name)]
               for name in ("diffusers", "loras", "diffusion_models", "text_encoders", "vae", "vae_approx")}
    # ComfyUI maps the legacy names to the same folders (folder_paths.map_legacy).
    folders["unet"] = folders["diffusion_models"]
    folders["clip"] = folders["text_encoders"]

    def get_folder_paths(name: str) -> list[str]:
        return folders[name]

    def get_filename_list(name: str) -> list[str]:
        out = []
        for root in folders[name]:
            root_path = Path(root)
            if root_path.is_dir():
                out += sorted(p.relative_to(root_path).as_posix() for p in root_path.rglob("*") if p.is_file())
        return out

    def get_full_path(name: str, filename: str) -> str | None:
        for root in folders[name]:
            candidate = Path(root) / filename
            if candidate.is_file():
                return str(candidate)
        return None

    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path
    folder_paths.get_temp_directory = lambda: str(models_dir.parent / "temp")
    folder_paths.folder_names_and_paths = folders

    comfy.model_management = mm
    comfy.utils = utils
    cli_args, latent_formats, latent_preview = _preview_modules(torch, mm)
    comfy.cli_args = cli_args
    comfy.latent_formats = latent_formats
    modules = {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils, "folder_paths": folder_paths,
               "comfy.cli_args": cli_args, "comfy.latent_formats": latent_formats, "latent_preview": latent_preview}
    sys.modules.update(modules)
    return modules


#: ComfyUI 0.8.0 comfy/latent_formats.py Wan21 (Qwen-Image's latent format): latent channel -> RGB.
WAN21_LATENT_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932],
    [0.0671, 0.0406, 0.0442],
    [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328],
    [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925],
    [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636],
    [0.0680, 0.3019, 0.1128],
    [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699],
    [0.0060, -0.0633, 0.0005],
    [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861],
]
WAN21_LATENT_RGB_FACTORS_BIAS = [-0.1835, -0.0868, -0.3360]


def _preview_modules(torch, mm) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """`comfy.cli_args`, `comfy.latent_formats` and `latent_preview` as ComfyUI 0.8.0 has them, minus TAESD
    (no decoder file is ever there in tests: ComfyUI then warns and falls back to Latent2RGB, as here)."""
    from PIL import Image

    cli_args = types.ModuleType("comfy.cli_args")

    class LatentPreviewMethod(enum.Enum):
        NoPreviews = "none"
        Auto = "auto"
        Latent2RGB = "latent2rgb"
        TAESD = "taesd"

        @classmethod
        def from_string(cls, value: str):
            for member in cls:
                if member.value == value:
                    return member
            return None

    cli_args.LatentPreviewMethod = LatentPreviewMethod
    # ComfyUI's command-line defaults: --preview-method none, --preview-size 512.
    cli_args.args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews, preview_size=512, cpu=False)
    args = cli_args.args

    latent_formats = types.ModuleType("comfy.latent_formats")

    class LatentFormat:
        scale_factor = 1.0
        latent_channels = 4
        latent_dimensions = 2
        latent_rgb_factors = None
        latent_rgb_factors_bias = None
        latent_rgb_factors_reshape = None
        taesd_decoder_name = None

    class Wan21(LatentFormat):
        latent_channels = 16
        latent_dimensions = 3
        latent_rgb_factors = WAN21_LATENT_RGB_FACTORS
        latent_rgb_factors_bias = WAN21_LATENT_RGB_FACTORS_BIAS

        def __init__(self) -> None:
            self.scale_factor = 1.0
            self.taesd_decoder_name = "lighttaew2_1"

    latent_formats.LatentFormat = LatentFormat
    latent_formats.Wan21 = Wan21

    lp = types.ModuleType("latent_preview")
    lp.default_preview_method = args.preview_method
    lp.MAX_PREVIEW_RESOLUTION = args.preview_size

    def preview_to_image(latent_image, do_scale=True):
        if do_scale:
            latents_ubyte = ((latent_image + 1.0) / 2.0).clamp(0, 1).mul(0xFF)
        else:
            latents_ubyte = latent_image.clamp(0, 1).mul(0xFF)
        latents_ubyte = latents_ubyte.to(device="cpu", dtype=torch.uint8,
                                         non_blocking=mm.device_supports_non_blocking(latent_image.device))
        return Image.fromarray(latents_ubyte.numpy())

    class LatentPreviewer:
        def decode_latent_to_preview(self, x0):
            pass

        def decode_latent_to_preview_image(self, preview_format, x0):
            preview_image = self.decode_latent_to_preview(x0)
            return ("JPEG", preview_image, lp.MAX_PREVIEW_RESOLUTION)

    class Latent2RGBPreviewer(LatentPreviewer):
        def __init__(self, latent_rgb_factors, latent_rgb_factors_bias=None, latent_rgb_factors_reshape=None):
            self.latent_rgb_factors = torch.tensor(latent_rgb_factors, device="cpu").transpose(0, 1)
            self.latent_rgb_factors_bias = None
            if latent_rgb_factors_bias is not None:
                self.latent_rgb_factors_bias = torch.tensor(latent_rgb_factors_bias, device="cpu")
            self.latent_rgb_factors_reshape = latent_rgb_factors_reshape

        def decode_latent_to_preview(self, x0):
            if self.latent_rgb_factors_reshape is not None:
                x0 = self.latent_rgb_factors_reshape(x0)
            self.latent_rgb_factors = self.latent_rgb_factors.to(dtype=x0.dtype, device=x0.device)
            if self.latent_rgb_factors_bias is not None:
                self.latent_rgb_factors_bias = self.latent_rgb_factors_bias.to(dtype=x0.dtype, device=x0.device)
            x0 = x0[0, :, 0] if x0.ndim == 5 else x0[0]
            latent_image = torch.nn.functional.linear(x0.movedim(0, -1), self.latent_rgb_factors,
                                                      bias=self.latent_rgb_factors_bias)
            return preview_to_image(latent_image)

    def get_previewer(device, latent_format):
        previewer = None
        method = args.preview_method
        if method != LatentPreviewMethod.NoPreviews:
            if method == LatentPreviewMethod.Auto:
                method = LatentPreviewMethod.Latent2RGB
            if method == LatentPreviewMethod.TAESD:
                logging.warning("Warning: TAESD previews enabled, but could not find models/vae_approx/%s",
                                latent_format.taesd_decoder_name)
            if latent_format.latent_rgb_factors is not None:
                previewer = Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias,
                                                latent_format.latent_rgb_factors_reshape)
        return previewer

    def set_preview_method(override: str | None = None) -> None:
        if override and override != "default":
            method = LatentPreviewMethod.from_string(override)
            if method is not None:
                args.preview_method = method
                return
        args.preview_method = lp.default_preview_method

    lp.preview_to_image = preview_to_image
    lp.LatentPreviewer = LatentPreviewer
    lp.Latent2RGBPreviewer = Latent2RGBPreviewer
    lp.get_previewer = get_previewer
    lp.set_preview_method = set_preview_method
    return cli_args, latent_formats, lp


def uninstall() -> None:
    for name in ("comfy", "comfy.model_management", "comfy.utils", "folder_paths", "comfy.cli_args",
                 "comfy.latent_formats", "latent_preview"):
        sys.modules.pop(name, None)
