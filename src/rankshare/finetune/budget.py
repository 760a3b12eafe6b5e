"""Choose each method's rank so that its trainable adapter parameters come closest to a budget.

Trainable adapter parameters (the head excluded) for targets of shape ``d_out × d_in``, N experts, and
L layers in a LoTR group (the docstrings of lotr.py, mor.py and moelora.py)::

    LoRA       r (d_in + d_out)                            per layer
    LoTR       r (d_in + d_out) + L r²                     per group (only L r² with frozen factors)
    MoR        r (d_in + d_out) + N (r + d_out) + N d_in   per layer
    MoE-LoRA   N r (d_in + d_out) + N d_in                 per layer

Every count grows strictly with r, so the rank closest to a budget is found by bisection. The mixtures
have a floor that no rank removes (both routers' N d_in, MoR's N d_out output scales), and every method a
ceiling at the largest useful rank, so a budget can be out of a method's reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import RankshareError
from ..targets import group_targets

METHODS = ("lora", "lotr", "mor", "moelora")

# A plan may miss its budget by at most this fraction of it; a method that cannot get closer is not
# compared at that budget, since it would be compared at a different size.
TOLERANCE = 0.5


def adapter_parameters(
    method: str,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    *,
    num_experts: int = 8,
    share: str = "by_name",
    freeze_factors: bool = False,
) -> int:
    """Exact trainable adapter parameters (head excluded) for targets name -> (d_out, d_in).

    LoRA counts as PEFT's LoRA without bias; ``num_experts`` applies to MoR and MoE-LoRA only, ``share``
    and ``freeze_factors`` to LoTR only (LoTR groups come from ``rankshare.targets.group_targets``).
    """
    _check_arguments(method, shapes, num_experts, share)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RankshareError(f"rank must be an integer >= 1, got {rank!r}.")
    n = num_experts
    if method == "lotr":
        total = 0
        for names in group_targets(shapes, share).values():
            d_out, d_in = shapes[names[0]]
            total += len(names) * rank * rank + (0 if freeze_factors else rank * (d_in + d_out))
        return total
    if method == "lora":
        return sum(rank * (d_in + d_out) for d_out, d_in in shapes.values())
    if method == "mor":
        return sum(rank * (d_in + d_out) + n * (rank + d_out) + n * d_in for d_out, d_in in shapes.values())
    return sum(n * rank * (d_in + d_out) + n * d_in for d_out, d_in in shapes.values())


def max_rank(shapes: dict[str, tuple[int, int]]) -> int:
    """The largest useful rank: min(d_out, d_in) over all targets.

    A LoTR group holds targets of one shape, so the minimum over groups is the same number.
    """
    if not shapes:
        raise RankshareError("No target modules given; name the layers to adapt.")
    return min(min(d_out, d_in) for d_out, d_in in shapes.values())


@dataclass
class Plan:
    """One method's rank for a budget; ``rank`` and ``parameters`` are None when the budget is out of reach."""

    method: str
    rank: int | None
    parameters: int | None
    budget: int
    note: str

    @property
    def reachable(self) -> bool:
        return self.rank is not None


def plan_rank(
    method: str,
    shapes: dict[str, tuple[int, int]],
    budget: int,
    *,
    num_experts: int = 8,
    share: str = "by_name",
    freeze_factors: bool = False,
) -> Plan:
    """The rank whose count is closest to ``budget`` (ties go to the smaller count), 1 <= rank <= max rank.

    A method whose closest count still misses the budget by more than ``TOLERANCE`` of it cannot reach the
    budget: the plan then has no rank, and its note says which count comes closest.
    """
    _check_budget(budget)
    _check_arguments(method, shapes, num_experts, share)

    def count(rank: int) -> int:
        return adapter_parameters(
            method, shapes, rank, num_experts=num_experts, share=share, freeze_factors=freeze_factors
        )

    top = max_rank(shapes)
    low, high = 1, top  # find the smallest rank whose count reaches the budget, or the top rank
    while low < high:
        middle = (low + high) // 2
        if count(middle) >= budget:
            high = middle
        else:
            low = middle + 1
    rank = low
    if rank > 1 and budget - count(rank - 1) <= count(rank) - budget:
        rank -= 1
    parameters = count(rank)
    if abs(parameters - budget) <= TOLERANCE * budget:
        note = f"rank {rank} gives {parameters:,} ({_relative(parameters, budget)})"
        return Plan(method, rank, parameters, budget, note)

    if rank == 1 and parameters > budget:
        why = f"its smallest adapter (rank 1) has {parameters:,} parameters ({_relative(parameters, budget)})"
    elif rank == top and parameters < budget:
        why = f"its largest adapter (rank {top}) has {parameters:,} parameters ({_relative(parameters, budget)})"
    else:
        below, above = (rank, rank + 1) if parameters < budget else (rank - 1, rank)
        why = f"rank {below} gives {count(below):,} and rank {above} gives {count(above):,}"
    return Plan(method, None, None, budget, f"cannot reach {budget:,}: {why}")


def plan_all(methods: Sequence[str], shapes: dict[str, tuple[int, int]], budget: int, **kwargs) -> list[Plan]:
    """``plan_rank`` for each method, in order; an error if no method can reach the budget."""
    if not methods:
        raise RankshareError(f"No methods to plan; choose some of {list(METHODS)}.")
    plans = [plan_rank(method, shapes, budget, **kwargs) for method in methods]
    if not any(plan.reachable for plan in plans):
        top = max_rank(shapes)
        ranges = "; ".join(
            f"{method} {adapter_parameters(method, shapes, 1, **kwargs):,}–"
            f"{adapter_parameters(method, shapes, top, **kwargs):,}"
            for method in methods
        )
        raise RankshareError(
            f"No method can come within {100 * TOLERANCE:.0f} % of a budget of {budget:,} adapter parameters on these "
            f"{len(shapes)} target modules. Counts from rank 1 to rank {top}: {ranges}. "
            "Choose a budget inside one of these ranges, or other target modules."
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


def _check_arguments(method: str, shapes: dict[str, tuple[int, int]], num_experts: int, share: str) -> None:
    if method not in METHODS:
        raise RankshareError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
    max_rank(shapes)  # refuses an empty set of targets
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise RankshareError(f"num_experts must be an integer >= 1, got {num_experts!r}.")
    if share not in ("by_name", "by_shape"):
        raise RankshareError(f"share must be 'by_name' or 'by_shape', got {share!r}.")
