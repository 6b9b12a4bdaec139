"""ComfyUI's memory manager can evict the pipeline like one of its own models (issue 11).

In ComfyUI every native model load calls `comfy.model_management.free_memory(memory_required, device)`,
and "Unload models" / POST /free calls `unload_all_models()`, which calls `free_memory(1e30, ...)`.
The stand-in reproduces exactly that call structure (tests/comfy_standin.py).
"""

from __future__ import annotations

import functools
import importlib
import logging
import shutil
from pathlib import Path

import pytest


@pytest.fixture
def L(pack):
    return importlib.import_module(f"{pack.__name__}.loaders.pipeline")


@pytest.fixture
def loaded(L, comfyui, tiny_2511_dir):
    models = Path(comfyui["folder_paths"].get_folder_paths("diffusers")[0])
    models.mkdir(parents=True)
    shutil.copytree(tiny_2511_dir, models / "Qwen-Image-Edit-tiny")
    settings = L.LoadSettings("Qwen-Image-Edit-tiny", precision="float32", device="cpu", quantization="none",
                              offload="none")
    return L.get_pipeline(settings)


def test_a_native_load_that_needs_more_than_is_free_evicts_the_pipeline(L, comfyui, loaded):
    mm = comfyui["comfy.model_management"]
    mm.free_bytes = 2 * 2**30
    mm.free_memory(1 * 2**30, mm.get_torch_device())  # fits in what is free: nothing to give back
    assert L.current_pipeline() is loaded
    mm.free_memory(3 * 2**30, mm.get_torch_device())  # does not fit: our pipeline goes first
    assert L.current_pipeline() is None
    assert mm.free_memory_calls[-1][0] == 3 * 2**30  # and ComfyUI's own free_memory still ran


def test_unload_models_releases_the_pipeline(L, comfyui, loaded):
    comfyui["comfy.model_management"].unload_all_models()
    assert L.current_pipeline() is None


def test_other_packs_hooks_are_chained_never_discarded(L, comfyui, loaded):
    mm = comfyui["comfy.model_management"]
    calls = []
    ours = mm.free_memory

    @functools.wraps(ours)
    def other_pack(memory_required, device, *args, **kwargs):
        calls.append("other")
        return ours(memory_required, device, *args, **kwargs)

    mm.free_memory = other_pack
    L.install_comfy_hooks()  # ours is already under the other pack's wrapper: nothing is added or removed
    assert mm.free_memory is other_pack
    mm.unload_all_models()
    assert calls == ["other"] and L.current_pipeline() is None


def test_a_typo_does_not_unload_comfyuis_models(L, comfyui):
    mm = comfyui["comfy.model_management"]
    with pytest.raises(L.LoadError):
        L.get_pipeline(L.LoadSettings("Qwen-Image-Edit-tpyo", device="cpu"))
    assert mm.free_memory_calls == []


def test_disable_smart_memory_is_said_once(L, comfyui, tiny_2511_dir, caplog):
    comfyui["comfy.model_management"].DISABLE_SMART_MEMORY = True
    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        for precision in ("float32", "bfloat16", "float32"):
            L.get_pipeline(L.LoadSettings(str(tiny_2511_dir), precision=precision, device="cpu",
                                          quantization="none", offload="none"))
    assert sum("--disable-smart-memory" in r.getMessage() for r in caplog.records) == 1


def test_release_empties_the_pinned_host_cache_once_the_pipeline_is_gone(L, pack, comfyui, tiny_2511_dir, monkeypatch):
    """Pinned blocks can only go back once the tensors in them are freed: the cache is emptied after the release."""
    import weakref

    compat = importlib.import_module(f"{pack.__name__}.loaders.compat")
    settings = L.LoadSettings(str(tiny_2511_dir), precision="float32", device="cpu", quantization="none",
                              offload="none")
    transformer = weakref.ref(L.get_pipeline(settings).pipe.transformer)
    seen: list[bool] = []
    real = compat.empty_host_cache

    def spy() -> bool:
        seen.append(L.current_pipeline() is None and transformer() is None)
        return real()

    monkeypatch.setattr(compat, "empty_host_cache", spy)
    assert L.release_pipeline()
    assert seen == [True]
