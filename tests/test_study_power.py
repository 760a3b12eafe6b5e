"""The powered study (issue 20): the rules its parts follow, a rate grid paired by seed, the baselines, the
held-out loss that measures forgetting, and the statistics of its report."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

from rankshare.errors import RankshareError
from rankshare.finetune.budget import closest_rank
from rankshare.study import forgetting, runner
from rankshare.study.plan import (
    BASELINES,
    MULTITASK_BUDGETS,
    POWER_BUDGET,
    Part,
    Variant,
    deep_part,
    downstream_floor_part,
    downstream_higher_rate_part,
    downstream_part,
    multitask_part,
    power_part,
    schedule_part,
    shallow_lower_rate_part,
    shallow_part,
)
from rankshare.study.report import (
    collapsed,
    comparison_section,
    equal_accuracy_note,
    forgetting_section,
    layer_distances,
    paired_difference,
    precision_note,
    schedule_section,
    searching,
    train_seconds,
    write_summary,
)
from rankshare.study.runner import variant_config

MINILM_SHAPES = {f"layer.{i}.{name}": (384, 384) for i in range(6) for name in ("query", "value")}
SMOLLM2_SHAPES = {**{f"layers.{i}.q_proj": (576, 576) for i in range(30)},
                  **{f"layers.{i}.v_proj": (192, 576) for i in range(30)}}


def count(variant: Variant, rank: int, shapes) -> int:
    return variant_config(variant, rank, ["q_proj"]).num_trainable_parameters(shapes)


def test_part_1_is_a_paired_grid_at_one_budget():
    part = power_part()
    assert part.seeds == part.search_seeds == (0, 1, 2, 3, 4)  # every rate trains every seed
    adapters = [v for v in part.variants if v.method not in BASELINES]
    assert sorted(v.method for v in adapters) == ["lora", "lotr", "lotr", "moelora", "mor"]
    assert {v.options.get("freeze_factors", False) for v in adapters if v.method == "lotr"} == {True, False}
    rates = sorted(part.learning_rates)
    assert len(rates) >= 4 and all(2.5 <= high / low <= 3.5 for low, high in zip(rates, rates[1:]))
    for variant in adapters:  # one matched budget: each method's closest rank lands within 2 % of it
        _, parameters = closest_rank(variant_config(variant, 1, ["query"]), MINILM_SHAPES, POWER_BUDGET)
        assert abs(parameters - POWER_BUDGET) <= 0.02 * POWER_BUDGET, variant.name
    assert {"head-only", "full"} <= {v.method for v in part.variants}  # the floor and the ceiling
    assert part.steps * part.batch_size >= 4 * part.max_train  # the schedule of docs/results/schedule-pilot


def test_the_schedule_check_doubles_part_1s_steps_at_its_chosen_rates(tmp_path):
    part, check = power_part(), schedule_part()
    assert check.steps == 2 * part.steps and check.rates_from == part.name and check.seeds == part.seeds
    assert [v.name for v in check.variants] == [v.name for v in part.variants if v.method not in BASELINES]
    with pytest.raises(RankshareError, match="run that part to its end first"):
        runner.rates_chosen_by(tmp_path / part.name, check)


def test_the_schedule_table_pairs_each_run_with_its_seed_at_half_the_steps_and_with_lora(tmp_path):
    def run(variant, seed, steps, validation, test):
        scores = {"validation": {"average": {"accuracy": validation}}, "test": {"average": {"accuracy": test}}}
        return {"variant": variant, "seed": seed, "steps": steps, "config": {"lr": 3e-3}, "metrics": scores}

    check = Part("long", "schedule", "m", "d", 1, 1, 1, 1, (), (0, 1, 2),
                 [Variant("lora", "LoRA", "lora"), Variant("mor", "MoR", "mor")], steps=20, rates_from="short")
    (tmp_path / "short").mkdir()
    for i, record in enumerate([run("lora", 0, 10, 0.70, 0.70), run("lora", 1, 10, 0.72, 0.74),
                                run("mor", 0, 10, 0.60, 0.71), run("mor", 1, 10, 0.62, 0.73),
                                run("mor", 2, 10, 0.99, 0.99)]):  # seed 2 has no 20-step run: left out
        (tmp_path / "short" / f"{i}.json").write_text(json.dumps(record))
    longer = [run("lora", 0, 20, 0.71, 0.70), run("lora", 1, 20, 0.73, 0.72),
              run("mor", 0, 20, 0.66, 0.72), run("mor", 1, 20, 0.70, 0.78)]
    table = schedule_section(check, longer, tmp_path)
    assert "validation % at 10 → 20 steps" in table and "Δ test vs LoRA at 20 steps" in table
    assert "| LoRA | 0.003 | 0, 1 | 71.0 → 72.0 (+1.0) | 72.0 → 71.0 (-1.0) | — |" in table
    differences = [0.02, 0.06]  # MoR minus LoRA at 20 steps, seed by seed
    half = 12.7062 * statistics.stdev(differences) / math.sqrt(2)  # t(0.975, 1 degree of freedom)
    interval = f"+4.0 [{100 * (0.04 - half):+.1f}, {100 * (0.04 + half):+.1f}]"
    assert f"| MoR | 0.003 | 0, 1 | 61.0 → 68.0 (+7.0) | 72.0 → 75.0 (+3.0) | {interval} |" in table


def test_part_2_spans_lora_r1_to_r4_on_the_deep_model():
    part = deep_part()
    assert part.model == "smollm2" and part.steps >= 300 and len(part.seeds) >= 3 and part.forgetting
    variants = {v.name: v for v in part.variants}
    assert "zero-shot" in variants and variants["lora"].ranks == (1, 4)
    r1, r4 = (count(variants["lora"], r, SMOLLM2_SHAPES) for r in (1, 4))
    assert (r1, r4) == (57_600, 230_400)  # 30 layers x r x (576 + 576 + 576 + 192)
    for name in ("lotr", "lotr-frozen"):
        counts = [count(variants[name], r, SMOLLM2_SHAPES) for r in variants[name].ranks]
        assert counts[0] < r1 / 2 and counts[-1] >= r4  # from far below r = 1's count up to r = 4's
    # frozen Tucker factors: the cores alone train, 60 groups' worth of r x r
    assert count(variants["lotr-frozen"], 32, SMOLLM2_SHAPES) == 60 * 32 * 32


def test_the_shallow_part_asks_part_2s_question_on_six_layers():
    part, deep = shallow_part(), deep_part()
    assert part.model == "minilm" and part.steps == power_part().steps and part.learning_rates == deep.learning_rates
    variants = {v.name: v for v in part.variants}
    for variant in variants.values():  # rates chosen at the rank nearest LoRA r = 1's count, as part 2 does
        assert abs(count(variant, variant.search_rank, MINILM_SHAPES) - 9_216) < 0.05 * 9_216
    assert variants.keys() == {v.name for v in deep.variants if v.method != "zero-shot"}
    assert variants["lora"].ranks == (1, 4)
    r1, r4 = (count(variants["lora"], r, MINILM_SHAPES) for r in (1, 4))
    assert (r1, r4) == (9_216, 36_864)  # 12 projections x r x (384 + 384)
    # trainable factors: U and V per projection name (2 x 2 x 384 r), one r x r core per layer and name
    assert [count(variants["lotr"], r, MINILM_SHAPES) for r in variants["lotr"].ranks] == [
        1536 * r + 12 * r * r for r in (2, 6, 20)] == [3_120, 9_648, 35_520]
    assert [count(variants["lotr-frozen"], r, MINILM_SHAPES) for r in variants["lotr-frozen"].ranks] == [
        768, 9_408, 37_632]  # 12 r^2, the cores alone
    for name in ("lotr", "lotr-frozen"):  # the same span as part 2: far below r = 1's count, about r = 1's, r = 4's
        counts = [count(variants[name], r, MINILM_SHAPES) for r in variants[name].ranks]
        assert counts[0] < r1 / 2 and abs(counts[1] - r1) < 0.05 * r1 and abs(counts[2] - r4) < 0.05 * r4


def test_the_shallow_lower_rate_check_reruns_the_largest_counts_one_rate_down():
    part, check = shallow_part(), shallow_lower_rate_part()
    rates = list(part.learning_rates)
    assert check.learning_rates == (rates[rates.index(1e-2) - 1],) == (3e-3,)  # one step below the rate chosen
    assert (check.seeds, check.steps, check.max_train) == (part.seeds, part.steps, part.max_train)
    assert {v.name: v.ranks for v in check.variants} == {"lora": (4,), "lotr": (20,), "lotr-frozen": (56,)}
    assert [v.options for v in check.variants] == [v.options for v in part.variants]


def test_the_news_floor_is_the_head_alone_on_part_3s_split_and_schedule():
    part, floor = downstream_part("news", "sentiment"), downstream_floor_part("news")
    same = ("model", "data", "max_train", "max_eval", "max_length", "batch_size", "steps", "seeds", "search_seeds")
    assert all(getattr(floor, name) == getattr(part, name) for name in same)
    assert [(v.method, v.learning_rates) for v in floor.variants] == [("head-only", (3e-2, 1e-1, 3e-1))]
    assert floor.name == "downstream-minilm-news-floor"


def test_the_higher_rate_check_is_part_3_one_rate_up_for_the_variants_at_the_top_of_its_grid():
    for target, source in (("news", "sentiment"), ("sentiment", "news")):
        part, check = downstream_part(target, source), downstream_higher_rate_part(target, source)
        assert check.learning_rates == (3 * max(part.learning_rates),) == (3e-2,)
        assert (check.steps, check.max_train, check.max_eval) == (part.steps, part.max_train, part.max_eval)
        assert check.seeds == ((0, 1, 2) if target == "sentiment" else (0,)) and set(check.seeds) <= set(part.seeds)
        assert [v.name for v in check.variants] == ["lora", f"cores-on-{source}", "cores-on-tucker"]
        assert [v for v in part.variants if v.name != "lotr"] == check.variants


def test_part_4_has_a_second_budget_where_mor_keeps_loras_rank():
    part = multitask_part()
    assert part.data == "skills" and part.steps >= 300 and len(part.seeds) >= 3 and part.forgetting
    small, large = MULTITASK_BUDGETS
    ranks = {v.name: closest_rank(variant_config(v, 1, ["q_proj"]), SMOLLM2_SHAPES, v.budget)
             for v in part.variants if v.budget}
    for variant in part.variants:
        if variant.budget == small:
            assert abs(ranks[variant.name][1] - small) <= 0.15 * small, variant.name
    assert {v.options.get("num_experts") for v in part.variants if v.method in ("mor", "moelora")} == {4, 8}
    assert ranks["mor-n4-large"][0] == ranks["lora"][0]  # MoR's shared rank at the larger budget = LoRA's at the first


def test_paired_difference_is_students_t_over_seeds():
    def runs(scores):
        return [{"seed": s, "metrics": {"test": {"average": {"accuracy": a}}}} for s, a in scores]

    lora = runs(((0, 0.70), (1, 0.72), (2, 0.71)))
    other = runs(((2, 0.71), (0, 0.72), (1, 0.76)))
    result = paired_difference(other, lora)
    differences = [0.02, 0.04, 0.00]  # paired by seed, not by position
    half = 4.302653 * statistics.stdev(differences) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert result["seeds"] == 3 and result["mean"] == pytest.approx(0.02)
    assert (result["low"], result["high"]) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-5)
    assert paired_difference(other[:1], lora)["seeds"] == 1


def test_forgetting_is_paired_by_seed_with_the_lora_nearest_in_parameters():
    def run(variant, rank, count, seed, score, change):
        return {"variant": variant, "rank": rank, "seed": seed, "trainable_parameters": {"adapter": count},
                "metrics": {"test": {"average": {"exact_match": score}}},
                "forgetting": {"base_loss": 3.7, "change": change}}

    part = Part("p", "multi-task", "m", "skills", 0, 0, 0, 8, (), (0, 1), forgetting=64,
                variants=[Variant("lora", "LoRA", "lora", ranks=(12, 16)), Variant("mor", "MoR", "mor", ranks=(8, 12))])
    runs = {"lora": [run("lora", 12, 691_200, 0, 0.46, 0.11), run("lora", 12, 691_200, 1, 0.45, 0.12),
                     run("lora", 16, 921_600, 0, 0.50, 0.13), run("lora", 16, 921_600, 1, 0.51, 0.14)],
            "mor": [run("mor", 8, 693_120, 1, 0.44, 0.09), run("mor", 8, 693_120, 0, 0.46, 0.08),
                    run("mor", 12, 924_480, 0, 0.48, 0.10), run("mor", 12, 924_480, 1, 0.49, 0.12)]}
    table, _ = forgetting_section([(part, runs)])
    rows = {tuple(cells[1:4]): cells for cells in (line.split(" | ") for line in table.splitlines()[2:])}
    half = 12.706205  # t(0.975, 1 degree of freedom) × stdev / sqrt(2), with stdev = |d0 - d1| / sqrt(2)
    # MoR r=8 (693,120) pairs with LoRA r=12 (691,200): loss -0.03 and -0.03, score 0.0 and -0.01 points.
    assert rows[("MoR", "8", "693,120")][7:10] == ["r=12", "-0.030 [-0.030, -0.030]",
                                                  f"-0.5 [{-0.5 - half * 0.5:+.1f}, {-0.5 + half * 0.5:+.1f}]"]
    # MoR r=12 (924,480) pairs with LoRA r=16 (921,600): loss -0.03 and -0.02.
    assert rows[("MoR", "12", "924,480")][7:9] == ["r=16", f"-0.025 [{-0.025 - half * 0.005:+.3f}, "
                                                           f"{-0.025 + half * 0.005:+.3f}]"]
    assert rows[("LoRA", "12", "691,200")][7:10] == ["—", "—", "—"]


def test_run_times_come_from_the_runs_that_had_the_machine_to_themselves():
    def run(seconds, threads):
        return {"train_seconds": seconds, "versions": {"threads": str(threads)}}

    assert train_seconds([run(100, 2), run(300, 1), run(120, 2)]) == "110 (2 at 2 threads)"
    assert train_seconds([run(300, 1), run(200, 1)]) == "250"


def test_equal_accuracy_is_the_smallest_adapter_whose_mean_reaches_loras():
    def runs(rank, parameters, scores):
        return [{"rank": rank, "seed": seed, "trainable_parameters": {"adapter": parameters},
                 "metrics": {"test": {"average": {"accuracy": score}}}} for seed, score in enumerate(scores)]

    part = Part("p", "parameter-efficiency", "m", "d", 1, 1, 1, 1, (1e-3,), (0, 1),
                [Variant("lora", "LoRA", "lora", (1, 4)), Variant("lotr", "LoTR", "lotr", (2, 8, 32))])
    grouped = {"lora": runs(1, 1000, (0.70, 0.72)) + runs(4, 4000, (0.74, 0.76)),
               "lotr": runs(2, 100, (0.60, 0.80)) + runs(8, 500, (0.72, 0.73)) + runs(32, 5000, (0.70, 0.71))}
    note = equal_accuracy_note(part, grouped)
    # r = 2's mean (70 %) falls short of 71 % though one seed is above it; r = 8's reaches it
    assert "LoRA r=1 (71.0 %, 1,000 parameters): LoTR r=8, 500 (2.0× fewer)" in note
    assert "LoRA r=4 (75.0 %, 4,000 parameters): LoTR: none of its ranks" in note


def test_a_check_one_rate_up_is_paired_with_lora_at_the_rate_its_part_chose():
    def runs(name, lr, scores):
        return [{"variant": name, "rank": 1, "seed": seed, "config": {"lr": lr}, "trainable_parameters": {"adapter": 9},
                 "metrics": {"test": {"average": {"accuracy": score}}}} for seed, score in enumerate(scores)]

    check = downstream_higher_rate_part("sentiment", "news")
    chosen = runs("lora", 1e-2, (0.76, 0.72))  # part 3's LoRA at its rate
    grouped = {"lora": runs("lora", 3e-2, (0.43, 0.43)), "cores-on-news": runs("cores-on-news", 3e-2, (0.64, 0.62)),
               "cores-on-tucker": runs("cores-on-tucker", 3e-2, (0.70, 0.66))}
    table, _ = comparison_section(check, grouped, 500, ("downstream-minilm-sentiment", chosen))
    assert "Δ vs LoRA r=1 at 0.01 (downstream-minilm-sentiment)" in table
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| -31.0 [" in rows["| LoRA r=1 (PEFT)"]  # LoRA at 3e-2 against LoRA at 1e-2, seed by seed
    assert "| -6.0 [" in rows["| cores only, on the frozen Tucker basis"]
    assert "smallest adapter" not in table  # reaching a collapsed LoRA's score says nothing
    own, _ = comparison_section(check, grouped, 500)  # without it, the part's own LoRA
    assert "| -31.0 [" not in own and "Δ vs LoRA r=1," in own


def test_a_part_still_choosing_its_rates_shows_its_short_runs(tmp_path):
    assert searching(tmp_path) is None
    for lr, score in ((1e-3, 0.5), (3e-3, 0.625)):
        record = {"variant": "lora", "rank": 1, "config": {"lr": lr}, "seed": 0, "steps": 100,
                  "metrics": {"validation": {"average": {"accuracy": score}}}}
        (tmp_path / f"lora-r1-lr{lr:g}-s0.json").write_text(json.dumps(record))
    text = searching(tmp_path)
    assert "2 short runs so far" in text and "| lora | 1 | 0.003 | 0 | 100 | 62.5 |" in text


def test_the_precision_note_gives_one_examples_worth_and_the_interval_widths():
    wide = {"mean": 0.01, "low": -0.02, "high": 0.04, "seeds": 5}  # ±3 points
    narrow = {"mean": 0.0, "low": -0.005, "high": 0.005, "seeds": 5}  # ±0.5
    note = precision_note(500, [None, wide, narrow, {"mean": 0.1, "low": math.nan, "high": math.nan, "seeds": 1}])
    assert "worth 0.20 points" in note and "±0.5 to ±3.0 points" in note
    assert "intervals" not in precision_note(504, [None])


def test_collapse_is_one_class_taking_four_fifths_of_the_predictions():
    def run(predicted):
        return {"metrics": {"test": {"sentiment": {"examples": 100, "predicted": predicted}, "average": {}}}}

    assert collapsed(run([80, 16, 4])) and not collapsed(run([79, 16, 5])) and not collapsed(run([50, 38, 12]))


def test_routing_distance_averages_every_pair_of_tasks():
    routing = {"a": [[1.0, 0.0]], "b": [[0.0, 1.0]], "c": [[1.0, 0.0]]}
    assert layer_distances(routing) == [pytest.approx((1 + 0 + 1) / 3)]  # pairs ab, ac, bc


def test_baselines_train_the_head_alone_or_everything(tiny_bert):
    model = BertForSequenceClassification.from_pretrained(tiny_bert)
    runner._baseline("head-only")(model, ["classifier"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    runner._baseline("full")(model, ["classifier"])
    assert all(p.requires_grad for p in model.parameters())


def test_held_out_loss_is_the_token_weighted_next_token_loss(tiny_llama, monkeypatch):
    articles = ["the cat sat on the mat and looked at the door", "rain fell", "a longer text " * 20]
    monkeypatch.setattr(forgetting, "held_out_articles", lambda count: articles[:count])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    loss, tokens = forgetting.language_model_loss(model, tokenizer, "cpu", 3)
    total, counted = 0.0, 0
    for text in articles:  # one at a time, no padding: transformers' own loss is the mean over n - 1 predictions
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][: forgetting.TOKENS]])
        with torch.no_grad():
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        counted += ids.shape[1] - 1
    assert tokens == counted and loss == pytest.approx(total / counted, rel=1e-5)


def test_a_grid_part_trains_every_rate_and_seed_and_chooses_on_their_mean(tiny_bert, colours, tmp_path):
    variants = [Variant("lora", "LoRA", "lora", budget=512), Variant("lotr", "LoTR", "lotr", budget=512),
                Variant("head-only", "head only", "head-only", learning_rates=(1e-2,), search_seeds=(0,)),
                Variant("full", "full", "full", learning_rates=(1e-4,), search_seeds=(0,))]
    part = Part("grid", "power", str(tiny_bert), str(colours), max_train=32, max_eval=12, max_length=16, batch_size=8,
                learning_rates=(1e-3, 3e-2), seeds=(0, 1), variants=variants, steps=6, search_seeds=(0, 1))
    out = tmp_path / "study"
    runner.run_study([part], ["grid"], out, quiet=True, say=lambda text: None)
    folder = out / "grid"
    search = json.loads((folder / "search.json").read_text())["learning_rates"]
    for name in ("lora", "lotr"):
        rank = search[name]["rank"]
        records = {(lr, seed): json.loads((folder / f"{name}-r{rank}-lr{lr:g}-s{seed}.json").read_text())
                   for lr in part.learning_rates for seed in part.seeds}
        assert all(set(r["metrics"]) == {"validation", "test"} and r["steps"] == 6 for r in records.values())
        means = {lr: statistics.fmean(records[lr, s]["metrics"]["validation"]["average"]["accuracy"]
                                      for s in part.seeds) for lr in part.learning_rates}
        assert search[name]["chosen"] == max(part.learning_rates, key=lambda lr: means[lr])
        assert search[name]["seeds"] == [0, 1] and records[1e-3, 0]["budget"] == 512
    head = json.loads((folder / "head-only-lr0.01-s1.json").read_text())  # seed 1 at the rate seed 0 chose
    assert head["trainable_parameters"]["adapter"] == 0 and set(head["metrics"]) == {"test"}
    full = json.loads((folder / "full-lr0.0001-s0.json").read_text())
    encoder = sum(p.numel() for n, p in BertForSequenceClassification.from_pretrained(tiny_bert).named_parameters()
                  if not n.startswith("classifier"))
    assert full["trainable_parameters"]["adapter"] == encoder
    summary = write_summary(out).read_text()
    assert "Δ accuracy vs LoRA, points [95 % CI]" in summary and "| head only |" in summary
    assert (out / "grid-rates.png").is_file() and (out / "grid-paired.png").is_file()

    # A grid still running (no search.json yet, some variants not reached) is drawn from the runs it has.
    (folder / "search.json").unlink()
    for path in folder.glob("lotr-*.json"):
        path.unlink()
    summary = write_summary(out).read_text()
    assert "**Still running**" in summary and "| LoRA | 0.001" in summary and "| LoTR |" not in summary


def test_a_part_not_started_may_change(tiny_bert, colours, tmp_path, monkeypatch):
    variants = [Variant("lora", "LoRA", "lora", (1,))]
    first = Part("first", "parameter-efficiency", str(tiny_bert), str(colours), max_train=16, max_eval=8, max_length=16,
                 batch_size=8, learning_rates=(1e-3,), seeds=(0,), variants=variants)
    second = Part(**{**first.__dict__, "name": "second"})
    out = tmp_path / "study"
    runner.run_study([first, second], ["first"], out, quiet=True, say=lambda text: None)
    changed = Part(**{**second.__dict__, "seeds": (0, 1)})
    runner.run_study([first, changed], ["first"], out, quiet=True, say=lambda text: None)  # not started: welcome
    recorded = json.loads((out / runner.PLAN_FILE).read_text())["parts"]
    assert recorded[1]["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="another study plan"):
        runner.run_study([Part(**{**first.__dict__, "max_train": 8}), changed], ["first"], out, quiet=True,
                         say=lambda text: None)
    # A process started before another recorded a changed plan for a part it has not begun refuses that part.
    runner.prepare([first, Part(**{**changed.__dict__, "seeds": (0, 1, 2)})], out)  # the other process
    monkeypatch.setattr(runner, "prepare", lambda parts, out: None)  # this one prepared before that
    with pytest.raises(RankshareError, match="another process changed it"):
        runner.run_study([first, changed], ["second"], out, quiet=True, say=lambda text: None)
    # A started part may gain seeds (the runs it has stay runs of it), never lose one.
    monkeypatch.undo()
    runner.prepare([Part(**{**first.__dict__, "seeds": (0, 1)}), changed], out)
    assert json.loads((out / runner.PLAN_FILE).read_text())["parts"][0]["seeds"] == [0, 1]
    with pytest.raises(RankshareError, match="another study plan"):
        runner.prepare([Part(**{**first.__dict__, "seeds": (1,)}), changed], out)


def test_a_diverged_run_is_recorded_as_collapsed_and_the_study_goes_on(tiny_bert, colours, tmp_path):
    # At this rate the first Adam step throws the weights past anything float32 logits can hold.
    variants = [Variant("lotr", "LoTR", "lotr", (2,))]
    part = Part("wild", "parameter-efficiency", str(tiny_bert), str(colours), max_train=16, max_eval=8, max_length=16,
                batch_size=8, learning_rates=(1e30,), seeds=(0, 1), variants=variants, steps=4)
    lines = []
    runner.run_study([part], ["wild"], tmp_path, quiet=True, say=lines.append)
    records = [json.loads((tmp_path / "wild" / f"lotr-r2-lr1e+30-s{seed}.json").read_text()) for seed in (0, 1)]
    assert all(0 < r["diverged_at_step"] < 4 and collapsed(r) for r in records)
    assert sum("diverged at step" in line for line in lines) == 2
