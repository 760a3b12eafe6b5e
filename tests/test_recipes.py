"""Recipes: each method's command-line defaults per objective, taken by train and compare unless given."""

from __future__ import annotations

import json

import pytest

import rankshare as rs
from rankshare.cli import build_parser, main
from rankshare.errors import RankshareError


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
    assert "(default unless --budget: lotr 24 (classify); 8 otherwise)" in text
