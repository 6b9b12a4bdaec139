"""`auto` placement with the real Qwen-Image-Edit-2511 component sizes (bf16, from the model card)."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture
def P(pack):
    return importlib.import_module(f"{pack.__name__}.loaders.placement")


@pytest.fixture
def REAL_BF16(P):
    return P.REAL_2511_BF16_BYTES


@pytest.mark.parametrize(
    "card_gib, expected",
    [
        (80, ("none", "none")),  # H100/A100 80 GB: everything resident in bf16
        (48, ("none", "model")),  # A6000/L40S: bf16, one component at a time
        (24, ("nf4", "none")),  # 4090/3090: NF4 transformer + text encoder ~20 GB
        (16, ("nf4", "model")),  # 4080/4060 Ti 16 GB
        (12, ("nf4", "group")),  # 3060 12 GB
        (8, ("nf4", "group")),
        (4, ("nf4", "sequential")),
    ],
)
def test_auto_by_gpu_size(P, REAL_BF16, card_gib, expected):
    free = int((card_gib - 0.6) * P.GiB)  # what a card shows free with a CUDA context open
    plan = P.plan_placement(REAL_BF16, free, "cuda")
    assert (plan.quantization, plan.offload) == expected
    assert plan.needed_bytes <= free
    assert "free" in plan.reason


def test_fixed_quantization_only_searches_offload(P, REAL_BF16):
    plan = P.plan_placement(REAL_BF16, 23 * P.GiB, "cuda", quantization="none")
    assert (plan.quantization, plan.offload) == ("none", "group")


def test_fixed_offload_only_searches_quantization(P, REAL_BF16):
    plan = P.plan_placement(REAL_BF16, 23 * P.GiB, "cuda", offload="model")
    assert (plan.quantization, plan.offload) == ("nf4", "model")


def test_without_bitsandbytes_auto_never_quantizes(P, REAL_BF16):
    plan = P.plan_placement(REAL_BF16, 23 * P.GiB, "cuda", can_quantize=False)
    assert plan.quantization == "none" and plan.offload == "group"


def test_nothing_fits_says_so(P, REAL_BF16):
    plan = P.plan_placement(REAL_BF16, 1 * P.GiB, "cuda", quantization="none", offload="none")
    assert "nothing fits" in plan.reason and "smaller size" in plan.reason


def test_cpu_and_mps_never_offload_or_quantize(P, REAL_BF16):
    for device in ("cpu", "mps"):
        plan = P.plan_placement(REAL_BF16, 64 * P.GiB, device)
        assert (plan.quantization, plan.offload) == ("none", "none")


def test_quantizing_only_text_encoder_keeps_transformer_size(P, REAL_BF16):
    sizes = P.component_bytes(REAL_BF16, "nf4", ("text_encoder",))
    assert sizes["transformer"] == REAL_BF16["transformer"]
    assert sizes["text_encoder"] < 0.5 * REAL_BF16["text_encoder"]


def test_offload_needs_are_ordered(P, REAL_BF16):
    needs = [P.device_bytes_needed(REAL_BF16, o) for o in P.OFFLOADS]
    assert needs == sorted(needs, reverse=True)
