"""Tiny random-weight Qwen-Image-Edit pipeline built from the REAL classes, fully offline.

The kit builds every component of :class:`diffusers.QwenImageEditPlusPipeline` (the class that runs
both Qwen-Image-Edit-2509 and -2511) from the genuine diffusers / transformers classes with tiny
sizes and random weights, and can save it in the diffusers folder layout (``model_index.json`` plus
one sub-folder per component, ``.safetensors`` weights only).  Loading such a folder with
``from_pretrained`` and running it exercises the real loading, tokenising, vision, denoising and
VAE code paths with no hub access: a 2-step edit of one image takes ~1.5 s in float32 (~0.8 s in
bfloat16) on two CPU cores.  The pipeline VAE-encodes every input image at ~1024x1024 whatever its
size, so each extra input image costs ~1 s or more; pass ``height``/``width`` (e.g. 64) to keep the
output small.

Design notes (the "why"):

* **Tokenizer.**  The pipeline drops the first ``prompt_template_encode_start_idx = 64`` hidden
  states of the encoded prompt template: with the real Qwen tokenizer the system-prompt prefix
  (everything up to and including ``<|im_start|>user\\n``) is exactly 64 tokens.  We train a
  byte-level BPE with the real Qwen2 pre-tokenizer on a corpus containing the template until every
  pre-token of the template is a single token (as it is in Qwen's 151k vocabulary), which makes the
  prefix exactly 64 tokens here too.  :func:`build_tiny_pipeline` asserts it.
* **Quantisable sizes.**  bitsandbytes' CPU NF4 kernel (AVX512-BF16 path) needs
  ``in_features % 64 == 0`` and ``out_features % 32 == 0``.  All text-encoder linears (text model,
  vision tower, patch merger) use widths 64/128/192/256 so NF4 and int8 quantisation of the text
  encoder work on CPU.  The transformer's inner width is 64 as well (4 heads x 16); its ``img_in``
  (16 in) and ``proj_out`` (16 out) cannot satisfy the CPU rule at these sizes, but diffusers only
  quantises the transformer on CUDA anyway.
* **On-disk dtype.**  The real checkpoints are stored in bfloat16, so :func:`save_tiny_pipeline`
  stores bfloat16 by default; loading code then sees the same "what dtype did I get?" behaviour.

Only torch, diffusers, transformers, tokenizers, safetensors and Pillow are used (no pytest), so a
``selftest`` command can import this module outside the test suite.
"""

from __future__ import annotations

import math
import pathlib
import random
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # heavy imports stay lazy so importing this module is cheap
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLProcessor,
    )

__all__ = [
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_DROP_TOKENS",
    "QWEN_FIRST_ADDED_ID",
    "QWEN_SPECIAL_TOKENS",
    "SCHEDULER_CONFIG",
    "TEXT_HIDDEN_SIZE",
    "build_tiny_pipeline",
    "build_tiny_processor",
    "build_tiny_scheduler",
    "build_tiny_text_encoder",
    "build_tiny_tokenizer",
    "build_tiny_transformer",
    "build_tiny_vae",
    "count_prefix_tokens",
    "make_test_image",
    "save_tiny_pipeline",
    "tiny_text_encoder_config",
    "tiny_transformer_config",
    "tiny_vae_config",
]

# --------------------------------------------------------------------------------------------------
# Constants mirrored from the real model
# --------------------------------------------------------------------------------------------------

#: ``QwenImageEditPlusPipeline.prompt_template_encode`` (diffusers 0.42.1), copied so the tokenizer can
#: be trained on it without instantiating a pipeline.  A test checks it still equals the pipeline's.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

#: ``QwenImageEditPlusPipeline.prompt_template_encode_start_idx``: hidden states dropped from the front.
PROMPT_TEMPLATE_DROP_TOKENS = 64

#: Qwen2 / Qwen2.5-VL added tokens, in the real tokenizer's id order (they follow the BPE vocab).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: The real Qwen2 tokenizer's id of its first added token (``<|endoftext|>``): its BPE vocab has 151643 entries.
QWEN_FIRST_ADDED_ID = 151643
#: Non-special added tokens of the real tokenizer (kept for a faithful layout; unused by the pipeline).
_QWEN_EXTRA_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

