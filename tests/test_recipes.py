"""Recipes: each method's command-line defaults per objective, taken by train and compare unless given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rankshare as rs
from rankshare.cli import build_parser, main
from rankshare.errors import RankshareError
from rankshare.study.plan import full_plan

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PARTS = {part.name: part for part in full_plan()}


def train(model, data, out, *extra) -> dict:
    args = ["train", "--method", "lotr", "--max-steps", 1, "--model", model, "--data", data,
            "--max-length", 16, "--batch-size", 8, "--quiet", "--out", out, *extra]
    assert main([str(a) for a in args]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_without_a_recipe_a_method_keeps_its_own_rate(monkeypatch):
    monkeypatch.setattr(rs.MoeLoraConfig, "recipes", {})
    assert rs.MoeLoraConfig.recipe("sft").learning_rate == rs.MoeLoraConfig.learning_rate
    assert rs.MoeLoraConfig.recipe("sft").options == {}
    with pytest.raises(RankshareError, match="Unknown objective 'translate'"):
        rs.MoeLoraConfig.recipe("translate")


def test_train_takes_the_recipe_of_its_objective_and_what_is_given_wins(tiny_bert, colours, tmp_path, monkeypatch):
    tucker = {"init": "tucker", "freeze_factors": True}
    monkeypatch.setattr(rs.LotrConfig, "recipes", {"classify": rs.Recipe(7e-4, "a test", tucker, rank=3),
                                                   "sft": rs.Recipe(2e-2, "another test", rank=5)})
    record = train(tiny_bert, colours, tmp_path / "recipe")
    assert record["config"]["learning_rate"] == 7e-4 and record["rank"] == 3  # classify's recipe, not sft's
    assert {name: record["config"]["adapter"][name] for name in tucker} == tucker
    given = train(tiny_bert, colours, tmp_path / "given", "--lr", 5e-3, "--no-freeze-factors", "--rank", 2)
    assert given["config"]["learning_rate"] == 5e-3 and given["rank"] == 2
    assert (given["config"]["adapter"]["init"], given["config"]["adapter"]["freeze_factors"]) == ("tucker", False)
    monkeypatch.setattr(rs.LotrConfig, "recipes", {"text_to_label": rs.Recipe(7e-4, "a test", tucker)})
    other = train(tiny_bert, colours, tmp_path / "other")  # a recipe of another objective does not apply
    assert other["config"]["learning_rate"] == rs.LotrConfig.learning_rate and other["rank"] == 8
    assert other["config"]["adapter"]["init"] == "random"


def test_the_help_lists_the_recipes(monkeypatch):
    monkeypatch.setattr(rs.MorConfig, "recipes", {"sft": rs.Recipe(1e-3, "a test")})
    monkeypatch.setattr(rs.LotrConfig, "recipes", {"classify": rs.Recipe(3e-3, "a test", {"init": "tucker"}, 24)})
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "mor 0.003 (classify), 0.003 (text_to_label), 0.003 (lm), 0.001 (sft)" in text
    assert "init of U and V (lotr; default: random; lotr classify: tucker)" in text
    assert ("lotr 24 (classify); moelora 2 (classify); moelora 2 (sft); 8 otherwise; "
            "at most the narrowest target's side)") in text


def test_a_recipe_rank_beyond_the_model_is_cut_to_the_narrowest_target(tiny_bert, colours, tmp_path):
    """LoTR's classify recipe (rank 88, chosen on MiniLM's 384-wide projections) on a model 32 wide: rank 32."""
    assert rs.LotrConfig.recipe("classify").rank > 32
    assert train(tiny_bert, colours, tmp_path / "cut")["rank"] == 32


def part_objective(part: str) -> str:
    return json.loads(next((RESULTS / part).glob("*-s*.json")).read_text())["config"]["objective"]


@pytest.mark.parametrize("method", ["lora", "lotr", "mor", "moelora"])
@pytest.mark.parametrize("objective", ["classify", "text_to_label", "sft"])
def test_each_recipe_is_what_its_part_of_the_study_chose(method, objective):
    """Each studied objective has a recipe per method whose rate, options and rank are those of the variant it names
    in the part of the study it names (docs/results/<part>/search.json); one taken from another objective's part
    says so."""
    recipe = rs.methods()[method].recipe(objective)
    where, _, remark = recipe.source.partition(" ")
    part_name, _, variant_name = where.partition("/")
    variant = {v.name: v for v in PARTS[part_name].variants}[variant_name]
    search = json.loads((RESULTS / part_name / "search.json").read_text())["learning_rates"]
    assert variant.method == method
    assert recipe.learning_rate == search[variant.lr_from or variant.name]["chosen"]
    assert recipe.options == variant.options
    assert recipe.rank in (None, search[variant.name]["rank"], *variant.ranks)
    assert part_objective(part_name) == objective or "not measured" in remark
