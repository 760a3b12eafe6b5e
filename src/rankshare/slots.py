"""Where a model holds its adapters: a base layer with named updates (``AdaptedLinear``) and a module trained whole
with one copy per adapter (``SavedModule``). One adapter is active, or, in a mixed batch (``MixedRows``), each row
of the batch has its own.

Nothing here knows a method's math: every update answers the ``AdapterLayer`` interface.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .errors import RankshareError
from .layer import dense_weight, linear_shape


class MixedRows:
    """The adapter of each row of a mixed batch (``"__base__"``: none), as index tensors per adapter name.

    A layer must receive exactly one row per example, batch first, or ``expansion`` rows per example where the
    caller declares them (generation with beams or several sequences per prompt gives each name ``expansion``
    consecutive rows, as ``repeat_interleave`` does). Any other row count cannot be told apart from a batch
    whose rows are not examples (sequence-first inputs, a gathered subset of tokens), so it is refused.
    """

    BASE = "__base__"

    def __init__(self, names: list[str], expansion: int = 1) -> None:
        self.names = list(names)
        self.expansion = expansion
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def groups(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``{adapter name: rows}`` for a batch of ``batch_size`` rows, "__base__" left out."""
        if batch_size != len(self.names) * self.expansion:
            expected = f"{len(self.names)}" + (f" × {self.expansion}" if self.expansion > 1 else "")
            raise RankshareError(
                f"adapter_names gives {len(self.names)} names, so each adapted layer must receive {expected} rows, "
                f"batch first; one received {batch_size} rows. A mixed batch needs layers whose inputs have one row "
                "per example: a layer fed sequence-first inputs or a subset of the tokens cannot be mixed. Run such "
                "a model with one adapter active at a time (set_adapter)."
            )
        if device not in self._cache:
            rows: dict[str, list[int]] = {}
            for row in range(batch_size):
                rows.setdefault(self.names[row // self.expansion], []).append(row)
            rows.pop(self.BASE, None)
            self._cache[device] = {name: torch.tensor(r, device=device) for name, r in rows.items()}
        return self._cache[device]


class AdaptedLinear(nn.Module):
    """A frozen base layer with named adapters: ``y = base_layer(x) + s · ΔW_active x``.

    ``active`` names the adapter in use (None: the base layer alone); ``merged`` the adapter folded into the
    base weight, if any. While ``rows`` is set (a mixed batch), each row gets its own adapter's update
    instead, and rows whose adapter does not adapt this layer get the base output.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        linear_shape(base_layer)  # refuses unsupported types
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.rows: MixedRows | None = None
        self.merged: str | None = None
        self._merged_gates: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.rows is not None:
            return out + self._mixed_update(x, out)
        if self.disabled or self.merged is not None or self.active not in self.adapters:
            return out
        return out + self.adapters[self.active].update(x, out)

    def _mixed_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # Adapters with one batch key (LoTR adapters on one basis) run together; each other adapter on its rows.
        groups = self.rows.groups(x.shape[0], x.device)
        together: dict[object, list[str]] = {}
        for name in groups:
            if name in self.adapters:
                key = self.adapters[name].batch_key()
                together.setdefault(("key", key) if key is not None else ("name", name), []).append(name)
        update = torch.zeros_like(out)
        for names in together.values():
            layers = [self.adapters[name] for name in names]
            rows, order = torch.cat([groups[name] for name in names]).sort()
            choice = torch.cat([torch.full_like(groups[name], i) for i, name in enumerate(names)])[order]
            whole = len(rows) == len(x)  # every row, in batch order: the only group, so no gather and no scatter
            inputs = (x if whole else x[rows]).to(layers[0].dtype)
            part = (layers[0].adapter_forward(inputs) if len(layers) == 1 else type(layers[0]).forward_rows(
                layers, inputs, choice)).to(out.dtype)
            if whole:
                return part
            update.index_add_(0, rows, part)
        return update

    @torch.no_grad()
    def merged_weight(self, name: str, gates: torch.Tensor | None = None, safe: bool = False) -> torch.Tensor:
        """``W + s · ΔW`` of adapter ``name`` as (d_out, d_in), formed aside; ``safe`` refuses NaN or inf in it.

        The sum is formed in the wider of the two dtypes and rounded once to the base weight's: for a bfloat16 or
        float16 base, ``(W.float() + s · ΔW).to(W.dtype)``. Rounding ``s · ΔW`` to the base dtype before adding
        would round twice, and lose ΔW entirely wherever it cancels W.
        """
        weight = dense_weight(self.base_layer)
        merged = _add_rounded_once(weight, self.adapters[name].delta_weight(gates))
        if safe and not torch.isfinite(merged).all():
            raise RankshareError(
                f"Merging this {weight.shape[0]}×{weight.shape[1]} adapter layer would put NaN or inf into its "
                f"{weight.dtype} base weight (the update s·ΔW is not finite, or overflows {weight.dtype}); the "
                "weight is unchanged. Retrain or reload a finite adapter, or merge into a wider dtype."
            )
        return merged

    @torch.no_grad()
    def merge(self, gates: torch.Tensor | None = None, safe: bool = False) -> None:
        """Fold the active adapter's ``s · ΔW`` into the base weight, in place (``safe``: see ``merged_weight``)."""
        if self.merged is not None:
            warnings.warn(f"Adapter {self.merged!r} is already merged into this layer; nothing to do.", stacklevel=2)
            return
        if self.active not in self.adapters:
            return
        dense_weight(self.base_layer).copy_(self.merged_weight(self.active, gates, safe))
        self.merged, self._merged_gates = self.active, gates

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update back out of the base weight, by subtraction (no copy of W is kept).

        In float32 this restores W to float32 rounding. In bfloat16 or float16 the merge rounded ``W + s · ΔW`` to
        the base dtype, so the subtraction (formed in float32, rounded once) gives back W to within one unit in
        the last place of the merged weight, not bit for bit; most elements come back exactly.
        """
        if self.merged is None:
            return
        weight = dense_weight(self.base_layer)
        weight.copy_(_add_rounded_once(weight, -self.adapters[self.merged].delta_weight(self._merged_gates)))
        self.merged, self._merged_gates = None, None

    def extra_repr(self) -> str:
        return f"active={self.active!r}" + (f", merged={self.merged!r}" if self.merged else "")


def _add_rounded_once(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta`` formed in the wider dtype of the two, rounded once to ``weight``'s dtype."""
    wide = torch.promote_types(weight.dtype, delta.dtype)
    return (weight.to(wide) + delta.to(weight.device, wide)).to(weight.dtype)


class SavedModule(nn.Module):
    """A module that trains whole beside the adapters (e.g. a classification head): each adapter has its own copy.

    ``original`` is the base model's module, used with no adapter active, inside ``disable_adapter()``, and for
    rows of a mixed batch whose adapter has no copy. Copies are float32, as the adapters are: an optimizer's
    moments of a float16 tensor underflow (g² below 6e-8 is 0, and eps = 1e-8 rounds to 0) and its steps
    become inf. A copy's floating inputs are cast to float32 and its outputs back to the original's dtype.
    In a mixed batch each copy gets its rows of every argument with one row per example, and outputs whose last
    dimension differs (heads over different label sets) are padded to the widest with -inf: a label a head lacks
    is impossible.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.rows: MixedRows | None = None

    def add_copy(self, name: str) -> nn.Module:
        self.copies[name] = copy.deepcopy(self.original).to(torch.float32)  # floating tensors only
        return self.copies[name]

    def copy_as_original(self, name: str) -> nn.Module:
        """Adapter ``name``'s copy, cast (in place) to the original's floating dtype: for a merged model."""
        dtype = _floating_dtype(self.original)
        return self.copies[name] if dtype is None else self.copies[name].to(dtype)

    def __getattr__(self, name: str):
        # Code that reads e.g. ``model.score.weight`` finds the module in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "copies"):
                raise
            return getattr(self.current(), name)

    def current(self) -> nn.Module:
        return self.original if self.disabled or self.active not in self.copies else self.copies[self.active]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.rows is None:
            return self._call(self.current(), x, *args, **kwargs)
        groups = self.rows.groups(x.shape[0], x.device)
        parts = [(rows, self._call_rows(self.copies[name], rows, x, args, kwargs)) for name, rows in groups.items()
                 if name in self.copies]
        covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for rows, _ in parts:
            covered[rows] = True
        if not covered.all():
            rest = (~covered).nonzero().squeeze(1)
            parts.append((rest, self._call_rows(self.original, rest, x, args, kwargs)))
        width = max(part.shape[-1] for _, part in parts)
        first = parts[0][1]
        out = first.new_full((x.shape[0], *first.shape[1:-1], width), -torch.inf)
        for rows, part in parts:
            out[rows, ..., : part.shape[-1]] = part
        return out

    def _call_rows(self, module: nn.Module, rows: torch.Tensor, x: torch.Tensor, args: tuple, kwargs: dict):
        """``module`` on ``rows`` of ``x`` and of every argument with one row per example."""
        def pick(value):
            return value[rows] if isinstance(value, torch.Tensor) and value.dim() and len(value) == len(x) else value

        return self._call(module, x[rows], *map(pick, args), **{k: pick(v) for k, v in kwargs.items()})

    def _call(self, module: nn.Module, *args, **kwargs):
        """``module(*args, **kwargs)`` in the module's own floating dtype, returned in the original's."""
        own, wanted = _floating_dtype(module), _floating_dtype(self.original)
        if own is None or wanted is None or own == wanted:
            return module(*args, **kwargs)
        out = module(*(_cast(a, own) for a in args), **{k: _cast(v, own) for k, v in kwargs.items()})
        return _cast(out, wanted)


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _cast(value, dtype: torch.dtype):
    """A floating tensor in ``dtype``; anything else as it is."""
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
