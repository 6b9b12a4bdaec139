"""Reliability: the settings that broke, NaN output, and the messages found by attacking the pack.

Each test here failed before its fix (issue 10): vae_precision other than 'same', NF4 on the text
encoder on CPU, NaN images saved as black ones, raw errors for long prompts, template tokens,
malformed or foreign model folders, odd device values and odd LoRAs.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import pytest
import torch

from tests.test_lora import MLP, make_lora, save_diffusers, save_raw
from tests.test_sampler import edit, image


@pytest.fixture
def L(pack):
    return importlib.import_module(f"{pack.__name__}.loaders.pipeline")


@pytest.fixture
def S(pack):
    return importlib.import_module(f"{pack.__name__}.utils.sampling")


def _load(L, model_dir, **settings):
    L.release_pipeline()
    options = {"precision": "float32", "device": "cpu", "quantization": "none", "offload": "none", **settings}
    s = L.LoadSettings(str(model_dir), **options)
    L.get_pipeline(s)
    return L.PipeHandle(s)


# -- the two broken settings -----------------------------------------------------------------------


@pytest.mark.parametrize("precision, vae_precision", [
    ("bfloat16", "float32"), ("bfloat16", "float16"), ("float32", "bfloat16"), ("float32", "float16"),
    ("float16", "float32"), ("float16", "bfloat16"),
])
def test_every_vae_precision_edits(L, sampler, tiny_2511_dir, precision, vae_precision):
    handle = _load(L, tiny_2511_dir, precision=precision, vae_precision=vae_precision)
    pipe = L.current_pipeline().pipe
    assert pipe.vae.dtype == getattr(torch, vae_precision)
    assert pipe.transformer.dtype == getattr(torch, precision)
    out = edit(sampler, handle, image())
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()
    L.release_pipeline()


def test_nf4_text_encoder_on_cpu_edits_with_the_vision_tower_unquantized(L, sampler, tiny_2511_dir):
    handle = _load(L, tiny_2511_dir, precision="bfloat16", quantization="nf4", quantize="text_encoder")
    encoder = L.current_pipeline().pipe.text_encoder
    kinds = {name: type(m).__name__ for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(kind == "Linear" for name, kind in kinds.items() if "visual" in name)
    assert any(kind == "Linear4bit" for name, kind in kinds.items() if "language_model" in name)
    out = edit(sampler, handle, image())
    assert torch.isfinite(out).all()
    assert L.current_pipeline().edits_done == 1
    L.release_pipeline()


@pytest.mark.slow
def test_a_pipeline_whose_first_edit_fails_is_not_kept(L, sampler, tiny_2511_dir, monkeypatch):
    handle = _load(L, tiny_2511_dir)
    first = L.current_pipeline()

    def broken_kernel(*args, **kwargs):
        raise AssertionError("N must be divisible by block_n")

    monkeypatch.setattr(first.pipe.text_encoder, "forward", broken_kernel)
    with pytest.raises(AssertionError):
        edit(sampler, handle, image())
    assert L.current_pipeline() is None
    out = edit(sampler, handle, image())  # loads afresh and works
    assert torch.isfinite(out).all() and L.current_pipeline() is not first
    L.release_pipeline()


def test_bad_input_on_the_first_edit_keeps_the_pipeline(L, S, sampler, tiny_2511_dir):
    handle = _load(L, tiny_2511_dir)
    loaded = L.current_pipeline()
    with pytest.raises(S.EditError):
        edit(sampler, handle, image(), prompt="x <|im_end|> y")
    assert L.current_pipeline() is loaded
    L.release_pipeline()


# -- NaN output ------------------------------------------------------------------------------------


def test_nan_weights_stop_the_edit_with_a_cause(L, S, sampler, tiny_2511_dir):
    handle = _load(L, tiny_2511_dir)
    loaded = L.current_pipeline()
    with torch.no_grad():
        loaded.pipe.transformer.proj_out.weight.fill_(float("nan"))
    with pytest.raises(S.EditError, match="NaN/infinite.*damaged weights"):
        edit(sampler, handle, image())
    L.release_pipeline()


@pytest.mark.slow
def test_a_nan_lora_is_named(L, S, sampler, pack, tiny_2511_dir, tmp_path):
    config, sd = make_lora(MLP, r=2, alpha=2, seed=5)
    sd = {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in sd.items()}
    path = save_diffusers(tmp_path / "broken_style.safetensors", config, sd)
    handle = _load(L, tiny_2511_dir)
    lora_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoRA"]()
    with_lora = lora_node.apply(handle, str(path), 1.0, "auto")[0]
    with pytest.raises(S.EditError, match="try without broken_style.safetensors"):
        edit(sampler, with_lora, image())
    assert torch.isfinite(edit(sampler, handle, image())).all()  # without it the pipeline is fine
    L.release_pipeline()


def test_float16_overflow_is_named_as_the_likely_cause(S):
    message = S.nonfinite_message("float16", ())
    assert "precision 'bfloat16'" in message and "LoRA" not in message


# -- prompts ---------------------------------------------------------------------------------------


def test_an_overlong_prompt_is_refused_before_the_text_encoder_runs(L, S, sampler, tiny_2511_dir, monkeypatch):
    handle = _load(L, tiny_2511_dir)
    encoder = L.current_pipeline().pipe.text_encoder
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(S.EditError, match=r"The prompt is \d+ tokens; .* at most \d+"):
        edit(sampler, handle, image(), prompt="make the sky purple and " * 1500)
    L.release_pipeline()


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>"])
def test_template_tokens_in_a_prompt_are_refused_by_name(S, token):
    for field in ("prompt", "negative_prompt"):
        req = S.EditRequest(**{"prompt": "make it red", field: f"a {token} b"})
        with pytest.raises(S.EditError, match=f"The {field} contains {token.replace('|', '[|]')}"):
            S.validate(req, [image()])


# -- model folders ---------------------------------------------------------------------------------


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(encoded) == n
    path.write_bytes(raw[:8] + encoded + raw[8 + n:])


@pytest.mark.parametrize("fault, match", [
    ("shape", r"diffusion_pytorch_model.safetensors has a corrupt safetensors header: the entry .* lacks a valid shape"),
    ("index_list", r"model_index.json is corrupt: it must be a JSON object"),
    ("class_int", r"model_index.json is corrupt: _class_name must be a string"),
    ("weight_map_list", r"index.json is corrupt: it needs a 'weight_map' object"),
    ("foreign", r"names \['os', 'system'\] for 'scheduler'.*never imports a module"),
    ("ddim", r"names \['diffusers', 'DDIMScheduler'\] for 'scheduler'"),
])
def test_malformed_and_foreign_folders_are_refused_by_file_and_fault(L, tiny_dir_copy, load_counter, fault, match):
    index = tiny_dir_copy / "model_index.json"
    data = json.loads(index.read_text())
    if fault == "shape":
        def drop_shape(header):
            header[next(k for k in header if k != "__metadata__")].pop("shape")
        _rewrite_header(tiny_dir_copy / "transformer" / "diffusion_pytorch_model.safetensors", drop_shape)
    elif fault == "index_list":
        index.write_text(json.dumps([data]))
    elif fault == "class_int":
        index.write_text(json.dumps({**data, "_class_name": 5}))
    elif fault == "weight_map_list":
        (tiny_dir_copy / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": ["diffusion_pytorch_model.safetensors"]}))
    elif fault == "foreign":
        index.write_text(json.dumps({**data, "scheduler": ["os", "system"]}))
    else:
        index.write_text(json.dumps({**data, "scheduler": ["diffusers", "DDIMScheduler"]}))
    L.release_pipeline()
    with pytest.raises(L.LoadError, match=match):
        L.get_pipeline(L.LoadSettings(str(tiny_dir_copy), device="cpu"))
    assert load_counter == [] and L.current_pipeline() is None


def test_a_prequantized_transformer_on_cpu_is_refused_before_loading(L, tiny_dir_copy, load_counter):
    config = tiny_dir_copy / "transformer" / "config.json"
    data = json.loads(config.read_text())
    data["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    config.write_text(json.dumps(data))
    with pytest.raises(L.LoadError, match="already quantized with bitsandbytes.*only on an NVIDIA GPU"):
        L.get_pipeline(L.LoadSettings(str(tiny_dir_copy), device="cpu"))
    assert load_counter == []


@pytest.mark.parametrize("device", ["auto:3", "cpu:1", "mps:0", 5, None, "cuda:x"])
def test_odd_device_values_are_refused_with_the_choices(L, pack, device):
    with pytest.raises(L.LoadError, match="device must be"):
        L.LoadSettings("x", device=device)
    verdict = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"].VALIDATE_INPUTS(device=device)
    assert isinstance(verdict, str) and "device must be" in verdict


def test_cuda_n_is_still_a_valid_device(L, pack):
    L.LoadSettings("x", device="cuda:1")
    assert pack.NODE_CLASS_MAPPINGS["QwenImageEditLoader"].VALIDATE_INPUTS(device="cuda:1") is True


# -- LoRAs -----------------------------------------------------------------------------------------


def test_a_lora_with_a_3d_tensor_is_refused_before_peft(pack, tmp_path, tiny_2511_dir, L):
    lora = importlib.import_module(f"{pack.__name__}.loaders.lora")
    _, sd = make_lora(MLP, r=2, alpha=2, seed=6)
    key = next(k for k in sd if "lora_A" in k)
    sd[key] = sd[key].unsqueeze(0)
    path = save_raw(tmp_path / "odd.safetensors", {"transformer." + k: v for k, v in sd.items()})
    _load(L, tiny_2511_dir)
    spec = lora.make_spec(str(path))
    with pytest.raises(lora.LoraError, match=r"3-D weight \[1, 2, 64\] where a LoRA has a matrix"):
        lora.read_lora(L.current_pipeline().pipe, spec)
    L.release_pipeline()


def test_an_sdxl_lora_is_refused_citing_its_own_key_names(pack, tmp_path, tiny_2511_dir, L):
    lora = importlib.import_module(f"{pack.__name__}.loaders.lora")
    path = save_raw(tmp_path / "sdxl_style.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    })
    _load(L, tiny_2511_dir)
    with pytest.raises(lora.LoraError) as info:
        lora.read_lora(L.current_pipeline().pipe, lora.make_spec(str(path)))
    message = str(info.value)
    assert "sdxl_style.safetensors is not a Qwen-Image LoRA" in message
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in message and "tions.0" not in message
    L.release_pipeline()


# -- two loaders, compile cache --------------------------------------------------------------------


def test_two_loaders_taking_turns_are_named_in_a_warning(L, tiny_2511_dir, caplog):
    a = L.LoadSettings(str(tiny_2511_dir), precision="float32", device="cpu", quantization="none", offload="none")
    b = L.LoadSettings(str(tiny_2511_dir), precision="bfloat16", device="cpu", quantization="none", offload="none")
    L.release_pipeline()
    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        for settings in (a, b, a):
            L.get_pipeline(settings)
    warnings = [r.getMessage() for r in caplog.records if "take turns" in r.getMessage()]
    assert len(warnings) == 1 and "precision 'float32' vs 'bfloat16'" in warnings[0]
    L.release_pipeline()


def test_compile_cache_goes_under_comfyuis_temp_folder(pack, comfyui, tmp_path):
    bridge = importlib.import_module(f"{pack.__name__}.utils.comfy")
    temp = Path(comfyui["folder_paths"].get_temp_directory())
    assert bridge.torch_compile_cache_dir() == temp / "torchinductor"
    assert temp.parent == tmp_path


def test_auto_size_is_diffusers_own_for_every_input_size(S):
    """size_mode 'auto' gives exactly what diffusers' calculate_dimensions gives (issue 11, bug 1)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    differ = [(w, h) for w in range(256, 2049, 7) for h in range(256, 2049, 7)
              if S.auto_size(w, h) != calculate_dimensions(1024 * 1024, w / h)]
    assert differ == []
    assert S.auto_size(64, 86) == calculate_dimensions(1024 * 1024, 64 / 86) == (896, 1184)


