"""Random-weight QwenImageEditPlusPipeline folders of chosen sizes, built from the REAL classes.

The tokenizer, processor and scheduler come from the offline test kit (``tinykit/tiny_pipeline.py``);
the transformer, text encoder and VAE are built here at any size, directly in the target dtype and
on the target device (no float32 copy first), so the same code makes a 300 MB folder for the CPU
memory figure and the full-size 20B-parameter transformer on a GPU machine.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any

import torch

from tinykit import tiny_pipeline as kit
from tinykit.real_shapes import default_dtype

#: Qwen-Image-Edit-2511's transformer config (public model config; zero_cond_t marks 2511).
FULL_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
    "zero_cond_t": True,
}


def large_transformer_config(num_layers: int = 4, joint_attention_dim: int = kit.TEXT_HIDDEN_SIZE) -> dict[str, Any]:
    """The tiny kit's transformer widened to the real inner width (1024 = 8 heads x 128).

    ~37.8M parameters (~75 MB bf16) per layer; the 16-channel latents of the tiny VAE are kept so
    the pipeline still runs end to end.
    """
    return {**kit.tiny_transformer_config(True), "num_layers": num_layers, "attention_head_dim": 128,
            "num_attention_heads": 8, "axes_dims_rope": (16, 56, 56), "joint_attention_dim": joint_attention_dim}


def _construct(factory: Any, device: str, dtype: torch.dtype, seed: int) -> Any:
    """Build a module with its parameters created directly as ``dtype`` on ``device``.

    Parameters are initialised by the classes' own initialisers (random); integer buffers keep their
    dtype. A float32 model of 20B parameters would need 80 GB, so nothing is built in float32 first.
    """
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        module = factory()
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype:  # e.g. buffers made with an explicit dtype
            tensor.data = tensor.data.to(dtype)
    return module.eval()


def build_transformer(config: dict[str, Any], device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> Any:
    from diffusers import QwenImageTransformer2DModel

    return _construct(lambda: QwenImageTransformer2DModel(**config), device, dtype, seed)


def build_vae(config: dict[str, Any] | None = None, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
              seed: int = 0) -> Any:
    """``config=None`` is the real Qwen-Image VAE (the class defaults); the kit's tiny one otherwise."""
    from diffusers import AutoencoderKLQwenImage

    return _construct(lambda: AutoencoderKLQwenImage(**(config or {})), device, dtype, seed)


def text_encoder_config(tokenizer: Any, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                        vision_hidden: int = 64, vision_intermediate: int = 128, vision_heads: int = 4,
                        vision_depth: int = 2) -> Any:
    """A Qwen2_5_VLConfig of any width, shaped like the kit's tiny one (same special-token ids).

    Keep every width a multiple of 64 so bitsandbytes' CPU NF4 kernel accepts each linear layer.
    """
    from transformers import Qwen2_5_VLConfig

    base = kit.tiny_text_encoder_config(tokenizer)
    text = base.text_config.to_dict()
    head_dim = hidden // heads
    half = head_dim // 2  # mrope sections (temporal, height, width) sum to head_dim / 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section})
    for key in ("layer_types", "max_window_layers", "architectures", "model_type", "transformers_version"):
        text.pop(key, None)
    vision = base.vision_config.to_dict()
    vision.update(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                  num_heads=vision_heads, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1])
    for key in ("architectures", "model_type", "transformers_version"):
        vision.pop(key, None)
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=base.image_token_id,
        video_token_id=base.video_token_id, vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id, bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id, tie_word_embeddings=False,
    )


#: A text encoder whose linear layers dominate its size, like the real 7B one (tiny's embedding does not).
REPRESENTATIVE_TEXT_ENCODER = dict(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=2,
                                   vision_hidden=256, vision_intermediate=512, vision_heads=4, vision_depth=4)
#: For the full-size transformer (joint_attention_dim 3584): the real width, two layers instead of 28.
WIDE_TEXT_ENCODER = dict(hidden=3584, intermediate=18944, layers=2, heads=28, kv_heads=4)


