"""An ``AdaptedModel``'s adapters to and from their files: ``save_pretrained``, ``load_adapter``, ``from_pretrained``.

The glue between the model and ``persistence`` (which reads and writes the files and knows no model): what a
saved adapter records of the model (its modules, shapes, heads and, for an adapter on a basis, the basis's
fingerprint), the checks a load makes before the model changes, and the undo when one fails late.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from . import persistence
from .errors import RankshareError
from .layer import linear_shape
from .slots import AdaptedLinear, SavedModule
from .targets import model_modules

HALF_DTYPES = (torch.bfloat16, torch.float16)


class AdapterFiles:
    """The file methods of ``AdaptedModel`` (a mixin: it uses the model's adapters, surgery and state dicts)."""

    def basis_fingerprint(self, adapter_name: str, dtype: torch.dtype | None = None) -> str:
        """The sha256 of the shared modules adapter ``adapter_name`` owns (its basis tensors), in key order; with
        ``dtype``, of those tensors cast to it (what ``model.to(dtype)`` would make of them)."""
        self._require(adapter_name)
        if adapter_name not in self.shared:
            raise RankshareError(f"Adapter {adapter_name!r} owns no shared factors, so it is no basis; an adapter "
                                 "is a basis when its method shares modules across layers.")
        digest = hashlib.sha256()
        for key, module in sorted(self.shared[adapter_name].items()):
            for pname, tensor in sorted(module.state_dict().items()):
                digest.update(f"{key}.{pname}:{tuple(tensor.shape)}".encode())
                cast = tensor.detach().to(dtype or tensor.dtype)
                digest.update(cast.to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _basis_dtype(self, adapter_name: str) -> torch.dtype:
        return next((p.dtype for p in self.shared[adapter_name].parameters()), torch.float32)

    def save_pretrained(self, directory: str | Path, adapter_name: str | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of one adapter (the active one by
        default): its tensors only. An adapter on a basis holds its cores and the basis's fingerprint.

        Both files replace any earlier ones only once both are written in full; an adapter holding NaN or inf
        is refused rather than saved over a good one.
        """
        name = adapter_name or self._require_active()
        adapter = self._require(name)
        layers = self.adapter_layers(name)
        owned = self.shared[name] if name in self.shared else {}
        layout = {
            "modules": {module: list(linear_shape(layer.base_layer)) for module, layer in layers.items()},
            "shared": {key: [module for module, layer in layers.items()
                             if any(m is shared for m in layer.shared_modules())] for key, shared in owned.items()},
            "modules_to_save": adapter.modules_to_save,
            "base_model_class": type(self.base_model).__name__,
        }
        basis = adapter.config.basis_name()
        if basis is not None:
            layout["basis_fingerprint"] = self.basis_fingerprint(basis)
            # The same factors after a cast of the model to half precision: an adapter still fits them.
            layout["basis_fingerprints"] = {str(dtype).removeprefix("torch."): self.basis_fingerprint(basis, dtype)
                                            for dtype in HALF_DTYPES}
        persistence.save_adapter(Path(directory), adapter.config, self.adapter_state_dict(name), layout)

    def load_adapter_weights(self, directory: str | Path, adapter_name: str | None = None) -> None:
        """Copy the tensors of an adapter saved by ``save_pretrained`` into adapter ``adapter_name`` (the active
        one by default), in place: for resuming training. The saved adapter must have its config and modules;
        both files are checked as ``load_adapter`` checks them, and a refused load changes no tensor."""
        directory = Path(directory)
        name = adapter_name or self._require_active()
        adapter = self._require(name)
        record, saved_config = persistence.read_adapter(directory)
        if saved_config != adapter.config or sorted(record["modules"]) != sorted(adapter.modules):
            raise RankshareError(
                f"The adapter in {directory} was saved with another config or other modules than adapter {name!r} "
                f"({record['config']} on {len(record['modules'])} modules; here: {adapter.config.to_dict()} on "
                f"{len(adapter.modules)}). Load it as a new adapter with load_adapter()."
            )
        tensors = persistence.read_weights(directory, record)
        persistence.copy_tensors(self.adapter_state_dict(name), tensors, directory / persistence.WEIGHTS_NAME)

    def fit_saved_heads(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Give adapter ``adapter_name``'s copies of the modules saved whole the output sizes of ``tensors`` (keyed as
        in the model): its own classification head over its own labels (``fit_linear_heads``)."""
        slots, adapter = self._saved(), self._adapters[adapter_name]
        for module in adapter.modules_to_save:
            if fit_linear_heads(slots[module].copies[adapter_name], tensors, module):
                present = {id(p) for p in self.parameters()}
                adapter.trains = [p for p in adapter.trains if id(p) in present]
                adapter.trains += list(slots[module].copies[adapter_name].parameters())
                slots[module].copies[adapter_name].requires_grad_(self._active == adapter_name)

    def load_adapter(self, directory: str | Path, adapter_name: str, is_trainable: bool = False,
                     basis: str | None = None) -> None:
        """Add the adapter saved in ``directory`` under ``adapter_name`` (not activated: see ``set_adapter``).

        An adapter saved on a basis needs that basis loaded first, with the same factors: ``basis`` names it
        here if it is loaded under another name than the one it was saved with. It is frozen unless
        ``is_trainable``. Files that do not fit each other or this model raise RankshareError and leave the
        model as it was.
        """
        directory = Path(directory)
        config_path = directory / persistence.CONFIG_NAME
        record, config = persistence.read_adapter(directory)
        persistence.check_base_model(model_modules(self.base_model), record["modules"], config_path)
        tensors = persistence.read_weights(directory, record)
        saved_basis = config.basis_name()
        if saved_basis is not None:
            config = config.on_basis(basis or saved_basis)
            self._check_basis(config.basis_name(), saved_basis, record, config_path)
        elif basis is not None:
            raise RankshareError(f"{config_path} is not an adapter on a basis; leave out basis={basis!r}.")

        active, requires_grad = self._active, {p: p.requires_grad for p in self.parameters()}
        self.add_adapter(adapter_name, config, record["modules_to_save"] or None)
        try:
            self.fit_saved_heads(adapter_name, tensors)
            persistence.check_adapted_modules(self._adapters[adapter_name].modules, record["modules"], config_path)
            persistence.copy_tensors(self.adapter_state_dict(adapter_name), tensors,
                                     directory / persistence.WEIGHTS_NAME)
        except Exception:
            self._forget(adapter_name, active, requires_grad)
            raise
        if not is_trainable:
            for parameter in self._adapters[adapter_name].trains:
                parameter.requires_grad_(False)
            self._adapters[adapter_name].trains = []

    def _check_basis(self, basis: str, saved_as: str, record: dict, config_path: Path) -> None:
        origin = f"the basis it was trained on (saved as {saved_as!r})"
        if basis not in self._adapters:
            raise RankshareError(
                f"{config_path} is an adapter on basis {basis!r}, which this model does not have (it has "
                f"{sorted(self._adapters) or 'none'}). Load {origin} first, e.g. load_adapter(folder, {basis!r})."
            )
        dtype = self._basis_dtype(basis)
        if dtype == torch.float32:
            recorded = record.get("basis_fingerprint")
        else:
            recorded = record.get("basis_fingerprints", {}).get(str(dtype).removeprefix("torch."))
            if recorded is None:
                raise RankshareError(
                    f"The factors of adapter {basis!r} are {dtype} here, and {config_path} records the fingerprint of "
                    f"its basis in float32 only. Load the adapter before casting the model to {dtype}."
                )
        if recorded != self.basis_fingerprint(basis):
            cast = "" if dtype == torch.float32 else f" (compared as {dtype}, the dtype they have here)"
            raise RankshareError(
                f"{config_path} was trained on other factors than those of adapter {basis!r} loaded here: the basis "
                f"fingerprints differ{cast}. Load {origin} under that name, unchanged since the adapter was trained."
            )

    def _forget(self, adapter_name: str, active: str | None, requires_grad: dict) -> None:
        """Undo an ``add_adapter`` that a load could not complete: the model as it was before."""
        if self._active == adapter_name:  # it was the first adapter
            self._active = None
        self.delete_adapter(adapter_name)
        if active is not None:
            self.set_adapter(active)
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> AdapterFiles:
        """An ``AdaptedModel``: ``base_model`` with the adapter saved in ``directory`` loaded as ``adapter_name`` and
        active.

        The adapter is frozen for inference unless ``is_trainable``. Files that do not fit each other or
        ``base_model`` raise RankshareError and leave ``base_model`` as it was.
        """
        if isinstance(base_model, AdapterFiles) or any(isinstance(m, (AdaptedLinear, SavedModule))
                                                       for m in base_model.modules()):
            raise RankshareError("This model already has rankshare adapters; load the adapter into the original base "
                                 "model, or add it with model.load_adapter(directory, name).")
        requires_grad = {parameter: parameter.requires_grad for parameter in base_model.parameters()}
        model = cls(base_model)
        try:
            model.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        except Exception:
            for parameter, flag in requires_grad.items():
                parameter.requires_grad_(flag)
            raise
        model.set_adapter(adapter_name)
        if not is_trainable:
            model.requires_grad_(False)
        return model


def fit_linear_heads(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> bool:
    """Give each nn.Linear in a saved module as many outputs as its stored weight has: a classification head over
    another label set than the base model's (each adapter has its own). Any other difference stays an error.
    Returns whether a layer changed."""
    changed = False
    for name, linear in list(module.named_modules()):
        weight = tensors.get(".".join(filter(None, (prefix, name, "weight"))))
        if not isinstance(linear, nn.Linear) or weight is None or weight.dim() != 2:
            continue
        if weight.shape[1] == linear.in_features and weight.shape[0] != linear.out_features:
            resized = nn.Linear(linear.in_features, weight.shape[0], bias=linear.bias is not None,
                                device=linear.weight.device, dtype=linear.weight.dtype)
            if name:
                parent_name, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent_name) if parent_name else module, child, resized)
            else:
                linear.weight, linear.bias, linear.out_features = resized.weight, resized.bias, resized.out_features
            changed = True
    return changed
