"""Compress a PEFT LoRA adapter into LoTR: one Tucker-2 fit per group of layers, from the LoRA factors alone.

The L layers of a group (as LoTR groups them, ``share``) hold LoRA updates ``ΔW_l = s_l B_l A_l`` with
``B_l: (d_out, r_l)``, ``A_l: (r_l, d_in)`` (GPT-2's Conv1D too: PEFT's fan_in_fan_out transposes the base
weight, not the factors) and ``s_l = alpha_l / r_l`` (``alpha_l / sqrt(r_l)`` with rsLoRA; r_l and alpha_l per
module with PEFT's rank_pattern and alpha_pattern). The fit, in float64::

    ΔW_l ≈ U G_l Vᵀ       U: (d_out, r), V: (d_in, r) orthonormal, shared;   G_l: (r, r), layer l

- HOSVD: U = the leading r eigenvectors of ``Σ_l ΔW_l ΔW_lᵀ = Σ_l s_l² B_l (A_l A_lᵀ) B_lᵀ``, V those of
  ``Σ_l ΔW_lᵀ ΔW_l = Σ_l s_l² A_lᵀ (B_lᵀ B_l) A_l``.
- HOOI sweeps, while the error falls: U from ``Σ_l (ΔW_l V)(ΔW_l V)ᵀ``, then V from ``Σ_l (ΔW_lᵀ U)(ΔW_lᵀ U)ᵀ``,
  with ``ΔW_l V = s_l B_l (A_l V)`` and ``ΔW_lᵀ U = s_l A_lᵀ (B_lᵀ U)`` formed from the factors.
- Cores by least squares: ``G_l = Uᵀ ΔW_l V = s_l (Uᵀ B_l)(A_l V)``.
- Error: U and V are orthonormal, so ``‖ΔW_l − U G_l Vᵀ‖² = ‖ΔW_l‖² − ‖G_l‖²`` with
  ``‖ΔW_l‖² = s_l² tr((B_lᵀ B_l)(A_l A_lᵀ))``; the relative error ``sqrt(Σ_l ‖ΔW_l − U G_l Vᵀ‖² / Σ_l ‖ΔW_l‖²)``
  needs no d_out × d_in matrix.

Every ΔW_l writes into span(B_1 … B_L) and reads from span(A_1ᵀ … A_Lᵀ), so the fit runs in orthonormal bases of
these two spans: no eigenproblem is wider than max(r, Σ_l r_l) (nor than d), and no ΔW_l is ever formed. The
unfoldings have rank ≤ Σ_l r_l, so r = Σ_l r_l (≤ d) reproduces the LoRA exactly.

The LoTR adapter has scale s = 1 (alpha = r): the cores carry the LoRA scales. Parameters per group: LoRA
``Σ_l r_l (d_in + d_out)``, LoTR ``r (d_in + d_out) + L r²``.

Many LoRAs (``compress_loras``): the k adapters' k·L updates of a group are one tensor ``d_out × kL × d_in``, fitted
as above with one U and V for all of them; task t's cores are ``G_{t,l} = Uᵀ ΔW_{t,l} V``. ``compress_lora`` is the
case k = 1, whose adapter keeps U and V as its own.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from torch import nn

from .errors import RankshareError
from .export import PEFT_PREFIX
from .layer import is_supported, linear_shape
from .lotr import LotrConfig
from .model import AdaptedModel, adapt, check_adapter_name
from .pretrained import fit_linear_heads
from .targets import find_targets, group_targets, matches, model_modules

MAX_SWEEPS = 20
# A sweep that lowers the relative error by less than this fraction of it ends the refinement.
MIN_IMPROVEMENT = 1e-4
# PEFT options under which the update is not s · B A x; each must be off (false, null or empty).
NOT_PLAIN_LORA = {
    "use_dora": "DoRA's magnitude vectors",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA's input pooling",
    "alora_invocation_tokens": "activated LoRA, which depends on the tokens",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters rather than modules",
    "trainable_token_indices": "trainable tokens",
    "use_bdlora": "block-diagonal factors",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA's singular values",
    "monteclora_config": "MonteCLoRA's sampling",
}


@dataclass(frozen=True)
class GroupFit:
    """How one LoTR group reproduces the LoRA updates of its modules."""

    modules: tuple[str, ...]
    relative_error: float  # sqrt(Σ_l ‖ΔW_l − U G_l Vᵀ‖²_F / Σ_l ‖ΔW_l‖²_F); 0 for an all-zero LoRA
    lora_parameters: int  # Σ_l r_l (d_in + d_out)
    lotr_parameters: int  # r (d_in + d_out) + L r²

    @property
    def parameter_ratio(self) -> float:
        """LoTR's parameters per LoRA parameter (below 1: LoTR is smaller)."""
        return self.lotr_parameters / self.lora_parameters