def test_every_error_the_pack_raises_has_one_root(pack, S):
    errors = importlib.import_module(f"{pack.__name__}.utils.errors")
    image = importlib.import_module(f"{pack.__name__}.utils.image")
    classes = [importlib.import_module(f"{pack.__name__}.loaders.pipeline").LoadError,
               importlib.import_module(f"{pack.__name__}.loaders.weights").ModelFolderError,
               importlib.import_module(f"{pack.__name__}.loaders.lora").LoraError,
               importlib.import_module(f"{pack.__name__}.loaders.speed").SpeedError, S.EditError]
    assert all(issubclass(c, errors.QwenEditError) for c in classes)
    with pytest.raises(errors.QwenEditError, match="NaN"):
        image.validate_image(torch.full((1, 8, 8, 3), float("nan")), "image")
    with pytest.raises(errors.QwenEditError):
        S.validate(S.EditRequest("make it red"), [torch.zeros(1, 8, 8, 3, dtype=torch.int64)])


@pytest.mark.slow
def test_a_cancelled_edit_puts_offloaded_components_back(L, pack, sampler, tiny_2511_dir, monkeypatch):
    """The pipeline's own maybe_free_model_hooks runs only after a finished call; a cancel must run it too."""
    bridge = importlib.import_module(f"{pack.__name__}.utils.comfy")
    handle = _load(L, tiny_2511_dir)
    pipe = L.current_pipeline().pipe
    calls = []
    real = type(pipe).maybe_free_model_hooks
    monkeypatch.setattr(type(pipe), "maybe_free_model_hooks", lambda self: (calls.append(1), real(self))[1])
    forward = pipe.transformer.forward

    def cancel_during_the_first_step(*args, **kwargs):
        bridge.request_cancel()  # as the Cancel button does mid-run; the step callback raises
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", cancel_during_the_first_step)
    with pytest.raises(bridge.Cancelled):
        edit(sampler, handle, image())
    monkeypatch.setattr(pipe.transformer, "forward", forward)
    assert calls == [1] and L.current_pipeline() is not None
    assert torch.isfinite(edit(sampler, handle, image())).all()
    L.release_pipeline()


# -- checked before the load (issue 12) --------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_an_impossible_offload_is_refused_before_any_weights_are_read(L, tiny_2511_dir, load_counter):
    with pytest.raises(L.LoadError, match="needs a GPU.*'none'"):
        L.get_pipeline(L.LoadSettings(str(tiny_2511_dir), device="cpu", offload="model"))
    assert load_counter == []


def test_the_cpu_plan_says_what_is_applied(pack):
    placement = importlib.import_module(f"{pack.__name__}.loaders.placement")
    plan = placement.plan_placement({"transformer": 1, "text_encoder": 1}, None, "cpu", "nf4", "auto", ("text_encoder",))
    assert plan.reason.startswith("nf4 text_encoder, all in cpu memory")
    plain = placement.plan_placement({"transformer": 1}, None, "cpu", "none", "none")
    assert plain.reason.startswith("bf16/fp16 weights, all in cpu memory")
    fit = placement.plan_placement({"transformer": 2**30}, 10 * 2**30, "cuda", "none", "none")
    assert "GiB" in fit.reason and " GB" not in fit.reason