def build_text_encoder(config: Any, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _construct(lambda: Qwen2_5_VLForConditionalGeneration(config), device, dtype, seed)


def save_pipeline(
    path: str | pathlib.Path,
    transformer_config: dict[str, Any] | None = None,
    text_encoder: dict[str, Any] | None = None,
    vae: str = "tiny",
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: str = "10GB",
) -> pathlib.Path:
    """Save a random-weight QwenImageEditPlusPipeline folder (safetensors, ``dtype`` on disk).

    ``transformer_config`` defaults to the kit's tiny one; ``text_encoder`` is None (the kit's tiny
    one) or keyword sizes for :func:`text_encoder_config`; ``vae`` is "tiny" or "full" (the real
    config). Components are built on ``device`` one at a time and freed once written.
    """
    from diffusers import QwenImageEditPlusPipeline

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = kit.build_tiny_tokenizer()
    te_config = (kit.tiny_text_encoder_config(tokenizer) if text_encoder is None
                 else text_encoder_config(tokenizer, **text_encoder))
    pipe = QwenImageEditPlusPipeline(
        scheduler=kit.build_tiny_scheduler(),
        vae=build_vae(kit.tiny_vae_config() if vae == "tiny" else None, device, dtype, seed),
        text_encoder=build_text_encoder(te_config, device, dtype, seed),
        tokenizer=tokenizer,
        processor=kit.build_tiny_processor(tokenizer),
        transformer=build_transformer(transformer_config or kit.tiny_transformer_config(True), device, dtype, seed),
    )
    pipe.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    del pipe
    return path


def describe(path: str | pathlib.Path) -> dict[str, Any]:
    """Bytes on disk per component and the transformer config of a saved folder."""
    path = pathlib.Path(path)
    sizes = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in path.iterdir() if d.is_dir()}
    config = json.loads((path / "transformer" / "config.json").read_text())
    return {"bytes": {k: v for k, v in sizes.items() if v}, "transformer_layers": config["num_layers"],
            "transformer_inner_dim": config["num_attention_heads"] * config["attention_head_dim"]}


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, bitsandbytes quantization state included.

    ``get_memory_footprint()`` counts the packed 4-bit weights but not their absmax/code tensors;
    those are added here (each shared tensor counted once).
    """
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for tensor in itertools.chain(module.parameters(), module.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
        add(getattr(tensor, "SCB", None))  # 8-bit row scales
    return total


#: File names `export_comfy_files` writes, as ComfyUI users name them (format -> file name).
COMFY_TRANSFORMER_FILES = {fmt: f"qwen_image_edit_2511_{fmt}.{'gguf' if fmt.startswith('gguf') else 'safetensors'}"
                           for fmt in kit.COMFY_TRANSFORMER_FORMATS}
COMFY_TEXT_ENCODER_FILES = {"bf16": "qwen_2.5_vl_7b.safetensors", "fp8_scaled": "qwen_2.5_vl_7b_fp8_scaled.safetensors"}
COMFY_VAE_FILE = "qwen_image_vae.safetensors"


def export_comfy_files(diffusers_dir: str | pathlib.Path, models: str | pathlib.Path, transformer_formats: Any,
                       text_encoder_formats: Any, to_wan_key: Any) -> pathlib.Path:
    """A ComfyUI ``models/`` folder holding the diffusers folder's model as single files.

    ``diffusion_models/`` gets the transformer in each of ``transformer_formats`` (the test kit's
    exporters: bf16, fp8, scaled fp8, comfy_quant, GGUF), ``text_encoders/`` the text encoder in each
    of ``text_encoder_formats`` (bf16, fp8_scaled), ``vae/`` the VAE; ``diffusers/Qwen-Image-Edit-2511``
    is the weight-free config folder the files loader reads its configs and tokenizer from.
    """
    from diffusers import QwenImageEditPlusPipeline

    models = pathlib.Path(models)
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    kit.save_config_folder(diffusers_dir, models / "diffusers" / "Qwen-Image-Edit-2511")
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(diffusers_dir), dtype=torch.bfloat16, local_files_only=True)
    for fmt in transformer_formats:
        kit.export_comfy_transformer(pipe, models / "diffusion_models" / COMFY_TRANSFORMER_FILES[fmt], fmt)
    for fmt in text_encoder_formats:
        kit.export_comfy_text_encoder(pipe, models / "text_encoders" / COMFY_TEXT_ENCODER_FILES[fmt], fmt)
    kit.export_comfy_vae(pipe, models / "vae" / COMFY_VAE_FILE, to_wan_key=to_wan_key)
    del pipe
    return models
