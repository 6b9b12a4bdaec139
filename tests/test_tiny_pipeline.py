"""The offline test kit is real: genuine classes, diffusers layout, real tokenizer behaviour, no network."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from tinykit.tiny_pipeline import (
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_DROP_TOKENS,
    QWEN_SPECIAL_TOKENS,
    SCHEDULER_CONFIG,
    build_tiny_pipeline,
    count_prefix_tokens,
    make_test_image,
    tiny_transformer_config,
)

COMPONENTS = {
    "transformer": ("diffusers", "QwenImageTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKLQwenImage"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
    "tokenizer": ("transformers", "Qwen2Tokenizer"),
    "processor": ("transformers", "Qwen2VLProcessor"),
}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".gguf"}


def _load(path: Path, dtype: torch.dtype = torch.float32, **kwargs):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(path, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit(pipe, images, **kwargs):
    args = dict(
        image=images,
        prompt="make it red",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        generator=torch.manual_seed(0),
        height=64,
        width=64,
    )
    args.update(kwargs)
    return pipe(**args).images[0]


# -- the kit builds the real thing -----------------------------------------------------------------


def test_components_are_the_real_library_classes():
    import diffusers
    import transformers

    pipe = build_tiny_pipeline()
    assert type(pipe) is diffusers.QwenImageEditPlusPipeline
    for name, (library, class_name) in COMPONENTS.items():
        component = getattr(pipe, name)
        expected = getattr(diffusers if library == "diffusers" else transformers, class_name)
        assert type(component) is expected, name
        assert type(component).__module__.startswith(f"{library}."), name
    assert type(pipe.processor.image_processor) is transformers.Qwen2VLImageProcessor


def test_tiny_transformer_config_matches_the_2511_switch():
    pipe_2511 = build_tiny_pipeline(zero_cond_t=True)
    pipe_2509 = build_tiny_pipeline(zero_cond_t=False)
    assert pipe_2511.transformer.config.zero_cond_t is True
    assert pipe_2509.transformer.config.zero_cond_t is False
    config = tiny_transformer_config(True)
    assert sum(config["axes_dims_rope"]) == config["attention_head_dim"]
    assert config["joint_attention_dim"] == pipe_2511.text_encoder.config.text_config.hidden_size
    assert config["in_channels"] == 4 * pipe_2511.vae.config.z_dim


def test_scheduler_has_the_real_qwen_image_edit_config():
    scheduler = build_tiny_pipeline().scheduler
    for key, value in SCHEDULER_CONFIG.items():
        assert scheduler.config[key] == value, key


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=1)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)


def test_text_encoder_linears_fit_bitsandbytes_cpu_kernels():
    """bnb's CPU NF4 kernel needs in_features % 64 == 0 and out_features % 32 == 0."""
    model = build_tiny_pipeline().text_encoder
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) > 20
    bad = {n: (m.in_features, m.out_features) for n, m in linears.items()
           if m.in_features % 64 or m.out_features % 32}
    assert not bad


# -- saved folder ------------------------------------------------------------------------------------


