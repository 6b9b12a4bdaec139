"""Each private diffusers / torch detail in loaders/compat.py, checked against the installed libraries.

When one of these fails after an upgrade, the pack's use of that detail must change with it.
"""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture
def compat(pack):
    return importlib.import_module(f"{pack.__name__}.loaders.compat")


def test_repeated_blocks_name_the_transformer_block(compat):
    from tinykit.tiny_pipeline import build_tiny_transformer

    transformer = build_tiny_transformer()
    names = compat.repeated_block_names(transformer)
    assert names and {type(b).__name__ for b in transformer.transformer_blocks} <= names


def test_uncompile_puts_the_plain_forward_back(compat):
    layer = torch.nn.Linear(4, 4)
    layer.compile(backend="eager")
    assert layer._compiled_call_impl is not None
    compat.uncompile(layer)
    x = torch.randn(2, 4)
    assert layer._compiled_call_impl is None and torch.equal(layer(x), layer.forward(x))


def test_dynamo_support_and_triton_are_torch_own_answers(compat):
    import torch._dynamo
    from torch.utils._triton import has_triton

    assert compat.dynamo_supported() is bool(torch._dynamo.is_dynamo_supported())
    assert compat.has_triton() is bool(has_triton())


def test_compile_error_types_catch_a_dynamo_failure(compat):
    def breaks_the_graph(x):
        return x + int(x.sum().item() > 0)  # a data-dependent Python value: no full graph possible

    with pytest.raises(compat.compile_error_types()):
        torch.compile(breaks_the_graph, backend="eager", fullgraph=True)(torch.ones(2))


def test_unpack_latents_inverts_the_pipelines_packing(compat):
    from diffusers import QwenImageEditPlusPipeline

    class Pipe:
        vae_scale_factor = 8

    Pipe._unpack_latents = QwenImageEditPlusPipeline._unpack_latents
    latents = torch.randn(1, 16, 8, 12)
    packed = QwenImageEditPlusPipeline._pack_latents(latents, 1, 16, 8, 12)
    unpacked = compat.unpack_latents(Pipe(), packed, 64, 96)
    assert unpacked.shape == (1, 16, 1, 8, 12) and torch.equal(unpacked[:, :, 0], latents)


def test_empty_host_cache_is_a_no_op_without_a_cuda_context(compat):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process")
    assert compat.empty_host_cache() is False
    assert not torch.cuda.is_initialized()  # it never creates a context (seconds and ~300 MB of VRAM)


@pytest.mark.gpu
def test_empty_host_cache_gives_pinned_memory_back(compat):
    def pinned_bytes() -> int:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))

    torch.cuda.init()
    block = torch.empty(64 * 2**20, dtype=torch.uint8).pin_memory()
    del block
    cached = pinned_bytes()
    assert cached >= 64 * 2**20  # freed, but still held by torch's host cache
    assert compat.empty_host_cache() is True
    assert cached - pinned_bytes() >= 64 * 2**20


def test_pack_latents_is_the_pipelines_packing(compat):
    from diffusers import QwenImageEditPlusPipeline

    class Pipe(QwenImageEditPlusPipeline):
        def __init__(self) -> None:  # only the static methods are used
            pass

    latents = torch.randn(2, 16, 1, 8, 12)
    packed = compat.pack_latents(Pipe(), latents)
    assert packed.shape == (2, 24, 64)
    assert torch.equal(packed, QwenImageEditPlusPipeline._pack_latents(latents, 2, 16, 8, 12))
    Pipe.vae_scale_factor = 8
    assert torch.equal(compat.unpack_latents(Pipe(), packed, 64, 96), latents)
