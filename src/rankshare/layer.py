"""What every adapter layer shares: it wraps a frozen linear layer and adds ``s · ΔW x`` to its output.

Base layers come in two storage layouts, and this file is the only place that knows them:
``torch.nn.Linear`` keeps its weight as ``(d_out, d_in)``; GPT-2's ``transformers.pytorch_utils.Conv1D``
keeps it as ``(d_in, d_out)``. Adapters always speak ``(d_out, d_in)``.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from .errors import RankshareError


def _conv1d_class() -> type | None:
    # A model can only hold a Conv1D if transformers is already imported, so never import it here.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported base layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.nf, module.nx
    raise RankshareError(
        f"{type(module).__name__} is not a supported base layer; rankshare adapts torch.nn.Linear and "
        "transformers' Conv1D. Choose target_modules that name linear layers."
    )


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as ``(d_out, d_in)`` (a view, not a copy)."""
    linear_shape(module)  # refuses unsupported types
    return module.weight.T if is_conv1d(module) else module.weight


class AdapterLayer(nn.Module):
    """A frozen base layer plus a low-rank update: ``y = base_layer(x) + s · ΔW x``.

    Subclasses implement ``adapter_forward(x)`` (returns ``s · ΔW x`` without forming ΔW) and
    ``delta_weight(gates)`` (returns ``s · ΔW`` as ``(d_out, d_in)``). Adapter parameters are created in
    float32 on the base layer's device; inputs are cast to their dtype and the update back to the output's.
    """

    def __init__(self, base_layer: nn.Module, scale: float) -> None:
        super().__init__()
        self.out_features, self.in_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.scale = scale
        self.merged = False
        self._merged_gates: torch.Tensor | None = None

    @property
    def factory(self) -> dict:
        """Keyword arguments that put a new adapter tensor beside the base weight, in float32."""
        return {"device": self.base_layer.weight.device, "dtype": torch.float32}

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, gates: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def shared_modules(self) -> list[nn.Module]:
        """Modules this layer uses but does not own (they are owned once by the ``AdaptedModel``)."""
        return []

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this layer owns, the frozen base layer's excluded."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("base_layer.")}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        adapter_dtype = next(iter(self._parameters.values())).dtype  # this layer's own tensors, not the base's
        return out + self.adapter_forward(x.to(adapter_dtype)).to(out.dtype)

    @torch.no_grad()
    def merge(self, gates: torch.Tensor | None = None, safe: bool = False) -> None:
        """Fold ``s · ΔW`` into the base weight, in place.

        ``safe=True`` forms the merged weight aside first and refuses, leaving the weight untouched, if it
        holds NaN or inf: a diverged adapter, or an update that overflows the base weight's dtype.
        """
        if self.merged:
            warnings.warn("This adapter layer is already merged; nothing to do.", stacklevel=2)
            return
        dense_weight(self.base_layer).copy_(self.merged_weight(gates, safe))
        self.merged, self._merged_gates = True, gates

    @torch.no_grad()
    def merged_weight(self, gates: torch.Tensor | None = None, safe: bool = False) -> torch.Tensor:
        """``W + s · ΔW`` as (d_out, d_in), formed aside; ``safe`` refuses NaN or inf in it (nothing changes)."""
        weight = dense_weight(self.base_layer)
        merged = weight + self.delta_weight(gates).to(weight)
        if safe and not torch.isfinite(merged).all():
            raise RankshareError(
                f"Merging this {self.out_features}×{self.in_features} adapter layer would put NaN or inf into its "
                f"{weight.dtype} base weight (the update s·ΔW is not finite, or overflows {weight.dtype}); the "
                "weight is unchanged. Retrain or reload a finite adapter, or merge into a wider dtype."
            )
        return merged

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ``s · ΔW`` back out of the base weight."""
        if not self.merged:
            warnings.warn("This adapter layer is not merged; nothing to do.", stacklevel=2)
            return
        weight = dense_weight(self.base_layer)
        weight -= self.delta_weight(self._merged_gates).to(weight)
        self.merged, self._merged_gates = False, None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}"
