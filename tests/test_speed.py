"""Speed options through the Speed node on the tiny pipeline (CPU): attention backend, regional
torch.compile, First Block Cache and TaylorSeer; each falls back with a warning where it cannot run and
is fully reverted when the node is removed (checked bit for bit against the untouched pipeline)."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch

from tinykit.tiny_pipeline import make_test_image

STEPS = 2


@pytest.fixture
def mods(pack):
    def mod(name):
        return importlib.import_module(f"{pack.__name__}.{name}")

    return mod("loaders.pipeline"), mod("loaders.speed"), mod("utils.comfy")


@pytest.fixture
def speed_node(pack):
    return pack.NODE_CLASS_MAPPINGS["QwenImageEditSpeed"]()


def image(w=64, h=64, seed=0):
    return torch.from_numpy(np.asarray(make_test_image(w, h, seed=seed), dtype=np.float32)[None] / 255)


_BASE: dict = {}


def base_edit(sampler, handle, steps=STEPS):
    """The untouched pipeline's result (computed once per step count; every test starts from a fresh load)."""
    if steps not in _BASE:
        _BASE[steps] = edit(sampler, handle, steps=steps)
    return _BASE[steps]


def edit(sampler, handle, **kw):
    args = dict(prompt="make it red", negative_prompt=" ", seed=0, steps=STEPS, true_cfg_scale=1.0,
                size_mode="match", width=1024, height=1024, images_per_prompt=1)
    args.update(kw)
    return sampler.edit(handle, image(), **args)[0]


def fast(speed_node, handle, attention_backend="native", compile="off", cache="off", cache_threshold=0.05,
         cache_interval=5):
    return speed_node.apply(handle, attention_backend, compile, cache, cache_threshold, cache_interval)[0]


def processor_backends(transformer) -> set:
    return {getattr(m.processor, "_attention_backend", None) for m in transformer.modules() if hasattr(m, "processor")}


def diffusers_hooks(transformer) -> list[str]:
    return [f"{n}:{h}" for n, m in transformer.named_modules() if getattr(m, "_diffusers_hook", None) is not None
            for h in m._diffusers_hook.hooks]


def block_computations(pipe):
    """Counts how often the last transformer block really computes its attention (its to_q projection runs)."""
    calls = []
    hook = pipe.transformer.transformer_blocks[-1].attn.to_q.register_forward_hook(lambda *a: calls.append(1))
    return calls, hook


# -- node and options ------------------------------------------------------------------------------


