"""Qwen-Image-Edit-2511 at its REAL widths with almost no depth, random weights, fully offline.

The tiny kit (``tiny_pipeline.py``) runs the real code at toy widths: 4 latent channels, 64-wide text
model. Bugs that only show at the real widths (16-channel latents, the 3584-wide text model, RoPE axes
(16, 56, 56), the 1280-wide vision tower, ComfyUI's 16-channel latent preview) slip through it. This
module builds the three models from the configs the pack ships (``loaders/configs/Qwen-Image-Edit-2511``)
with only the depth cut:

* transformer: the 2511 config with ``num_layers=1`` (~380M parameters);
* VAE: the real config, unchanged (z_dim 16, ~127M);
* text encoder: Qwen2.5-VL-7B's config with 1 text layer and ``vision_depth`` vision blocks (default 2:
  one windowed block and one full-attention block, the two kinds the real tower mixes), ~1.4B
  parameters with the untied 152064 x 3584 embedding and lm_head of the real model.

:func:`save_real_shapes_pipeline` writes them as a diffusers folder (bf16, ~3.7 GB) with the real
scheduler and processor settings and a tokenizer whose added tokens have the real ids (see
``build_tiny_tokenizer(first_added_id=...)``), so the real text-encoder config works unchanged.

Random weights are drawn fast: models are built on the meta device and each weight is a slice of one
shared pool of normal values, scaled to ``1/sqrt(fan_in)`` (norm scales 1, biases 0.02). That takes ~2 s
instead of ~20 s for the libraries' own initialisation and keeps the outputs finite.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .tiny_pipeline import (
    PROMPT_TEMPLATE_DROP_TOKENS,
    QWEN_FIRST_ADDED_ID,
    build_tiny_processor,
    build_tiny_tokenizer,
    count_prefix_tokens,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

__all__ = [
    "CONFIGS",
    "build_real_text_encoder",
    "build_real_transformer",
    "build_real_vae",
    "real_config",
    "save_real_shapes_pipeline",
]

#: The configs the pack ships (the public model's, numbers only).
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "loaders" / "configs" / "Qwen-Image-Edit-2511"

_MODEL_INDEX = {
    "_class_name": "QwenImageEditPlusPipeline",
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def real_config(component: str, **changes: Any) -> dict[str, Any]:
    """The shipped ``<component>/config.json`` with `changes` applied."""
    return {**json.loads((CONFIGS / component / "config.json").read_text()), **changes}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in `dtype` (their parameters are created in the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fill_random(model: torch.nn.Module, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """Materialise a meta-device model on the CPU with cheap random weights (see the module docstring).

    Only parameters and persistent buffers are filled: non-persistent buffers (RoPE frequencies) are
    recomputed by the classes when the saved folder is loaded, which is the only way these models are used.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=generator).to(dtype)
    model.to_empty(device="cpu")
    offset = 0
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.numel() == 0 or not tensor.is_floating_point():
                continue
            is_bias = name.rsplit(".", 1)[-1].endswith("bias")
            if tensor.ndim == 1 and not is_bias:  # norm scales
                tensor.fill_(1.0)
                continue
            flat = tensor.view(-1)
            start = 0
            while start < flat.numel():  # consecutive slices of the pool, restarting at a moving offset
                take = min(flat.numel() - start, pool.numel() - offset)
                flat[start:start + take].copy_(pool[offset:offset + take])
                start += take
                offset = (offset + take) % (pool.numel() - 7) or 1
            # Biases small but not zero: every tensor holds values of its own (file-format tests tell them apart).
            tensor.mul_(0.02 if is_bias else tensor[0].numel() ** -0.5)
    return model.eval()


def _on_meta(build: Any, dtype: torch.dtype) -> Any:
    """Built in `dtype` on the meta device: no memory, and `to_empty` then allocates `dtype` directly."""
    with torch.device("meta"), default_dtype(dtype):
        return build()


