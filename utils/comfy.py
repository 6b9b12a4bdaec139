"""The thin bridge to ComfyUI's runtime.

Every function here works with or without ComfyUI: inside ComfyUI it uses ComfyUI's device, model
folders, progress bar, interrupt flag and memory management; outside it (tests, the command line) it
falls back to plain torch and a simple cancel flag.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("qwen_image_edit")


@functools.cache
def _comfy_modules() -> tuple[Any, Any] | None:
    try:
        import comfy.model_management as model_management
        import folder_paths
    except ImportError:
        return None
    return model_management, folder_paths


def refresh() -> None:
    """Look for ComfyUI's modules again (tests install and remove a stand-in)."""
    _comfy_modules.cache_clear()


def in_comfyui() -> bool:
    return _comfy_modules() is not None


def comfy_upscale() -> Callable[..., Any] | None:
    """ComfyUI's `comfy.utils.common_upscale(samples [B,C,H,W], width, height, upscale_method, crop)`,
    or None outside ComfyUI."""
    if not in_comfyui():
        return None
    import comfy.utils

    return comfy.utils.common_upscale


def default_device() -> str:
    """ComfyUI's device inside ComfyUI; otherwise the first of cuda, mps, xpu, cpu that exists."""
    import torch

    mods = _comfy_modules()
    if mods is not None:
        return str(mods[0].get_torch_device())
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def free_device_memory(device: str) -> int | None:
    """Bytes free on `device` (torch's reserved-but-unused memory included), or None when unknown.
    Inside ComfyUI its own `get_free_memory` answers, so both agree on what is free."""
    import torch

    dev = torch.device(device)
    mods = _comfy_modules()
    if mods is not None and hasattr(mods[0], "get_free_memory"):
        return int(mods[0].get_free_memory(dev))
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        props = torch.xpu.get_device_properties(dev)
        return int(props.total_memory - torch.xpu.memory_allocated(dev))
    if dev.type in ("cpu", "mps"):
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
            return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else None
    return None


def empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    mods = _comfy_modules()
    if mods is not None:
        mods[0].soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_comfy_memory(needed_bytes: int, device: str) -> None:
    """Ask ComfyUI to make `needed_bytes` free on `device` by unloading its own models, through whatever
    hooks other packs installed (never around them). A no-op outside ComfyUI."""
    mods = _comfy_modules()
    if mods is not None:
        import torch

        mods[0].free_memory(needed_bytes, torch.device(device))


def smart_memory_disabled() -> bool:
    """ComfyUI runs with --disable-smart-memory: it unloads every model after each prompt."""
    mods = _comfy_modules()
    return mods is not None and bool(getattr(mods[0], "DISABLE_SMART_MEMORY", False))


_HOOK_MARK = "_qwen_image_edit_release"