#: The real Qwen-Image-Edit(-2509/-2511) ``scheduler/scheduler_config.json``.  Note: with
#: ``shift_terminal=0.02`` diffusers 0.42.1 computes NaN sigmas for ``num_inference_steps=1``
#: (0/0 in ``stretch_shift_to_terminal``), so a 1-step edit returns an all-NaN image.
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# The real Qwen2.5-VL image processor settings (Qwen-Image-Edit ``processor/preprocessor_config.json``).
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
_MIN_PIXELS = 3136
_MAX_PIXELS = 12845056

# The first four entries of the real VAE's per-channel latent statistics (z_dim is 4 here).
_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075]
_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558]

# --------------------------------------------------------------------------------------------------
# Tiny sizes
# --------------------------------------------------------------------------------------------------

#: Width of the tiny text model = the transformer's ``joint_attention_dim``.
TEXT_HIDDEN_SIZE = 64
_TEXT_INTERMEDIATE_SIZE = 128
_TEXT_HEADS = 4  # head_dim 16; mrope sections sum to head_dim / 2 = 8
_TEXT_KV_HEADS = 2
_VISION_HIDDEN_SIZE = 64
_VISION_INTERMEDIATE_SIZE = 128
_VISION_HEADS = 4
_LAYERS = 2

# Corpus for the BPE: the template (so its prefix is whole-word tokens) plus a few edit prompts.
_EXTRA_CORPUS: tuple[str, ...] = (
    "Picture 1: Picture 2: Picture 3: ",
    "make it red",
    "Make the sky blue and add a small hat to the cat.",
    "Replace the background with a sunny beach, keep the person unchanged.",
    "Turn the photo into a watercolor painting.",
)


def tiny_transformer_config(zero_cond_t: bool = True) -> dict[str, Any]:
    """Constructor kwargs of the tiny :class:`diffusers.QwenImageTransformer2DModel`.

    ``zero_cond_t=True`` is Qwen-Image-Edit-2511, ``False`` is -2509 (the only config difference).
    ``in_channels`` is ``4 * vae z_dim`` because latents are packed 2x2; ``axes_dims_rope`` sums to
    ``attention_head_dim``.
    """
    return {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": TEXT_HIDDEN_SIZE,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 4, 4),
        "zero_cond_t": zero_cond_t,
    }


def tiny_vae_config() -> dict[str, Any]:
    """Constructor kwargs of the tiny :class:`diffusers.AutoencoderKLQwenImage` (8x spatial)."""
    return {
        "base_dim": 8,
        "z_dim": 4,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "latents_mean": list(_LATENTS_MEAN),
        "latents_std": list(_LATENTS_STD),
    }


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def tiny_text_encoder_config(tokenizer: Qwen2Tokenizer | None = None) -> Qwen2_5_VLConfig:
    """A tiny :class:`transformers.Qwen2_5_VLConfig` whose token ids match ``tokenizer``.

    Every ``nn.Linear`` in the resulting model has ``in_features % 64 == 0`` and
    ``out_features % 32 == 0`` (bitsandbytes CPU kernels), except ``lm_head`` (not quantised).
    Patch / merge / window sizes are the real ones so the real image processor output fits.
    """
    from transformers import Qwen2_5_VLConfig

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            # Like the real model (152064 > 151665 tokens), the embedding is a bit larger than the
            # tokenizer; a multiple of 64 keeps it friendly to any kernel.
            "vocab_size": _round_up(len(tokenizer), 64),
            "hidden_size": TEXT_HIDDEN_SIZE,
            "intermediate_size": _TEXT_INTERMEDIATE_SIZE,
            "num_hidden_layers": _LAYERS,
            "num_attention_heads": _TEXT_HEADS,
            "num_key_value_heads": _TEXT_KV_HEADS,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": _LAYERS,
            "hidden_size": _VISION_HIDDEN_SIZE,
            "intermediate_size": _VISION_INTERMEDIATE_SIZE,
            "num_heads": _VISION_HEADS,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": TEXT_HIDDEN_SIZE,
            "fullatt_block_indexes": [_LAYERS - 1],
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )


# --------------------------------------------------------------------------------------------------
# Component builders
# --------------------------------------------------------------------------------------------------


