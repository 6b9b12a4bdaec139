"""Speed options on the cached pipeline: attention backend, regional compile, step cache.

Each option is carried on the `PipeHandle` as a `SpeedOptions` (the Speed node sets it), applied
to the transformer just before an edit with diffusers' own switches, and reverted when a later run
does not ask for it, so nothing (an attention backend, compiled blocks, cache hooks) leaks from one
workflow into the next:

* attention backend: checked when applied, then each edit runs inside diffusers' public
  `attention_backend(name)` context manager (`run_with_fallback`), so nothing is left set between
  edits and nothing needs undoing. The context manager sets diffusers' process-wide backend, not a
  thread-local one, for the length of the edit; that is safe here because the pack holds
  `pipeline_lock()` for the whole edit and ComfyUI runs one prompt at a time. Only the Qwen
  transformer's processors read it: the text encoder is transformers' and the VAE calls SDPA itself.
* regional compile: `transformer.compile_repeated_blocks(fullgraph=...)`, which compiles each
  `QwenImageTransformerBlock` (the 60 identical blocks) instead of the whole model: one block's
  compile is reused 60 times, so compiling takes seconds, not minutes.
* step cache: `transformer.enable_cache(FirstBlockCacheConfig | TaylorSeerCacheConfig)` /
  `disable_cache()`.

Everything is off by default. An option this machine cannot run falls back with a warning: at apply
time (kernel package missing, no GPU for a GPU-only kernel, no Triton for compile on CUDA) and at run
time (`run_with_fallback`: a compile or attention-kernel failure in the first edit turns that option
off, warns, and runs the edit again).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import traceback
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..utils import comfy
from ..utils.errors import QwenEditError
from . import compat

if TYPE_CHECKING:
    from .pipeline import LoadedPipeline

log = logging.getLogger("qwen_image_edit")

T = TypeVar("T")

#: The node's choices -> diffusers `AttentionBackendName` values. Only backends that run from an
#: installed package: the `*_hub` ones download kernels at run time, which this pack never does.
ATTENTION_BACKENDS: dict[str, str] = {
    "native": "native",      # PyTorch scaled_dot_product_attention (the default)
    "flash": "flash",        # flash-attn 2 (pip install flash-attn)
    "flash3": "_flash_3",    # flash-attn 3 (Hopper; built from source)
    "sage": "sage",          # SageAttention (pip install sageattention)
    "xformers": "xformers",  # xFormers memory-efficient attention
}
_PACKAGES = {"flash": "flash_attn", "_flash_3": "flash_attn_interface", "sage": "sageattention", "xformers": "xformers"}
# Kernels that exist only for NVIDIA GPUs: refused up front elsewhere. (Other diffusers backends asked for
# from Python are tried, and a failure at run time falls back through `run_with_fallback`.)
_CUDA_ONLY = {"flash", "flash_varlen", "_flash_3", "_flash_varlen_3", "sage", "sage_varlen", "xformers"}
COMPILE_MODES = ("off", "regional")
CACHE_MODES = ("off", "first_block", "taylorseer")


class SpeedError(QwenEditError, ValueError):
    """A speed option has an invalid value."""


@dataclass(frozen=True)
class SpeedOptions:
    """What the Speed node asks for. Defaults are all off: the pipeline exactly as loaded.

    `attention_backend` is one of `ATTENTION_BACKENDS` (or, from Python, any diffusers backend name
    that does not download a kernel). `cache_threshold` is First Block Cache's threshold (higher skips
    more steps); `cache_interval` is TaylorSeer's: one full step, then `cache_interval - 1` predicted.
    """

    attention_backend: str = "native"
    compile: str = "off"
    cache: str = "off"
    cache_threshold: float = 0.05
    cache_interval: int = 5

    def __post_init__(self) -> None:
        backend = self.attention_backend
        if backend not in ATTENTION_BACKENDS and (not backend.replace("_", "").isalnum() or backend.endswith("_hub")):
            raise SpeedError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {backend!r}.")
        if self.compile not in COMPILE_MODES:
            raise SpeedError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {self.compile!r}.")
        if self.cache not in CACHE_MODES:
            raise SpeedError(f"cache must be one of {', '.join(CACHE_MODES)}, not {self.cache!r}.")
        if not (math.isfinite(self.cache_threshold) and self.cache_threshold >= 0):
            raise SpeedError("cache_threshold must be a number >= 0 (First Block Cache's default is 0.05).")
        if int(self.cache_interval) < 1:
            raise SpeedError("cache_interval must be at least 1 (1 computes every step).")

    @property
    def backend_id(self) -> str:
        return ATTENTION_BACKENDS.get(self.attention_backend, self.attention_backend)

    @property
    def cache_key(self) -> tuple:
        if self.cache == "first_block":
            return ("first_block", float(self.cache_threshold))
        if self.cache == "taylorseer":
            return ("taylorseer", int(self.cache_interval))
        return ("off",)


OFF = SpeedOptions()


@dataclass
class SpeedState:
    """Kept in `LoadedPipeline.speed`: what is applied to the transformer now."""

    attention: str = "native"        # diffusers backend id each edit runs under
    attention_asked: str = "native"  # what was asked (differs after a fallback; not retried every run)
    compiled: bool = False
    compile_asked: str = "off"
    compile_broken: str = ""         # why compile failed on this pipeline; not retried until reloaded
    cache_key: tuple = ("off",)


def installed_attention_backends() -> list[str]:
    """The node choices whose kernel package is importable here (native always)."""
    return [name for name, bid in ATTENTION_BACKENDS.items()
            if bid == "native" or importlib.util.find_spec(_PACKAGES[bid]) is not None]


def _state(loaded: LoadedPipeline) -> SpeedState:
    if loaded.speed is None:
        loaded.speed = SpeedState()
    return loaded.speed


def _on_cuda(loaded: Any) -> bool:
    return str(loaded.device).startswith("cuda")


# -- attention -------------------------------------------------------------------------------------


def _attention(state: SpeedState) -> AbstractContextManager[Any]:
    """What an edit runs inside: diffusers' `attention_backend` for a chosen backend, else nothing (the default)."""
    if state.attention == "native":
        return nullcontext()
    from diffusers import attention_backend

    return attention_backend(state.attention)


