"""ComfyUI's single files: each format the tiny kit exports loads through the files loader node.

The tiny 2511 (and 2509) diffusers folder is exported in ComfyUI's own layouts (bf16 with and without
the 2511 marker and with a ``model.diffusion_model.`` prefix, plain fp8, legacy scaled fp8,
``comfy_quant`` fp8, GGUF Q8_0 and Q4_0 written with the ``gguf`` package; the text encoder in bf16
and fp8_scaled; the VAE in WanVAE key names). A weight-free copy of the diffusers folder under
models/diffusers gives the configs, as `hf download --exclude "*.safetensors"` would.
"""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from tests.test_lora import loras  # noqa: E402,F401 - the LoRA files fixture
from tinykit import tiny_pipeline as tp  # noqa: E402

#: Lowest PSNR (dB) against the bf16 diffusers folder, per transformer format, measured ~47-54 dB on the
#: tiny kit (random weights amplify quantization noise more than a trained model would).
MIN_PSNR = {"fp8": 40.0, "scaled_fp8": 40.0, "comfy_quant": 40.0, "gguf_q8_0": 40.0, "gguf_q4_0": 35.0}
SUFFIX = {fmt: ".gguf" if fmt.startswith("gguf") else ".safetensors" for fmt in tp.COMFY_TRANSFORMER_FORMATS}


def _mod(pack: types.ModuleType, name: str) -> types.ModuleType:
    return importlib.import_module(f"{pack.__name__}.{name}")