class LoraUpdate(NamedTuple):
    """One layer's LoRA update ``scale · B A`` as PEFT stores it."""

    scale: float
    A: torch.Tensor  # (r_l, d_in)
    B: torch.Tensor  # (d_out, r_l)


@dataclass(frozen=True)
class CompressionReport:
    """How ``compress_loras`` reproduces k LoRAs with one basis.

    Relative errors as ``GroupFit``'s: ``errors[task][group]`` over the task's updates in one group, and
    ``task_errors[task]`` over all of them. Parameter counts are trainable ones: the basis's factors, each task's
    cores and head (``modules_to_save``), and each LoRA's factors and the same head.
    """

    groups: dict[str, tuple[str, ...]]  # group key -> its modules
    errors: dict[str, dict[str, float]]
    task_errors: dict[str, float]
    basis_parameters: int  # Σ_groups r (d_in + d_out)
    task_parameters: dict[str, int]  # Σ_groups L r², plus the head
    lora_parameters: dict[str, int]  # Σ_l r_l (d_in + d_out), plus the head

    @property
    def total_parameters(self) -> int:
        return self.basis_parameters + sum(self.task_parameters.values())

    @property
    def parameter_ratio(self) -> float:
        """The compressed adapters' parameters per parameter of the k LoRAs (below 1: smaller)."""
        return self.total_parameters / sum(self.lora_parameters.values())


class _Lora(NamedTuple):
    """One PEFT LoRA folder, read and checked against the base model."""

    directory: Path
    config: dict
    updates: dict[str, LoraUpdate]
    saved_tensors: dict[str, torch.Tensor]  # names as in the base model
    saved_modules: list[str]


class _Fitted(NamedTuple):
    lotr: LotrConfig  # the adapter the fit fills (no basis, no freezing)
    groups: dict[str, list[str]]
    fits: dict[str, TuckerFit]  # per group, over [(task, module) for task in tasks for module in the group]


def compress_lora(base_model: nn.Module, peft_directory: str | Path, rank: int,
                  share: str = "by_name") -> tuple[AdaptedModel, dict[str, GroupFit]]:
    """``base_model`` with a LoTR adapter of rank ``rank`` fitted to the PEFT LoRA adapter in ``peft_directory``.

    ``peft_directory`` holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``. The modules LoRA
    adapts are grouped as LoTR groups them (``share``, see ``LotrConfig``), each group is fitted as the module
    docstring says, and the modules PEFT saved whole (``modules_to_save``, e.g. a classifier) are copied. The result
    is an ordinary trainable LoTR adapter named ``"default"`` (``save_pretrained`` writes it). It is
    ``compress_loras`` with one LoRA, whose adapter keeps the factors as its own.

    Returns ``(model, report)``: ``report`` maps each group's key (as in ``model.shared["default"]``) to its
    ``GroupFit`` (relative error, LoRA and LoTR parameter counts and their ratio)::

        model, report = rs.compress_lora(base, "lora-folder", rank=16)
        for key, fit in report.items():
            print(key, f"{fit.relative_error:.3f}", f"{fit.parameter_ratio:.2f}")

    A folder this cannot reproduce (not LoRA, DoRA, trained biases, NaN or inf, modules the base model lacks or has
    in another shape, a rank above a group's min(d_out, d_in)) raises RankshareError, and ``base_model`` is left
    as it was.
    """
    lora = _read_lora(base_model, Path(peft_directory))
    fitted = _fit(base_model, {"default": lora}, rank, share)
    shapes = _shapes(lora)
    report = {key: GroupFit(modules=tuple(members), relative_error=fitted.fits[key].relative_error(),
                            lora_parameters=sum(lora.updates[n].A.shape[0] * sum(shapes[n]) for n in members),
                            lotr_parameters=fitted.lotr.num_trainable_parameters({n: shapes[n] for n in members}))
              for key, members in fitted.groups.items()}
    # Everything is checked and fitted; adapt() checks before it changes the model, and the copies cannot fail.
    model = adapt(base_model, fitted.lotr, modules_to_save=lora.saved_modules or None)
    _copy_factors(model.shared["default"], fitted)
    _copy_task(model, "default", fitted, 0, lora)
    return model, report