def _apply_attention(loaded: Any, options: SpeedOptions, state: SpeedState) -> None:
    asked = options.backend_id
    if asked == state.attention_asked:
        return
    state.attention_asked = asked
    state.attention = "native"
    if asked == "native":
        return
    if asked in _CUDA_ONLY and not _on_cuda(loaded):
        log.warning("Qwen-Image-Edit: attention_backend=%s needs an NVIDIA GPU and this pipeline runs on %s; "
                    "using native attention (PyTorch SDPA).", options.attention_backend, loaded.device)
        return
    try:
        from diffusers import attention_backend

        with attention_backend(asked):  # diffusers checks the kernel package on entry; nothing runs here
            pass
    except (RuntimeError, ValueError, ImportError) as exc:
        log.warning("Qwen-Image-Edit: attention_backend=%s is not available here (%s); using native attention "
                    "(PyTorch SDPA).", options.attention_backend, str(exc).splitlines()[0])
        return
    state.attention = asked
    log.info("Qwen-Image-Edit: attention backend %s", asked)


# -- compile ---------------------------------------------------------------------------------------


def _compiled_blocks(transformer: Any) -> list[Any]:
    names = compat.repeated_block_names(transformer)
    return [m for m in transformer.modules() if type(m).__name__ in names]


def _uncompile(transformer: Any, state: SpeedState) -> None:
    for block in _compiled_blocks(transformer):
        compat.uncompile(block)
    state.compiled = False


def _compile_unsupported_reason(loaded: Any) -> str:
    if not hasattr(loaded.pipe.transformer, "compile_repeated_blocks"):
        return "this diffusers has no compile_repeated_blocks (needs diffusers >= 0.35)"
    if not compat.dynamo_supported():
        return "torch.compile is not supported on this Python/platform"
    if _on_cuda(loaded):
        if not compat.has_triton():
            return "torch.compile on an NVIDIA GPU needs Triton (pip install triton, or triton-windows on Windows)"
    return ""


def _apply_compile(loaded: Any, options: SpeedOptions, state: SpeedState) -> None:
    if options.compile == state.compile_asked:
        return
    transformer = loaded.pipe.transformer
    state.compile_asked = options.compile
    if options.compile == "off":
        if state.compiled:
            _uncompile(transformer, state)
        return
    reason = state.compile_broken or _compile_unsupported_reason(loaded)
    if reason:
        log.warning("Qwen-Image-Edit: compile=regional is not possible here (%s); running uncompiled.", reason)
        return
    # fullgraph=False: the step-cache and offload hooks wrap block forwards in Python state that dynamo
    # cannot put in one graph; a graph break there is cheap, a hard error is not.
    cache = comfy.torch_compile_cache_dir()
    if cache is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    transformer.compile_repeated_blocks(fullgraph=False, dynamic=None)
    state.compiled = True
    log.info("Qwen-Image-Edit: compiling the %d transformer blocks on the first edit", len(_compiled_blocks(transformer)))