@pytest.fixture(scope="session")
def exported(pack: types.ModuleType, tiny_2511_dir: Path, tiny_2509_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models/ folder holding every exported file plus a weight-free config folder."""
    from diffusers import QwenImageEditPlusPipeline

    to_wan = _mod(pack, "loaders.comfy_files").diffusers_to_wan_vae_key
    models = tmp_path_factory.mktemp("comfy-models")
    for sub in ("diffusion_models", "text_encoders", "vae", "diffusers"):
        (models / sub).mkdir()
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_2511_dir, dtype=torch.bfloat16)
    for fmt in tp.COMFY_TRANSFORMER_FORMATS:
        tp.export_comfy_transformer(pipe, models / "diffusion_models" / f"tiny_2511_{fmt}{SUFFIX[fmt]}", fmt)
    tp.export_comfy_transformer(pipe, models / "diffusion_models" / "tiny_2511_bf16_prefixed.safetensors",
                                prefix="model.diffusion_model.")
    tp.export_comfy_transformer(pipe, models / "diffusion_models" / "tiny_2511_bf16_no_marker.safetensors",
                                marker=False)
    tp.export_comfy_text_encoder(pipe, models / "text_encoders" / "tiny_te_bf16.safetensors")
    tp.export_comfy_text_encoder(pipe, models / "text_encoders" / "tiny_te_fp8_scaled.safetensors", "fp8_scaled")
    tp.export_comfy_vae(pipe, models / "vae" / "tiny_vae.safetensors", to_wan_key=to_wan)
    pipe_2509 = QwenImageEditPlusPipeline.from_pretrained(tiny_2509_dir, dtype=torch.bfloat16)
    tp.export_comfy_transformer(pipe_2509, models / "diffusion_models" / "tiny_2509_bf16.safetensors")
    tp.save_config_folder(tiny_2511_dir, models / "diffusers" / "Qwen-Image-Edit-2511")
    return models


@pytest.fixture
def files_env(comfyui: dict[str, types.ModuleType], exported: Path) -> dict[str, types.ModuleType]:
    """The ComfyUI stand-in with its model folders pointed at the exported files."""
    folders = comfyui["folder_paths"].folder_names_and_paths
    for name, sub in (("diffusion_models", "diffusion_models"), ("unet", "diffusion_models"),
                      ("text_encoders", "text_encoders"), ("clip", "text_encoders"), ("vae", "vae"),
                      ("diffusers", "diffusers")):
        folders[name] = [str(exported / sub)]
    return comfyui


def _load_files(pack: types.ModuleType, diffusion_model: str, text_encoder: str = "tiny_te_bf16.safetensors",
                vae: str = "tiny_vae.safetensors", **settings: Any) -> Any:
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditFilesLoader"]()
    kwargs = {"precision": "bfloat16", "vae_precision": "same", "quantization": "none",
              "quantize": "transformer+text_encoder", "device": "cpu", "offload": "none", **settings}
    return node.load(diffusion_model, text_encoder, vae, **kwargs)[0]


def _edit(pack: types.ModuleType, handle: Any) -> Any:
    from tests.test_sampler import edit, image

    return edit(pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"](), handle, image(), steps=2)


@pytest.fixture(scope="session")
def folder_reference(pack: types.ModuleType, tiny_2511_dir: Path) -> Any:
    """The bf16 diffusers folder's edit: what every file set is compared with."""
    loader = _mod(pack, "loaders.pipeline")
    loader.release_pipeline()
    settings = loader.LoadSettings(str(tiny_2511_dir), precision="bfloat16", device="cpu", quantization="none",
                                   offload="none")
    loader.get_pipeline(settings)
    try:
        return _edit(pack, loader.PipeHandle(settings))
    finally:
        loader.release_pipeline()


def _psnr(a: Any, b: Any) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


# -- the formats -----------------------------------------------------------------------------------


def test_bf16_files_give_the_diffusers_folders_pixels(pack, files_env, folder_reference) -> None:
    out = _edit(pack, _load_files(pack, "tiny_2511_bf16.safetensors"))
    assert torch.equal(out, folder_reference)


def test_a_prefixed_file_loads_like_the_plain_one(pack, files_env, folder_reference) -> None:
    out = _edit(pack, _load_files(pack, "tiny_2511_bf16_prefixed.safetensors"))
    assert torch.equal(out, folder_reference)


@pytest.mark.parametrize("fmt", [f for f in tp.COMFY_TRANSFORMER_FORMATS if f != "bf16"])
def test_quantized_transformers_stay_close_and_stay_quantized(pack, files_env, folder_reference, fmt) -> None:
    from_files = _mod(pack, "loaders.from_files")
    handle = _load_files(pack, f"tiny_2511_{fmt}{SUFFIX[fmt]}")
    transformer = _mod(pack, "loaders.pipeline").current_pipeline().pipe.transformer
    weight = transformer.transformer_blocks[0].attn.to_q.weight
    if fmt.startswith("gguf"):
        from diffusers.quantizers.gguf.utils import GGUFParameter

        assert isinstance(weight, GGUFParameter) and weight.quant_type.name == fmt.split("_", 1)[1].upper()
    else:
        assert from_files.fp8_storage(transformer.transformer_blocks[0].attn.to_q) == torch.float8_e4m3fn
        assert weight.element_size() == 1
        has_scale = hasattr(transformer.transformer_blocks[0].attn.to_q, "comfy_weight_scale")
        assert has_scale == (fmt != "fp8")
    out = _edit(pack, handle)
    assert torch.isfinite(out).all()
    assert _psnr(out, folder_reference) >= MIN_PSNR[fmt]


def test_fp8_scaled_text_encoder_stays_fp8_and_close(pack, files_env, folder_reference) -> None:
    handle = _load_files(pack, "tiny_2511_bf16.safetensors", text_encoder="tiny_te_fp8_scaled.safetensors")
    encoder = _mod(pack, "loaders.pipeline").current_pipeline().pipe.text_encoder
    layer = encoder.model.language_model.layers[0].mlp.up_proj
    assert _mod(pack, "loaders.from_files").fp8_storage(layer) == torch.float8_e4m3fn
    assert layer.weight.element_size() == 1 and layer.comfy_weight_scale.dtype == torch.float32
    assert encoder.dtype == torch.bfloat16
    assert _psnr(_edit(pack, handle), folder_reference) >= 40.0


def test_fp8_halves_the_transformers_linear_memory(pack, files_env) -> None:
    def linear_bytes() -> int:
        model = _mod(pack, "loaders.pipeline").current_pipeline().pipe.transformer
        return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                   if isinstance(m, torch.nn.Linear))

    _load_files(pack, "tiny_2511_bf16.safetensors")
    bf16 = linear_bytes()
    _load_files(pack, "tiny_2511_scaled_fp8.safetensors")
    assert linear_bytes() == bf16 // 2


def test_the_marker_selects_2511_and_its_absence_2509(pack, files_env) -> None:
    loader = _mod(pack, "loaders.pipeline")
    outputs = {}
    for name, zero_cond_t in (("tiny_2511_bf16.safetensors", True), ("tiny_2511_bf16_no_marker.safetensors", False)):
        handle = _load_files(pack, name)
        loaded = loader.current_pipeline()
        assert loaded.is_2511 is zero_cond_t
        assert bool(loaded.pipe.transformer.config.zero_cond_t) is zero_cond_t
        outputs[zero_cond_t] = _edit(pack, handle)
    assert not torch.equal(outputs[True], outputs[False])