def on_comfy_free_memory(release: Callable[[int, Any], bool]) -> None:
    """Let ComfyUI's memory manager evict our pipeline like one of its own models.

    ComfyUI frees memory for every model load with `comfy.model_management.free_memory(memory_required,
    device)`, and "Unload models" / POST /free calls it too (`unload_all_models` -> `free_memory(1e30)`).
    The wrapper first offers `release(memory_required, device)` the chance to give back our pipeline, then
    calls the function it replaced, so hooks other packs installed before or after keep working.
    Idempotent: installing twice adds nothing.
    """
    mods = _comfy_modules()
    if mods is None:
        return
    mm = mods[0]
    fn = mm.free_memory
    while fn is not None:  # already in the chain (perhaps under another pack's wrapper)?
        if getattr(fn, _HOOK_MARK, None) is not None:
            return
        fn = getattr(fn, "__wrapped__", None)
    previous = mm.free_memory

    @functools.wraps(previous)
    def free_memory(memory_required: Any, device: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            release(memory_required, device)
        except Exception:  # noqa: BLE001 - freeing must never break ComfyUI's own model loading
            log.exception("Qwen-Image-Edit: releasing the pipeline failed")
        return previous(memory_required, device, *args, **kwargs)

    setattr(free_memory, _HOOK_MARK, release)
    mm.free_memory = free_memory


def trim_host_memory() -> None:
    """Hand freed host memory back to the system. glibc keeps freed blocks of a released model in its
    arenas (measured: ~60% of a 1.4 GB model stayed in RSS) until `malloc_trim` runs."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def model_folder_paths(folder: str) -> list[Path]:
    """The folders ComfyUI searches for `folder` models (extra_model_paths.yaml included); [] outside ComfyUI."""
    mods = _comfy_modules()
    if mods is None:
        return []
    try:
        return [Path(p) for p in mods[1].get_folder_paths(folder)]
    except KeyError:
        return []


def diffusers_model_dirs() -> list[Path]:
    return model_folder_paths("diffusers")


def model_files(*folders: str) -> list[str]:
    """The files ComfyUI lists in its model folders `folders` (e.g. "loras"; "diffusion_models", "unet")."""
    mods = _comfy_modules()
    if mods is None:
        return []
    names: list[str] = []
    for folder in folders:
        try:
            names += [n for n in mods[1].get_filename_list(folder) if n not in names]
        except KeyError:
            continue
    return names


def model_file_path(folders: tuple[str, ...], name: str) -> Path:
    """A combo value to a file: ComfyUI's model folders `folders` first, then a plain path."""
    mods = _comfy_modules()
    if mods is not None:
        for folder in folders:
            try:
                full = mods[1].get_full_path(folder, name)
            except KeyError:
                continue
            if full:
                return Path(full)
    return Path(name).expanduser()


def lora_files() -> list[str]:
    return model_files("loras")


def lora_path(name: str) -> Path:
    return model_file_path(("loras",), name)


def torch_compile_cache_dir() -> Path | None:
    """Where torch.compile's cache goes inside ComfyUI (its temp folder), or None to leave torch's default."""
    mods = _comfy_modules()
    if mods is None or not hasattr(mods[1], "get_temp_directory"):
        return None
    return Path(mods[1].get_temp_directory()) / "torchinductor"


def comfy_tokenizer_dir(name: str) -> Path | None:
    """A tokenizer folder ComfyUI ships (`comfy/text_encoders/<name>/`), or None outside ComfyUI."""
    mods = _comfy_modules()
    if mods is None:
        return None
    module_file = getattr(mods[0], "__file__", None)
    if not module_file:
        return None
    folder = Path(module_file).parent / "text_encoders" / name
    return folder if (folder / "vocab.json").is_file() else None


# -- progress and cancel ---------------------------------------------------------------------------

_cancel = threading.Event()


class Cancelled(Exception):
    """Raised outside ComfyUI when `request_cancel()` was called during a run."""


def request_cancel() -> None:
    """Cancel the running edit at its next step (outside ComfyUI; inside, ComfyUI's Cancel does it)."""
    _cancel.set()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException (or `Cancelled`) when a cancel is pending."""
    mods = _comfy_modules()
    if mods is not None:
        mods[0].throw_exception_if_processing_interrupted()
    if _cancel.is_set():
        _cancel.clear()
        raise Cancelled("cancelled")


_printer: Callable[[int, int], None] | None = None


@contextlib.contextmanager
def progress_printer(printer: Callable[[int, int], None]):
    """Send every progress update made inside the block to `printer(value, total)` (the command line)."""
    global _printer
    previous, _printer = _printer, printer
    try:
        yield
    finally:
        _printer = previous


class Progress:
    """One progress bar: ComfyUI's when present, else a text callback (given, or `progress_printer`'s)."""

    def __init__(self, total: int, printer: Callable[[int, int], None] | None = None) -> None:
        self.total = total
        self._printer = printer or _printer
        self._bar = None
        if in_comfyui():
            import comfy.utils

            self._bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, preview: Any = None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, preview)
        elif self._printer is not None:
            self._printer(value, self.total)


def clear_cancel() -> None:
    _cancel.clear()


def latent_previewer(device: Any, latent_channels: int) -> Callable[[Any], Any] | None:
    """ComfyUI's latent preview for Qwen-Image latents (Wan 2.1 format), when previews are on.

    Returns a function taking unpacked latents `[B, C, 1, H, W]` and giving ComfyUI's preview tuple,
    or None when previews are off, ComfyUI is absent, or the latent width is not the real model's.
    """
    if not in_comfyui() or latent_channels != 16:
        return None
    try:
        import comfy.latent_formats
        import latent_preview

        previewer = latent_preview.get_previewer(device, comfy.latent_formats.Wan21())
    except Exception:  # noqa: BLE001 - a preview is a nicety; never fail an edit for it
        log.debug("Qwen-Image-Edit: no latent preview", exc_info=True)
        return None
    if previewer is None:
        return None
    return lambda latents: previewer.decode_latent_to_preview_image("JPEG", latents)