def _split_special(text: str) -> list[str]:
    """Return the plain-text pieces of ``text`` between Qwen special tokens."""
    pieces = [text]
    for special in QWEN_SPECIAL_TOKENS:
        pieces = [part for piece in pieces for part in piece.split(special)]
    return [p for p in pieces if p]


def build_tiny_tokenizer(first_added_id: int | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE :class:`transformers.Qwen2Tokenizer` trained locally, with Qwen's added tokens.

    Uses the real Qwen2 pre-tokenizer (split regex + byte-level), so untrained text still tokenises
    (every byte is in the alphabet).  Training on the prompt template makes each template word a
    single token, hence a 64-token system prefix as with the real tokenizer.  Deterministic.

    ``first_added_id`` (e.g. :data:`QWEN_FIRST_ADDED_ID`) pads the vocabulary with tokens no merge can
    produce so that the added tokens get the real tokenizer's ids (``<|image_pad|>`` = 151655): the
    real text-encoder config, which finds image tokens by id, then works unchanged.  The text still
    tokenises exactly as without padding.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # an upper bound: training stops once every corpus word is one token
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = _split_special(PROMPT_TEMPLATE) + list(_EXTRA_CORPUS)
    bpe.train_from_iterator(corpus, trainer=trainer)

    vocab: dict[str, int] = dict(bpe.get_vocab())
    merges: list[tuple[str, str]] = [(first, second) for first, second in _bpe_merges(bpe)]
    next_id = len(vocab)
    if first_added_id is not None:
        if first_added_id < next_id:
            raise ValueError(f"first_added_id={first_added_id} is below the trained vocabulary ({next_id} tokens)")
        # Unreachable: no merge builds "<unused_N>" from its bytes, so tokenisation is unchanged.
        vocab.update({f"<unused_{i}>": i for i in range(next_id, first_added_id)})
        next_id = first_added_id
    for token in QWEN_SPECIAL_TOKENS + _QWEN_EXTRA_ADDED_TOKENS:
        vocab[token] = next_id
        next_id += 1

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        errors="replace",
        split_special_tokens=False,
        # The real tokenizer_config.json lists these as additional special tokens.
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN_EXTRA_ADDED_TOKENS])
    for token in QWEN_SPECIAL_TOKENS + _QWEN_EXTRA_ADDED_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:  # pragma: no cover - sanity
            raise RuntimeError(f"added token {token!r} did not keep its vocab id")
    return tokenizer


def _bpe_merges(bpe: Any) -> list[list[str]]:
    """The merges of a trained ``tokenizers`` BPE, in rank order."""
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    # tokenizers >= 0.20 stores pairs as lists, older ones as "a b" strings.
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]


def count_prefix_tokens(tokenizer: Qwen2Tokenizer, template: str = PROMPT_TEMPLATE) -> int:
    """Number of tokens of the template's system prefix, up to and including ``<|im_start|>user\\n``."""
    prefix = template.split("{}", 1)[0]
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def build_tiny_processor(tokenizer: Qwen2Tokenizer | None = None) -> Qwen2VLProcessor:
    """A :class:`transformers.Qwen2VLProcessor` with the real Qwen2.5-VL image-processor settings.

    transformers 5 always builds the video sub-processor, which needs torchvision.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    size = {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(
        size=size,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(_IMAGE_MEAN),
        image_std=list(_IMAGE_STD),
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(_IMAGE_MEAN),
        image_std=list(_IMAGE_STD),
    )
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def build_tiny_text_encoder(
    tokenizer: Qwen2Tokenizer | None = None, seed: int = 0
) -> Qwen2_5_VLForConditionalGeneration:
    """A random-weight :class:`transformers.Qwen2_5_VLForConditionalGeneration` (float32, eval mode)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_text_encoder_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def build_tiny_transformer(zero_cond_t: bool = True, seed: int = 0) -> QwenImageTransformer2DModel:
    """A random-weight :class:`diffusers.QwenImageTransformer2DModel` (float32, eval mode)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**tiny_transformer_config(zero_cond_t)).eval()


def build_tiny_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    """A random-weight :class:`diffusers.AutoencoderKLQwenImage` (float32, eval mode)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(**tiny_vae_config()).eval()


