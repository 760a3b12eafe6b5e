"""The evidence study's machinery: its plan, the choice of learning rates, resumption, the merged check and
the statistics of its summary (the study's figures themselves are in docs/RESULTS.md)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import rankshare as rs
from rankshare.cli import main
from rankshare.errors import RankshareError
from rankshare.finetune.budget import closest_rank
from rankshare.finetune.evaluation import RouterTracker
from rankshare.study import runner
from rankshare.study.plan import MIXTURE_BUDGET, Part, Variant, full_plan, quick_plan
from rankshare.study.report import fill_page, mean_std, points, specialisation, write_summary
from rankshare.study.runner import variant_config

MINILM_SHAPES = {f"layer.{i}.{name}": (384, 384) for i in range(6) for name in ("query", "value")}
SMOLLM2_SHAPES = {**{f"layers.{i}.q_proj": (576, 576) for i in range(30)},
                  **{f"layers.{i}.v_proj": (192, 576) for i in range(30)}}


def test_full_plan_follows_the_rules():
    parts = {part.name: part for part in full_plan()}
    assert set(parts) == {"lotr-minilm-news", "lotr-minilm-sentiment", "mor-minilm-news+sentiment",
                          "lotr-smollm2-sentiment", "lotr-minilm-sentiment-lower-rate", "power-minilm-sentiment",
                          "power-minilm-sentiment-960-steps", "deep-smollm2-sentiment", "shallow-minilm-sentiment",
                          "shallow-minilm-sentiment-lower-rate",
                          "downstream-minilm-news",
                          "downstream-minilm-sentiment", "downstream-minilm-news-floor",
                          "downstream-minilm-news-higher-rate", "downstream-minilm-sentiment-higher-rate",
                          "multitask-smollm2-skills"}
    for part in (p for p in parts.values() if p.steps is None):  # the first study's parts (test_study_power.py)
        assert part.seeds == (0, 1, 2)
        assert len(part.learning_rates) >= 2 or part.name.endswith("lower-rate")  # a fixed rate, said in its name
        searched = {v.name for v in part.variants if not v.lr_from}
        assert all(v.lr_from in searched for v in part.variants if v.lr_from)
    for name in ("lotr-minilm-news", "lotr-minilm-sentiment"):
        options = [v.options for v in parts[name].variants if v.method == "lotr"]
        assert {"share": "by_shape"} in options and {"init": "tucker", "freeze_factors": True} in options
    mixtures = [v for v in parts["mor-minilm-news+sentiment"].variants if v.method != "lora"]
    assert sorted((v.method, v.options["num_experts"]) for v in mixtures) == [
        ("moelora", 2), ("moelora", 4), ("moelora", 8), ("mor", 2), ("mor", 4), ("mor", 8)]


def test_sweeps_span_the_same_parameter_range():
    """LoTR's sweep must cover LoRA's range of counts, or the curves could not be compared at equal size."""
    for part, shapes in ((full_plan()[0], MINILM_SHAPES), (full_plan()[3], SMOLLM2_SHAPES)):
        counts = {v.name: [variant_config(v, r, ["q_proj"]).num_trainable_parameters(shapes) for r in v.ranks]
                  for v in part.variants}
        for name, sweep in counts.items():  # every LoTR curve starts near LoRA's smallest and reaches its largest
            assert sweep[0] < counts["lora"][0] * 1.5 and sweep[-1] >= counts["lora"][-1], (part.name, name, sweep)
    # the closed forms, by hand: LoRA 2 projections x 6 layers x r (384 + 384); LoTR per group r·768 + 6 r²
    assert rs.PeftLoraConfig(rank=16, target_modules=["query"]).num_trainable_parameters(MINILM_SHAPES) == 147_456
    assert rs.LotrConfig(rank=64, target_modules=["query"]).num_trainable_parameters(MINILM_SHAPES) == 147_456


def test_mixtures_are_compared_at_the_budget():
    for v in full_plan()[2].variants:
        _, parameters = closest_rank(variant_config(v, 1, ["query"]), MINILM_SHAPES, MIXTURE_BUDGET)
        assert abs(parameters - MIXTURE_BUDGET) <= 0.2 * MIXTURE_BUDGET, (v.name, parameters)


def test_quick_plan_runs_the_same_parts_smaller():
    full, quick = full_plan(), quick_plan()
    assert [p.name for p in quick] == [p.name for p in full]
    for small, big in zip(quick, full):
        assert small.max_train < big.max_train and small.seeds == (0,)
        assert {v.name for v in small.variants} <= {v.name for v in big.variants}
        assert all(v.lr_from is None for v in small.variants)


def test_summary_statistics():
    assert mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert mean_std([0.8]) == (0.8, 0.0)
    assert specialisation({"a": [[0.5, 0.5]], "b": [[0.5, 0.5]]}) == 0
    assert specialisation({"a": [[1.0, 0.0]], "b": [[0.0, 1.0]]}) == 1
    # per layer, then averaged: layers that swap experts are fully specialised, though the layer means agree
    assert specialisation({"a": [[1.0, 0.0], [0.0, 1.0]], "b": [[0.0, 1.0], [1.0, 0.0]]}) == 1
    routing = {"a": [[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]], "b": [[0.4, 0.4, 0.2], [0.5, 0.5, 0.0]]}
    assert specialisation(routing) == pytest.approx(0.15)
    assert specialisation({"a": [[1.0]]}) is None
    runs = [{"rank": r, "trainable_parameters": {"adapter": 10 * r, "head": 3}, "train_seconds": 1.0,
             "metrics": {"test": {"average": {"accuracy": a, "macro_f1": a / 2}}}}
            for r, a in ((2, 0.5), (2, 0.7), (1, 0.4))]
    one, two = points(runs)
    assert (one["rank"], one["parameters"], one["seeds"]) == (1, 10, 1)
    assert two["accuracy"] == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))


@pytest.fixture(scope="module")
def tiny_part(tiny_bert, colours) -> Part:
    variants = [Variant("lora", "LoRA", "lora", (1, 2)),
                Variant("lotr", "LoTR", "lotr", (2, 4), search_rank=4),
                Variant("lotr-frozen", "LoTR frozen", "lotr", (4,), lr_from="lotr",
                        options={"init": "tucker", "freeze_factors": True})]
    return Part("tiny", "parameter-efficiency", str(tiny_bert), str(colours), max_train=32, max_eval=12, max_length=16,
                batch_size=8, learning_rates=(1e-3, 3e-2), seeds=(0, 1), variants=variants, merge_seeds=(1,))


def test_study_chooses_rates_on_validation_and_resumes(tiny_part, tmp_path, monkeypatch):
    out = tmp_path / "study"
    runner.run_study([tiny_part], ["tiny"], out, quiet=True, say=lambda text: None)
    folder = out / "tiny"
    search = json.loads((folder / "search.json").read_text())["learning_rates"]
    assert set(search) == {"lora", "lotr"}  # lotr-frozen borrows lotr's rate
    for name, result in search.items():
        searched = {lr: json.loads((folder / f"{name}-r{result['rank']}-lr{lr:g}-s0.json").read_text())
                    for lr in tiny_part.learning_rates}
        best = max(tiny_part.learning_rates,
                   key=lambda lr: searched[lr]["metrics"]["validation"]["average"]["accuracy"])
        assert result["chosen"] == best and result["rank"] == {"lora": 2, "lotr": 4}[name]
    lr = search["lotr"]["chosen"]
    final = json.loads((folder / f"lotr-frozen-r4-lr{lr:g}-s1.json").read_text())
    assert set(final["metrics"]) == {"test"}  # test scores only outside the search
    assert final["trainable_parameters"]["adapter"] == 2 * 2 * 4 * 4  # two groups of 2 layers, cores only
    assert final["merged"]["metrics"] == final["metrics"] and final["merged"]["max_abs_output_difference"] < 1e-5
    assert not (out / runner.CHECKPOINTS).exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "fit", no_training)
    runner.run_study([tiny_part], ["tiny"], out, quiet=True, say=lambda text: None)
    summary = write_summary(out).read_text()
    assert "| LoTR frozen | 4 | 64 |" in summary and (out / "tiny.png").is_file()
    added = Part(**{**tiny_part.__dict__, "name": "added"})
    runner.run_study([tiny_part, added], ["tiny"], out, quiet=True, say=lambda text: None)  # a new part is welcome
    assert [p["name"] for p in json.loads((out / runner.PLAN_FILE).read_text())["parts"]] == ["tiny", "added"]
    changed = Part(**{**tiny_part.__dict__, "seeds": (0,)})
    with pytest.raises(ValueError, match="another study plan"):
        runner.run_study([changed, added], ["tiny"], out, quiet=True, say=lambda text: None)


def test_seeds_redraw_the_new_head(tiny_part, tmp_path):
    space = runner.Workspace(runner.Job(methods=[], model=tiny_part.model, data=tiny_part.data, max_train=8,
                                        max_eval=4, max_length=16), quiet=True)
    heads = []
    for seed in (0, 1, 0):
        runner._initialise_head(space, seed)
        heads.append(space.pristine.classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[2]) and not torch.equal(heads[0], heads[1])
    assert heads[1].std().item() == pytest.approx(space.pristine.config.initializer_range, rel=0.5)


def test_the_quick_study_runs_every_part(tmp_path):
    """`rankshare study --quick`: every part of the full plan, on the real packaged models and data, a few steps."""
    out = tmp_path / "quick"
    assert main(["study", "--quick", "--quiet", "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "Not run yet" not in summary
    assert all(f"## {part.name}" in summary for part in quick_plan())
    assert "## Forgetting" in summary and (out / "forgetting.png").is_file()
    pages = [tmp_path / "RESULTS.md", tmp_path / "README.md"]  # --redraw refreshes every page given
    for page in pages:
        page.write_text("<!-- summary: Forgetting: held-out news loss of every SmolLM2 run -->\n<!-- /summary -->\n")
    assert main(["study", "--quick", "--redraw", "--out", str(out), *(f"--page={page}" for page in pages)]) == 0
    assert all("| part | variant |" in page.read_text() and "(quick/forgetting.png)" in page.read_text()
               for page in pages)


@pytest.mark.parametrize("args, message", [
    (["--parts", "nope"], "no part named nope"),
    (["--redraw"], "holds no study"),
    (["--redraw", "--page", "nowhere.md"], "--page: nowhere.md is not a file"),
])
def test_study_bad_input_is_one_line(args, message, tmp_path, capsys):
    assert main(["study", "--quick", "--out", str(tmp_path / "empty"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_a_page_takes_its_blocks_from_the_summary(tmp_path):
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    summary = results / "summary.md"
    summary.write_text("# Study results\n\nintro\n\n## part-a\n\n| a | 1 |\n\n![part-a.png](part-a.png)\n\n"
                       "## Wall time\n\nTotal: 3.0 minutes.\n")
    page = tmp_path / "docs" / "RESULTS.md"
    page.write_text("# Results\n\nProse.\n\n<!-- summary: part-a -->\nold table\n<!-- /summary -->\n\nMore prose.\n"
                    "<!-- summary: Wall time -->\n<!-- /summary -->\n")
    assert fill_page(page, summary) == ["part-a", "Wall time"]
    assert page.read_text() == ("# Results\n\nProse.\n\n<!-- summary: part-a -->\n| a | 1 |\n\n"
                                "![part-a.png](results/part-a.png)\n<!-- /summary -->\n\nMore prose.\n"
                                "<!-- summary: Wall time -->\nTotal: 3.0 minutes.\n<!-- /summary -->\n")
    page.write_text("<!-- summary: part-b -->\n<!-- /summary -->\n")
    with pytest.raises(RankshareError, match="names no section .* the sections are: part-a, Wall time"):
        fill_page(page, summary)
    assert page.read_text() == "<!-- summary: part-b -->\n<!-- /summary -->\n"  # left as it was


def test_rates_are_chosen_on_validation_not_test(tiny_part, tmp_path, monkeypatch):
    """Scripted scores where validation prefers 3e-2 and test prefers 1e-3: the study must follow validation,
    report only the final runs at that rate, and average them over seeds."""

    def scripted_fit(space, settings, folder, stop_after=None, splits=("validation", "test"), prepare=None,
                     eval_batch_size=None, stop_on_divergence=False):
        scores = {"validation": {1e-3: 0.5, 3e-2: 0.9}[settings.lr],
                  "test": {1e-3: 0.8, 3e-2: 0.6}[settings.lr] + settings.seed / 100}
        metrics = {split: {"average": {"accuracy": scores[split], "macro_f1": scores[split] / 2}} for split in splits}
        return None, {"method": settings.method, "rank": settings.rank, "seed": settings.seed, "metrics": metrics,
                      "config": {"lr": settings.lr}, "trainable_parameters": {"adapter": 10 * settings.rank, "head": 2},
                      "train_seconds": 1.0, "versions": {"threads": "2"}}

    monkeypatch.setattr(runner, "fit", scripted_fit)
    part = Part(**{**tiny_part.__dict__, "name": "scripted", "learning_rates": (1e-3, 3e-2), "seeds": (0, 1, 2),
                   "variants": [Variant("lora", "LoRA", "lora", (1, 2))]})
    out = tmp_path / "study"
    runner.run_study([part], ["scripted"], out, quiet=True, say=lambda text: None)
    search = json.loads((out / "scripted" / "search.json").read_text())["learning_rates"]["lora"]
    assert search == {"rank": 2, "seeds": [0], "validation_accuracy": {"0.001": 0.5, "0.03": 0.9}, "chosen": 3e-2}
    summary = write_summary(out).read_text()
    # test accuracy at 3e-2 over seeds 0, 1, 2: 60, 61, 62 -> 61.0 ± 1.0; macro-F1 half of it
    assert "| LoRA | 1 | 10 | 61.0 ± 1.0 | 30.5 ± 0.5 | 3 | 1 |" in summary
    assert "| LoRA | 2 | 20 | 61.0 ± 1.0 | 30.5 ± 0.5 | 3 | 1 |" in summary
    assert "0.001: 50.0, 0.03: 90.0 | 0.03 (top of the grid) |" in summary


def test_router_statistics_are_kept_per_layer():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=2)
    model = rs.adapt(BertForSequenceClassification(config).eval(),
                     rs.MorConfig(rank=2, num_experts=3, target_modules=["query", "value"]))
    layers = list(model.adapter_layers().values())
    inputs = {}  # each layer's input, seen by a hook of our own on the slot holding it
    for slot in [m for m in model.modules() if isinstance(m, rs.AdaptedLinear)]:
        slot.register_forward_pre_hook(
            lambda module, args: inputs.__setitem__(module.adapters["default"], args[0]))
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    tracker = RouterTracker(model)
    tracker.observe(mask, ["a", "b", "a"])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    per_layer = tracker.layer_means()
    for task, rows in (("a", [0, 2]), ("b", [1])):
        expected = []
        for layer in layers:
            with torch.no_grad():
                gates = torch.softmax(inputs[layer] @ layer.router.T, -1)  # (B, T, N): the router, written out
            picked = torch.cat([gates[r][mask[r].bool()] for r in rows])  # the task's real tokens
            expected.append(picked.mean(0))
        torch.testing.assert_close(torch.tensor(per_layer[task]), torch.stack(expected), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(tracker.means()[task]), torch.stack(expected).mean(0), atol=1e-6,
                                   rtol=0)
