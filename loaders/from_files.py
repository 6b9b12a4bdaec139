"""Building QwenImageEditPlusPipeline from ComfyUI's single files, with no 58 GB diffusers folder.

The weights come from the three files (see `comfy_files`); the small rest (component configs,
scheduler config, tokenizer, image-processor settings) comes from, in order:
1. a diffusers folder of the model under ComfyUI/models/diffusers, weights or not (the
   `hf download ... --exclude "*.safetensors"` download is a few MB);
2. the same in the Hugging Face cache;
3. the configs shipped with this pack (`loaders/configs/`, numbers only) with the Qwen2.5 tokenizer
   that ComfyUI itself ships (`comfy/text_encoders/qwen25_tokenizer/`).
Every file is checked against the model built from those configs (on the meta device: no memory)
before any weight is read.

Loading, per format, with the libraries' own machinery:
* bf16/fp16/fp32 transformer: `QwenImageTransformer2DModel.from_single_file` (bitsandbytes NF4/8-bit
  through its `quantization_config`); GGUF: the same with `GGUFQuantizationConfig`, kept quantized.
* fp8 (plain, ComfyUI's scaled fp8 and `comfy_quant`): the model is built on the meta device and the
  fp8 tensors are assigned as they are; each fp8 linear layer gets a diffusers hook (`Fp8Linear`) that
  computes with `weight.to(compute dtype) * scale`, so the weights stay fp8 (~1 byte/param) in memory.
* text encoder: transformers' `from_pretrained(config=..., state_dict=...)` (which also quantizes
  with bitsandbytes) or, for fp8 files, the meta-device assignment above.
* VAE: the WanVAE keys renamed to diffusers' and loaded into `AutoencoderKLQwenImage`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import comfy
from .comfy_files import (
    ComfyFile,
    check_shapes,
    inspect_file,
    original_text_encoder_key,
    read_tensors,
    text_encoder_key,
)
from .weights import ComponentInfo, ModelFolder, ModelFolderError

log = logging.getLogger("qwen_image_edit")

SHIPPED_CONFIGS = Path(__file__).with_name("configs") / "Qwen-Image-Edit-2511"
CONFIG_REPOS = ("Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Edit-2509")
_FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


@dataclass(frozen=True)
class ConfigSource:
    """Where the component configs, tokenizer and image-processor settings come from."""

    root: Path  # holds transformer/, text_encoder/, vae/ (config.json) and scheduler/
    tokenizer: Path  # a tokenizer folder (tokenizer.json, or vocab.json + merges.txt)
    processor: Path | None  # a saved Qwen2VLProcessor; None: built from root/processor/preprocessor_config.json
    description: str


def config_download_command() -> str:
    """The one download that supplies the configs and tokenizer, to where the loader looks for them:
    ComfyUI's models/diffusers inside ComfyUI, the Hugging Face cache elsewhere."""
    dirs = comfy.diffusers_model_dirs()
    target = f' --local-dir "{dirs[0] / "Qwen-Image-Edit-2511"}"' if dirs else ""
    return f'hf download Qwen/Qwen-Image-Edit-2511 --exclude "*.safetensors"{target}'


def _is_config_folder(path: Path) -> bool:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(index, dict) and str(index.get("_class_name", "")).startswith("QwenImageEdit")
            and all((path / c / "config.json").is_file() for c in ("transformer", "text_encoder", "vae"))
            and (path / "tokenizer").is_dir() and (path / "processor").is_dir())


def _folder_source(path: Path, how: str) -> ConfigSource:
    return ConfigSource(path, path / "tokenizer", path / "processor", f"{path} ({how})")


def find_config_source(variant: str = "Edit-2511") -> ConfigSource:
    """The first place holding the configs and tokenizer (see the module docstring); never downloads."""
    folders = [p.parent for root in comfy.diffusers_model_dirs() if root.is_dir()
               for p in sorted(root.glob("*/model_index.json"))]
    folders = [p for p in folders if _is_config_folder(p)]
    folders.sort(key=lambda p: variant.split("-")[-1] not in p.name)
    if folders:
        return _folder_source(folders[0], "diffusers folder")
    try:
        from huggingface_hub import snapshot_download

        for repo in CONFIG_REPOS:
            try:
                path = Path(snapshot_download(repo, local_files_only=True))
            except Exception:  # noqa: BLE001 - not in the local cache
                continue
            if _is_config_folder(path):
                return _folder_source(path, "Hugging Face cache")
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        pass
    tokenizer = comfy.comfy_tokenizer_dir("qwen25_tokenizer")
    if tokenizer is not None:
        return ConfigSource(SHIPPED_CONFIGS, tokenizer, None,
                            f"the configs shipped with this pack and ComfyUI's tokenizer ({tokenizer})")
    raise ModelFolderError(
        "Loading ComfyUI model files needs the model's small config and tokenizer files (a few MB), which "
        "ComfyUI itself provides; outside ComfyUI fetch them once with:\n  " + config_download_command()
    )


