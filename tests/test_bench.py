"""The benchmark's machinery on a tiny random LLaMA: what it measures is what it says (timings are not judged)."""

from __future__ import annotations

import math

import pytest

from rankshare.bench import bench_setup, parameter_scaling
from rankshare.bench.report import markdown
from rankshare.bench.setups import synthetic_setup


@pytest.fixture(scope="module")
def measured() -> dict:
    setup = synthetic_setup(hidden=128, layers=2, batch=8, length=16)  # a row for each of 8 tasks
    return bench_setup(setup, repeats=2, warmup=1, full=True, say=lambda text: None)


def by_name(measured: dict, prefix: str) -> dict:
    return next(v for v in measured["variants"] if v["name"].startswith(prefix))


def test_every_variant_is_measured(measured):
    names = [v["name"] for v in measured["variants"]]
    assert names[:3] == ["limit (frozen, grads to inputs)", "head only", "PEFT LoRA r=8"]
    assert {"LoTR r=8", "LoTR cores only (r=8, on a basis)", "MoR N=8 r=8", "MoE-LoRA N=8 r=8",
            "MoR N=8 r=8, naive per-expert"} <= set(names)
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
    assert by_name(measured, "LoTR cores only")["trainable_parameters"] == 4 * 8**2  # L r², U and V borrowed


def test_memory_accounts_for_state_and_mor_stays_at_n_times_r(measured):
    lora, mor, naive = (by_name(measured, p)["memory"] for p in ("PEFT LoRA", "MoR N=8 r=8", "MoR N=8 r=8, naive"))
    trainable = by_name(measured, "MoR N=8 r=8")["trainable_parameters"]
    assert mor["gradients"] == 4 * trainable and mor["optimiser"] == 8 * trainable
    tokens, layers, experts, d_out = 8 * 16, 4, 8, 128
    per_expert_outputs = tokens * experts * d_out * 4 * layers  # the (n, N, d_out) tensors the fast path avoids
    assert naive["activations"] - mor["activations"] >= per_expert_outputs
    assert mor["activations"] - lora["activations"] < per_expert_outputs / 2


def test_merged_inference_matches_and_files_are_tight(measured):
    merged = measured["merged_inference"]
    assert merged["lotr_max_abs_difference"] < 1e-5 and merged["mor_max_abs_difference"] < 1e-5
    for v in measured["variants"]:
        if v["file"]:
            assert v["file"]["bytes"] <= 1.05 * v["file"]["parameter_bytes"] + 16 * 1024, v["name"]


def test_mixed_batch_rows_match_their_adapters_alone(measured):
    tasks = measured["many_tasks"]
    assert set(tasks["times"]) == {"PEFT LoRA, mixed", "LoTR on one basis, mixed", "LoTR, one adapter"}
    assert tasks["max_abs_difference"] < 1e-5
    assert tasks["difference_from_one_adapter"] > 1e-2  # the tasks differ, so the check above means something


def test_task_memory_counts_equal_the_closed_forms(measured):
    # 2 groups (q, v) of L = 2 layers, d_in = d_out = 128, r = 8: one basis 2 · r (d_in + d_out), then L r² per
    # layer and task; LoRA r (d_in + d_out) per layer and task.
    rows = measured["many_tasks"]["memory"]["rows"]
    assert [row["tasks"] for row in rows] == [1, 2, 4, 8, 16]
    for row in rows:
        assert row["lotr"] == row["lotr_closed_form"] == 2 * 8 * 256 + row["tasks"] * 4 * 8**2
        assert row["lora"] == row["lora_closed_form"] == row["tasks"] * 4 * 8 * 256


def test_report_renders(measured):
    bench = {"mode": "quick", "machine": {"processor": "x", "cpus": 2, "torch_threads": 2, "device": "cpu"},
             "versions": {"torch": "t", "transformers": "t", "peft": "p"}, "repeats": 2, "warmup": 1,
             "wall_seconds": 1.0,
             "setups": [measured], "parameter_scaling": parameter_scaling()}
    text = markdown(bench)
    assert "LoTR step / PEFT LoRA step" in text and "| 768 | 12 | 294,912 | 26,112 |" in text
    assert "## Many tasks on one base" in text and "LoTR on one basis / PEFT LoRA mixed batch" in text
    assert "| 16 | 8,192 | 8,192 | 131,072 | 131,072 | 0.062 |" in text
