"""LoRAs through the LoRA node on the tiny pipeline: real PEFT LoRAs saved as safetensors files.

The LoRA files are trained-shape adapters made with PEFT on the tiny transformer (random, non-zero
weights), saved the way diffusers saves them and in the ComfyUI, kohya and lightx2v key formats.
Reference results come from PEFT or diffusers used directly on a second pipeline, so these tests fail
if the node applies a LoRA at the wrong scale, to the wrong layers, with the wrong scheduler, or
leaves anything behind once it is removed.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tinykit.tiny_pipeline import build_tiny_transformer, make_test_image

STEPS = 2
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
MLP = ["img_mlp.net.0.proj", "img_mlp.net.2", "add_q_proj", "to_add_out"]
LIGHTNING_NAME = "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"
#: The scheduler config from the diffusers Qwen-Image docs / lightx2v model card, written out here
#: independently of the pack's constant.
DOCS_LIGHTNING_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


# -- LoRA files ------------------------------------------------------------------------------------


def make_lora(targets: list[str], r: int, alpha: int, seed: int):
    """A PEFT LoRA on the tiny transformer: (LoraConfig, state dict with PEFT's bare key names)."""
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = build_tiny_transformer(zero_cond_t=True, seed=0)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config)
    with torch.no_grad():  # init_lora_weights=False already gives random A and B; make B clearly non-zero
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return config, {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_diffusers(path: Path, config, sd) -> Path:
    """As diffusers saves a trained LoRA: `transformer.` keys plus the LoraConfig in the header."""
    from diffusers import QwenImageEditPlusPipeline

    QwenImageEditPlusPipeline.save_lora_weights(path.parent, transformer_lora_layers=sd, weight_name=path.name,
                                                transformer_lora_adapter_metadata=config.to_dict())
    return path


def save_raw(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def alpha_format(sd, config, prefix: str, down_up: bool) -> dict:
    """ComfyUI (`diffusion_model.`) or lightx2v (no prefix, lora_down/lora_up) layout with `.alpha` keys."""
    out = {}
    for key, value in sd.items():
        module, part = key.rsplit(".lora_", 1)
        if down_up:
            part = part.replace("A.weight", "down.weight").replace("B.weight", "up.weight")
        out[f"{prefix}{module}.lora_{part}"] = value
        out[f"{prefix}{module}.alpha"] = torch.tensor(float(config.lora_alpha))
    return out


def kohya_format(sd, config) -> dict:
    out = {}
    for key, value in sd.items():
        module, part = key.rsplit(".lora_", 1)
        flat = "lora_unet_" + module.replace(".", "_")
        out[f"{flat}.lora_{part.replace('A.weight', 'down.weight').replace('B.weight', 'up.weight')}"] = value
        out[f"{flat}.alpha"] = torch.tensor(float(config.lora_alpha))
    return out


@pytest.fixture(scope="session")
def loras(tmp_path_factory):
    """name -> path of the LoRA files used below, plus the PEFT configs and state dicts behind them."""
    root = tmp_path_factory.mktemp("loras")
    cfg_a, sd_a = make_lora(ATTN, r=4, alpha=8, seed=1)   # alpha != r: a lost scale would show
    cfg_b, sd_b = make_lora(MLP, r=2, alpha=2, seed=2)
    cfg_l, sd_l = make_lora(ATTN + MLP, r=4, alpha=4, seed=3)
    files = {
        "a": save_diffusers(root / "style_a.safetensors", cfg_a, sd_a),
        "b": save_diffusers(root / "concept_b.safetensors", cfg_b, sd_b),
        "lightning": save_diffusers(root / LIGHTNING_NAME, cfg_l, sd_l),
        "a_comfy": save_raw(root / "a_comfy.safetensors", alpha_format(sd_a, cfg_a, "diffusion_model.", False)),
        "a_lightx2v": save_raw(root / "a_lightx2v.safetensors", alpha_format(sd_a, cfg_a, "", True)),
        "a_kohya": save_raw(root / "a_kohya.safetensors", kohya_format(sd_a, cfg_a)),
        # A bare PEFT state dict has no alpha: bake the scale into lora_B so it means the same LoRA.
        "a_bare": save_raw(root / "a_bare.safetensors", {k: v * (2.0 if "lora_B" in k else 1.0) for k, v in sd_a.items()}),
        # Not for Qwen-Image: a Flux-style LoRA (layers Qwen-Image lacks), an SDXL kohya LoRA, and a
        # Qwen-named LoRA for a wider model (wrong shapes).
        "flux": save_raw(root / "flux_style.safetensors", {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4),
        }),
        "sdxl": save_raw(root / "sdxl_style.safetensors", {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        }),
        "wide": save_raw(root / "qwen_wide.safetensors", {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4),
        }),
        "full": save_raw(root / "model.safetensors", {"transformer_blocks.0.attn.to_q.weight": torch.randn(8, 8)}),
        # LoKr: diffusers' Qwen-Image load_lora_weights takes LoRA weights only.
        "lokr": save_raw(root / "lokr_style.safetensors", {
            "transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.randn(4, 4),
            "transformer.transformer_blocks.0.attn.to_q.lokr_w2": torch.randn(16, 16),
        }),
    }
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    files["garbage"] = root / "garbage.safetensors"
    (root / "style.ckpt").write_bytes(b"pickle")
    files["ckpt"] = root / "style.ckpt"
    files["configs"] = {"a": (cfg_a, sd_a), "b": (cfg_b, sd_b), "lightning": (cfg_l, sd_l)}
    return files


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def mods(pack):
    def mod(name):
        return importlib.import_module(f"{pack.__name__}.{name}")

    return mod("loaders.pipeline"), mod("loaders.lora"), mod("utils.sampling")