# -- what the files are ----------------------------------------------------------------------------


def inspect_files(diffusion_model: Path, text_encoder: Path, vae: Path) -> tuple[ModelFolder, dict[str, ComfyFile]]:
    """Header checks of the three files; the result describes them like a diffusers folder (sizes, variant)."""
    files = {"transformer": inspect_file(diffusion_model, "transformer"),
             "text_encoder": inspect_file(text_encoder, "text_encoder"),
             "vae": inspect_file(vae, "vae")}
    if files["vae"].quantized:
        raise ModelFolderError(f"{vae.name} is stored as {files['vae'].storage}; use the bf16 qwen_image_vae.safetensors.")
    components = {
        role: ComponentInfo(role, f.path, weight_bytes=f.stored_bytes, params=f.params,
                            pre_quantized=f.storage if f.quantized else None)
        for role, f in files.items()
    }
    transformer = files["transformer"]
    return ModelFolder(transformer.path, "QwenImageEditPlusPipeline", components, transformer.zero_cond_t), files


# -- loading ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    target = logging.getLogger(logger)
    level, target.level = target.level, logging.ERROR
    try:
        yield
    finally:
        target.setLevel(level)


def _expected_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_model(build: Any) -> Any:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _transformer_config(source: ConfigSource, file: ComfyFile) -> dict[str, Any]:
    from diffusers import QwenImageTransformer2DModel

    config = dict(QwenImageTransformer2DModel.load_config(str(source.root / "transformer")))
    config.update(num_layers=file.num_layers, zero_cond_t=file.zero_cond_t)
    return config


def load_transformer(file: ComfyFile, source: ConfigSource, dtype: Any, quantization: Any = None) -> Any:
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel

    config = _transformer_config(source, file)
    meta = _meta_model(lambda: QwenImageTransformer2DModel.from_config(config))
    check_shapes(file, _expected_shapes(meta), f"the Qwen-Image transformer of {source.root.name}")
    if file.storage.startswith("GGUF"):
        if file.prefix:
            raise ModelFolderError(f"{file.path.name}: GGUF keys with a '{file.prefix}' prefix are not supported.")
        # diffusers warns that the 2511 marker key is unused; zero_cond_t below is what it means.
        with _quiet("diffusers.loaders.single_file_model"):
            return QwenImageTransformer2DModel.from_single_file(
                str(file.path), config=str(source.root), subfolder="transformer", local_files_only=True,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), dtype=dtype,
                num_layers=file.num_layers, zero_cond_t=file.zero_cond_t,
            )
    tensors, scales = read_tensors(file, keep_fp8=True)
    if _has_fp8(tensors):
        return _assign_fp8(meta, tensors, scales, dtype, file)
    return QwenImageTransformer2DModel.from_single_file(
        tensors, config=str(source.root), subfolder="transformer", local_files_only=True, dtype=dtype,
        quantization_config=quantization, num_layers=file.num_layers, zero_cond_t=file.zero_cond_t,
    )


def load_text_encoder(file: ComfyFile, source: ConfigSource, dtype: Any, quantization: Any = None) -> Any:
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(str(source.root / "text_encoder"), local_files_only=True)
    meta = _meta_model(lambda: Qwen2_5_VLForConditionalGeneration(config))
    expected = {original_text_encoder_key(k): s for k, s in _expected_shapes(meta).items()}
    check_shapes(file, expected, "the Qwen2.5-VL text encoder", optional=("lm_head.",))
    tensors, scales = read_tensors(file, keep_fp8=True)
    if _has_fp8(tensors):
        tensors = {text_encoder_key(k): v for k, v in tensors.items()}
        scales = {text_encoder_key(k): v for k, v in scales.items()}
        tensors.setdefault("lm_head.weight", tensors["model.language_model.embed_tokens.weight"])
        return _assign_fp8(meta, tensors, scales, dtype, file)
    # The pipeline never uses lm_head (it is dropped after loading); ComfyUI's files do not have it.
    tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=tensors, dtype=dtype, quantization_config=quantization,
    ).eval()


def load_vae(file: ComfyFile, source: ConfigSource, dtype: Any) -> Any:
    from diffusers import AutoencoderKLQwenImage

    config = AutoencoderKLQwenImage.load_config(str(source.root / "vae"))
    meta = _meta_model(lambda: AutoencoderKLQwenImage.from_config(config))
    check_shapes(file, _expected_shapes(meta), "the Qwen-Image VAE")
    tensors, _ = read_tensors(file, keep_fp8=False)
    meta.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return meta.eval()


def _has_fp8(tensors: dict[str, Any]) -> bool:
    return any(str(t.dtype).removeprefix("torch.") in _FP8_DTYPES for t in tensors.values())


FP8_HOOK = "qwen_fp8_linear"