def compress_loras(base_model: nn.Module, adapters: dict[str, str | Path], rank: int, share: str = "by_name",
                   basis_name: str = "basis") -> tuple[AdaptedModel, CompressionReport]:
    """``base_model`` with k PEFT LoRA adapters (``{task name: folder}``) compressed into one shared LoTR basis.

    The model holds adapter ``basis_name`` (the fitted U and V of each group, frozen; no task of its own: its cores
    are zero) and, per task, a LoTR adapter of that name on it (``LotrConfig(basis=basis_name)``) holding the task's
    fitted cores and its own copy of the modules its LoRA saved whole (a head). The first task is active; a mixed
    batch serves several (``model(..., adapter_names=[...])``), and each saves and exports as any adapter on a basis.

    The LoRAs may differ in rank and ``rank_pattern``; they must adapt the same modules of the same base model (as
    their configs name it). Anything else, or anything ``compress_lora`` refuses, raises one RankshareError that
    names the adapter, and ``base_model`` is left as it was::

        model, report = rs.compress_loras(base, {"add": "lora-add", "sort": "lora-sort"}, rank=16)
        print(report.errors["add"], report.parameter_ratio)
    """
    if not isinstance(adapters, dict) or not adapters:
        raise RankshareError("compress_loras takes a dict of task name -> PEFT LoRA folder, with at least one entry.")
    for name in [basis_name, *adapters]:
        check_adapter_name(name)
    if basis_name in adapters:
        raise RankshareError(f"Task {basis_name!r} has the name of the basis adapter; choose another basis_name.")
    loras = {}
    for task, directory in adapters.items():
        try:
            loras[task] = _read_lora(base_model, Path(directory))
        except RankshareError as error:
            raise RankshareError(f"LoRA {task!r}: {error}") from None
    _check_alike(loras)
    fitted = _fit(base_model, loras, rank, share)
    first = next(iter(loras.values()))
    shapes = _shapes(first)
    head = {task: sum(t.numel() for t in lora.saved_tensors.values()) for task, lora in loras.items()}
    cores = replace(fitted.lotr, basis=basis_name).num_trainable_parameters(shapes)
    basis_count = fitted.lotr.num_trainable_parameters(shapes) - cores
    k = len(loras)
    report = CompressionReport(
        groups={key: tuple(members) for key, members in fitted.groups.items()},
        errors={task: {key: fit.relative_error(i, k) for key, fit in fitted.fits.items()}
                for i, task in enumerate(loras)},
        task_errors={task: _relative(sum(fit.residual(i, k) for fit in fitted.fits.values()),
                                     sum(fit.energy(i, k) for fit in fitted.fits.values()))
                     for i, task in enumerate(loras)},
        basis_parameters=basis_count, task_parameters={task: cores + head[task] for task in loras},
        lora_parameters={task: sum(lora.updates[n].A.shape[0] * sum(shapes[n]) for n in lora.updates) + head[task]
                         for task, lora in loras.items()})
    # Every input is checked and fitted: from here on nothing can fail.
    model = AdaptedModel(base_model)
    model.add_adapter(basis_name, replace(fitted.lotr, freeze_factors=True))
    _copy_factors(model.shared[basis_name], fitted)
    for i, (task, lora) in enumerate(loras.items()):
        model.add_adapter(task, replace(fitted.lotr, basis=basis_name), modules_to_save=lora.saved_modules or None)
        _copy_task(model, task, fitted, i, lora)
    model.set_adapter(next(iter(loras)))
    return model, report


