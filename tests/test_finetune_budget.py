"""The budget planner: its counts against real adapters (and PEFT's LoRA), its choice against brute force."""

from __future__ import annotations

import warnings

import pytest

import rankshare as rs
from conftest import FAMILIES, base_model
from rankshare.finetune.budget import METHODS, adapter_parameters, max_rank, plan_all, plan_rank
from rankshare.layer import linear_shape
from rankshare.targets import find_targets


def target_shapes(family) -> dict[str, tuple[int, int]]:
    return {name: linear_shape(module) for name, module in find_targets(base_model(family), family.targets).items()}


def roberta_base_shapes() -> dict[str, tuple[int, int]]:
    """RoBERTa-base's query and value projections: 12 layers of 768 × 768."""
    return {
        f"roberta.encoder.layer.{i}.attention.self.{kind}": (768, 768) for i in range(12) for kind in ("query", "value")
    }


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_lotr_counts_equal_adapted_models(family, rank):
    shapes = target_shapes(family)
    for share in ("by_name", "by_shape"):
        for freeze_factors in (False, True):
            config = rs.LotrConfig(rank=rank, target_modules=family.targets, share=share, freeze_factors=freeze_factors)
            expected = rs.adapt(base_model(family), config).num_trainable_parameters()
            assert adapter_parameters("lotr", shapes, rank, share=share, freeze_factors=freeze_factors) == expected


@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("num_experts", [1, 4])
def test_mixture_counts_equal_adapted_models(family, rank, num_experts):
    shapes = target_shapes(family)
    for method, config_class in (("mor", rs.MorConfig), ("moelora", rs.MoeLoraConfig)):
        config = config_class(rank=rank, num_experts=num_experts, target_modules=family.targets)
        expected = rs.adapt(base_model(family), config).num_trainable_parameters()
        assert adapter_parameters(method, shapes, rank, num_experts=num_experts) == expected


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_lora_counts_equal_peft(family, rank):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that GPT-2's Conv1D needs fan_in_fan_out, and sets it
        model = peft.get_peft_model(base_model(family), peft.LoraConfig(r=rank, target_modules=family.targets))
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_parameters("lora", target_shapes(family), rank) == expected


def test_roberta_base_figures_from_methods_md():
    shapes = roberta_base_shapes()
    assert adapter_parameters("lora", shapes, 8) == 294_912
    assert adapter_parameters("lotr", shapes, 8) == 26_112
    assert adapter_parameters("lotr", shapes, 8, share="by_shape") == 8 * 1536 + 24 * 64
    assert plan_rank("lora", shapes, 294_912).rank == 8
    assert plan_rank("lotr", shapes, 26_112).rank == 8
    # With one U, V for query and value, LoTR r = 32 has exactly LoRA r = 2's 73,728 parameters.
    plan = plan_rank("lotr", shapes, adapter_parameters("lora", shapes, 2), share="by_shape")
    assert (plan.rank, plan.parameters, plan.note) == (32, 73_728, "rank 32 gives 73,728 (exactly the budget)")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", [{}, {"share": "by_shape", "num_experts": 2}, {"freeze_factors": True}])