def test_files_share_the_one_cached_pipeline(pack, files_env, tiny_2511_dir) -> None:
    loader = _mod(pack, "loaders.pipeline")
    _load_files(pack, "tiny_2511_bf16.safetensors")
    first = loader.current_pipeline()
    _load_files(pack, "tiny_2511_bf16.safetensors")
    assert loader.current_pipeline() is first
    _load_files(pack, "tiny_2511_bf16_no_marker.safetensors")
    assert loader.current_pipeline() is not first


def test_file_lists_come_from_comfyuis_folders(pack, files_env) -> None:
    loader = _mod(pack, "loaders.pipeline")
    assert "tiny_2511_gguf_q4_0.gguf" in loader.list_files("transformer")
    assert loader.list_files("text_encoder") == ["tiny_te_bf16.safetensors", "tiny_te_fp8_scaled.safetensors"]
    assert loader.list_files("vae") == ["tiny_vae.safetensors"]
    inputs = pack.NODE_CLASS_MAPPINGS["QwenImageEditFilesLoader"].INPUT_TYPES()["required"]
    assert list(inputs)[:3] == ["diffusion_model", "text_encoder", "vae"]


def test_sizes_for_placement_come_from_the_files(pack, files_env) -> None:
    from_files = _mod(pack, "loaders.from_files")
    dm = files_env["folder_paths"].folder_names_and_paths["diffusion_models"][0]
    te = Path(files_env["folder_paths"].folder_names_and_paths["text_encoders"][0])
    vae = Path(files_env["folder_paths"].folder_names_and_paths["vae"][0]) / "tiny_vae.safetensors"
    sizes = {}
    for fmt in ("bf16", "scaled_fp8", "gguf_q4_0"):
        folder, files = from_files.inspect_files(Path(dm) / f"tiny_2511_{fmt}{SUFFIX[fmt]}", te / "tiny_te_bf16.safetensors", vae)
        info = folder.components["transformer"]
        assert (info.pre_quantized is None) == (fmt == "bf16")
        sizes[fmt] = folder.bytes_at(2, "transformer")
        assert folder.components["text_encoder"].pre_quantized is None
    assert sizes["scaled_fp8"] < 0.7 * sizes["bf16"]
    assert sizes["gguf_q4_0"] < sizes["scaled_fp8"]


def test_nf4_is_not_stacked_on_quantized_files(pack, files_env) -> None:
    """The planner's quantized components leave out a pre-quantized transformer."""
    loader = _mod(pack, "loaders.pipeline")
    _load_files(pack, "tiny_2511_scaled_fp8.safetensors", text_encoder="tiny_te_bf16.safetensors",
                quantization="nf4", quantize="text_encoder")
    encoder = loader.current_pipeline().pipe.text_encoder
    assert any("4bit" in type(m).__name__ for m in encoder.modules())
    assert loader.current_pipeline().pipe.transformer.transformer_blocks[0].attn.to_q.weight.element_size() == 1


# -- refusals --------------------------------------------------------------------------------------


def _save(path: Path, tensors: dict[str, Any], metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _refused(pack: types.ModuleType, match: str, **files: str) -> None:
    loader = _mod(pack, "loaders.pipeline")
    with pytest.raises(loader.LoadError, match=match):
        _load_files(pack, **files)
    assert loader.current_pipeline() is None


@pytest.mark.slow
def test_wrong_files_are_refused_by_name_and_leave_the_cache_usable(pack, files_env, exported, tmp_path,
                                                                     folder_reference) -> None:
    from safetensors.torch import load_file

    dm = exported / "diffusion_models"
    tensors = load_file(str(dm / "tiny_2511_bf16.safetensors"))
    layered = _save(tmp_path / "layered.safetensors",
                    {**tensors, "time_text_embed.addition_t_embedding.weight": torch.zeros(2, 64)})
    flux = _save(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)})
    nvfp4 = _save(tmp_path / "nvfp4.safetensors", {**tensors, "img_in.comfy_quant": torch.tensor(
        list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)},
        metadata={"_quantization_metadata": json.dumps({"layers": {"img_in": {"format": "nvfp4"}}})})
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not loaded")
    _refused(pack, "layered.safetensors appears to be a Qwen-Image-Layered", diffusion_model=str(layered))
    _refused(pack, "flux.safetensors appears to be a Flux diffusion model", diffusion_model=str(flux))
    _refused(pack, "nvfp4", diffusion_model=str(nvfp4))
    _refused(pack, "pickle", diffusion_model=str(pickle))
    _refused(pack, "tiny_vae.safetensors appears to be a Wan 2.1 / Qwen-Image VAE",
             diffusion_model="tiny_2511_bf16.safetensors", text_encoder=str(exported / "vae" / "tiny_vae.safetensors"))
    _refused(pack, "appears to be a Qwen-Image diffusion model", diffusion_model="tiny_2511_bf16.safetensors",
             vae=str(dm / "tiny_2511_bf16.safetensors"))
    _refused(pack, "Diffusion model file not found: nope.safetensors. Put it in /.*/diffusion_models",
             diffusion_model="nope.safetensors")
    assert torch.equal(_edit(pack, _load_files(pack, "tiny_2511_bf16.safetensors")), folder_reference)