def _relative(residual: float, energy: float) -> float:
    return math.sqrt(residual / energy) if energy > 0 else 0.0


def _read_lora(base_model: nn.Module, directory: Path) -> _Lora:
    config, updates, saved_tensors = _read_peft_lora(directory)
    modules = model_modules(base_model)
    _check_modules(updates, modules, directory)
    saved_modules = _check_saved_modules(config.get("modules_to_save") or [], saved_tensors, modules, directory)
    return _Lora(directory, config, updates, saved_tensors, saved_modules)


def _check_alike(loras: dict[str, _Lora]) -> None:
    """Every LoRA adapts the modules of the first, on the base model its config names."""
    (first_task, first), *others = loras.items()
    for task, lora in others:
        if set(lora.updates) != set(first.updates):
            missing = sorted(set(first.updates) - set(lora.updates))
            extra = sorted(set(lora.updates) - set(first.updates))
            raise RankshareError(
                f"LoRA {task!r} ({lora.directory}) adapts other modules than LoRA {first_task!r}: it lacks "
                f"{missing[:3]} and adds {extra[:3]}. One basis serves LoRAs of the same target modules; compress "
                "such LoRAs apart."
            )
        named, first_named = (lora.config.get("base_model_name_or_path"), first.config.get("base_model_name_or_path"))
        if named and first_named and not _same_model(named, first_named):
            raise RankshareError(f"LoRA {task!r} ({lora.directory}) was trained on {named!r}, LoRA {first_task!r} on "
                                 f"{first_named!r}; compress LoRAs of one base model together.")


def _same_model(named: str, other: str) -> bool:
    """Whether two PEFT configs' ``base_model_name_or_path`` name one model: two hub ids agree whole; where either
    is a local folder, the folders' (or the hub id's) own names agree, as the same model in another place or a hub
    model downloaded into a folder of its name."""
    def is_folder(name: str) -> bool:
        return name.startswith((".", "~")) or Path(name).is_absolute()

    if not (is_folder(named) or is_folder(other)):
        return named == other
    return Path(named).name == Path(other).name


def _shapes(lora: _Lora) -> dict[str, tuple[int, int]]:
    return {name: (update.B.shape[0], update.A.shape[1]) for name, update in lora.updates.items()}


def lora_shapes(peft_directory: str | Path) -> dict[str, tuple[int, int]]:
    """The ``(d_out, d_in)`` of every module the PEFT LoRA in ``peft_directory`` adapts (its folder checked as for
    ``compress_lora``, without a base model)."""
    _, updates, _ = _read_peft_lora(Path(peft_directory))
    return {name: (update.B.shape[0], update.A.shape[1]) for name, update in updates.items()}


def _fit(base_model: nn.Module, loras: dict[str, _Lora], rank: int, share: str) -> _Fitted:
    """One Tucker-2 fit per group over every LoRA's updates of the group, after the checks that need the model."""
    first = next(iter(loras.values()))
    modules = model_modules(base_model)
    names = [name for name in modules if name in first.updates]  # model order
    shapes = _shapes(first)
    lotr = LotrConfig(rank=rank, target_modules=names, share=share)  # checks rank and share
    extra = sorted(set(find_targets(base_model, names)) - set(names))
    if extra:
        raise RankshareError(f"The LoRA's module names, as LoTR's target_modules, would also select {extra[:5]} in "
                             "this base model, which the LoRA does not adapt (one module's name ends in another's); "
                             "this LoRA cannot be compressed onto this model.")
    groups = group_targets(shapes, share)
    for key, members in groups.items():
        d_out, d_in = shapes[members[0]]
        if rank > min(d_out, d_in):
            raise RankshareError(f"Rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)} of group {key!r} "
                                 f"({d_out}×{d_in}); choose rank <= {min(d_out, d_in)}.")
    fits = {key: fit_tucker2([lora.updates[name] for lora in loras.values() for name in members], rank)
            for key, members in groups.items()}
    return _Fitted(lotr, groups, fits)


def _copy_factors(shared: nn.ModuleDict, fitted: _Fitted) -> None:
    with torch.no_grad():
        for key, fit in fitted.fits.items():
            shared[key].left.copy_(fit.left)
            shared[key].right.copy_(fit.right)