@pytest.fixture
def lora_node(pack):
    return pack.NODE_CLASS_MAPPINGS["QwenImageEditLoRA"]()


def image(w=64, h=64, seed=0):
    return torch.from_numpy(np.asarray(make_test_image(w, h, seed=seed), dtype=np.float32)[None] / 255)


_BASE: dict = {}


def base_edit(sampler, handle, steps=STEPS, true_cfg_scale=1.0):
    """The never-LoRA'd pipeline's result (computed once per setting; every test starts from a fresh load)."""
    key = (steps, true_cfg_scale)
    if key not in _BASE:
        _BASE[key] = edit(sampler, handle, steps=steps, true_cfg_scale=true_cfg_scale)
    return _BASE[key]


def edit(sampler, handle, **kw):
    args = dict(prompt="make it red", negative_prompt=" ", seed=0, steps=STEPS, true_cfg_scale=1.0,
                size_mode="match", width=1024, height=1024, images_per_prompt=1)
    args.update(kw)
    return sampler.edit(handle, image(), **args)[0]


def with_loras(lora_node, handle, *items):
    """Chain LoRA nodes: items are (path, strength) or (path, strength, lightning)."""
    for item in items:
        handle = lora_node.apply(handle, str(item[0]), item[1], *(item[2:] or ("auto",)))[0]
    return handle


def peft_layers(transformer) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)]


def direct(pipe, S, steps=STEPS, cfg=1.0, seed=0):
    """The pipeline called directly with the arguments the node builds (pixels as the node returns them)."""
    req = S.EditRequest("make it red", " ", seed, steps, cfg, "match", 64, 64)
    kwargs = S.pipeline_kwargs(req, [make_test_image(64, 64, seed=0)], 64, 64, seed)
    return pipe(**kwargs).images.permute(0, 2, 3, 1).float()


