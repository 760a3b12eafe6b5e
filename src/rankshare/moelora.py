"""MoE-LoRA: N independent LoRA experts mixed by a per-token softmax router (MoR's main baseline).

::

    ΔW_i = s · B_i A_i        A_i: (r, d_in)  B_i: (d_out, r)
    y    = W x + b + Σ_i g_i(x) ΔW_i x,        g(x) = softmax(R x),  R: (N, d_in)

Trainable parameters per layer: ``N r (d_in + d_out) + N d_in``.

Forward with all experts in two matmuls (the widest activation is n × N r)::

    h = [A_1; …; A_N] x          (n, N r)
    y_adapter = s · [B_1 … B_N] (g ⊗ 1_r ⊙ h)

Init: each A_i as LoRA's, B_i = 0, a small random router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Recipe, register
from .mixture import MixtureConfig, MixtureLayer, uniform_fan_in


class MoeLoraLayer(MixtureLayer):
    """A frozen base layer plus N routed LoRA experts."""

    def __init__(self, base_layer: nn.Module, rank: int, num_experts: int, scale: float) -> None:
        super().__init__(base_layer, num_experts, scale)
        shape_a = (num_experts, rank, self.in_features)
        self.lora_A = nn.Parameter(uniform_fan_in(shape_a, self.in_features, self.factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank, **self.factory))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        num_experts, rank, _ = self.lora_A.shape
        hidden = x @ self.lora_A.reshape(num_experts * rank, -1).T  # (..., N r)
        gated = self.router_probs(x).unsqueeze(-1) * hidden.unflatten(-1, (num_experts, rank))  # (..., N, r)
        experts_up = (self.scale * self.lora_B).transpose(1, 2).reshape(num_experts * rank, -1)  # s · (N r, d_out)
        return gated.flatten(-2) @ experts_up  # (..., d_out)

    def expert_delta_weights(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A

    def mixed_lora_factors(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # B' = [g_1 B_1 … g_N B_N] (d_out, N r), A' = s [A_1; …; A_N] (N r, d_in): a rank-N r LoRA.
        num_experts, rank, _ = self.lora_A.shape
        up = (gates[:, None, None] * self.lora_B).permute(1, 0, 2).reshape(self.out_features, num_experts * rank)
        return up, self.scale * self.lora_A.reshape(num_experts * rank, -1)


@register
@dataclass
class MoeLoraConfig(MixtureConfig):
    """MoE-LoRA: rank r per expert, num_experts N, alpha (s = alpha / r)."""

    method = "moelora"
    title = "MoE-LoRA"
    layer_class = MoeLoraLayer
    # Chosen on the validation split of the first study's demo, where no recipe applies (docs/RESULTS.md).
    learning_rate = 1e-2
    recipes = {
        "classify": Recipe(3e-3, "power-minilm-sentiment/moelora-n4", {"num_experts": 4}, rank=2),
        "text_to_label": Recipe(3e-3, "power-minilm-sentiment/moelora-n4 (classify's: text_to_label not measured)",
                                {"num_experts": 4}),
        "sft": Recipe(1e-2, "multitask-smollm2-skills/moelora-n4", {"num_experts": 4}, rank=2),
    }

    def num_trainable_parameters(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Per layer: ``N r (d_in + d_out) + N d_in``."""
        r, n = self.rank, self.num_experts
        return sum(n * r * (d_in + d_out) + n * d_in for d_out, d_in in shapes.values())