def _copy_task(model: AdaptedModel, adapter: str, fitted: _Fitted, task: int, lora: _Lora) -> None:
    """Adapter ``adapter`` takes task ``task``'s cores (the fits list them task by task) and its saved modules."""
    model.fit_saved_heads(adapter, lora.saved_tensors)
    layers, state = model.adapter_layers(adapter), model.adapter_state_dict(adapter)
    with torch.no_grad():
        for key, members in fitted.groups.items():
            start = task * len(members)
            for name, core in zip(members, fitted.fits[key].cores[start : start + len(members)]):
                layers[name].core.copy_(core)
        for key, tensor in lora.saved_tensors.items():
            state[key].copy_(tensor)


class TuckerFit(NamedTuple):
    """A Tucker-2 fit of updates ``ΔW_i ≈ U G_i Vᵀ``, in float64."""

    left: torch.Tensor  # U (d_out, r)
    right: torch.Tensor  # V (d_in, r)
    cores: list[torch.Tensor]  # G_i (r, r), one per update, in the order given
    energies: list[float]  # ‖ΔW_i‖²_F

    def _part(self, part: int, parts: int) -> range:
        size = len(self.cores) // parts
        return range(part * size, (part + 1) * size)

    def energy(self, part: int = 0, parts: int = 1) -> float:
        """Σ_i ‖ΔW_i‖² over the updates of ``part`` of ``parts`` equal consecutive parts (all by default)."""
        return sum(self.energies[i] for i in self._part(part, parts))

    def residual(self, part: int = 0, parts: int = 1) -> float:
        """Σ_i ‖ΔW_i − U G_i Vᵀ‖² over the same updates: U and V are orthonormal, so each is ‖ΔW_i‖² − ‖G_i‖²."""
        return sum(max(self.energies[i] - float(self.cores[i].square().sum()), 0.0) for i in self._part(part, parts))

    def relative_error(self, part: int = 0, parts: int = 1) -> float:
        return _relative(self.residual(part, parts), self.energy(part, parts))


