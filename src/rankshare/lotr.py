"""LoTR: low tensor rank adaptation (Bershatsky et al., arXiv 2402.01376).

The updates of the L layers of one group (e.g. every query projection) form a Tucker-2 tensor
``d_out × L × d_in``: the left and right factors are shared by the group, each layer owns a small core::

    ΔW_l = s · U G_l Vᵀ      U: (d_out, r) shared   V: (d_in, r) shared   G_l: (r, r) layer l

    y = W_l x + b + U ((s V G_lᵀ)ᵀ x)       # ΔW_l is never formed; the widest activation is n × r

Trainable parameters per group: ``r (d_in + d_out) + L r²`` (only ``L r²`` with ``freeze_factors``).

Initialisation keeps ΔW = 0: G = 0 and U, V with orthonormal columns, either random (``init="random"``)
or the leading singular vectors of the mode-1 and mode-3 unfoldings of the stacked frozen weights
(``init="tucker"``, one step of HOSVD). At step 0 only the cores receive gradient; the factors follow.

Many tasks on one basis: with ``basis="news"`` an adapter uses adapter "news"'s U and V (frozen for it) and
trains only its own cores, ``L r²`` per group. In a batch that mixes such adapters, ``Vᵀ x`` and ``U (·)`` are
computed once for all rows; only the r×r core differs per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .config import AdapterConfig, Recipe, register
from .errors import RankshareError
from .layer import AdapterLayer, dense_weight, linear_shape
from .targets import SHARES, group_targets


@register
@dataclass
class LotrConfig(AdapterConfig):
    """LoTR's options beside rank, alpha and target_modules.

    share: ``"by_name"`` — one U, V per group of modules whose names agree once layer indices are masked
        (all ``layers.*.q_proj`` together, as in the paper); ``"by_shape"`` — one U, V for all targets of
        one shape (e.g. query and value together, as in the authors' code); ``"by_module"`` — one U, V per
        module (L = 1): nothing shared across layers, only across the adapters on one basis, as when many LoRAs
        are compressed into one basis per layer.
    init: ``"random"`` (random orthonormal U, V) or ``"tucker"`` (U, V from the frozen weights).
    freeze_factors: train only the cores G_l.
    basis: the name of a LoTR adapter in the same model whose U and V this adapter uses, frozen; it trains
        only its cores, which start at zero (the base model). Its groups and rank must be the basis's.
    """

    method = "lotr"
    title = "LoTR"
    uses_a_basis = True
    recipes = {
        "classify": Recipe(3e-3, "power-minilm-sentiment/lotr-frozen", {"init": "tucker", "freeze_factors": True},
                           rank=88),
        "text_to_label": Recipe(3e-3, "deep-smollm2-sentiment/lotr", {"share": "by_name"}, rank=48),
        "sft": Recipe(3e-3, "deep-smollm2-sentiment/lotr (text_to_label's: sft not measured)", {"share": "by_name"},
                      rank=48),
    }

    share: str = field(default="by_name", metadata={
        "choices": SHARES,
        "help": "one U, V per projection type (by_name), per shape (by_shape) or per module (by_module)"})
    init: str = field(default="random", metadata={"choices": ("random", "tucker"), "help": "init of U and V"})
    freeze_factors: bool = field(default=False, metadata={"help": "train the cores only"})
    # A name inside one model; the command line's --basis takes a trained run instead.
    basis: str | None = field(default=None, metadata={"option": False})

    def validate(self) -> None:
        super().validate()
        if self.basis is not None and not (isinstance(self.basis, str) and self.basis):
            raise RankshareError(f"LotrConfig: basis must be the name of a LoTR adapter, got {self.basis!r}.")

    def basis_name(self) -> str | None:
        return self.basis

    def on_basis(self, basis: str) -> LotrConfig:
        return replace(self, basis=basis)

    def basis_options(self) -> dict[str, object]:
        """An adapter on this one's U and V adapts the same modules, grouped alike, at the same rank."""
        return {"rank": self.rank, "target_modules": self.target_modules, "share": self.share}

    def num_trainable_parameters(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Per group of L layers: ``r (d_in + d_out) + L r²``, or ``L r²`` with frozen or borrowed factors."""
        total = 0
        for names in group_targets(shapes, self.share).values():
            d_out, d_in = shapes[names[0]]
            own_factors = not (self.freeze_factors or self.basis)
            total += len(names) * self.rank**2 + (self.rank * (d_in + d_out) if own_factors else 0)
        return total

    def create_adapters(self, targets: dict[str, nn.Module], basis: dict[str, nn.Module] | None = None
                        ) -> tuple[dict[str, AdapterLayer], dict[str, nn.Module]]:
        grouped = group_targets({n: linear_shape(m) for n, m in targets.items()}, self.share)
        if self.basis is not None:
            return self._layers_on_basis(targets, grouped, basis or {}), {}
        layers, groups = {}, {}
        for key, names in grouped.items():
            bases = [targets[name] for name in names]
            group = LotrGroup(*linear_shape(bases[0]), self.rank, device=bases[0].weight.device)
            if self.init == "tucker":
                group.init_from_weights([dense_weight(base) for base in bases])
            group.requires_grad_(not self.freeze_factors)
            group.members = tuple(names)
            groups[key] = group
            for name, base in zip(names, bases):
                layers[name] = LotrLayer(base, group, self.rank, self.scale)
        return layers, groups

    def _layers_on_basis(self, targets: dict[str, nn.Module], grouped: dict[str, list[str]],
                         basis: dict[str, nn.Module]) -> dict[str, AdapterLayer]:
        found = {key: [list(group.members), group.left.shape[1]] for key, group in basis.items()
                 if isinstance(group, LotrGroup)}
        wanted = {key: [names, self.rank] for key, names in grouped.items()}
        if found != wanted:
            raise RankshareError(
                f"LotrConfig(basis={self.basis!r}) must adapt the modules of its basis, grouped the same way, at the "
                f"same rank: the basis has {_describe(found)}, this config gives {_describe(wanted)}. Use the basis's "
                "target_modules, share and rank."
            )
        layers = {}
        for key, names in grouped.items():
            for name in names:
                layers[name] = LotrLayer(targets[name], basis[key], self.rank, self.scale)
        return layers


def _describe(groups: dict[str, list]) -> str:
    if not groups:
        return "no LoTR groups"
    return "; ".join(f"{key}: {len(names)} modules, rank {rank}" for key, (names, rank) in sorted(groups.items()))


class LotrGroup(nn.Module):
    """The factors one group of layers shares: ``left`` U (d_out, r) and ``right`` V (d_in, r)."""

    def __init__(self, out_features: int, in_features: int, rank: int, device: torch.device | None = None) -> None:
        super().__init__()
        if rank > min(out_features, in_features):
            raise RankshareError(
                f"LoTR rank {rank} exceeds min(d_out, d_in) = {min(out_features, in_features)} of a "
                f"{out_features}×{in_features} layer; choose rank <= {min(out_features, in_features)}."
            )
        self.left = nn.Parameter(_random_orthonormal(out_features, rank, device))
        self.right = nn.Parameter(_random_orthonormal(in_features, rank, device))
        self.members: tuple[str, ...] = ()  # the names of the layers using the group

    @torch.no_grad()
    def init_from_weights(self, weights: list[torch.Tensor]) -> None:
        """U, V := leading singular vectors of the unfoldings of the stacked weights W_l (d_out, d_in).

        The mode-1 unfolding is ``[W_1 … W_L]`` (d_out, L d_in); its left singular vectors are the
        eigenvectors of ``Σ_l W_l W_lᵀ``. The mode-3 unfolding ``[W_1ᵀ … W_Lᵀ]`` gives V from ``Σ_l W_lᵀ W_l``.
        """
        stacked = torch.stack([w.detach().to(torch.float64) for w in weights])  # (L, d_out, d_in)
        rank = self.left.shape[1]
        self.left.copy_(_top_eigenvectors(torch.einsum("loi,lpi->op", stacked, stacked), rank))
        self.right.copy_(_top_eigenvectors(torch.einsum("loi,loj->ij", stacked, stacked), rank))

    def extra_repr(self) -> str:
        return f"out_features={self.left.shape[0]}, in_features={self.right.shape[0]}, rank={self.left.shape[1]}"


class LotrLayer(AdapterLayer):
    """One layer of a LoTR group: owns its ``core`` G (r, r); uses the group's U and V."""

    def __init__(self, base_layer: nn.Module, group: LotrGroup, rank: int, scale: float) -> None:
        super().__init__(base_layer, scale)
        self.core = nn.Parameter(torch.zeros(rank, rank, **self.factory))
        # Not registered as a submodule: the group is owned once by the AdaptedModel, so its tensors are
        # counted, moved and saved once, however many layers use it.
        object.__setattr__(self, "group", group)

    def shared_modules(self) -> list[nn.Module]:
        return [self.group]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.core.requires_grad and not self.group.right.requires_grad:
            # Training cores on a frozen V (cores only, or on a basis): the core's gradient needs only the (n, r)
            # product Vᵀ x, not the (d_in, r) gradient of V Gᵀ that the folded form below would compute.
            return ((x @ self.group.right) @ (self.scale * self.core).T) @ self.group.left.T
        # s · V Gᵀ costs d_in r² and no activation: two token-sized products remain, as in LoRA.
        right_core = self.group.right @ (self.scale * self.core).T  # (d_in, r)
        return (x @ right_core) @ self.group.left.T  # (..., r) -> (..., d_out)

    def batch_key(self) -> object:
        return self.group  # adapters on one basis share V^T x and U (.) in a mixed batch

    @classmethod
    def forward_rows(cls, layers: list[LotrLayer], x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        group = layers[0].group
        cores = torch.stack([layer.scale * layer.core for layer in layers])[choice]  # (B, r, r), row i: s_t G_t
        # (B, ..., r): one product for every row. V as (r, d_in) rows, as a Linear weight: on CPU this thin
        # product runs about twice as fast as x @ V with V's (d_in, r) rows.
        hidden = nn.functional.linear(x, group.right.T.contiguous())
        mixed = (hidden.reshape(len(x), -1, hidden.shape[-1]) @ cores.transpose(1, 2)).reshape(hidden.shape)
        return mixed @ group.left.T  # (B, ..., d_out)

    def lora_factors(self, gates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``B' = U``, ``A' = s G Vᵀ``: one layer of a LoTR group is a rank-r LoRA update, exactly."""
        if gates is not None:
            raise RankshareError("LoTR has no router; merge or export it without gates.")
        return self.group.left, self.scale * self.core @ self.group.right.T


def _random_orthonormal(rows: int, cols: int, device: torch.device | None) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, device=device, dtype=torch.float32))
    return q.contiguous()  # QR's Q is column-major; FSDP and views elsewhere want row-major parameters


def _top_eigenvectors(symmetric: torch.Tensor, count: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(symmetric)  # eigenvalues ascending
    return vectors[:, -count:].flip(-1).to(torch.float32)