@functools.cache
def fp8_linear_hook() -> type:
    """A diffusers hook class: the layer keeps its fp8 weight and computes with `weight.to(dtype) * scale`.

    The weight is held as a uint8 view of the fp8 bytes: PEFT then leaves a LoRA on the layer in full
    precision (it gives adapters the base weight's dtype when that is a float), and no dtype cast of
    the model (`.to(bfloat16)`) can silently dequantize it without the scale. `new_forward` never
    writes to the module, so an exception mid-forward leaves nothing half-changed, and offload hooks
    that move `weight` between devices move the fp8 bytes. (A function, so importing the pack does
    not import diffusers.)
    """
    import torch.nn.functional as F
    from diffusers.hooks import ModelHook

    class Fp8Linear(ModelHook):
        def __init__(self, storage_dtype: Any, compute_dtype: Any) -> None:
            super().__init__()
            self.storage_dtype = storage_dtype
            self.compute_dtype = compute_dtype

        def new_forward(self, module: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            weight = module.weight.view(self.storage_dtype).to(self.compute_dtype)
            scale = getattr(module, "comfy_weight_scale", None)
            if scale is not None:
                weight = weight * scale.to(weight.device, self.compute_dtype)
            bias = None if module.bias is None else module.bias.to(self.compute_dtype)
            return F.linear(x.to(self.compute_dtype), weight, bias)

    return Fp8Linear


def fp8_storage(module: Any) -> Any:
    """The fp8 dtype a linear layer's weight is kept in, or None."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(FP8_HOOK) if registry is not None else None
    return None if hook is None else hook.storage_dtype


def _assign_fp8(meta: Any, tensors: dict[str, Any], scales: dict[str, Any], dtype: Any, file: ComfyFile) -> Any:
    """Fill a meta-device model with the file's tensors, keeping fp8 linear weights fp8 (see `fp8_linear_hook`)."""
    import torch
    from diffusers.hooks import HookRegistry

    fp8_layers = {}
    for name, module in meta.named_modules():
        weight = tensors.get(f"{name}.weight")
        if isinstance(module, torch.nn.Linear) and weight is not None and str(weight.dtype).endswith(_FP8_DTYPES):
            fp8_layers[name] = (module, weight.dtype)
            tensors[f"{name}.weight"] = weight.view(torch.uint8)
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            layer = key.rsplit(".", 1)[0]
            # A scaled fp8 weight outside a linear layer (rare: a conv) is dequantized here.
            tensors[key] = (tensor.to(torch.float32) * scales.get(layer, 1.0)).to(dtype) \
                if str(tensor.dtype).endswith(_FP8_DTYPES) else tensor.to(dtype)
    missing = [k for k in meta.state_dict() if k not in tensors]
    if missing:
        raise ModelFolderError(f"{file.path.name} lacks {len(missing)} weight(s), e.g. {missing[0]}. Download it again.")
    meta.requires_grad_(False)
    meta.load_state_dict({k: tensors[k] for k in meta.state_dict()}, strict=True, assign=True)
    hook = fp8_linear_hook()
    for name, (module, storage) in fp8_layers.items():
        if name in scales:
            module.register_buffer("comfy_weight_scale", scales[name].to(torch.float32))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook(storage, dtype), FP8_HOOK)
    log.info("Qwen-Image-Edit: %s stays %s in memory (%d layers), computing in %s",
             file.path.name, file.storage, len(fp8_layers), str(dtype).removeprefix("torch."))
    return meta.eval()


def load_tokenizer_and_processor(source: ConfigSource) -> tuple[Any, Any]:
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = Qwen2Tokenizer.from_pretrained(str(source.tokenizer), local_files_only=True)
    if source.processor is not None:
        return tokenizer, Qwen2VLProcessor.from_pretrained(str(source.processor), local_files_only=True)
    image_processor = Qwen2VLImageProcessor.from_pretrained(str(source.root / "processor"), local_files_only=True)
    video = Qwen2VLVideoProcessor(patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
                                  temporal_patch_size=image_processor.temporal_patch_size,
                                  image_mean=image_processor.image_mean, image_std=image_processor.image_std)
    return tokenizer, Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video)


def build_pipeline(files: dict[str, ComfyFile], source: ConfigSource, dtype: Any, vae_dtype: Any,
                   quantization: dict[str, Any]) -> Any:
    """The pipeline from the files, on the CPU; the caller places it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    log.info("Qwen-Image-Edit: configs and tokenizer from %s", source.description)
    tokenizer, processor = load_tokenizer_and_processor(source)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(source.root / "scheduler"), local_files_only=True)
    return QwenImageEditPlusPipeline(
        scheduler=scheduler,
        vae=load_vae(files["vae"], source, vae_dtype),
        text_encoder=load_text_encoder(files["text_encoder"], source, dtype, quantization.get("text_encoder")),
        tokenizer=tokenizer,
        processor=processor,
        transformer=load_transformer(files["transformer"], source, dtype, quantization.get("transformer")),
    )