def build_real_transformer(num_layers: int = 1, zero_cond_t: bool = True, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16) -> QwenImageTransformer2DModel:
    """The 2511 transformer config (2509 with ``zero_cond_t=False``) with `num_layers` blocks."""
    from diffusers import QwenImageTransformer2DModel

    config = real_config("transformer", num_layers=num_layers, zero_cond_t=zero_cond_t)
    return _fill_random(_on_meta(lambda: QwenImageTransformer2DModel.from_config(config), dtype), seed, dtype)


def build_real_vae(seed: int = 1, dtype: torch.dtype = torch.bfloat16) -> AutoencoderKLQwenImage:
    """The real VAE (z_dim 16) with its own initialisation (0.7 s; a conv stack needs no tricks)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    with default_dtype(dtype):
        return AutoencoderKLQwenImage.from_config(real_config("vae")).eval()


def build_real_text_encoder(num_layers: int = 1, vision_depth: int = 2, *, tie_word_embeddings: bool = False,
                            seed: int = 2, dtype: torch.dtype = torch.bfloat16) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL-7B at full width with `num_layers` text layers and `vision_depth` vision blocks.

    The last vision block keeps full attention (as blocks 7, 15, 23 and 31 of the real 32 do), the
    others windowed attention. ``vision_depth=32`` is the real tower with its real full-attention blocks.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    fields = real_config("text_encoder", tie_word_embeddings=tie_word_embeddings)
    real_full = fields["vision_config"]["fullatt_block_indexes"]
    fields.update(num_hidden_layers=num_layers, max_window_layers=min(num_layers, fields["max_window_layers"]))
    fields["vision_config"] = {**fields["vision_config"], "depth": vision_depth,
                               "fullatt_block_indexes": [i for i in real_full if i < vision_depth] or [vision_depth - 1]}
    config = Qwen2_5_VLConfig(**fields)  # at construction: derived fields (layer_types) follow the depth
    model = _on_meta(lambda: Qwen2_5_VLForConditionalGeneration(config), dtype)
    if tie_word_embeddings:
        model.tie_weights()
    model = _fill_random(model, seed, dtype)
    if tie_word_embeddings:
        model.tie_weights()  # to_empty gave the tied pair separate storage
    return model


def save_real_shapes_pipeline(path: str | pathlib.Path, *, zero_cond_t: bool = True, num_layers: int = 1,
                              text_layers: int = 1, vision_depth: int = 2, seed: int = 0) -> pathlib.Path:
    """Write the real-widths pipeline as a diffusers folder at `path` (bf16 safetensors); returns `path`.

    One component at a time is built, saved and dropped, so the peak is the text encoder (~2.8 GB).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(first_added_id=QWEN_FIRST_ADDED_ID)
    if count_prefix_tokens(tokenizer) != PROMPT_TEMPLATE_DROP_TOKENS:  # pragma: no cover - sanity
        raise RuntimeError("the tokenizer's system prefix is not the pipeline's 64 tokens")
    tokenizer.save_pretrained(path / "tokenizer")
    build_tiny_processor(tokenizer).save_pretrained(path / "processor")
    scheduler = {k: v for k, v in json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text()).items()
                 if not k.startswith("_")}
    FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(path / "scheduler")

    model: Any = build_real_transformer(num_layers, zero_cond_t, seed)
    model.save_pretrained(path / "transformer", safe_serialization=True)
    model = build_real_vae(seed + 1)
    model.save_pretrained(path / "vae", safe_serialization=True)
    model = build_real_text_encoder(text_layers, vision_depth, seed=seed + 2)
    if model.config.image_token_id != tokenizer.convert_tokens_to_ids("<|image_pad|>"):  # pragma: no cover
        raise RuntimeError("the tokenizer's <|image_pad|> id is not the text encoder's image_token_id")
    model.save_pretrained(path / "text_encoder", safe_serialization=True)
    del model

    import diffusers

    (path / "model_index.json").write_text(json.dumps({**_MODEL_INDEX, "_diffusers_version": diffusers.__version__},
                                                      indent=2))
    return path