def test_saved_folder_has_the_diffusers_layout(tiny_2511_dir: Path):
    index = json.loads((tiny_2511_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    for name, (library, class_name) in COMPONENTS.items():
        assert index[name] == [library, class_name], name
        assert (tiny_2511_dir / name).is_dir(), name
    assert (tiny_2511_dir / "transformer" / "config.json").is_file()
    assert (tiny_2511_dir / "vae" / "config.json").is_file()
    assert (tiny_2511_dir / "text_encoder" / "config.json").is_file()
    assert (tiny_2511_dir / "scheduler" / "scheduler_config.json").is_file()
    assert (tiny_2511_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (tiny_2511_dir / "processor" / "processor_config.json").is_file()
    transformer_config = json.loads((tiny_2511_dir / "transformer" / "config.json").read_text())
    assert transformer_config["zero_cond_t"] is True


def test_only_safetensors_weights_are_written(tiny_2511_dir: Path):
    weights = [p for p in tiny_2511_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert {p.parent.name for p in weights} == {"transformer", "vae", "text_encoder"}


def test_saved_folder_is_tiny(tiny_2511_dir: Path):
    size = sum(p.stat().st_size for p in tiny_2511_dir.rglob("*") if p.is_file())
    assert size < 4 * 1024 * 1024, size


def test_weights_are_stored_in_bfloat16_like_the_real_checkpoint(tiny_2511_dir: Path):
    from safetensors import safe_open

    for name in ("transformer", "vae", "text_encoder"):
        (file,) = (tiny_2511_dir / name).glob("*.safetensors")
        with safe_open(file, framework="pt") as handle:
            dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
        assert dtypes == {"BF16"}, (name, dtypes)


# -- tokenizer: the pipeline's 64-token template prefix -------------------------------------------


def test_prompt_template_matches_the_pipeline():
    from diffusers import QwenImageEditPlusPipeline

    pipe = build_tiny_pipeline()
    assert isinstance(pipe, QwenImageEditPlusPipeline)
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == PROMPT_TEMPLATE_DROP_TOKENS == 64


@pytest.mark.parametrize("subfolder", ["tokenizer", "processor"])
def test_system_prefix_is_exactly_64_tokens_after_reload(tiny_2511_dir: Path, subfolder: str):
    """The pipeline drops the first 64 hidden states; with this vocab they are exactly the system
    prefix up to and including ``<|im_start|>user\\n``, as with the real Qwen tokenizer."""
    from transformers import AutoProcessor, Qwen2Tokenizer

    if subfolder == "tokenizer":
        tokenizer = Qwen2Tokenizer.from_pretrained(tiny_2511_dir / "tokenizer")
    else:
        tokenizer = AutoProcessor.from_pretrained(tiny_2511_dir / "processor").tokenizer
    assert count_prefix_tokens(tokenizer) == 64

    text = PROMPT_TEMPLATE.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it red")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:64]) == PROMPT_TEMPLATE.split("{}")[0]
    assert tokenizer.decode(ids[64:]).startswith("Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it red")


def test_special_tokens_are_single_ids_matching_the_text_encoder(tiny_2511_dir: Path):
    from transformers import Qwen2_5_VLConfig, Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(tiny_2511_dir / "tokenizer")
    for token in QWEN_SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert set(QWEN_SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    config = Qwen2_5_VLConfig.from_pretrained(tiny_2511_dir / "text_encoder")
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size >= len(tokenizer)
    # Any text tokenises (byte-level fallback), including words the BPE never saw.
    ids = tokenizer("Zebra-striped ümlaut 🦓", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Zebra-striped ümlaut 🦓"


# -- load and edit through from_pretrained ----------------------------------------------------------


def test_from_pretrained_keeps_zero_cond_t(tiny_2511_dir: Path, tiny_2509_dir: Path):
    assert _load(tiny_2511_dir).transformer.config.zero_cond_t is True
    assert _load(tiny_2509_dir).transformer.config.zero_cond_t is False


@pytest.mark.slow
@pytest.mark.parametrize("n_images", [1, 2])
def test_two_step_edit_returns_the_requested_size(tiny_2511_dir: Path, n_images: int):
    pipe = _load(tiny_2511_dir)
    images = [make_test_image(64, 64, seed) for seed in range(n_images)]
    out = _edit(pipe, images, width=96, height=64)
    assert out.size == (96, 64)
    assert out.mode == "RGB"


def test_edit_is_reproducible_and_runs_in_bfloat16(tiny_2511_dir: Path):
    import numpy as np

    pipe = _load(tiny_2511_dir, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16
    image = make_test_image(64, 64, 0)
    first, second = _edit(pipe, [image]), _edit(pipe, [image])
    assert first.size == (64, 64)
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_text_encoder_quantizes_to_nf4_on_cpu(tiny_2511_dir: Path):
    pytest.importorskip("bitsandbytes")
    from diffusers import PipelineQuantizationConfig

    quant = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=["text_encoder"],
    )
    pipe = _load(tiny_2511_dir, dtype=torch.bfloat16, quantization_config=quant)
    kinds = {type(m).__name__ for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)
             and n != "lm_head"}
    assert kinds == {"Linear4bit"}
    embeds, _ = pipe.encode_prompt("make it red", image=[make_test_image(64, 64, 0)], device=torch.device("cpu"))
    assert embeds.shape[-1] == 64 and torch.isfinite(embeds).all()


# -- test images ---------------------------------------------------------------------------------------


def test_make_test_image_is_deterministic_and_structured():
    import numpy as np

    a, b, c = make_test_image(80, 48, 0), make_test_image(80, 48, 0), make_test_image(80, 48, 1)
    assert a.size == (80, 48) and a.mode == "RGB"
    pixels = np.asarray(a)
    assert np.array_equal(pixels, np.asarray(b))
    assert not np.array_equal(pixels, np.asarray(c))
    assert pixels.std() > 30  # gradient + shapes, not a flat colour
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


# -- offline guard ---------------------------------------------------------------------------------------


def test_socket_connect_is_blocked():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(RuntimeError, match="network access in tests is forbidden"):
            sock.connect(("127.0.0.1", 9))
    with pytest.raises(RuntimeError, match="network access in tests is forbidden"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(RuntimeError, match="network access in tests is forbidden"):
        socket.getaddrinfo("huggingface.co", 443)


def test_unix_sockets_still_work():
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no AF_UNIX on this platform")
    with tempfile.TemporaryDirectory() as folder:
        address = os.path.join(folder, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(address)
            server.listen(1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(address)


def test_hugging_face_libraries_are_offline_with_a_throwaway_cache():
    import huggingface_hub

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    home = Path(os.environ["HF_HOME"]).resolve()
    assert home != (Path.home() / ".cache" / "huggingface").resolve()
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).resolve().is_relative_to(home)


def test_hub_repo_id_fails_without_touching_the_network():
    """Offline mode stops the hub client before any socket is opened (no RuntimeError from the guard)."""
    from diffusers import QwenImageEditPlusPipeline

    with pytest.raises(OSError) as info:
        QwenImageEditPlusPipeline.from_pretrained("Qwen/Qwen-Image-Edit-2511")
    assert "network access in tests is forbidden" not in str(info.value)
