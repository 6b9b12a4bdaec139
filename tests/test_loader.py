"""The loader: dtypes, quantization, placement, the singleton cache and every bad input."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def L(pack):
    """loaders.pipeline, with the cache empty before and after each test."""
    import importlib

    mod = importlib.import_module(f"{pack.__name__}.loaders.pipeline")
    mod.release_pipeline()
    yield mod
    mod.release_pipeline()


def settings(L, path, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("quantization", "none")
    kw.setdefault("offload", "none")
    return L.LoadSettings(str(path), **kw)


# -- import ----------------------------------------------------------------------------------------


def test_pack_imports_cheaply_under_any_folder_name(tmp_path):
    link = tmp_path / "ComfyUI-Qwen Edit-main"
    link.symlink_to(REPO, target_is_directory=True)
    code = f"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("ComfyUI-Qwen Edit-main", {str(link / '__init__.py')!r},
                                              submodule_search_locations=[{str(link)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'diffusers', 'transformers', 'accelerate', 'bitsandbytes', 'huggingface_hub', 'peft'}})
print(sorted(mod.NODE_CLASS_MAPPINGS), heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    nodes, heavy = out.strip().rsplit("] [", 1)
    assert "QwenImageEditLoader" in nodes
    assert heavy == "]", f"importing the pack pulled in heavy modules: [{heavy}"


def test_loader_node_is_declared_for_saved_workflows(pack):
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["QwenImageEditLoader"] == "Load Qwen-Image-Edit (diffusers)"
    assert node.RETURN_TYPES == ("QWEN_IMAGE_EDIT_PIPE",)
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["model", "precision", "vae_precision", "quantization", "quantize", "device", "offload"]
    for name, (_, options) in required.items():
        assert options.get("tooltip"), f"input {name} has no tooltip"
        assert options["default"] in required[name][0]
    assert required["precision"][1]["default"] == "bfloat16"
    assert "Qwen/Qwen-Image-Edit-2511" in required["model"][0]


# -- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])
def test_precision_sets_every_component_dtype(L, tiny_2511_dir, precision):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, precision=precision))
    want = getattr(torch, precision)
    for name in ("transformer", "text_encoder", "vae"):
        assert getattr(loaded.pipe, name).dtype == want, name


def test_vae_precision_override(L, tiny_2511_dir):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, precision="bfloat16", vae_precision="float32"))
    assert loaded.pipe.transformer.dtype == torch.bfloat16
    assert loaded.pipe.text_encoder.dtype == torch.bfloat16
    assert loaded.pipe.vae.dtype == torch.float32


def test_loads_through_from_pretrained_with_safetensors_only(L, tiny_2511_dir, load_counter):
    L.get_pipeline(settings(L, tiny_2511_dir))
    (kwargs,) = load_counter
    assert kwargs["use_safetensors"] is True
    assert "trust_remote_code" not in kwargs
    assert kwargs[L.dtype_kwarg()] == torch.bfloat16


# -- zero_cond_t -----------------------------------------------------------------------------------


def test_2511_keeps_zero_cond_t_and_2509_does_not(L, tiny_2511_dir, tiny_2509_dir):
    a = L.get_pipeline(settings(L, tiny_2511_dir))
    assert a.is_2511 and a.pipe.transformer.config.zero_cond_t is True
    b = L.get_pipeline(settings(L, tiny_2509_dir))
    assert not b.is_2511 and not b.pipe.transformer.config.get("zero_cond_t", False)


def test_zero_cond_t_dropped_by_diffusers_fails_loudly(L, tiny_2511_dir):
    """A diffusers that drops zero_cond_t leaves a transformer config without it: that must raise."""
    from diffusers import QwenImageTransformer2DModel

    folder = L.inspect_model_folder(tiny_2511_dir)
    config = dict(QwenImageTransformer2DModel.load_config(tiny_2511_dir / "transformer"))
    config.pop("zero_cond_t")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    old_style = QwenImageTransformer2DModel.from_config(config)
    with pytest.raises(L.LoadError, match=r"zero_cond_t.*diffusers>=0\.37"):
        L.check_zero_cond_t(folder, old_style)
    L.check_zero_cond_t(folder, QwenImageTransformer2DModel.from_config({**config, "zero_cond_t": True}))


# -- quantization ----------------------------------------------------------------------------------


@pytest.mark.parametrize("quant, layer", [("nf4", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_text_encoder_quantizes_on_cpu_and_edits(L, tiny_2511_dir, quant, layer):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, quantization=quant, quantize="text_encoder"))
    te_layers = {type(m).__name__ for m in loaded.pipe.text_encoder.modules()}
    assert layer in te_layers
    assert not any("bit" in type(m).__name__ for m in loaded.pipe.transformer.modules())
    from tinykit.tiny_pipeline import make_test_image

    out = loaded.pipe(image=[make_test_image(64, 64)], prompt="red", negative_prompt=" ", num_inference_steps=2, height=64, width=64,
                      generator=torch.manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(out)).all()


def test_quantized_text_encoder_is_smaller(L, tiny_2511_dir):
    full = L.get_pipeline(settings(L, tiny_2511_dir)).pipe.text_encoder.get_memory_footprint()
    nf4 = L.get_pipeline(settings(L, tiny_2511_dir, quantization="nf4", quantize="text_encoder"))
    assert nf4.pipe.text_encoder.get_memory_footprint() < full


def test_prequantized_checkpoint_loads_quantized_without_being_asked(L, tiny_2511_dir, tmp_path):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, quantization="nf4", quantize="text_encoder"))
    saved = tmp_path / "prequant"
    loaded.pipe.save_pretrained(saved, safe_serialization=True)
    L.release_pipeline()
    assert json.loads((saved / "text_encoder" / "config.json").read_text())["quantization_config"]
    folder = L.inspect_model_folder(saved)
    assert folder.components["text_encoder"].pre_quantized == "nf4"
    again = L.get_pipeline(settings(L, saved))
    assert "Linear4bit" in {type(m).__name__ for m in again.pipe.text_encoder.modules()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
@pytest.mark.parametrize("quantize", ["transformer", "transformer+text_encoder"])
def test_transformer_quantization_without_cuda_is_refused_clearly(L, tiny_2511_dir, quantize, load_counter):
    with pytest.raises(L.LoadError, match="only on a CUDA GPU.*text_encoder"):
        L.get_pipeline(settings(L, tiny_2511_dir, quantization="nf4", quantize=quantize))
    assert load_counter == [] and L.current_pipeline() is None
    assert L.get_pipeline(settings(L, tiny_2511_dir)).pipe is not None


def test_missing_bitsandbytes_is_refused_clearly(L, tiny_2511_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(L.LoadError, match="pip install bitsandbytes"):
        L.get_pipeline(settings(L, tiny_2511_dir, quantization="nf4", quantize="text_encoder"))
    assert L.current_pipeline() is None


@pytest.mark.gpu
@pytest.mark.parametrize("quant, layer", [("nf4", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_transformer_quantizes_on_cuda(L, tiny_2511_dir, quant, layer):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, device="cuda", quantization=quant))
    assert layer in {type(m).__name__ for m in loaded.pipe.transformer.modules()}
    assert layer in {type(m).__name__ for m in loaded.pipe.text_encoder.modules()}
    img_mod = loaded.pipe.transformer.transformer_blocks[0].img_mod
    assert not any("bit" in type(m).__name__ for m in img_mod.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["none", "model", "sequential", "group"])
def test_offload_modes_on_cuda(L, tiny_2511_dir, offload):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, device="cuda", offload=offload))
    from tinykit.tiny_pipeline import make_test_image

    out = loaded.pipe(image=[make_test_image(64, 64)], prompt="red", negative_prompt=" ", num_inference_steps=2, height=64, width=64,
                      generator=torch.manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)


# -- placement -------------------------------------------------------------------------------------


def test_group_offload_runs_on_cpu(L, tiny_2511_dir):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, offload="group", precision="float32"))
    from tinykit.tiny_pipeline import make_test_image

    out = loaded.pipe(image=[make_test_image(64, 64)], prompt="red", negative_prompt=" ", num_inference_steps=2, height=64, width=64,
                      generator=torch.manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_gpu_offload_on_cpu_is_refused_clearly(L, tiny_2511_dir, offload):
    with pytest.raises(L.LoadError, match="needs a GPU.*'none'"):
        L.get_pipeline(settings(L, tiny_2511_dir, offload=offload))
    assert L.current_pipeline() is None


def test_auto_on_cpu_keeps_everything_plain(L, tiny_2511_dir):
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, quantization="auto", offload="auto"))
    assert (loaded.placement.quantization, loaded.placement.offload) == ("none", "none")
    assert loaded.device == "cpu"


def test_auto_device_picks_cpu_here(L, tiny_2511_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    loaded = L.get_pipeline(settings(L, tiny_2511_dir, device="auto"))
    assert loaded.device == "cpu" and loaded.pipe.transformer.device.type == "cpu"


def test_unavailable_device_is_refused(L, tiny_2511_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(L.LoadError, match="not available.*'auto' or 'cpu'"):
        L.get_pipeline(settings(L, tiny_2511_dir, device="cuda"))


def test_component_sizes_come_from_headers(L, tiny_2511_dir):
    from diffusers import QwenImageEditPlusPipeline

    folder = L.inspect_model_folder(tiny_2511_dir)
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_2511_dir), **{L.dtype_kwarg(): torch.float32})
    for name in ("transformer", "text_encoder", "vae"):
        params = sum(p.numel() for p in getattr(pipe, name).parameters())
        buffers = sum(b.numel() for b in getattr(pipe, name).buffers() if b.is_floating_point())
        assert params <= folder.components[name].params <= params + buffers, name


# -- cache -----------------------------------------------------------------------------------------


def test_same_settings_reuse_the_pipeline(L, tiny_2511_dir, load_counter):
    s = settings(L, tiny_2511_dir)
    first = L.get_pipeline(s)
    again = L.get_pipeline(L.LoadSettings(**{**s.__dict__}))
    assert again is first and len(load_counter) == 1


def test_changed_setting_releases_old_pipeline_before_loading(L, tiny_2511_dir, load_counter, monkeypatch):
    from diffusers import QwenImageEditPlusPipeline

    old = weakref.ref(L.get_pipeline(settings(L, tiny_2511_dir)).pipe)
    alive_at_load = []
    spy = QwenImageEditPlusPipeline.from_pretrained.__func__

    def check(cls, *a, **kw):
        gc.collect()
        alive_at_load.append(old() is not None)
        return spy(cls, *a, **kw)

    monkeypatch.setattr(QwenImageEditPlusPipeline, "from_pretrained", classmethod(check))
    new = L.get_pipeline(settings(L, tiny_2511_dir, precision="float32"))
    assert alive_at_load == [False], "the old pipeline was still alive when the new load started"
    assert new.pipe.transformer.dtype == torch.float32


def test_release_frees_the_pipeline(L, tiny_2511_dir):
    ref = weakref.ref(L.get_pipeline(settings(L, tiny_2511_dir)).pipe)
    assert L.release_pipeline() is True
    gc.collect()
    assert ref() is None and L.current_pipeline() is None
    assert L.release_pipeline() is False


def test_concurrent_loads_load_once(L, tiny_2511_dir, load_counter):
    s = settings(L, tiny_2511_dir)
    results, errors = [], []

    def worker():
        try:
            results.append(L.get_pipeline(s))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(load_counter) == 1
    assert all(r is results[0] for r in results)


def test_loader_node_returns_handle_not_pipeline(pack, L, tiny_2511_dir):
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]()
    (handle,) = node.load(str(tiny_2511_dir), "bfloat16", "same", "none", "transformer+text_encoder", "cpu", "none")
    assert isinstance(handle, L.PipeHandle) and handle.settings.model == str(tiny_2511_dir)
    assert L.current_pipeline().settings == handle.settings
    assert not any(isinstance(v, torch.nn.Module) for v in vars(handle).values())


def test_comfyui_free_releases_pipeline_and_lists_models(pack, L, tiny_2511_dir, tmp_path, comfyui):
    models = comfyui["folder_paths"].get_folder_paths("diffusers")[0]
    Path(models).mkdir(parents=True)
    shutil.copytree(tiny_2511_dir, Path(models) / "Qwen-Image-Edit-tiny")
    assert L.list_models()[0] == "Qwen-Image-Edit-tiny"
    loaded = L.get_pipeline(settings(L, "Qwen-Image-Edit-tiny", device="auto"))
    assert loaded.folder.path == Path(models) / "Qwen-Image-Edit-tiny"
    assert len(comfyui["comfy.model_management"].free_memory_calls) == 1, "ComfyUI was not asked for memory first"
    comfyui["comfy.model_management"].unload_all_models()
    assert L.current_pipeline() is None
    shutil.copytree(tiny_2511_dir, Path(models) / "Qwen-Image-Edit-2511")
    assert L.resolve_model_path("Qwen/Qwen-Image-Edit-2511") == Path(models) / "Qwen-Image-Edit-2511"


def test_loader_validates_only_device_itself(pack):
    """ComfyUI skips its own checks for every input VALIDATE_INPUTS names (or all, with **kwargs)."""
    import inspect

    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"]
    spec = inspect.getfullargspec(node.VALIDATE_INPUTS)
    assert spec.varkw is None and spec.args[1:] == ["device"]
    assert node.VALIDATE_INPUTS(device="cuda:1") is True
    assert "device must be" in node.VALIDATE_INPUTS(device="tpu")


# -- bad input -------------------------------------------------------------------------------------


def _assert_clean_then_valid_load_works(L, good_dir):
    assert L.current_pipeline() is None
    assert L.get_pipeline(settings(L, good_dir)).pipe is not None


def test_missing_folder(L, tmp_path, tiny_2511_dir):
    with pytest.raises(L.LoadError, match="not found.*models/diffusers"):
        L.get_pipeline(settings(L, tmp_path / "nope"))
    _assert_clean_then_valid_load_works(L, tiny_2511_dir)


def test_folder_missing_a_component(L, tiny_dir_copy, tiny_2511_dir):
    shutil.rmtree(tiny_dir_copy / "vae")
    with pytest.raises(L.LoadError, match="missing the component.*vae.*download"):
        L.get_pipeline(settings(L, tiny_dir_copy))
    _assert_clean_then_valid_load_works(L, tiny_2511_dir)


def test_hub_id_not_cached_offline_gives_download_command(L, tiny_2511_dir):
    """Outside ComfyUI the command fills the HF cache, where the loader looks; nothing about restarting ComfyUI."""
    with pytest.raises(L.LoadError, match=r"hf download Qwen/Qwen-Image-Edit-2511\n") as info:
        L.get_pipeline(settings(L, "Qwen/Qwen-Image-Edit-2511"))
    assert "ComfyUI (press R)" not in str(info.value) and "run the command again" in str(info.value)
    _assert_clean_then_valid_load_works(L, tiny_2511_dir)


def test_inside_comfyui_the_download_command_names_the_absolute_folder(L, comfyui):
    root = comfyui["folder_paths"].get_folder_paths("diffusers")[0]
    with pytest.raises(L.LoadError) as info:
        L.get_pipeline(settings(L, "Qwen/Qwen-Image-Edit-2511"))
    assert f'--local-dir "{Path(root) / "Qwen-Image-Edit-2511"}"' in str(info.value)
    assert Path(root).is_absolute() and "refresh ComfyUI (press R)" in str(info.value)


def test_hub_id_in_cache_resolves(L, tiny_2511_dir, tmp_path, monkeypatch):
    """A snapshot in the HF cache layout resolves by repo id with no network."""
    cache = tmp_path / "hub"
    snap = cache / "models--Qwen--Qwen-Image-Edit-2511" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_2511_dir, snap)
    (cache / "models--Qwen--Qwen-Image-Edit-2511" / "refs").mkdir()
    (cache / "models--Qwen--Qwen-Image-Edit-2511" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert L.resolve_model_path("Qwen/Qwen-Image-Edit-2511") == snap


def test_bin_only_weights_are_refused(L, tiny_dir_copy, tiny_2511_dir):
    from safetensors.torch import load_file

    vae = tiny_dir_copy / "vae"
    for f in vae.glob("*.safetensors"):
        torch.save(load_file(f), vae / "diffusion_pytorch_model.bin")
        f.unlink()
    with pytest.raises(L.LoadError, match="only pickle weights.*safetensors"):
        L.get_pipeline(settings(L, tiny_dir_copy))
    _assert_clean_then_valid_load_works(L, tiny_2511_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(L, tiny_dir_copy, tiny_2511_dir, damage):
    target = next((tiny_dir_copy / "transformer").glob("*.safetensors"))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(L.LoadError, match="(truncated|not a valid|corrupt).*[Dd]ownload it again"):
        L.get_pipeline(settings(L, tiny_dir_copy))
    _assert_clean_then_valid_load_works(L, tiny_2511_dir)


def test_not_a_qwen_edit_plus_folder(L, tiny_dir_copy):
    index = tiny_dir_copy / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "QwenImageEditPipeline"}))
    with pytest.raises(L.LoadError, match="2509 and -2511"):
        L.get_pipeline(settings(L, tiny_dir_copy))


def test_out_of_memory_during_load_leaves_cache_empty(L, tiny_2511_dir, monkeypatch):
    """Failure injection: the device runs out of memory while weights move to it."""
    from diffusers import QwenImageEditPlusPipeline

    def oom(self, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(QwenImageEditPlusPipeline, "to", oom)
    with pytest.raises(L.LoadError, match="Out of memory.*nf4.*offload"):
        L.get_pipeline(settings(L, tiny_2511_dir))
    monkeypatch.undo()
    _assert_clean_then_valid_load_works(L, tiny_2511_dir)


def test_interrupted_load_leaves_cache_empty(L, tiny_2511_dir, monkeypatch):
    from diffusers import QwenImageEditPlusPipeline

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(QwenImageEditPlusPipeline, "to", interrupted)
    with pytest.raises(KeyboardInterrupt):
        L.get_pipeline(settings(L, tiny_2511_dir))
    monkeypatch.undo()
    _assert_clean_then_valid_load_works(L, tiny_2511_dir)


@pytest.mark.parametrize("field, value", [("precision", "fp8"), ("offload", "disk"), ("quantization", "gguf"),
                                          ("device", "tpu"), ("model", " ")])
def test_invalid_settings_are_refused(L, field, value):
    with pytest.raises(L.LoadError, match="not one of|must be one of|No model"):
        L.LoadSettings(**{"model": "x", field: value})


@pytest.mark.slow
def test_unused_lm_head_is_dropped_without_changing_the_edit(L, tiny_2511_dir):
    from diffusers import QwenImageEditPlusPipeline

    from tinykit.tiny_pipeline import make_test_image

    loaded = L.get_pipeline(settings(L, tiny_2511_dir, precision="float32"))
    assert isinstance(loaded.pipe.text_encoder.lm_head, torch.nn.Identity)
    plain = QwenImageEditPlusPipeline.from_pretrained(str(tiny_2511_dir), **{L.dtype_kwarg(): torch.float32})
    assert not isinstance(plain.text_encoder.lm_head, torch.nn.Identity)
    args = dict(prompt="red", negative_prompt=" ", num_inference_steps=2, height=64, width=64, output_type="pt")
    ours = loaded.pipe(image=[make_test_image(64, 64)], generator=torch.manual_seed(0), **args).images
    theirs = plain(image=[make_test_image(64, 64)], generator=torch.manual_seed(0), **args).images
    assert torch.equal(ours, theirs)