@pytest.fixture
def reference(tiny_2511_dir):
    """A second, independent fp32 pipeline from the same folder, for reference results."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_2511_dir), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- node declaration ------------------------------------------------------------------------------


def test_lora_node_declaration(pack):
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoRA"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["QwenImageEditLoRA"] == "Qwen-Image-Edit LoRA"
    spec = node.INPUT_TYPES()
    assert list(spec["required"]) == ["pipe", "lora_name", "strength", "lightning"]
    req = spec["required"]
    assert req["pipe"][0] == "QWEN_IMAGE_EDIT_PIPE" and node.RETURN_TYPES == ("QWEN_IMAGE_EDIT_PIPE",)
    assert req["strength"][1]["default"] == 1.0 and req["lightning"][1]["default"] == "auto"
    assert req["lightning"][0] == ["auto", "off", "4-step", "8-step"]
    for name, (_, opts) in req.items():
        assert opts.get("tooltip"), name
    assert node.DESCRIPTION and node.OUTPUT_TOOLTIPS


def test_combo_lists_safetensors_in_comfyui_loras_and_resolves_them(comfyui, pack, loras, handle, lora_node):
    folder = Path(comfyui["folder_paths"].get_folder_paths("loras")[0])
    (folder / "sub").mkdir(parents=True)
    shutil.copy(loras["a"], folder / "style_a.safetensors")
    shutil.copy(loras["b"], folder / "sub" / "concept_b.safetensors")
    shutil.copy(loras["ckpt"], folder / "old.ckpt")
    listed = pack.NODE_CLASS_MAPPINGS["QwenImageEditLoRA"].INPUT_TYPES()["required"]["lora_name"][0]
    assert listed == ["style_a.safetensors", "sub/concept_b.safetensors"]
    out = lora_node.apply(handle, "sub/concept_b.safetensors", 1.0)[0]
    assert out.loras[0].path == str((folder / "sub" / "concept_b.safetensors").resolve())


def test_node_returns_a_new_handle_and_loads_nothing(mods, handle, lora_node, loras, load_counter):
    L, LO, _ = mods
    out = with_loras(lora_node, handle, (loras["a"], 0.8), (loras["b"], 1.0))
    assert handle.loras == () and len(out.loras) == 2 and out.settings == handle.settings
    first = out.loras[0]
    assert (first.path, first.strength, first.lightning) == (str(loras["a"].resolve()), 0.8, "auto")
    assert load_counter == [] and LO.loaded_adapters(L.current_pipeline()) == {}
    assert lora_node.apply(handle, str(loras["a"]), 0.8)[0] == with_loras(lora_node, handle, (loras["a"], 0.8))


# -- applying --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_strength_one_applies_the_lora_exactly_as_peft_does(sampler, handle, lora_node, loras, mods, reference):
    """Node output at strength 1 == the same PEFT adapter added to a pipeline directly (scale alpha/r = 2)."""
    from peft import set_peft_model_state_dict

    S = mods[2]
    base = base_edit(sampler, handle)
    out = edit(sampler, with_loras(lora_node, handle, (loras["a"], 1.0)))
    assert out.isfinite().all() and not torch.equal(out, base)
    config, sd = loras["configs"]["a"]
    reference.transformer.add_adapter(config)
    set_peft_model_state_dict(reference.transformer, sd)
    assert torch.equal(out, direct(reference, S))


@pytest.mark.slow
def test_strength_zero_and_removal_give_the_base_model_bit_for_bit(sampler, handle, lora_node, loras, mods):
    L = mods[0]
    transformer = L.current_pipeline().pipe.transformer
    base = base_edit(sampler, handle)
    assert torch.equal(edit(sampler, with_loras(lora_node, handle, (loras["a"], 0.0))), base)
    assert peft_layers(transformer) == []  # strength 0 loads nothing
    assert not torch.equal(edit(sampler, with_loras(lora_node, handle, (loras["a"], 1.0))), base)
    assert peft_layers(transformer) != []
    assert torch.equal(edit(sampler, handle), base)  # LoRA node removed
    assert peft_layers(transformer) == [] and not getattr(transformer, "peft_config", None)
    assert mods[1].loaded_adapters(L.current_pipeline()) == {}


@pytest.mark.slow
def test_changing_strength_reuses_the_adapter_and_never_reloads(sampler, handle, lora_node, loras, mods,
                                                                load_counter, monkeypatch):
    L = mods[0]
    pipe = L.current_pipeline().pipe
    loads = []
    real = type(pipe).load_lora_weights

    def spy(self, source, adapter_name=None, **kw):  # diffusers' public loader is the only way in
        loads.append(adapter_name)
        return real(self, source, adapter_name=adapter_name, **kw)

    monkeypatch.setattr(type(pipe), "load_lora_weights", spy)
    full = edit(sampler, with_loras(lora_node, handle, (loras["a"], 1.0)))
    half = edit(sampler, with_loras(lora_node, handle, (loras["a"], 0.5)))
    again = edit(sampler, with_loras(lora_node, handle, (loras["a"], 1.0)))
    assert len(loads) == 1 and load_counter == []
    assert not torch.equal(full, half) and torch.equal(full, again)
    assert L.current_pipeline().pipe is pipe


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the reference's 2nd load
def test_two_chained_loras_both_apply(sampler, handle, lora_node, loras, mods, reference):
    L, LO, S = mods
    both = edit(sampler, with_loras(lora_node, handle, (loras["a"], 1.0), (loras["b"], 0.5)))
    loaded = L.current_pipeline()
    names = list(LO.loaded_adapters(loaded))
    assert [s.name for s in LO.loaded_adapters(loaded).values()] == ["style_a.safetensors", "concept_b.safetensors"]
    assert loaded.pipe.get_active_adapters() == names
    scales = {}  # the scale each adapter runs at: strength x alpha / r
    for module in loaded.pipe.transformer.modules():
        if hasattr(module, "scaling") and hasattr(module, "base_layer"):
            scales.update(module.scaling)
    assert scales == {names[0]: 1.0 * 8 / 4, names[1]: 0.5 * 2 / 2}
    # The reference: diffusers' own load_lora_weights from the files, then set_adapters.
    reference.load_lora_weights(str(loras["a"]), adapter_name="a")
    reference.load_lora_weights(str(loras["b"]), adapter_name="b")
    reference.set_adapters(["a", "b"], [1.0, 0.5])
    assert torch.equal(both, direct(reference, S))
    reference.set_adapters(["a"], [1.0])
    assert not torch.equal(both, direct(reference, S))  # B changes the result


@pytest.mark.slow
def test_switching_loras_deletes_the_unused_adapter(sampler, handle, lora_node, loras, mods):
    L, LO, _ = mods
    edit(sampler, with_loras(lora_node, handle, (loras["a"], 1.0)))
    only_b = with_loras(lora_node, handle, (loras["b"], 1.0))
    out = edit(sampler, only_b)
    loaded = L.current_pipeline()
    assert [s.name for s in LO.loaded_adapters(loaded).values()] == ["concept_b.safetensors"]
    assert loaded.pipe.get_list_adapters() == {"transformer": list(LO.loaded_adapters(loaded))}
    (b_name,) = LO.loaded_adapters(loaded)
    for name, module in loaded.pipe.transformer.named_modules():  # no weights of A are left anywhere
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            assert set(module.lora_A) <= {b_name} and set(module.lora_B) <= {b_name}, name
    L.release_pipeline()
    L.get_pipeline(handle.settings)
    assert torch.equal(edit(sampler, only_b), out)  # same as B on a fresh pipeline


@pytest.mark.slow
def test_replaced_file_is_reloaded(sampler, handle, lora_node, loras, mods, tmp_path):
    L, LO, _ = mods
    path = tmp_path / "mine.safetensors"
    shutil.copy(loras["a"], path)
    out_a = edit(sampler, with_loras(lora_node, handle, (path, 1.0)))
    changed_before = lora_node.IS_CHANGED(str(path))
    shutil.copy(loras["b"], path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert lora_node.IS_CHANGED(str(path)) != changed_before
    out_b = edit(sampler, with_loras(lora_node, handle, (path, 1.0)))
    assert len(LO.loaded_adapters(L.current_pipeline())) == 1
    assert torch.equal(out_b, edit(sampler, with_loras(lora_node, handle, (loras["b"], 1.0))))
    assert not torch.equal(out_a, out_b)


@pytest.mark.parametrize("fmt", ["a_comfy", "a_lightx2v", "a_kohya", "a_bare"])
def test_non_diffusers_key_formats_load_as_the_same_lora(handle, lora_node, loras, mods, fmt):
    """ComfyUI, lightx2v, kohya and bare PEFT files of LoRA A give A's weight deltas (diffusers converts)."""
    L, LO, _ = mods
    loaded = L.current_pipeline()

    def deltas(path):
        LO.apply_loras(loaded, with_loras(lora_node, handle, (path, 1.0)).loras)
        from peft.tuners.lora import LoraLayer

        out = {}
        for name, module in loaded.pipe.transformer.named_modules():
            if isinstance(module, LoraLayer):
                (adapter,) = module.active_adapters
                out[name] = module.get_delta_weight(adapter)
        return out

    want, got = deltas(loras["a"]), deltas(loras[fmt])
    assert sorted(got) == sorted(want) and len(want) == 8
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert len(LO.loaded_adapters(loaded)) == 1


