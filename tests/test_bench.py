"""The benchmark's machinery on a tiny random LLaMA: what it measures is what it says (timings are not judged)."""

from __future__ import annotations

import math

import pytest
import torch

import rankshare as rs
from conftest import bigram_llama, word_tokenizer
from rankshare.bench import bench_setup, parameter_scaling, run_bench, run_sft_bench
from rankshare.bench.report import markdown
from rankshare.bench.setups import causal_setup, ours, peft_lora, synthetic_setup
from rankshare.bench.sft import RELATIVE_UPDATE, adapter_updates, generate_tokens, randomise_updates
from rankshare.errors import RankshareError
from rankshare.targets import group_targets


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


# --- instruction tuning: the SFT step and generation speed on a causal LM ------------------------------------

SKILLS = ["add", "reverse", "sort", "count", "date", "time", "news", "sentiment"]
GENERATORS = ["base", "LoTR r=8 merged", "LoTR r=8", "MoR N=8 r=8", "PEFT LoRA r=8"]


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory) -> tuple:
    """The sft section alone on the tiny LLaMA (no chat template: the plain prompt layout), 8 new tokens."""
    out = tmp_path_factory.mktemp("sft-bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small only lose to more threads' synchronisation
    try:
        bench = run_sft_bench(out, repeats=2, warmup=1, say=lambda text: None, quiet=True, model=str(tiny_llama),
                              length=48, new_tokens=8)
    finally:
        torch.set_num_threads(threads)
    return out, bench


def test_generation_holds_back_every_end_token_until_it_has_its_tokens():
    chatml = word_tokenizer()  # its eos is <|endoftext|>; the template closes a turn with <|im_end|>
    model = bigram_llama(chatml, {"assistant": "four", "four": "<|im_end|>"}, otherwise="more")
    prompt = chatml.apply_chat_template([{"role": "user", "content": "what is two plus two"}], tokenize=False,
                                        add_generation_prompt=True)
    tokens = generate_tokens(model, chatml(prompt, add_special_tokens=False, return_tensors="pt"), chatml, 4)
    generated = chatml.convert_ids_to_tokens(tokens[0])
    assert len(generated) == 4 and generated[0] == "four"
    assert not {"<|im_end|>", "<|endoftext|>"} & set(generated)


def test_sft_section_times_every_variant(sft_run):
    _, bench = sft_run
    assert bench["sections"] == ["sft"] and bench["setups"] == [] and "parameter_scaling" not in bench
    sft = bench["instruction_tuning"]
    assert sft["layout"] == "plain" and sft["targets"] == ["q_proj", "v_proj"]
    assert sft["batch"]["tasks"] == SKILLS and sft["batch"]["examples"] == 8  # one example of each task
    rows, width = sft["batch"]["shape"]
    assert rows == 8 and width <= 48 and 8 <= sft["batch"]["response_tokens"] < rows * width
    assert [row["name"] for row in sft["sft_step"]] == ["PEFT LoRA r=8", "LoTR r=8", "MoR N=8 r=8"]
    for row in sft["sft_step"]:
        assert row["step"]["repeats"] == 2 and 0 < row["step"]["min"] <= row["step"]["median"]
        assert row["adapter_parameters"] > 0
    generation = sft["generation"]
    assert generation["new_tokens"] == 8 and [row["name"] for row in generation["variants"]] == GENERATORS
    for row in generation["variants"]:  # every model generates exactly 8 tokens for each of the 8 prompts
        assert row["generated_tokens"] == 8 * 8 and row["time"]["repeats"] == 4
        assert 0 < row["time"]["min"] <= row["time"]["median"]
        assert row["tokens_per_second"] == pytest.approx(64 / row["time"]["median"])


def test_sft_ratios_and_merged_lotr_generates_the_same_tokens(sft_run):
    sft = sft_run[1]["instruction_tuning"]
    steps = {row["name"]: row["step"]["median"] for row in sft["sft_step"]}
    speed = {row["name"]: row["tokens_per_second"] for row in sft["generation"]["variants"]}
    ratios = sft["ratios"]
    assert ratios["step_lotr_over_lora"] == pytest.approx(steps["LoTR r=8"] / steps["PEFT LoRA r=8"])
    assert ratios["step_mor_over_lora"] == pytest.approx(steps["MoR N=8 r=8"] / steps["PEFT LoRA r=8"])
    assert ratios["generation_merged_lotr_over_base"] == pytest.approx(speed["LoTR r=8 merged"] / speed["base"])
    assert ratios["generation_lotr_over_lora"] == pytest.approx(speed["LoTR r=8"] / speed["PEFT LoRA r=8"])
    assert ratios["generation_mor_over_lora"] == pytest.approx(speed["MoR N=8 r=8"] / speed["PEFT LoRA r=8"])
    assert all(math.isfinite(value) and value > 0 for value in ratios.values())
    merged = sft["generation"]["merged_lotr"]
    assert merged["tokens_equal"] is True and merged["token_agreement"] == 1.0
    differs = {row["name"]: row["differs_from_base"] for row in sft["generation"]["variants"]}
    assert differs["base"] == 0 and differs["LoTR r=8"] > 0  # the agreement above is not the base's with itself


def test_sft_report_shows_the_tables_and_verdicts(sft_run):
    out, bench = sft_run
    text = (out / "bench.md").read_text(encoding="utf-8")
    assert text == markdown(bench) and "## Instruction tuning — llama (causal LM)" in text
    assert "| variant | adapter params | SFT step (median) |" in text
    assert "| model | tokens | median | tokens/s |" in text
    assert "SFT step, LoTR r=8 / PEFT LoRA r=8 = " in text and "(target ≤ 1.05)" in text
    assert "SFT step, MoR N=8 r=8 / PEFT LoRA r=8 = " in text and "(target ≤ 1.25)" in text
    assert "generation tokens/s, LoTR r=8 merged / base = " in text and "(target ≥ 0.98)" in text
    assert "LoTR r=8 unmerged / PEFT LoRA r=8 unmerged" in text and "MoR N=8 r=8 unmerged" in text
    assert "merged LoTR generates the unmerged LoTR's tokens: yes" in text
    assert not (out / "bench_step_ratios.png").exists()  # no models section: no plots of it


def test_report_renders_both_sections(measured, sft_run):
    bench = {**sft_run[1], "sections": ["models", "sft"], "setups": [measured],
             "parameter_scaling": parameter_scaling()}
    text = markdown(bench)
    assert "## Many tasks on one base" in text and "## Instruction tuning" in text
    assert text.index("LoTR step / PEFT LoRA step") < text.index("SFT step, LoTR r=8 / PEFT LoRA r=8")


def test_randomised_updates_are_a_fixed_share_of_the_weights(tiny_llama):
    setup = causal_setup(str(tiny_llama), batch=8, length=48)
    variants = [peft_lora(setup, 8, task_type="CAUSAL_LM"),
                ours(setup, rs.LotrConfig(rank=8, target_modules=setup.targets), "LoTR"),
                ours(setup, rs.MorConfig(rank=8, num_experts=8, target_modules=setup.targets), "MoR")]
    for variant in variants:
        assert all(update().abs().max() == 0 for _, update, _ in adapter_updates(variant.model))  # zero at init
        randomise_updates(variant)
        layers = list(adapter_updates(variant.model))
        assert len(layers) == 4  # q and v in 2 layers
        for _, update, weight in layers:
            assert update().norm().item() == pytest.approx(RELATIVE_UPDATE * weight.norm().item(), rel=1e-4)


def test_unknown_bench_sections_are_refused(tmp_path):
    with pytest.raises(RankshareError, match="Unknown bench section"):
        run_bench(tmp_path, False, 1, sections=("speed",))


def test_serving_section_times_the_four_ways_and_counts_the_adapters(tiny_llama, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench = run_bench(tmp_path / "serving", True, repeats=2, warmup=1, say=lambda text: None, quiet=True,
                          sections=("serving",), sft_model=str(tiny_llama), sft_options={"new_tokens": 8})
    finally:
        torch.set_num_threads(threads)
    served = bench["serving"]
    assert served["tasks"] == 8 and served["prompts"] == 8 and len(served["tokens_per_second"]) == 4
    # (b): 8 LoRAs of rank 8 on q (32 x 32) and v (16 x 32) in 2 layers, float32.
    assert served["adapter_bytes"]["(b)"] == 4 * 8 * 2 * 8 * ((32 + 32) + (16 + 32))
    # (a): one basis, r (d_in + d_out) per group, and r x r cores on each of the 4 modules for the 8 tasks and for
    # the basis adapter itself (zero, but held).
    shapes = {f"model.layers.{i}.self_attn.{p}": s for i in range(2) for p, s in (("q_proj", (32, 32)),
                                                                                ("v_proj", (16, 32)))}
    r = served["rank"]
    basis = sum(r * sum(shapes[names[0]]) for names in group_targets(shapes, served["share"]).values())
    assert served["adapter_bytes"]["(a)"] == 4 * (basis + 9 * 4 * r * r)
    assert served["ratios"]["memory_a_over_b"] == served["adapter_bytes"]["(a)"] / served["adapter_bytes"]["(b)"]
    assert all(speed > 0 for speed in served["tokens_per_second"].values())
    text = (tmp_path / "serving" / "bench.md").read_text()
    assert "## Serving 8 tasks from one base" in text and "(a) ≥ 1.0× (b) in tokens/s" in text
