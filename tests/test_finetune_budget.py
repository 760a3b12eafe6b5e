"""The budget planner: each method's own count against the adapters it creates, the plan against brute force."""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest

import rankshare as rs
from conftest import FAMILIES, base_model
from rankshare.finetune.budget import closest_rank, fits, max_rank, plan_all, plan_rank
from rankshare.layer import linear_shape
from rankshare.targets import find_targets


def target_shapes(family) -> dict[str, tuple[int, int]]:
    return {name: linear_shape(module) for name, module in find_targets(base_model(family), family.targets).items()}


def option_grid(cls: type[rs.AdapterConfig]) -> list[dict]:
    """Every combination of a method's options: all choices, both truth values, numbers 1 and 4."""
    values = {}
    for name, spec in cls.options().items():
        if "choices" in spec.metadata:
            values[name] = list(spec.metadata["choices"])
        elif isinstance(spec.default, bool):
            values[name] = [False, True]
        else:
            values[name] = [1, 4]
    return [dict(zip(values, combination)) for combination in itertools.product(*values.values())]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


CASES = [(name, options) for name, cls in rs.methods().items() for options in option_grid(cls)]


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_counts_equal_the_adapters_adapt_creates(family, method, options, rank):
    config = rs.methods()[method](rank=rank, target_modules=family.targets, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that GPT-2's Conv1D needs fan_in_fan_out, and sets it
        model = rs.adapt(base_model(family), config)
    assert config.num_trainable_parameters(target_shapes(family)) == trainable(model)


def test_every_method_is_covered():
    assert list(rs.methods()) == ["lora", "lotr", "mor", "moelora"]
    assert {method for method, _ in CASES} == set(rs.methods())


def roberta_base_shapes() -> dict[str, tuple[int, int]]:
    """RoBERTa-base's query and value projections: 12 layers of 768 × 768."""
    return {f"roberta.encoder.layer.{i}.attention.self.{kind}": (768, 768)
            for i in range(12) for kind in ("query", "value")}


def test_roberta_base_figures_from_methods_md():
    shapes, targets = roberta_base_shapes(), ["query", "value"]
    assert rs.PeftLoraConfig(rank=8, target_modules=targets).num_trainable_parameters(shapes) == 294_912
    assert rs.LotrConfig(rank=8, target_modules=targets).num_trainable_parameters(shapes) == 26_112
    by_shape = rs.LotrConfig(rank=8, target_modules=targets, share="by_shape")
    assert by_shape.num_trainable_parameters(shapes) == 8 * 1536 + 24 * 64
    # With one U, V for query and value, LoTR r = 32 has exactly LoRA r = 2's 73,728 parameters.
    plan = plan_rank(by_shape, shapes, 73_728)
    assert (plan.rank, plan.parameters, plan.note) == (32, 73_728, "rank 32 gives 73,728 (exactly the budget)")


def brute_force(config: rs.AdapterConfig, shapes, budget: int) -> tuple[int, int] | None:
    counts = {r: dataclasses.replace(config, rank=r).num_trainable_parameters(shapes)
              for r in range(1, max_rank(shapes) + 1)}
    inside = [r for r, n in counts.items() if 0.9 * budget <= n <= 1.05 * budget]
    if not inside:
        return None
    best = min(inside, key=lambda r: (abs(counts[r] - budget), counts[r]))
    return best, counts[best]


@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_plan_picks_the_closest_rank_inside_the_window(method, options):
    shapes = target_shapes(FAMILIES["llama"])
    config = rs.methods()[method](rank=1, target_modules=["q_proj", "k_proj", "v_proj"], **options)
    counts = [dataclasses.replace(config, rank=r).num_trainable_parameters(shapes)
              for r in range(1, max_rank(shapes) + 1)]
    budgets = {1, 10 * counts[-1]}
    for n in counts:  # the window's edges, where rounding would show
        budgets |= {n - 1, n, n + 1, int(n / 1.05), int(n / 1.05) + 1, int(n / 0.9), int(n / 0.9) + 1}
    for budget in sorted(b for b in budgets if b > 0):
        plan = plan_rank(config, shapes, budget, vary=False)
        expected = brute_force(config, shapes, budget)
        if expected is None:
            assert not plan.reachable and plan.note.startswith(f"left out: no rank fits −10 %/+5 % of {budget:,}")
        else:
            assert (plan.rank, plan.parameters) == expected, budget
            assert plan.note.startswith(f"rank {expected[0]} gives {expected[1]:,} (")


def test_window_is_five_percent_over_and_ten_under():
    shapes = {"layer": (50, 50)}  # LoRA: 100 per rank
    lora = rs.PeftLoraConfig(rank=1, target_modules=["layer"])
    assert fits(1050, 1000) and not fits(1051, 1000) and fits(900, 1000) and not fits(899, 1000)
    assert plan_rank(lora, shapes, 2000).rank == 20
    # At 660, 700 is closer (+6.1 %) but outside the window; 600 (−9.1 %) is inside.
    assert closest_rank(lora, shapes, 660) == (7, 700) and plan_rank(lora, shapes, 660).rank == 6
    assert plan_rank(lora, shapes, 1150).rank == 11  # ties go to the smaller count


def test_demo_moelora_tries_other_expert_counts():
    """MiniLM's query and value (12 of 384 × 384) at 150,000: 8 experts give 110,592 or 184,320 (+22.9 %)."""
    shapes = {f"layer.{i}.{kind}": (384, 384) for i in range(6) for kind in ("query", "value")}
    config = rs.MoeLoraConfig(rank=1, num_experts=8, target_modules=["query", "value"])
    assert plan_rank(config, shapes, 150_000, vary=False).reachable is False
    plan = plan_rank(config, shapes, 150_000)
    assert (plan.rank, plan.options, plan.parameters) == (2, {"num_experts": 6}, 138_240)
    assert plan.note == ("rank 2 with num_experts=6 gives 138,240 (−7.8 % of budget); with num_experts=8 no rank fits "
                         "−10 %/+5 % (rank 2 gives 184,320, +22.9 % of budget)")
    # 6 is the fitting expert count nearest to the 8 asked for: 7 does not fit at any rank.
    fitting = [n for n in range(2, 9) if brute_force(dataclasses.replace(config, num_experts=n), shapes, 150_000)]
    assert min(fitting, key=lambda n: (abs(n - 8), n)) == 6


def test_a_method_left_out_names_the_nearest_budget_it_can_meet():
    shapes = target_shapes(FAMILIES["bert"])  # six 32 × 32 targets
    mor = rs.MorConfig(rank=1, num_experts=8, target_modules=["query", "value"])
    smallest = min(dataclasses.replace(mor, num_experts=n).num_trainable_parameters(shapes) for n in range(2, 9))
    plan = plan_rank(mor, shapes, smallest // 3)
    assert not plan.reachable and plan.rank is None and plan.parameters is None
    assert "nor with any of num_experts=2–8" in plan.note
    assert plan.note.endswith(f"the nearest budget it can meet is {plan.nearest_budget:,}")
    assert plan_rank(mor, shapes, plan.nearest_budget).reachable
    assert not plan_rank(mor, shapes, plan.nearest_budget - 1).reachable  # nothing nearer fits
    lora = rs.PeftLoraConfig(rank=1, target_modules=["query", "value"])
    assert plan_rank(lora, shapes, smallest // 3).reachable  # LoRA has no floor


def test_plan_above_the_largest_rank():
    shapes = target_shapes(FAMILIES["llama"])  # k_proj and v_proj are 16 × 32: rank <= 16
    lora = rs.PeftLoraConfig(rank=1, target_modules=["q_proj"])
    largest = dataclasses.replace(lora, rank=16).num_trainable_parameters(shapes)
    plan = plan_rank(lora, shapes, 3 * largest)
    assert not plan.reachable and plan.nearest_budget == largest * 10 // 9
    assert plan_rank(lora, shapes, plan.nearest_budget).rank == 16
    assert closest_rank(lora, shapes, 3 * largest) == (16, largest)


def test_plan_all_keeps_order_and_leaves_out_what_cannot_fit():
    shapes = target_shapes(FAMILIES["bert"])
    configs = [cls(rank=1, target_modules=["query", "value"]) for cls in rs.methods().values()]
    budget = 2 * 6 * 64  # LoRA at rank 2; the mixtures' routers alone are larger
    plans = plan_all(configs, shapes, budget)
    assert [plan.method for plan in plans] == list(rs.methods())
    assert [plan.reachable for plan in plans] == [True, True, False, False]


@pytest.mark.parametrize("budget", [1, 10**12])
def test_no_method_fitting_the_budget_is_an_error(budget):
    shapes = target_shapes(FAMILIES["bert"])
    configs = [cls(rank=1, target_modules=["query", "value"]) for cls in rs.methods().values()]
    with pytest.raises(rs.RankshareError) as error:
        plan_all(configs, shapes, budget)
    message = str(error.value)
    assert f"budget of {budget:,}" in message
    for config in configs:
        assert f"{config.method} {plan_rank(config, shapes, budget).nearest_budget:,}" in message


@pytest.mark.parametrize("budget", [0, -5, 2.5, True, "100"])
def test_invalid_budget_is_an_error(budget):
    with pytest.raises(rs.RankshareError, match="budget must be a positive integer"):
        plan_rank(rs.PeftLoraConfig(target_modules=["layer"]), {"layer": (8, 8)}, budget)


def test_invalid_arguments_are_errors():
    lora = rs.PeftLoraConfig(target_modules=["layer"])
    with pytest.raises(rs.RankshareError, match="No target modules"):
        plan_rank(lora, {}, 100)
    with pytest.raises(rs.RankshareError, match="No methods"):
        plan_all([], {"layer": (8, 8)}, 100)