def test_plan_picks_the_closest_rank(method, options):
    shapes = target_shapes(FAMILIES["llama"])
    counts = {rank: adapter_parameters(method, shapes, rank, **options) for rank in range(1, max_rank(shapes) + 1)}
    budgets = sorted({1, *counts.values(), *(c + 1 for c in counts.values()), *(c - 1 for c in counts.values())})
    budgets += [(a + b) // 2 for a, b in zip(sorted(counts.values()), sorted(counts.values())[1:])]  # near ties
    budgets += [(a + b + 1) // 2 for a, b in zip(sorted(counts.values()), sorted(counts.values())[1:])]
    budgets += [10 * max(counts.values())]
    for budget in filter(None, budgets):
        best = min(counts, key=lambda rank: (abs(counts[rank] - budget), counts[rank]))
        plan = plan_rank(method, shapes, budget, **options)
        if abs(counts[best] - budget) <= 0.5 * budget:
            assert (plan.rank, plan.parameters) == (best, counts[best]), budget
            assert plan.note.startswith(f"rank {best} gives {counts[best]:,} (")
        else:
            assert (plan.rank, plan.parameters) == (None, None) and not plan.reachable, budget
            assert plan.note.startswith(f"cannot reach {budget:,}:")


def test_ties_go_to_the_smaller_count():
    shapes = {"layer": (10, 10)}  # LoRA: 20 per rank
    assert plan_rank("lora", shapes, 30).rank == 1
    assert plan_rank("lora", shapes, 31).rank == 2


def test_note_reads_as_a_sentence():
    shapes = {f"layers.{i}.proj": (64, 64) for i in range(4)}  # LoRA: 512 per rank
    assert plan_rank("lora", shapes, 6250).note == "rank 12 gives 6,144 (−1.7 % of budget)"
    assert plan_rank("lora", shapes, 6100).note == "rank 12 gives 6,144 (+0.7 % of budget)"


def test_mixture_floor_puts_a_small_budget_out_of_reach():
    shapes = target_shapes(FAMILIES["bert"])  # six 32 × 32 targets
    smallest = adapter_parameters("mor", shapes, 1)
    assert smallest == 6 * (64 + 8 * (1 + 32) + 8 * 32)
    plan = plan_rank("mor", shapes, smallest // 2)
    assert plan.rank is None and plan.parameters is None
    assert plan.note == (
        f"cannot reach {smallest // 2:,}: its smallest adapter (rank 1) has {smallest:,} parameters (+100.0 % of budget)"
    )
    assert plan_rank("lora", shapes, smallest // 2).rank is not None  # LoRA has no floor


def test_largest_rank_caps_a_large_budget():
    shapes = target_shapes(FAMILIES["llama"])  # k_proj and v_proj are 16 × 32: rank <= 16
    assert max_rank(shapes) == 16
    largest = adapter_parameters("lora", shapes, 16)
    plan = plan_rank("lora", shapes, 3 * largest)
    assert plan.rank is None
    assert plan.note.startswith(f"cannot reach {3 * largest:,}: its largest adapter (rank 16) has {largest:,} ")
    assert plan_rank("lora", shapes, int(1.9 * largest)).rank == 16


def test_plan_all_keeps_order_and_marks_unreachable_methods():
    shapes = target_shapes(FAMILIES["bert"])
    budget = adapter_parameters("lora", shapes, 2)
    plans = plan_all(list(METHODS), shapes, budget, num_experts=8)
    assert [plan.method for plan in plans] == list(METHODS)
    assert [plan.reachable for plan in plans] == [True, True, False, False]


@pytest.mark.parametrize("budget", [1, 10**12])
def test_no_method_reaching_the_budget_is_an_error(budget):
    shapes = target_shapes(FAMILIES["bert"])
    with pytest.raises(rs.RankshareError) as error:
        plan_all(list(METHODS), shapes, budget)
    message = str(error.value)
    assert f"budget of {budget:,}" in message
    for method in METHODS:
        low, high = adapter_parameters(method, shapes, 1), adapter_parameters(method, shapes, 32)
        assert f"{method} {low:,}–{high:,}" in message


@pytest.mark.parametrize("budget", [0, -5, 2.5, True, "100"])
def test_invalid_budget_is_an_error(budget):
    with pytest.raises(rs.RankshareError, match="budget must be a positive integer"):
        plan_rank("lora", {"layer": (8, 8)}, budget)


def test_invalid_arguments_are_errors():
    with pytest.raises(rs.RankshareError, match="Unknown method 'dora'"):
        adapter_parameters("dora", {"layer": (8, 8)}, 2)
    with pytest.raises(rs.RankshareError, match="No target modules"):
        plan_rank("lora", {}, 100)
    with pytest.raises(rs.RankshareError, match="share must be"):
        adapter_parameters("lotr", {"layer": (8, 8)}, 2, share="by_type")
    with pytest.raises(rs.RankshareError, match="rank must be"):
        adapter_parameters("lora", {"layer": (8, 8)}, 0)
    with pytest.raises(rs.RankshareError, match="No methods"):
        plan_all([], {"layer": (8, 8)}, 100)