def build_tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """:class:`diffusers.FlowMatchEulerDiscreteScheduler` with the real Qwen-Image-Edit config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def build_tiny_pipeline(zero_cond_t: bool = True, seed: int = 0) -> QwenImageEditPlusPipeline:
    """Build a tiny float32 :class:`diffusers.QwenImageEditPlusPipeline` from the real classes.

    ``zero_cond_t=True`` mimics Qwen-Image-Edit-2511, ``False`` -2509.  The same ``seed`` always gives
    identical weights (each component is seeded separately, so their order does not matter).  The
    global torch RNG state is restored afterwards.
    """
    from diffusers import QwenImageEditPlusPipeline

    rng_state = torch.random.get_rng_state()
    try:
        tokenizer = build_tiny_tokenizer()
        prefix_len = count_prefix_tokens(tokenizer)
        if prefix_len != PROMPT_TEMPLATE_DROP_TOKENS:
            raise RuntimeError(
                f"tiny tokenizer encodes the system prefix in {prefix_len} tokens, "
                f"expected {PROMPT_TEMPLATE_DROP_TOKENS} (the pipeline's prompt_template_encode_start_idx)"
            )
        processor = build_tiny_processor(tokenizer)
        pipe = QwenImageEditPlusPipeline(
            scheduler=build_tiny_scheduler(),
            vae=build_tiny_vae(seed),
            text_encoder=build_tiny_text_encoder(tokenizer, seed),
            tokenizer=tokenizer,
            processor=processor,
            transformer=build_tiny_transformer(zero_cond_t, seed),
        )
    finally:
        torch.random.set_rng_state(rng_state)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(
    path: str | pathlib.Path,
    zero_cond_t: bool = True,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> pathlib.Path:
    """Build the tiny pipeline and save it to ``path`` in the diffusers folder layout.

    Weights are written as ``.safetensors`` only, cast to ``dtype`` (bfloat16 by default, like the
    real checkpoints on the hub).  Returns ``path`` as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    pipe = build_tiny_pipeline(zero_cond_t=zero_cond_t, seed=seed)
    if dtype != torch.float32:
        for name in ("transformer", "vae", "text_encoder"):
            # torch.nn.Module.to, not ModelMixin.to: diffusers 0.42.1's override logs a spurious
            # "modules ... should be kept in float32: []" warning on every dtype cast.
            torch.nn.Module.to(getattr(pipe, name), dtype=dtype)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# --------------------------------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------------------------------