def test_speed_node_declaration(pack):
    node = pack.NODE_CLASS_MAPPINGS["QwenImageEditSpeed"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["QwenImageEditSpeed"] == "Qwen-Image-Edit Speed"
    req = node.INPUT_TYPES()["required"]
    assert list(req) == ["pipe", "attention_backend", "compile", "cache", "cache_threshold", "cache_interval"]
    assert req["attention_backend"][0] == ["native", "flash", "flash3", "sage", "xformers"]
    assert req["compile"][0] == ["off", "regional"] and req["cache"][0] == ["off", "first_block", "taylorseer"]
    defaults = {k: v[1].get("default") for k, v in req.items() if k != "pipe"}
    assert defaults == {"attention_backend": "native", "compile": "off", "cache": "off", "cache_threshold": 0.05,
                        "cache_interval": 5}
    assert "Installed here: native" in req["attention_backend"][1]["tooltip"]
    for name, (_, opts) in req.items():
        assert opts.get("tooltip"), name
    assert node.RETURN_TYPES == ("QWEN_IMAGE_EDIT_PIPE",) and node.DESCRIPTION


@pytest.mark.parametrize("kw,match", [
    ({"attention_backend": "flash_hub"}, "attention_backend must be one of"),
    ({"attention_backend": "../x"}, "attention_backend must be one of"),
    ({"compile": "max-autotune"}, "compile must be one of"),
    ({"cache": "pab"}, "cache must be one of"),
    ({"cache_threshold": -0.1}, "cache_threshold must be a number >= 0"),
    ({"cache_interval": 0}, "cache_interval must be at least 1"),
])
def test_bad_options_refused(mods, kw, match):
    with pytest.raises(mods[1].SpeedError, match=match):
        mods[1].SpeedOptions(**kw)


def test_node_returns_a_new_handle_and_keeps_loras(mods, handle, speed_node):
    S = mods[1]
    out = fast(speed_node, handle, cache="first_block", cache_threshold=0.1)
    assert handle.speed is None and out.settings == handle.settings and out.loras == handle.loras
    assert out.speed == S.SpeedOptions(cache="first_block", cache_threshold=0.1)


@pytest.mark.slow
def test_all_off_is_the_untouched_pipeline(sampler, handle, speed_node, mods):
    L, S, _ = mods
    base = base_edit(sampler, handle)
    assert torch.equal(edit(sampler, fast(speed_node, handle)), base)
    transformer = L.current_pipeline().pipe.transformer
    assert processor_backends(transformer) == {None} and diffusers_hooks(transformer) == []
    assert S.effective(L.current_pipeline()) == S.OFF


# -- attention backend -----------------------------------------------------------------------------


def test_gpu_kernels_fall_back_to_native_on_cpu_with_a_warning(sampler, handle, speed_node, mods, caplog):
    L, S, _ = mods
    loaded = L.current_pipeline()
    for backend in ("flash", "flash3", "xformers"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
            S.apply_speed(loaded, S.SpeedOptions(attention_backend=backend))  # what the sampler calls
        assert f"attention_backend={backend} needs an NVIDIA GPU" in caplog.text and "using native" in caplog.text
        assert S.effective(loaded).attention_backend == "native"
    caplog.clear()
    base = base_edit(sampler, handle)
    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        out = edit(sampler, fast(speed_node, handle, attention_backend="sage"))
    assert "attention_backend=sage needs an NVIDIA GPU" in caplog.text
    assert torch.equal(out, base) and processor_backends(loaded.pipe.transformer) == {None}


def test_missing_kernel_package_falls_back_with_diffusers_reason(sampler, handle, mods, caplog):
    """A backend diffusers knows but whose package is missing (NPU here): diffusers' own check refuses it."""
    L, S, _ = mods
    base = base_edit(sampler, handle)
    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        out = edit(sampler, L.PipeHandle(handle.settings, speed=S.SpeedOptions(attention_backend="_native_npu")))
    assert "attention_backend=_native_npu is not available here" in caplog.text and "torch_npu" in caplog.text
    assert torch.equal(out, base)
    assert processor_backends(L.current_pipeline().pipe.transformer) == {None}


def sdpa_calls(monkeypatch, transformer) -> list[tuple[str, str]]:
    """Records each PyTorch SDPA call as (where, kernels): "transformer" for a call inside `transformer`'s forward,
    else "outside"; "math only" when PyTorch may use only its math kernel (as under `_native_math`), else "any"."""
    calls: list[tuple[str, str]] = []
    inside: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        only_math = not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled())
        calls.append(("transformer" if inside else "outside", "math only" if only_math else "any"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    transformer.register_forward_pre_hook(lambda *a: inside.append(1))
    transformer.register_forward_hook(lambda *a: inside.clear())
    return calls


def kernels(calls, where: str) -> set[str]:
    return {k for w, k in calls if w == where}


def another_pipelines_kernels(calls) -> set[str]:
    """What diffusers' public attention dispatcher runs outside the pack's edits, as another pipeline's model would."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    calls.clear()
    q = torch.randn(1, 4, 2, 8)
    dispatch_attention_fn(q, q, q)
    return kernels(calls, "outside")


@pytest.mark.slow
def test_attention_backend_is_used_for_the_edit_only(sampler, handle, mods, monkeypatch):
    """A backend that runs on CPU (SDPA's math kernel) runs every attention of the transformer during the edit and
    nothing else: not the VAE or text encoder, not other pipelines, not later edits, not after a cancelled edit."""
    L, S, C = mods
    transformer = L.current_pipeline().pipe.transformer
    calls = sdpa_calls(monkeypatch, transformer)
    assert another_pipelines_kernels(calls) == {"any"}
    base = base_edit(sampler, handle)
    math = L.PipeHandle(handle.settings, speed=S.SpeedOptions(attention_backend="_native_math"))
    calls.clear()
    out = edit(sampler, math)
    assert kernels(calls, "transformer") == {"math only"} and kernels(calls, "outside") == {"any"}
    assert S.effective(L.current_pipeline()).attention_backend == "_native_math"
    torch.testing.assert_close(out, base, rtol=0, atol=1e-4)
    assert another_pipelines_kernels(calls) == {"any"}
    calls.clear()
    assert torch.equal(edit(sampler, handle), base)
    assert kernels(calls, "transformer") == {"any"}
    assert processor_backends(transformer) == {None}  # no per-model backend is ever set
    C.request_cancel()
    with pytest.raises(C.Cancelled):
        edit(sampler, math)
    assert another_pipelines_kernels(calls) == {"any"}


@pytest.mark.slow
def test_attention_kernel_failing_at_run_time_falls_back(sampler, handle, mods, caplog):
    """cuDNN attention sets fine but has no CPU kernel: the first edit fails inside attention, then reruns native."""
    L, S, _ = mods
    base = base_edit(sampler, handle)
    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        out = edit(sampler, L.PipeHandle(handle.settings, speed=S.SpeedOptions(attention_backend="_native_cudnn")))
    assert "attention backend _native_cudnn failed" in caplog.text
    assert torch.equal(out, base)
    assert processor_backends(L.current_pipeline().pipe.transformer) == {None}


# -- step cache ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_first_block_cache_skips_steps_and_is_removed_cleanly(sampler, handle, speed_node, mods):
    L = mods[0]
    pipe = L.current_pipeline().pipe
    base = base_edit(sampler, handle, steps=4)
    calls, hook = block_computations(pipe)
    cached = edit(sampler, fast(speed_node, handle, cache="first_block", cache_threshold=10.0), steps=4)
    assert len(calls) == 1  # only step 0 ran the whole transformer; later steps reused its residual
    assert cached.isfinite().all() and not torch.equal(cached, base) and pipe.transformer.is_cache_enabled
    assert diffusers_hooks(pipe.transformer)
    calls.clear()
    assert torch.equal(edit(sampler, handle, steps=4), base) and len(calls) == 4
    hook.remove()
    assert not pipe.transformer.is_cache_enabled and diffusers_hooks(pipe.transformer) == []


@pytest.mark.slow
def test_first_block_cache_threshold_zero_matches_uncached(sampler, handle, speed_node):
    base = base_edit(sampler, handle, steps=3)
    torch.testing.assert_close(edit(sampler, fast(speed_node, handle, cache="first_block", cache_threshold=0.0),
                                    steps=3), base, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_taylorseer_predicts_steps_and_switches_with_first_block(sampler, handle, speed_node, mods):
    L = mods[0]
    pipe = L.current_pipeline().pipe
    base = base_edit(sampler, handle, steps=6)
    calls, hook = block_computations(pipe)
    out = edit(sampler, fast(speed_node, handle, cache="taylorseer", cache_interval=2), steps=6)
    # TaylorSeer computes the 3 warm-up steps, then every 2nd step: steps 0, 1, 2, 4.
    assert len(calls) == 4 and out.isfinite().all() and not torch.equal(out, base)
    calls.clear()
    edit(sampler, fast(speed_node, handle, cache="first_block", cache_threshold=10.0), steps=6)
    assert len(calls) == 1  # switching cache kinds replaced the hooks instead of stacking them
    calls.clear()
    assert torch.equal(edit(sampler, handle, steps=6), base) and len(calls) == 6
    hook.remove()
    assert diffusers_hooks(pipe.transformer) == []


@pytest.mark.slow
def test_cache_state_is_reset_after_a_cancelled_edit(sampler, handle, speed_node, mods):
    """A cancelled edit never reaches the pipeline's own reset; the next edit must not reuse its cache."""
    C = mods[2]
    cached = fast(speed_node, handle, cache="first_block", cache_threshold=0.05)
    first = edit(sampler, cached, steps=3)
    C.request_cancel()
    with pytest.raises(C.Cancelled):
        edit(sampler, cached, steps=3)
    assert torch.equal(edit(sampler, cached, steps=3), first)


# -- regional compile ------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_regional_compile_runs_on_cpu_and_is_undone(sampler, handle, speed_node, mods, fresh_dynamo):
    """Compiles the two tiny blocks with inductor (C++ on CPU; ~10-40 s here, the on-disk cache helps later)."""
    L, S, _ = mods
    transformer = L.current_pipeline().pipe.transformer
    base = base_edit(sampler, handle)
    compiled = fast(speed_node, handle, compile="regional")
    out = edit(sampler, compiled)
    blocks = list(transformer.transformer_blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert S.effective(L.current_pipeline()).compile == "regional"
    assert out.isfinite().all()
    torch.testing.assert_close(out, base, rtol=0, atol=1e-4)
    torch.testing.assert_close(edit(sampler, compiled), out, rtol=0, atol=1e-6)  # reuses the compiled blocks
    assert torch.equal(edit(sampler, handle), base)
    assert all(b._compiled_call_impl is None for b in blocks)


@pytest.mark.slow
def test_compile_without_a_working_compiler_falls_back(sampler, handle, speed_node, mods, caplog, monkeypatch,
                                                       fresh_dynamo):
    """No C++ compiler (as on a bare Windows box): inductor fails on the first edit, which reruns uncompiled."""
    import torch._inductor.config as inductor_config

    L, S, _ = mods
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel would need no compiler
    base = base_edit(sampler, handle)
    compiled = fast(speed_node, handle, compile="regional")
    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        out = edit(sampler, compiled)
    assert "torch.compile failed" in caplog.text and "running uncompiled" in caplog.text
    assert torch.equal(out, base)
    loaded = L.current_pipeline()
    assert S.effective(loaded).compile == "off"
    assert all(b._compiled_call_impl is None for b in loaded.pipe.transformer.transformer_blocks)
    caplog.clear()
    edit(sampler, fast(speed_node, handle))
    with caplog.at_level(logging.WARNING, logger="qwen_image_edit"):
        assert torch.equal(edit(sampler, compiled), base)  # not retried on this pipeline
    assert "compile=regional is not possible here" in caplog.text