# -- refusing wrong files --------------------------------------------------------------------------


@pytest.mark.parametrize("key,match", [
    ("flux", r"flux_style\.safetensors is not a Qwen-Image LoRA: 2 of its 2 weights .*single_transformer_blocks"),
    ("sdxl", r"sdxl_style\.safetensors (is not a Qwen-Image LoRA|could not be read as a Qwen-Image LoRA)"),
    ("wide", r"qwen_wide\.safetensors does not fit this model's layer sizes \(transformer_blocks\.0\.attn\.to_q "
             r"has 64 inputs, the LoRA 3072"),
])
@pytest.mark.slow
def test_wrong_lora_is_refused_and_the_pipe_is_unchanged(sampler, handle, lora_node, loras, mods, key, match):
    L, LO, _ = mods
    with_a = with_loras(lora_node, handle, (loras["a"], 1.0))
    out_a = edit(sampler, with_a)
    before = dict(LO.loaded_adapters(L.current_pipeline()))
    with pytest.raises(LO.LoraError, match=match):
        edit(sampler, with_loras(lora_node, with_a, (loras[key], 1.0)))
    loaded = L.current_pipeline()
    assert LO.loaded_adapters(loaded) == before
    assert loaded.pipe.get_list_adapters() == {"transformer": list(before)}
    assert torch.equal(edit(sampler, with_a), out_a)