# -- cache -----------------------------------------------------------------------------------------


def cache_config(options: SpeedOptions, dtype: Any = None) -> Any:
    """diffusers' cache config for `options` (None when off)."""
    if options.cache == "first_block":
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=float(options.cache_threshold))
    if options.cache == "taylorseer":
        from diffusers import TaylorSeerCacheConfig

        kwargs: dict[str, Any] = {"cache_interval": int(options.cache_interval)}
        if dtype is not None:
            kwargs["taylor_factors_dtype"] = dtype  # the default is bfloat16 whatever the model's precision
        return TaylorSeerCacheConfig(**kwargs)
    return None


def _apply_cache(loaded: Any, options: SpeedOptions, state: SpeedState) -> None:
    if options.cache_key == state.cache_key:
        return
    transformer = loaded.pipe.transformer
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()
    state.cache_key = ("off",)
    config = cache_config(options, getattr(transformer, "dtype", None))
    if config is None:
        return
    try:
        transformer.enable_cache(config)
    except (ValueError, TypeError, RuntimeError, AttributeError) as exc:
        if getattr(transformer, "is_cache_enabled", False):
            transformer.disable_cache()
        log.warning("Qwen-Image-Edit: cache=%s is not possible here (%s); running without a cache.",
                    options.cache, exc)
        return
    state.cache_key = options.cache_key
    log.info("Qwen-Image-Edit: step cache %s", config)


# -- public ----------------------------------------------------------------------------------------


def apply_speed(loaded: Any, options: SpeedOptions | None) -> SpeedOptions:
    """Make the pipeline's transformer run with `options` (None: all off); returns what is in effect."""
    options = options or OFF
    state = _state(loaded)
    _apply_attention(loaded, options, state)
    _apply_compile(loaded, options, state)
    _apply_cache(loaded, options, state)
    return effective(loaded)


def effective(loaded: Any) -> SpeedOptions:
    """The speed options actually in effect on the pipeline (after any fallback)."""
    state = _state(loaded)
    backend = next((k for k, v in ATTENTION_BACKENDS.items() if v == state.attention), state.attention)
    cache = state.cache_key[0]
    return SpeedOptions(
        attention_backend=backend,
        compile="regional" if state.compiled else "off",
        cache=cache,
        cache_threshold=state.cache_key[1] if cache == "first_block" else OFF.cache_threshold,
        cache_interval=state.cache_key[1] if cache == "taylorseer" else OFF.cache_interval,
    )


def _reset_cache_state(loaded: Any) -> None:
    """The cache hooks keep per-run state; the pipeline resets it only after a run that finished."""
    transformer = loaded.pipe.transformer
    if getattr(transformer, "is_cache_enabled", False):
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()


def _raised_in(exc: BaseException, fragment: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if fragment in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def _is_compile_failure(exc: BaseException) -> bool:
    return isinstance(exc, compat.compile_error_types()) or _raised_in(exc, "torch/_inductor/")


def run_with_fallback(loaded: Any, run: Callable[[], T]) -> T:
    """Run an edit; if the compiled blocks or a non-native attention kernel fail, turn that off, warn, retry.

    Only those failures are retried (recognised by type and by where they were raised); anything else,
    cancel and out-of-memory included, propagates unchanged.
    """
    state = _state(loaded)
    _reset_cache_state(loaded)
    try:
        with _attention(state):
            return run()
    except Exception as exc:  # noqa: BLE001 - filtered below, re-raised unless it is a speed-option failure
        transformer = loaded.pipe.transformer
        if state.compiled and _is_compile_failure(exc):
            state.compile_broken = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            _uncompile(transformer, state)
            log.warning("Qwen-Image-Edit: torch.compile failed (%s); running uncompiled from now on.",
                        state.compile_broken)
        elif state.attention != "native" and _raised_in(exc, "attention_dispatch"):
            failed = state.attention
            state.attention = "native"
            log.warning("Qwen-Image-Edit: attention backend %s failed (%s: %s); using native attention.",
                        failed, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        else:
            raise
        traceback.clear_frames(exc.__traceback__)
    _reset_cache_state(loaded)
    with _attention(state):
        return run()


__all__ = [
    "ATTENTION_BACKENDS", "CACHE_MODES", "COMPILE_MODES", "OFF", "SpeedError", "SpeedOptions", "apply_speed",
    "cache_config", "effective", "installed_attention_backends", "run_with_fallback",
]