def test_a_file_of_the_wrong_shape_is_refused_naming_the_mismatch(pack, files_env, exported, tmp_path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(exported / "text_encoders" / "tiny_te_bf16.safetensors"))
    tensors["model.norm.weight"] = torch.zeros(32)
    wrong = _save(tmp_path / "other_te.safetensors", tensors)
    _refused(pack, r"other_te.safetensors does not fit the Qwen2.5-VL text encoder: model.norm.weight is \[32\]",
             diffusion_model="tiny_2511_bf16.safetensors", text_encoder=str(wrong))


# -- configs and tokenizer -------------------------------------------------------------------------


def test_without_a_diffusers_folder_comfyuis_tokenizer_and_the_shipped_configs_serve(pack, files_env, exported,
                                                                                    tmp_path) -> None:
    from_files = _mod(pack, "loaders.from_files")
    files_env["folder_paths"].folder_names_and_paths["diffusers"] = [str(tmp_path / "empty")]
    with pytest.raises(from_files.ModelFolderError, match='hf download Qwen/Qwen-Image-Edit-2511 --exclude "\\*.safetensors"'):
        from_files.find_config_source()
    tp.save_comfy_tokenizer(tmp_path / "comfy" / "text_encoders" / "qwen25_tokenizer")
    source = from_files.find_config_source()
    assert source.root == from_files.SHIPPED_CONFIGS and source.processor is None
    tokenizer, processor = from_files.load_tokenizer_and_processor(source)
    assert tp.count_prefix_tokens(tokenizer) == tp.PROMPT_TEMPLATE_DROP_TOKENS
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    # The pipeline's own processor call: the image placeholder grows to the image's merged patch count.
    text = tp.PROMPT_TEMPLATE.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it red")
    inputs = processor(text=[text], images=[tp.make_test_image(384, 384)], padding=True, return_tensors="pt")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert inputs["input_ids"][0].tolist().count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == t * h * w // 4
    # The shipped configs are the real model's: the tiny files are refused by shape, before any weight loads.
    _refused(pack, "tiny_vae.safetensors does not fit the Qwen-Image VAE", diffusion_model="tiny_2511_bf16.safetensors")


def test_the_shipped_configs_are_the_real_models_sizes(pack) -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    root = _mod(pack, "loaders.from_files").SHIPPED_CONFIGS
    with init_empty_weights():
        transformer = QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(root / "transformer"))
        encoder = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(root / "text_encoder"))
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(root / "vae"))
    real = _mod(pack, "loaders.placement").REAL_2511_BF16_BYTES
    for name, model in (("transformer", transformer), ("text_encoder", encoder), ("vae", vae)):
        params = sum(p.numel() for p in model.parameters())
        assert abs(2 * params - real[name]) / real[name] < 0.03, name
    assert transformer.config.zero_cond_t is True


# -- the VAE's key names ---------------------------------------------------------------------------


