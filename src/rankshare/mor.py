"""MoR: mixture of ranks (Tang et al., arXiv 2410.13408).

One LoRA pair A (r, d_in), B (d_out, r) per layer, shared by N experts that only rescale it, mixed by a
per-token softmax router R (N, d_in)::

    ΔW_i = s · diag(b_i) B diag(a_i) A        a_i ∈ R^r  (scale_in[i]),  b_i ∈ R^d_out  (scale_out[i])
    y    = W x + b + Σ_i g_i(x) ΔW_i x,        g(x) = softmax(R x)

Trainable parameters per layer: ``r (d_in + d_out) + N (r + d_out) + N d_in``.

Fast forward (the widest activation is n × N r, never n × N × d_out)::

    h = A x                                   (n, r)
    u_i = g_i(x) · (a_i ⊙ h)                  (n, N, r)
    M = [diag(b_1) B, …, diag(b_N) B]         (d_out, N r), from weights only
    y_adapter = s · u M^T                     (n, d_out)

Init: A as LoRA's, B = 0 (so ΔW = 0), a_i = b_i = 1 (so MoR starts as plain LoRA), a small random router
that breaks the symmetry between experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Recipe, register
from .mixture import MixtureConfig, MixtureLayer, uniform_fan_in


class MorLayer(MixtureLayer):
    """A frozen base layer plus a MoR update."""

    def __init__(self, base_layer: nn.Module, rank: int, num_experts: int, scale: float) -> None:
        super().__init__(base_layer, num_experts, scale)
        self.lora_A = nn.Parameter(uniform_fan_in((rank, self.in_features), self.in_features, self.factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **self.factory))
        self.scale_in = nn.Parameter(torch.ones(num_experts, rank, **self.factory))
        self.scale_out = nn.Parameter(torch.ones(num_experts, self.out_features, **self.factory))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        num_experts, rank = self.scale_in.shape
        hidden = x @ self.lora_A.T  # (..., r)
        gated = self.router_probs(x).unsqueeze(-1) * (hidden.unsqueeze(-2) * self.scale_in)  # (..., N, r)
        # s · [diag(b_1) B, …, diag(b_N) B]ᵀ, from weights only (s folded in here, not into an n × d_out product)
        experts_out = (self.lora_B.T * (self.scale * self.scale_out).unsqueeze(1)).reshape(num_experts * rank, -1)
        return gated.flatten(-2) @ experts_out  # (..., N r) @ (N r, d_out)

    def expert_delta_weights(self) -> torch.Tensor:
        return self.scale * torch.einsum("io,ok,ik,kd->iod", self.scale_out, self.lora_B, self.scale_in, self.lora_A)

    def mixed_lora_factors(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A is shared, so the mixture is a rank-r LoRA: B' = s Σ_i g_i diag(b_i) B diag(a_i) (d_out, r), A' = A.
        mixed = torch.einsum("i,io,ok,ik->ok", gates, self.scale_out, self.lora_B, self.scale_in)
        return self.scale * mixed, self.lora_A


@register
@dataclass
class MorConfig(MixtureConfig):
    """MoR: rank r of the shared LoRA pair, num_experts N scaling experts, alpha (s = alpha / r)."""

    method = "mor"
    title = "MoR"
    layer_class = MorLayer
    recipes = {
        "classify": Recipe(3e-3, "power-minilm-sentiment/mor-n4", {"num_experts": 4}, rank=6),
        "text_to_label": Recipe(3e-3, "power-minilm-sentiment/mor-n4 (classify's: text_to_label not measured)",
                                {"num_experts": 4}),
        "sft": Recipe(3e-3, "multitask-smollm2-skills/mor-n4", {"num_experts": 4}, rank=8),
    }

    def num_trainable_parameters(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Per layer: ``r (d_in + d_out) + N (r + d_out) + N d_in``."""
        r, n = self.rank, self.num_experts
        return sum(r * (d_in + d_out) + n * (r + d_out) + n * d_in for d_out, d_in in shapes.values())