def test_wrong_lora_on_a_clean_pipeline_leaves_the_base_model(sampler, handle, lora_node, loras, mods):
    L, LO, _ = mods
    base = base_edit(sampler, handle)
    with pytest.raises(LO.LoraError, match="flux_style.safetensors"):
        edit(sampler, with_loras(lora_node, handle, (loras["b"], 1.0), (loras["flux"], 1.0)))
    assert peft_layers(L.current_pipeline().pipe.transformer) == []
    assert torch.equal(edit(sampler, handle), base)


@pytest.mark.parametrize("key,match", [
    ("ckpt", r"style\.ckpt is a \.ckpt file\. Only \.safetensors LoRAs are loaded"),
    ("garbage", r"garbage\.safetensors is not a valid safetensors file"),
    ("full", r"model\.safetensors holds no LoRA weights .*full model checkpoint"),
    ("lokr", r"lokr_style\.safetensors is a LoKr \(LyCORIS\) adapter; .*Choose a LoRA version"),
])
def test_unusable_files_are_refused_by_the_node(handle, lora_node, loras, mods, key, match):
    with pytest.raises(mods[1].LoraError, match=match):
        lora_node.apply(handle, str(loras[key]), 1.0)


def test_missing_file_and_empty_choice_are_refused(handle, lora_node, mods, tmp_path):
    LO = mods[1]
    with pytest.raises(LO.LoraError, match=r"LoRA file not found: .*nope\.safetensors"):
        lora_node.apply(handle, str(tmp_path / "nope.safetensors"), 1.0)
    with pytest.raises(LO.LoraError, match="No LoRA chosen.*models/loras"):
        lora_node.apply(handle, "", 1.0)
    assert lora_node.IS_CHANGED(str(tmp_path / "nope.safetensors")) == "missing"


# -- Lightning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,steps", [
    ("Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors", 4),
    ("Qwen-Image-Edit-2511-Lightning-8steps-V1.0-fp32.safetensors", 8),
    ("Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors", 4),
    ("qwen_image_edit_lightning_8_step.safetensors", 8),
    ("Qwen-Image-Lightning-8-steps-V2.0.safetensors", 8),
    ("lightning.safetensors", None),
    ("my_style_4steps.safetensors", None),
    ("Qwen-Image-Edit-2511-anime.safetensors", None),
])
def test_lightning_recognised_by_file_name(mods, name, steps):
    assert mods[1].lightning_steps_from_name(name) == steps


