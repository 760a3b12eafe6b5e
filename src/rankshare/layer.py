"""What every method's layer shares (``AdapterLayer``): one low-rank update ``s · ΔW x`` of one frozen base layer.

Base layers come in two storage layouts, and this file is the only place that knows them:
``torch.nn.Linear`` keeps its weight as ``(d_out, d_in)``; GPT-2's ``transformers.pytorch_utils.Conv1D``
keeps it as ``(d_in, d_out)``. Adapters always speak ``(d_out, d_in)``.
"""

from __future__ import annotations

import sys

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
    """One method's low-rank update of one base layer: ``s · ΔW x``, computed without forming ΔW.

    Subclasses implement ``adapter_forward(x)`` (returns ``s · ΔW x``, the fast path) and ``lora_factors(gates)``
    (the update as a LoRA pair ``B' A' = s · ΔW``): merging (``delta_weight``) and export to PEFT follow from it.
    Tensors are created in float32 on the base layer's device (``factory``).
    The base layer is referenced, not owned: in a model it belongs to the ``AdaptedLinear`` that holds this
    update beside other adapters' updates. Called alone, the layer computes ``base_layer(x) + s · ΔW x``.
    """

    def __init__(self, base_layer: nn.Module, scale: float) -> None:
        super().__init__()
        self.out_features, self.in_features = linear_shape(base_layer)
        object.__setattr__(self, "base_layer", base_layer)  # not a submodule: never saved or counted here
        self.scale = scale

    @property
    def factory(self) -> dict:
        """Keyword arguments that put a new adapter tensor beside the base weight, in float32."""
        return {"device": self.base_layer.weight.device, "dtype": torch.float32}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the update is computed in: this layer's own tensors' (the base's is another matter); float32
        for a layer that owns none."""
        own = next(self.parameters(), None)
        return torch.float32 if own is None else own.dtype

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lora_factors(self, gates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')``, (d_out, r') and (r', d_in), with ``B' A' = s · ΔW``: the update as a plain LoRA pair."""
        raise RankshareError(f"{type(self).__name__} gives no lora_factors (its update as a LoRA pair), so it can "
                             "be neither merged nor exported; implement lora_factors(gates).")

    def delta_weight(self, gates: torch.Tensor | None = None) -> torch.Tensor:
        """``s · ΔW`` as ``(d_out, d_in)``, for merging: ``B' A'`` of ``lora_factors``."""
        up, down = self.lora_factors(gates)
        return up @ down

    def shared_modules(self) -> list[nn.Module]:
        """Modules this layer uses but does not own (they are owned once by the ``AdaptedModel``)."""
        return []

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this layer owns."""
        return dict(self.named_parameters())

    def update(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``s · ΔW x`` computed in this layer's dtype and returned in ``like``'s."""
        return self.adapter_forward(x.to(self.dtype)).to(like.dtype)

    def batch_key(self) -> object | None:
        """Layers with the same key (not None) compute a mixed batch together, in one ``forward_rows`` call."""
        return None

    @classmethod
    def forward_rows(cls, layers: list[AdapterLayer], x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """``s · ΔW x`` where row i of ``x`` goes through ``layers[choice[i]]`` (layers of one ``batch_key``)."""
        out = None
        for index, layer in enumerate(layers):
            rows = (choice == index).nonzero().squeeze(1)
            part = layer.adapter_forward(x[rows])
            out = part.new_zeros((x.shape[0], *part.shape[1:])) if out is None else out
            out.index_copy_(0, rows, part)
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        return out + self.update(x, out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}"
