"""Choose each method's rank so that its trainable adapter parameters fit a budget.

Each method counts its own parameters (``AdapterConfig.num_trainable_parameters``, the closed form in its
file). A plan may exceed its budget by at most 5 % and fall short of it by at most 10 %. Every count grows
strictly with the rank, so the two ranks around a budget are found by bisection, and the one closer to the
budget among those that fit is chosen. Where one rank step is too coarse (MoE-LoRA: one more rank adds
N (d_in + d_out) per layer), the planner tries the values the method offers for its ``budget_alternatives`` (the
number of experts), nearest to the asked one first, and says so in the plan; a method that still cannot
fit is left out, and its note names the nearest budget it could meet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import AdapterConfig
from ..errors import RankshareError

OVER, UNDER = 0.05, 0.10  # a plan's count lies in [budget (1 − UNDER), budget (1 + OVER)]
WINDOW = f"−{100 * UNDER:.0f} %/+{100 * OVER:.0f} %"


def fits(parameters: int, budget: int) -> bool:
    # In integers: 0.9 B <= n <= 1.05 B.
    return 10 * parameters >= 9 * budget and 20 * parameters <= 21 * budget


def max_rank(shapes: dict[str, tuple[int, int]]) -> int:
    """The largest useful rank: min(d_out, d_in) over all targets."""
    if not shapes:
        raise RankshareError("No target modules given; name the layers to adapt.")
    return min(min(d_out, d_in) for d_out, d_in in shapes.values())


@dataclass
class Plan:
    """One method's rank (and options) for a budget; ``rank`` is None when the method is left out."""

    method: str
    rank: int | None
    options: dict[str, Any]
    parameters: int | None
    budget: int
    note: str
    nearest_budget: int | None = None  # for a method left out: the nearest budget it could meet

    @property
    def reachable(self) -> bool:
        return self.rank is not None


def neighbouring_ranks(config: AdapterConfig, shapes: dict[str, tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """``(rank, count)`` of the largest rank below the budget and the smallest at or above it (one may be missing)."""
    def count(rank: int) -> int:
        return dataclasses.replace(config, rank=rank).num_trainable_parameters(shapes)

    top = max_rank(shapes)
    low, high = 1, top  # the smallest rank whose count reaches the budget, or the top rank
    while low < high:
        middle = (low + high) // 2
        if count(middle) >= budget:
            high = middle
        else:
            low = middle + 1
    found = count(low)
    if found < budget:  # even the top rank is below the budget
        return [(low, found)]
    return ([(low - 1, count(low - 1))] if low > 1 else []) + [(low, found)]


def closest_rank(config: AdapterConfig, shapes: dict[str, tuple[int, int]], budget: int) -> tuple[int, int]:
    """``(rank, count)`` closest to ``budget`` whether it fits or not (ties go to the smaller count)."""
    _check_budget(budget)
    return min(neighbouring_ranks(config, shapes, budget), key=lambda pair: abs(pair[1] - budget))


def plan_rank(config: AdapterConfig, shapes: dict[str, tuple[int, int]], budget: int, vary: bool = True) -> Plan:
    """The rank (and, with ``vary``, the alternative option values) that fit ``budget``; see the module's doc."""
    _check_budget(budget)
    method = config.method
    candidates = [config]
    if vary:
        for name, values in config.budget_alternatives.items():
            asked = getattr(config, name)
            others = sorted((v for v in values if v != asked), key=lambda v: (abs(v - asked), v))
            candidates += [dataclasses.replace(config, **{name: value}) for value in others]
    rank, parameters = closest_rank(config, shapes, budget)
    closest = f"rank {rank} gives {parameters:,}, {_relative(parameters, budget)}"
    for candidate in candidates:
        fitting = [(r, n) for r, n in neighbouring_ranks(candidate, shapes, budget) if fits(n, budget)]
        if not fitting:
            continue
        rank, parameters = min(fitting, key=lambda pair: abs(pair[1] - budget))
        note = f"rank {rank} gives {parameters:,} ({_relative(parameters, budget)})"
        if candidate is not config:
            changed = [k for k, v in candidate.option_values().items() if v != getattr(config, k)]
            chosen = ", ".join(f"{k}={getattr(candidate, k)}" for k in changed)
            asked = ", ".join(f"{k}={getattr(config, k)}" for k in changed)
            note = (f"rank {rank} with {chosen} gives {parameters:,} ({_relative(parameters, budget)}); with {asked} "
                    f"no rank fits {WINDOW} ({closest})")
        return Plan(method, rank, candidate.option_values(), parameters, budget, note)
    tried = f", nor with any of {_alternatives(config)}" if len(candidates) > 1 else ""
    nearest = nearest_budget(candidates, shapes, budget)
    note = (f"left out: no rank fits {WINDOW} of {budget:,} ({closest}){tried}; the nearest budget it can meet is "
            f"{nearest:,}")
    return Plan(method, None, config.option_values(), None, budget, note, nearest)


def _alternatives(config: AdapterConfig) -> str:
    return ", ".join(f"{name}={min(values)}–{max(values)}" for name, values in config.budget_alternatives.items())


def nearest_budget(configs: Sequence[AdapterConfig], shapes: dict[str, tuple[int, int]], budget: int) -> int:
    """The budget nearest to ``budget`` that one of ``configs`` fits at some rank.

    A count n fits the budgets from n / 1.05 to n / 0.9; the nearest of these lies next to a neighbouring rank.
    """
    best = None
    for config in configs:
        for _, n in neighbouring_ranks(config, shapes, budget):
            edge = (10 * n) // 9 if n < budget else -(-20 * n // 21)  # the end of n's range nearest the budget
            if best is None or abs(edge - budget) < abs(best - budget):
                best = edge
    return best


def plan_all(configs: Sequence[AdapterConfig], shapes: dict[str, tuple[int, int]], budget: int) -> list[Plan]:
    """``plan_rank`` for each config, in order; an error if no method can fit the budget."""
    if not configs:
        raise RankshareError("No methods to plan; choose some of rankshare.methods().")
    plans = [plan_rank(config, shapes, budget) for config in configs]
    if not any(plan.reachable for plan in plans):
        nearest = ", ".join(f"{plan.method} {plan.nearest_budget:,}" for plan in plans)
        raise RankshareError(
            f"No method fits a budget of {budget:,} adapter parameters ({WINDOW}) on these {len(shapes)} target "
            f"modules; the nearest budgets each can meet: {nearest}. Choose one of these, or other target modules."
        )
    return plans


def _relative(parameters: int, budget: int) -> str:
    if parameters == budget:
        return "exactly the budget"
    percent = 100 * (parameters - budget) / budget
    return f"{'+' if percent > 0 else '−'}{abs(percent):.1f} % of budget"


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise RankshareError(f"The parameter budget must be a positive integer, got {budget!r}.")