def test_vae_key_mapping_agrees_with_diffusers_own_wan_converter(pack) -> None:
    """diffusers' convert_wan_vae_to_diffusers (written for the real layout) reads our ComfyUI names back."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    files = _mod(pack, "loaders.comfy_files")
    with init_empty_weights():
        keys = list(AutoencoderKLQwenImage().state_dict())
    wan = {files.diffusers_to_wan_vae_key(k, 2): k for k in keys}
    assert len(wan) == len(keys)
    converted = convert_wan_vae_to_diffusers({k: v for k, v in wan.items()})
    assert converted == {v: v for v in keys}
    assert all(files.wan_to_diffusers_vae_key(w, 2) == d for w, d in wan.items())


def test_vae_key_mapping_round_trips_for_other_depths(pack) -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage

    files = _mod(pack, "loaders.comfy_files")
    for blocks in (1, 3):
        with init_empty_weights():
            keys = list(AutoencoderKLQwenImage(base_dim=8, num_res_blocks=blocks, dim_mult=[1, 2, 2, 2]).state_dict())
        assert [files.wan_to_diffusers_vae_key(files.diffusers_to_wan_vae_key(k, blocks), blocks) for k in keys] == keys


def test_the_exported_files_are_shaped_like_comfyuis(exported) -> None:
    """Key names ComfyUI's own detection looks for (comfy/model_detection.py, comfy/sd.py)."""
    from safetensors import safe_open

    with safe_open(str(exported / "diffusion_models" / "tiny_2511_bf16.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"txt_norm.weight", "img_in.weight", "__index_timestep_zero__"} <= keys
    with safe_open(str(exported / "text_encoders" / "tiny_te_fp8_scaled.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.self_attn.k_proj.bias" in keys and "scaled_fp8" in keys and "lm_head.weight" not in keys
        assert f.get_tensor("model.layers.0.mlp.up_proj.scale_weight").dtype == torch.float32
    with safe_open(str(exported / "vae" / "tiny_vae.safetensors"), "pt") as f:
        assert {"decoder.middle.0.residual.0.gamma", "encoder.conv1.weight", "conv2.weight"} <= set(f.keys())


def test_exported_folder_has_no_weights(exported) -> None:
    folder = exported / "diffusers" / "Qwen-Image-Edit-2511"
    assert not list(folder.rglob("*.safetensors")) and (folder / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["scaled_fp8", "gguf_q8_0"])
def test_a_lora_applies_to_quantized_files_and_comes_off_cleanly(pack, files_env, loras, fmt) -> None:
    """LoRAs work on fp8 and GGUF transformers (PEFT wraps the hooked / GGUF linear layers)."""
    from tests.test_sampler import edit, image

    lora_node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoRA"]()
    sampler = pack.NODE_CLASS_MAPPINGS["QwenImageEditSampler"]()
    handle = _load_files(pack, f"tiny_2511_{fmt}{SUFFIX[fmt]}")
    base = edit(sampler, handle, image(), steps=2)
    with_lora = lora_node.apply(handle, str(loras["a"]), 1.0, "auto")[0]
    styled = edit(sampler, with_lora, image(), steps=2)
    assert torch.isfinite(styled).all() and not torch.equal(styled, base)
    assert torch.equal(edit(sampler, handle, image(), steps=2), base)


def test_other_comfy_quant_formats_are_refused_from_the_layer_json(pack, files_env, exported, tmp_path) -> None:
    """No `_quantization_metadata`: the per-layer comfy_quant JSON alone says the format."""
    from safetensors.torch import load_file

    tensors = load_file(str(exported / "diffusion_models" / "tiny_2511_comfy_quant.safetensors"))
    key = next(k for k in tensors if k.endswith(".comfy_quant"))
    tensors[key] = torch.tensor(list(json.dumps({"format": "mxfp8"}).encode()), dtype=torch.uint8)
    _refused(pack, "mxfp8_layer.safetensors is quantized as mxfp8", diffusion_model=str(_save(tmp_path / "mxfp8_layer.safetensors", tensors)))
    tensors = load_file(str(exported / "diffusion_models" / "tiny_2511_comfy_quant.safetensors"))
    scale = next(k for k in tensors if k.endswith(".weight_scale"))
    tensors[scale] = torch.ones(4, 2)
    _refused(pack, "block-scaled fp8", diffusion_model=str(_save(tmp_path / "blocks.safetensors", tensors)))


@pytest.mark.parametrize("fmt", ["scaled_fp8", "gguf_q4_0"])
def test_group_offload_runs_quantized_files_unchanged(pack, files_env, fmt) -> None:
    """Group offload moves the fp8 bytes / GGUF blocks between devices; on the CPU it must not change a pixel."""
    name = f"tiny_2511_{fmt}{SUFFIX[fmt]}"
    plain = _edit(pack, _load_files(pack, name, text_encoder="tiny_te_fp8_scaled.safetensors"))
    grouped = _edit(pack, _load_files(pack, name, text_encoder="tiny_te_fp8_scaled.safetensors", offload="group"))
    assert torch.equal(plain, grouped)