def make_test_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image with structure: a colour gradient plus a few filled shapes.

    Structure (edges, flat areas, distinct colours) makes shifts, crops and colour drift visible
    in comparisons, unlike pure noise.
    """
    rng = random.Random(seed)
    xs = torch.linspace(0.0, 1.0, width).view(1, width).expand(height, width)
    ys = torch.linspace(0.0, 1.0, height).view(height, 1).expand(height, width)
    phase = rng.random()
    rgb = torch.stack([xs, ys, (0.5 + 0.5 * torch.sin(6.2832 * (xs + ys + phase))) * 0.8], dim=-1)
    array = (rgb * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(array).convert("RGB")

    draw = ImageDraw.Draw(image)
    palette = [(230, 40, 40), (40, 200, 60), (40, 80, 230), (250, 220, 30), (255, 255, 255), (0, 0, 0)]
    for i in range(3):
        w = max(2, int(width * rng.uniform(0.15, 0.35)))
        h = max(2, int(height * rng.uniform(0.15, 0.35)))
        x0 = rng.randrange(0, max(1, width - w))
        y0 = rng.randrange(0, max(1, height - h))
        color = palette[rng.randrange(len(palette))]
        if i % 2 == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
    return image


# --------------------------------------------------------------------------------------------------
# ComfyUI single files
# --------------------------------------------------------------------------------------------------

#: Transformer formats :func:`export_comfy_transformer` writes (ComfyUI's own, see loaders/comfy_files.py).
COMFY_TRANSFORMER_FORMATS = ("bf16", "fp8", "scaled_fp8", "comfy_quant", "gguf_q8_0", "gguf_q4_0")
_FP8_MAX = 448.0


def _linear_weight_keys(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _fp8_state_dict(state: dict[str, torch.Tensor], linears: set[str], fmt: str) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 layouts: plain e4m3fn, legacy scaled fp8 (`scaled_fp8` + `scale_weight`), `comfy_quant`."""
    import json

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key not in linears:
            out[key] = tensor.to(torch.bfloat16)
            continue
        layer = key[: -len(".weight")]
        if fmt == "fp8":
            out[key] = tensor.to(torch.float8_e4m3fn)
            continue
        scale = (tensor.float().abs().max() / _FP8_MAX).clamp(min=1e-12)
        out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
        if fmt == "scaled_fp8":
            out[f"{layer}.scale_weight"] = scale.reshape(())
        else:
            out[f"{layer}.weight_scale"] = scale.reshape(())
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                      dtype=torch.uint8)
    if fmt == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _write_gguf(path: pathlib.Path, state: dict[str, torch.Tensor], linears: set[str], qtype_name: str) -> None:
    """A GGUF file as city96's converter writes it: linear weights quantized, the rest float32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(str(path), arch="qwen_image")
    for key, tensor in state.items():
        data = tensor.float().numpy()
        if key in linears and data.shape[-1] % block == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_comfy_transformer(pipe: QwenImageEditPlusPipeline, path: str | pathlib.Path, fmt: str = "bf16", *,
                             marker: bool | None = None, prefix: str = "") -> pathlib.Path:
    """Write the pipeline's transformer as a ComfyUI diffusion-model file in format `fmt`.

    `marker` (default: the transformer's zero_cond_t) adds ComfyUI's `__index_timestep_zero__` Edit-2511
    key; `prefix` goes before every key (e.g. ``model.diffusion_model.``, as in full checkpoints).
    """
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    model = pipe.transformer
    marker = bool(model.config.zero_cond_t) if marker is None else marker
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    linears = _linear_weight_keys(model)
    if fmt.startswith("gguf_"):
        if marker:
            state["__index_timestep_zero__"] = torch.zeros(0)  # ComfyUI registers it as an empty buffer
        _write_gguf(path, state, linears, fmt.split("_", 1)[1].upper())
        return path
    state = _fp8_state_dict(state, linears, fmt) if fmt != "bf16" else {k: v.to(torch.bfloat16) for k, v in state.items()}
    if marker:
        state["__index_timestep_zero__"] = torch.tensor([])
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def export_comfy_text_encoder(pipe: QwenImageEditPlusPipeline, path: str | pathlib.Path,
                              fmt: str = "bf16") -> pathlib.Path:
    """The text encoder as ComfyUI's file: original Qwen2.5-VL key layout, no lm_head; bf16 or fp8_scaled."""
    from safetensors.torch import save_file

    model = pipe.text_encoder
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("lm_head."):
            continue
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        state[key] = tensor.detach().to("cpu")
    linears = {k.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
               for k in _linear_weight_keys(model)}
    state = _fp8_state_dict(state, linears, "scaled_fp8") if fmt == "fp8_scaled" else \
        {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return pathlib.Path(path)


def export_comfy_vae(pipe: QwenImageEditPlusPipeline, path: str | pathlib.Path, *, to_wan_key: Any) -> pathlib.Path:
    """The VAE in ComfyUI's WanVAE key layout (bf16); `to_wan_key(key, num_res_blocks)` renames a key."""
    from safetensors.torch import save_file

    blocks = pipe.vae.config.num_res_blocks
    state = {to_wan_key(k, blocks): v.detach().to("cpu", torch.bfloat16).contiguous()
             for k, v in pipe.vae.state_dict().items()}
    save_file(state, str(path))
    return pathlib.Path(path)


def save_config_folder(diffusers_dir: str | pathlib.Path, path: str | pathlib.Path) -> pathlib.Path:
    """A copy of a diffusers folder without its weights: what `hf download --exclude "*.safetensors"` gives."""
    import shutil

    path = pathlib.Path(path)
    shutil.copytree(diffusers_dir, path, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return path


def save_comfy_tokenizer(path: str | pathlib.Path, tokenizer: Qwen2Tokenizer | None = None) -> pathlib.Path:
    """The tokenizer as ComfyUI ships Qwen2.5's (comfy/text_encoders/qwen25_tokenizer/): vocab.json,
    merges.txt and tokenizer_config.json, no tokenizer.json."""
    import json
    import tempfile

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        model = json.loads((pathlib.Path(scratch) / "tokenizer.json").read_text())["model"]
        config = (pathlib.Path(scratch) / "tokenizer_config.json").read_text()
    (path / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (path / "tokenizer_config.json").write_text(config)
    return path