def fit_tucker2(updates: list[LoraUpdate], rank: int) -> TuckerFit:
    """``U (d_out, r)``, ``V (d_in, r)`` and the cores ``G_l (r, r)`` of ``ΔW_l ≈ U G_l Vᵀ``, in float64 (the module
    docstring has the math)."""
    left = _span([update.B.double() for update in updates], rank)  # (d_out, w): orthonormal, spans every B_l
    right = _span([update.A.double().T for update in updates], rank)  # (d_in, w')
    # In these bases ΔW_l = left (b_l a_l) rightᵀ, the scale folded into b_l; U = left u and V = right v.
    bs = [update.scale * (left.T @ update.B.double()) for update in updates]  # (w, r_l)
    as_ = [update.A.double() @ right for update in updates]  # (r_l, w')
    energies = [float(((b.T @ b) * (a @ a.T)).sum()) for b, a in zip(bs, as_)]  # ‖ΔW_l‖² = tr((bᵀb)(a aᵀ))
    energy = sum(energies)

    def cores(u: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [(u.T @ b) @ (a @ v) for b, a in zip(bs, as_)]  # G_l = Uᵀ ΔW_l V, (r, r)

    def error(u: torch.Tensor, v: torch.Tensor) -> float:
        kept = sum(float(g.square().sum()) for g in cores(u, v))
        return math.sqrt(max(energy - kept, 0.0) / energy) if energy > 0 else 0.0

    def left_given(v: torch.Tensor) -> torch.Tensor:  # U from Σ_l (ΔW_l V)(ΔW_l V)ᵀ
        return _leading_eigenvectors(_gram([b @ (a @ v) for b, a in zip(bs, as_)]), rank)

    def right_given(u: torch.Tensor) -> torch.Tensor:  # V from Σ_l (ΔW_lᵀ U)(ΔW_lᵀ U)ᵀ
        return _leading_eigenvectors(_gram([a.T @ (b.T @ u) for b, a in zip(bs, as_)]), rank)

    # HOSVD: Σ_l ΔW_l ΔW_lᵀ = Σ_l b_l (a_l a_lᵀ) b_lᵀ and Σ_l ΔW_lᵀ ΔW_l = Σ_l a_lᵀ (b_lᵀ b_l) a_l, in the bases.
    u = _leading_eigenvectors(sum(b @ (a @ a.T) @ b.T for b, a in zip(bs, as_)), rank)  # (w, r)
    v = _leading_eigenvectors(sum(a.T @ (b.T @ b) @ a for b, a in zip(bs, as_)), rank)  # (w', r)
    best = error(u, v)
    for _ in range(MAX_SWEEPS):
        new_u = left_given(v)
        new_v = right_given(new_u)
        new_error = error(new_u, new_v)
        if new_error >= best:
            break
        u, v, previous, best = new_u, new_v, best, new_error
        if previous - best <= MIN_IMPROVEMENT * previous:
            break
    return TuckerFit(left @ u, right @ v, cores(u, v), energies)


def _span(blocks: list[torch.Tensor], rank: int) -> torch.Tensor:
    """Orthonormal columns ``(d, w)`` whose span holds every column of ``blocks``, with ``w >= rank``."""
    columns = torch.cat(blocks, dim=1)  # (d, Σ_l r_l)
    # More directions asked for than the LoRA uses: any others will do, their cores come out zero.
    missing = max(0, rank - columns.shape[1])
    extra = torch.randn(columns.shape[0], missing, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.cat([columns, extra], dim=1))  # (d, min(d, Σ_l r_l + missing))
    return q


def _gram(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``Σ X Xᵀ`` over the blocks X (d, k): d × d, symmetric."""
    return sum(x @ x.T for x in blocks)


def _leading_eigenvectors(symmetric: torch.Tensor, count: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(symmetric)  # eigenvalues ascending
    return vectors[:, -count:].flip(-1)


# -- PEFT's folder ----------------------------------------------------------------------------------------------

def _read_peft_lora(directory: Path) -> tuple[dict, dict[str, LoraUpdate], dict[str, torch.Tensor]]:
    """PEFT's config, each adapted module's update (name -> ``LoraUpdate``) and the other tensors (name -> tensor,
    names as in the base model), everything checked that can be without the base model."""
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file():
        raise RankshareError(f"No adapter_config.json in {directory}; point compress_lora to a folder written by "
                             "PEFT's save_pretrained().")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise RankshareError(f"{config_path} is not valid JSON ({error}); save the PEFT adapter again.") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise RankshareError(f"{config_path} describes a {found or 'non-PEFT'} adapter, not PEFT's LoRA "
                             "(peft_type 'LORA'); compress_lora compresses LoRA adapters only.")
    for option, what in NOT_PLAIN_LORA.items():
        if config.get(option):
            raise RankshareError(f"{config_path} sets {option}={config[option]!r} ({what}), so its update is not "
                                 "s · B A and LoTR cannot reproduce it. Compress a plain LoRA adapter.")
    if config.get("bias", "none") != "none":
        raise RankshareError(f"{config_path} sets bias={config['bias']!r}: the adapter trained biases of the base "
                             "model, which a LoTR adapter does not hold. Compress a LoRA trained with bias='none'.")
    if not weights_path.is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        raise RankshareError(
            f"No adapter_model.safetensors in {directory}"
            + ("; there is an adapter_model.bin, a pickle, which rankshare never opens (unpickling can run code). "
               "Save the adapter with PEFT's save_pretrained(safe_serialization=True)." if pickled else
               "; save the adapter again with PEFT's save_pretrained().")
        )
    try:
        tensors = safetensors.torch.load_file(weights_path)
    except Exception as error:  # safetensors raises several types for damaged files
        raise RankshareError(f"{weights_path} is not a readable safetensors file ({error}); save it again.") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RankshareError(f"Tensor {key!r} in {weights_path} holds NaN or inf: the LoRA had diverged when it "
                                 "was saved. Retrain it, or compress an earlier checkpoint.")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    others, foreign = {}, []
    for key, tensor in tensors.items():
        found = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if found:
            factors.setdefault(found[1], {})[found[2]] = tensor
        elif key.startswith(PEFT_PREFIX):
            others[key[len(PEFT_PREFIX):]] = tensor
        else:
            foreign.append(key)
    if foreign or not factors:
        what = f"tensors named otherwise than PEFT names them: {foreign[:5]}" if foreign else "no LoRA factors"
        raise RankshareError(f"{weights_path} holds {what} (PEFT's are '{PEFT_PREFIX}<module>.lora_A.weight' and "
                             "'.lora_B.weight'); save the adapter with PEFT's save_pretrained().")
    return config, {name: _update(name, pair, config, weights_path) for name, pair in factors.items()}, others


def _update(name: str, pair: dict[str, torch.Tensor], config: dict, path: Path) -> LoraUpdate:
    """The update of module ``name``, its scale from ``r``, ``lora_alpha`` and the patterns as PEFT resolves them."""
    if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["B"].dim() != 2 or (
            pair["A"].shape[0] != pair["B"].shape[1]):
        shapes = {part: tuple(tensor.shape) for part, tensor in pair.items()}
        raise RankshareError(f"{path}: module {name!r} has LoRA factors of shapes {shapes}; expected lora_A (r, d_in) "
                             "and lora_B (d_out, r). Save the adapter again.")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = rank_pattern.get(_pattern_key(rank_pattern, name), config.get("r"))
    alpha = alpha_pattern.get(_pattern_key(alpha_pattern, name), config.get("lora_alpha"))
    if rank != pair["A"].shape[0] or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise RankshareError(
            f"{path.parent / 'adapter_config.json'} gives module {name!r} rank {rank!r} and lora_alpha {alpha!r}, but "
            f"its factors have rank {pair['A'].shape[0]}: the config (r, rank_pattern, lora_alpha, alpha_pattern) "
            "does not belong with these tensors. Save the adapter again with PEFT."
        )
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoraUpdate(scale, pair["A"], pair["B"])


def _pattern_key(patterns: dict, name: str) -> str:
    """The first key of ``rank_pattern`` or ``alpha_pattern`` that names ``name``, as PEFT's ``get_pattern_key``:
    a regex matched against the end of the name, at a dot."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), name)


def _check_modules(updates: dict[str, LoraUpdate], modules: dict[str, nn.Module], directory: Path) -> None:
    for name, update in updates.items():
        module = modules.get(name)
        if module is None or not is_supported(module):
            raise RankshareError(
                f"The LoRA in {directory} adapts {name!r}, which this base model "
                f"{'lacks' if module is None else f'has as a {type(module).__name__}, not a linear layer'}; pass the "
                "base model the LoRA was trained on (the model itself, not a PEFT or rankshare model around it)."
            )
        lora_shape = (update.B.shape[0], update.A.shape[1])
        if linear_shape(module) != lora_shape:
            raise RankshareError(
                f"Module {name!r} is {'×'.join(map(str, linear_shape(module)))} (d_out×d_in) in this base model but "
                f"{'×'.join(map(str, lora_shape))} in the LoRA of {directory}; pass the base model it was trained on."
            )


def _check_saved_modules(patterns: list[str], tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                         directory: Path) -> list[str]:
    """The modules PEFT saved whole (``modules_to_save``; entries naming no module, as PEFT adds ``score`` for any
    classifier, are passed over); ``tensors`` must hold exactly their state, in their shapes."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found = [name for name in modules if matches(name, patterns)]
    found = [name for name in found if not any(name.startswith(other + ".") for other in found)]
    # Each adapter has its own copy of a saved module: a classification head may have its own number of labels.
    heads = {name: copy.deepcopy(modules[name]) for name in found}
    for name, head in heads.items():
        fit_linear_heads(head, tensors, name)
    expected = {f"{name}.{key}": tensor for name in found for key, tensor in heads[name].state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise RankshareError(
            f"{directory / 'adapter_model.safetensors'} does not hold exactly the LoRA factors and the modules saved "
            f"whole (modules_to_save {patterns}) in this base model: missing {missing[:5]}, not LoRA factors nor "
            f"of those modules {unexpected[:5]}. Compress a plain LoRA of linear layers, on the base model it was "
            "trained on."
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise RankshareError(
                f"{key!r} (of modules_to_save) has shape {tuple(tensor.shape)} in {directory} but "
                f"{tuple(expected[key].shape)} in this base model; build the base model as it was for training "
                "(e.g. with the same num_labels)."
            )
    return found
