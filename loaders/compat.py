"""The private diffusers / torch details the pack relies on, each in one place.

Public APIs come first everywhere else; these have no public equivalent yet. `tests/test_compat.py`
checks each against the installed libraries, so an upstream change fails a test instead of an edit.
"""

from __future__ import annotations

from typing import Any


def repeated_block_names(model: Any) -> set[str]:
    """Class names of the blocks `compile_repeated_blocks` compiles (ModelMixin._repeated_blocks)."""
    return set(getattr(model, "_repeated_blocks", None) or ())


def uncompile(module: Any) -> None:
    """Undo `nn.Module.compile()`: torch keeps the compiled call in `_compiled_call_impl`; no public undo."""
    module._compiled_call_impl = None


def dynamo_supported() -> bool:
    """Whether torch.compile can run on this Python / platform (`torch._dynamo.is_dynamo_supported`)."""
    import torch._dynamo

    return bool(torch._dynamo.is_dynamo_supported())


def has_triton() -> bool:
    """Whether inductor can build GPU kernels here (`torch.utils._triton.has_triton`: Triton and a device it runs on)."""
    from torch.utils._triton import has_triton as _has_triton

    return bool(_has_triton())


def compile_error_types() -> tuple[type[BaseException], ...]:
    """The exception types torch.compile's dynamo raises (`torch._dynamo.exc.TorchDynamoException`)."""
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


def unpack_latents(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """The pipeline's packed 2x2 latents `[B, N, C*4]` back to `[B, C, 1, H/8, W/8]` (for previews)."""
    return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def pack_latents(pipe: Any, latents: Any) -> Any:
    """`[B, C, 1, h, w]` latents (VAE layout) in the transformer's packed 2x2 layout `[B, h*w/4, C*4]`,
    as the pipeline packs its noise and reference latents (masked edits blend in this layout)."""
    batch, channels, _, height, width = latents.shape
    return type(pipe)._pack_latents(latents, batch, channels, height, width)


def empty_host_cache() -> bool:
    """Give the pinned (page-locked) host memory that PyTorch's host caching allocator keeps back to the system.

    Group offload with CUDA streams pins every offloaded weight; once the pipeline is released those blocks
    stay in the allocator's cache (RSS stays up, and pinned pages cannot even be swapped) until this runs.
    Public since torch 2.9 as `torch.accelerator.empty_host_cache`; older releases only have the private
    `torch._C._host_emptyCache` (same allocator). A no-op, returning False, without an initialised CUDA
    context: nothing can have been pinned, and no context is created here.
    """
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return False
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) \
        or getattr(torch._C, "_host_emptyCache", None)
    if empty is None:  # pragma: no cover - torch too old to have a host cache to empty
        return False
    empty()
    return True
