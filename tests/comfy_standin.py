"""A stand-in for the parts of ComfyUI's runtime the pack touches, for CI.

ComfyUI is not a pip package, so CI cannot import the real thing. This reproduces, with the same
names and behaviour as ComfyUI 0.8.0's source, exactly the API `utils/comfy.py` uses:
`comfy.model_management` (device, interrupt flag and exception, free_memory / unload_all_models /
get_free_memory, soft_empty_cache),
`comfy.utils.ProgressBar` with its global hook, `comfy.utils.common_upscale`, and `folder_paths`.
`tests/test_comfyui_real.py` runs the same checks against a real ComfyUI checkout when COMFYUI_PATH is set.
"""

from __future__ import annotations

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
    folders = {name: [str(models_dir / name)] for name in ("diffusers", "loras", "diffusion_models", "text_encoders", "vae")}
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
    modules = {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils, "folder_paths": folder_paths}
    sys.modules.update(modules)
    return modules


def uninstall() -> None:
    for name in ("comfy", "comfy.model_management", "comfy.utils", "folder_paths"):
        sys.modules.pop(name, None)
