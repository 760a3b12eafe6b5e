"""What MoR and MoE-LoRA share: N experts mixed per token by a softmax router ``g(x) = softmax(R x)``.

A mixture layer computes ``y = W x + b + Σ_i g_i(x) · ΔW_i x``. Because the gates depend on x, the mixture
merges into W only for a fixed gate vector (e.g. one task's mean routing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .config import AdapterConfig
from .errors import RankshareError
from .layer import AdapterLayer


@dataclass
class MixtureConfig(AdapterConfig):
    """num_experts: the number N of experts the router mixes."""

    merge_needs_gates = True
    # One more expert changes a mixture's count by a step that one rank may not match: the planner may try these.
    budget_alternatives = {"num_experts": tuple(range(2, 9))}
    layer_class: ClassVar[type[MixtureLayer]]

    num_experts: int = field(default=8, metadata={"help": "experts N the router mixes", "min": 1})

    def create_adapters(self, targets: dict[str, nn.Module]) -> tuple[dict[str, AdapterLayer], dict[str, nn.Module]]:
        return {name: self.layer_class(base, self.rank, self.num_experts, self.scale)
                for name, base in targets.items()}, {}


class MixtureLayer(AdapterLayer):
    """An adapter layer with a bias-free ``router`` R (N, d_in).

    The router starts small and random (as ``nn.Linear`` does): a zero router gives every expert the same
    gate and, in MoR, identical gradients forever.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, scale: float) -> None:
        super().__init__(base_layer, scale)
        self.num_experts = num_experts
        self.router = nn.Parameter(uniform_fan_in((num_experts, self.in_features), self.in_features, self.factory))

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The gates g(x), shape ``(..., N)``, summing to one over experts."""
        return torch.softmax(x.to(self.router.dtype) @ self.router.T, dim=-1)

    def expert_delta_weights(self) -> torch.Tensor:
        """``s · ΔW_i`` for every expert, shape ``(N, d_out, d_in)``."""
        raise NotImplementedError

    def lora_factors(self, gates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The constant mixture ``Σ_i gates_i · s · ΔW_i`` as one LoRA pair ``B' A'``."""
        if gates is None:
            raise RankshareError(
                f"{type(self).__name__}'s update depends on each token's router gates, so it cannot be merged "
                f"or exported as is. Pass gates= a vector of {self.num_experts} weights (e.g. one task's mean "
                "routing) to use that constant mixture."
            )
        gates = torch.as_tensor(gates, dtype=self.router.dtype, device=self.router.device)
        if gates.shape != (self.num_experts,) or not torch.isfinite(gates).all():
            raise RankshareError(
                f"gates must be {self.num_experts} finite numbers (one per expert), got shape {tuple(gates.shape)}."
            )
        return self.mixed_lora_factors(gates)

    def mixed_lora_factors(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')`` with ``B' A' = Σ_i gates_i · s · ΔW_i``, without forming the N updates one by one."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_experts={self.num_experts}"


def uniform_fan_in(shape: tuple[int, ...], fan_in: int, factory: dict) -> torch.Tensor:
    """U(-1/√fan_in, 1/√fan_in): nn.Linear's default init (Kaiming-uniform with a = √5), as LoRA's A uses."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape, **factory).uniform_(-bound, bound)
