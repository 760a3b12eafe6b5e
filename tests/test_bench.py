"""The benchmark's machinery on a tiny random LLaMA: what it measures is what it says (timings are not judged)."""

from __future__ import annotations

import math

import pytest

from rankshare.bench import bench_setup, parameter_scaling
from rankshare.bench.report import markdown
from rankshare.bench.setups import synthetic_setup


@pytest.fixture(scope="module")
def measured() -> dict:
    setup = synthetic_setup(hidden=128, layers=2, batch=2, length=16)
    return bench_setup(setup, repeats=2, warmup=1, full=True, say=lambda text: None)


def by_name(measured: dict, prefix: str) -> dict:
    return next(v for v in measured["variants"] if v["name"].startswith(prefix))


def test_every_variant_is_measured(measured):
    names = [v["name"] for v in measured["variants"]]
    assert names[:3] == ["limit (frozen, grads to inputs)", "head only", "PEFT LoRA r=8"]
    assert {"LoTR r=8", "MoR N=8 r=8", "MoE-LoRA N=8 r=8", "MoR N=8 r=8, naive per-expert"} <= set(names)
    for v in measured["variants"]:
        assert v["step"]["repeats"] == 2 and 0 < v["step"]["min"] <= v["step"]["median"]
        assert math.isfinite(v["forward"]["median"])


def test_parameter_counts_and_budget_match(measured):
    q_and_v = [(128, 128)] * 4  # 2 layers × (q, v); LLaMA here has as many key/value heads as query heads
    assert by_name(measured, "PEFT LoRA")["adapter_parameters"] == sum(8 * (a + b) for a, b in q_and_v)
    assert by_name(measured, "LoTR r=8")["adapter_parameters"] == 2 * (8 * 256 + 2 * 64)
    matched = by_name(measured, "LoTR r=")  # the LoTR at LoRA's budget comes closest to LoRA's count
    lora = by_name(measured, "PEFT LoRA")["adapter_parameters"]
    at_budget = next(v for v in measured["variants"] if "LoRA's budget" in v["name"])
    assert abs(at_budget["adapter_parameters"] - lora) <= abs(matched["adapter_parameters"] - lora)
    assert by_name(measured, "limit")["trainable_parameters"] == 0


def test_memory_accounts_for_state_and_mor_stays_at_n_times_r(measured):
    lora, mor, naive = (by_name(measured, p)["memory"] for p in ("PEFT LoRA", "MoR N=8 r=8", "MoR N=8 r=8, naive"))
    trainable = by_name(measured, "MoR N=8 r=8")["trainable_parameters"]
    assert mor["gradients"] == 4 * trainable and mor["optimiser"] == 8 * trainable
    tokens, layers, experts, d_out = 2 * 16, 4, 8, 128
    per_expert_outputs = tokens * experts * d_out * 4 * layers  # the (n, N, d_out) tensors the fast path avoids
    assert naive["activations"] - mor["activations"] >= per_expert_outputs
    assert mor["activations"] - lora["activations"] < per_expert_outputs / 2


def test_merged_inference_matches_and_files_are_tight(measured):
    merged = measured["merged_inference"]
    assert merged["lotr_max_abs_difference"] < 1e-5 and merged["mor_max_abs_difference"] < 1e-5
    for v in measured["variants"]:
        if v["file"]:
            assert v["file"]["bytes"] <= 1.05 * v["file"]["parameter_bytes"] + 16 * 1024, v["name"]


def test_report_renders(measured):
    bench = {"mode": "quick", "machine": {"processor": "x", "cpus": 2, "torch_threads": 2, "device": "cpu"},
             "versions": {"torch": "t", "transformers": "t", "peft": "p"}, "repeats": 2, "warmup": 1,
             "wall_seconds": 1.0,
             "setups": [measured], "parameter_scaling": parameter_scaling()}
    text = markdown(bench)
    assert "LoTR step / PEFT LoRA step" in text and "| 768 | 12 | 294,912 | 26,112 |" in text
