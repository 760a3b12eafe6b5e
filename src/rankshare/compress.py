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
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from torch import nn

from .errors import RankshareError
from .export import PEFT_PREFIX
from .layer import is_supported, linear_shape
from .lotr import LotrConfig
from .model import AdaptedModel, adapt
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


def compress_lora(base_model: nn.Module, peft_directory: str | Path, rank: int,
                  share: str = "by_name") -> tuple[AdaptedModel, dict[str, GroupFit]]:
    """``base_model`` with a LoTR adapter of rank ``rank`` fitted to the PEFT LoRA adapter in ``peft_directory``.

    ``peft_directory`` holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``. The modules LoRA
    adapts are grouped as LoTR groups them (``share``, see ``LotrConfig``), each group is fitted as the module
    docstring says, and the modules PEFT saved whole (``modules_to_save``, e.g. a classifier) are copied. The result
    is an ordinary trainable LoTR adapter named ``"default"`` (``save_pretrained`` writes it).

    Returns ``(model, report)``: ``report`` maps each group's key (as in ``model.shared["default"]``) to its
    ``GroupFit`` (relative error, LoRA and LoTR parameter counts and their ratio)::

        model, report = rs.compress_lora(base, "lora-folder", rank=16)
        for key, fit in report.items():
            print(key, f"{fit.relative_error:.3f}", f"{fit.parameter_ratio:.2f}")

    A folder this cannot reproduce (not LoRA, DoRA, trained biases, NaN or inf, modules the base model lacks or has
    in another shape, a rank above a group's min(d_out, d_in)) raises RankshareError, and ``base_model`` is left
    as it was.
    """
    directory = Path(peft_directory)
    config, updates, saved_tensors = _read_peft_lora(directory)
    modules = model_modules(base_model)
    _check_modules(updates, modules, directory)
    saved_modules = _check_saved_modules(config.get("modules_to_save") or [], saved_tensors, modules, directory)

    names = [name for name in modules if name in updates]  # model order
    shapes = {name: (updates[name].B.shape[0], updates[name].A.shape[1]) for name in names}
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

    fits, report = {}, {}
    for key, members in groups.items():
        left, right, cores, error = fit_tucker2([updates[name] for name in members], rank)
        fits[key] = left, right, cores
        report[key] = GroupFit(
            modules=tuple(members),
            relative_error=error,
            lora_parameters=sum(updates[name].A.shape[0] * sum(shapes[name]) for name in members),
            lotr_parameters=lotr.num_trainable_parameters({name: shapes[name] for name in members}),
        )

    # Everything is checked and fitted; adapt() checks before it changes the model, and the copies cannot fail.
    model = adapt(base_model, lotr, modules_to_save=saved_modules or None)
    layers, shared, state = model.adapter_layers(), model.shared["default"], model.adapter_state_dict()
    with torch.no_grad():
        for key, (left, right, cores) in fits.items():
            shared[key].left.copy_(left)
            shared[key].right.copy_(right)
            for name, core in zip(groups[key], cores):
                layers[name].core.copy_(core)
        for key, tensor in saved_tensors.items():
            state[key].copy_(tensor)
    return model, report


def fit_tucker2(updates: list[LoraUpdate], rank: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], float]:
    """``U (d_out, r)``, ``V (d_in, r)``, the cores ``G_l (r, r)`` and the relative error of ``ΔW_l ≈ U G_l Vᵀ``,
    in float64 (the module docstring has the math)."""
    left = _span([update.B.double() for update in updates], rank)  # (d_out, w): orthonormal, spans every B_l
    right = _span([update.A.double().T for update in updates], rank)  # (d_in, w')
    # In these bases ΔW_l = left (b_l a_l) rightᵀ, the scale folded into b_l; U = left u and V = right v.
    bs = [update.scale * (left.T @ update.B.double()) for update in updates]  # (w, r_l)
    as_ = [update.A.double() @ right for update in updates]  # (r_l, w')
    energy = sum(float(((b.T @ b) * (a @ a.T)).sum()) for b, a in zip(bs, as_))  # Σ_l ‖ΔW_l‖²

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
    return left @ u, right @ v, cores(u, v), best


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
    expected = {f"{name}.{key}": tensor for name in found for key, tensor in modules[name].state_dict().items()}
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