def test_lightning_choice_overrides_the_name(mods, loras):
    LO = mods[1]
    assert LO.make_spec(str(loras["a"]), 1.0, "8-step").lightning_steps == 8
    assert LO.make_spec(str(loras["lightning"]), 1.0, "auto").lightning_steps == 4
    assert LO.make_spec(str(loras["lightning"]), 1.0, "off").lightning_steps is None
    with pytest.raises(LO.LoraError, match="lightning must be one of"):
        LO.make_spec(str(loras["a"]), 1.0, "2-step")


def test_lightning_defaults_rule(mods):
    S = mods[2]
    req = S.EditRequest("x")  # steps 40, true_cfg_scale 4.0: the model card's and the node's defaults
    assert S.with_lightning_defaults(req, None) is req
    got = S.with_lightning_defaults(req, 8)
    assert (got.steps, got.true_cfg_scale) == (8, 1.0)
    got = S.with_lightning_defaults(S.EditRequest("x", steps=6, true_cfg_scale=4.0), 4)
    assert (got.steps, got.true_cfg_scale) == (6, 1.0)
    got = S.with_lightning_defaults(S.EditRequest("x", steps=40, true_cfg_scale=2.5), 4)
    assert (got.steps, got.true_cfg_scale) == (4, 2.5)


def count_transformer_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.slow
def test_lightning_lora_uses_its_scheduler_steps_and_cfg_then_restores(sampler, handle, lora_node, loras, mods,
                                                                      reference):
    """At the sampler's defaults (40 steps, CFG 4) a 4-step Lightning LoRA runs 4 steps without CFG on the
    Lightning scheduler, exactly like diffusers' documented recipe; removing it restores everything."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    L, LO, S = mods
    pipe = L.current_pipeline().pipe
    own = pipe.scheduler
    base = base_edit(sampler, handle, STEPS, 4.0)
    lightning = with_loras(lora_node, handle, (loras["lightning"], 1.0))
    calls, hook = count_transformer_calls(pipe)
    out = edit(sampler, lightning, steps=40, true_cfg_scale=4.0)
    hook.remove()
    assert len(calls) == 4  # 4 steps, one pass each (no CFG)
    config = pipe.scheduler.config
    assert pipe.scheduler is not own and config.time_shift_type == "exponential" and config.shift_terminal is None
    assert config.base_shift == config.max_shift == pytest.approx(math.log(3))

    reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(DOCS_LIGHTNING_SCHEDULER)
    reference.load_lora_weights(str(loras["lightning"]))
    assert torch.equal(out, direct(reference, S, steps=4, cfg=1.0))

    assert torch.equal(edit(sampler, handle, steps=STEPS, true_cfg_scale=4.0), base)
    assert pipe.scheduler is own


def test_lightning_respects_steps_and_cfg_the_user_set(sampler, handle, lora_node, loras, mods):
    pipe = mods[0].current_pipeline().pipe
    lightning = with_loras(lora_node, handle, (loras["lightning"], 1.0))
    calls, hook = count_transformer_calls(pipe)
    edit(sampler, lightning, steps=3, true_cfg_scale=2.0)
    hook.remove()
    assert len(calls) == 6  # 3 steps x (cond + uncond)


@pytest.mark.slow
def test_lightning_chosen_explicitly_and_turned_off(sampler, handle, lora_node, loras, mods):
    pipe = mods[0].current_pipeline().pipe
    own = pipe.scheduler
    calls, hook = count_transformer_calls(pipe)
    edit(sampler, with_loras(lora_node, handle, (loras["a"], 1.0, "8-step")), steps=40, true_cfg_scale=4.0)
    assert len(calls) == 8 and pipe.scheduler is not own
    calls.clear()
    edit(sampler, with_loras(lora_node, handle, (loras["lightning"], 1.0, "off")), steps=STEPS)
    hook.remove()
    assert len(calls) == STEPS and pipe.scheduler is own


def test_failed_lightning_load_keeps_the_scheduler(sampler, handle, lora_node, loras, mods):
    LO = mods[1]
    pipe = mods[0].current_pipeline().pipe
    own = pipe.scheduler
    with pytest.raises(LO.LoraError):
        edit(sampler, with_loras(lora_node, handle, (loras["flux"], 1.0, "4-step")), steps=40)
    assert pipe.scheduler is own
