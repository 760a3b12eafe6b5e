"""Model surgery: put adapter layers into a model in place, count and merge them, take them out again.

Nothing here knows a method's math: a config's ``create_adapters`` builds the layers (and any factors
they share), and every layer answers the ``AdapterLayer`` interface. The adapter files are read and
written by ``persistence``, which knows no model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import persistence
from .config import AdapterConfig, ExternalAdapterConfig
from .errors import RankshareError
from .layer import AdapterLayer, linear_shape
from .targets import find_targets, matches


def adapt(model: nn.Module, config: AdapterConfig, modules_to_save: list[str] | None = None) -> AdaptedModel:
    """Freeze ``model``, replace each target module in place by an adapter layer, and wrap the result.

    ``modules_to_save`` names modules (suffixes, as target_modules) that train fully and are saved with the
    adapter, e.g. a classification head. A method another library implements (``ExternalAdapterConfig``,
    e.g. PEFT's LoRA) is attached by that library, and its model comes back.
    """
    if not isinstance(config, AdapterConfig) or not config.method:
        raise RankshareError(f"adapt() needs the config of a registered method (rankshare.methods()), got "
                             f"{type(config).__name__}.")
    if isinstance(config, ExternalAdapterConfig):
        return config.attach(model, list(modules_to_save or []))
    targets = find_targets(model, config.target_modules)
    trained_whole = _find_modules_to_save(model, modules_to_save or [], targets)
    model.requires_grad_(False)
    layers, shared = config.create_adapters(targets)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    for module in trained_whole.values():
        module.requires_grad_(True)
    return AdaptedModel(model, config, list(layers), shared, list(trained_whole))


def _find_modules_to_save(model: nn.Module, patterns: list[str], targets: dict) -> dict[str, nn.Module]:
    if isinstance(patterns, str):
        patterns = [patterns]
    found = {name: m for name, m in model.named_modules() if name and matches(name, patterns)}
    unmatched = [p for p in patterns if not any(matches(name, [p]) for name in found)]
    if unmatched:
        children = ", ".join(name for name, _ in model.named_children())
        raise RankshareError(f"modules_to_save {unmatched} matched no module; top-level modules are: {children}.")
    clash = sorted(n for n in found if any(n == t or n.startswith(t + ".") or t.startswith(n + ".") for t in targets))
    if clash:
        raise RankshareError(f"modules_to_save {clash} overlap target_modules; a module is either adapted or saved "
                             "whole.")
    return found


class AdaptedModel(nn.Module):
    """A base model with adapter layers inside; calls and unknown attributes go to the base model.

    ``shared`` owns the tensors that several layers use (LoTR's factors), once.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: AdapterConfig,
        adapter_names: list[str],
        shared: dict[str, nn.Module],
        modules_to_save: list[str],
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.shared = nn.ModuleDict(shared)
        self.adapter_config = config
        self.adapter_names = adapter_names
        self.modules_to_save = modules_to_save

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def adapter_layers(self) -> dict[str, AdapterLayer]:
        return {name: self.base_model.get_submodule(name) for name in self.adapter_names}

    # -- parameters ---------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor the adapter adds or trains, each once: layer tensors, shared factors, saved modules."""
        state = {}
        for name, layer in self.adapter_layers().items():
            state.update({f"{name}.{key}": p for key, p in layer.adapter_parameters().items()})
        for key, module in self.shared.items():
            state.update({f"shared.{key}.{pname}": p for pname, p in module.named_parameters()})
        for name in self.modules_to_save:
            module = self.base_model.get_submodule(name)
            state.update({f"{name}.{key}": t for key, t in module.state_dict().items()})
        return state

    def num_trainable_parameters(self) -> int:
        """Trainable parameters, each shared tensor counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> None:
        trainable = self.num_trainable_parameters()
        total = sum(p.numel() for p in self.parameters())
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # -- merging ------------------------------------------------------------------------------------------

    def merge(self, gates: torch.Tensor | list[float] | None = None, safe: bool = False) -> None:
        """Fold every update into its base weight (in place, reversible by ``unmerge``).

        Mixture methods (MoR, MoE-LoRA) merge only with ``gates``: one weight per expert, used in every layer.
        ``safe=True`` checks every layer before changing any: if one would put NaN or inf into its base weight,
        RankshareError names it and all weights are left exactly as they were.
        """
        self._merge(self.adapter_layers(), gates, safe)

    def _merge(self, layers: dict[str, AdapterLayer], gates, safe: bool) -> None:
        if safe:
            # All checks come first: undoing a merge by subtraction would not restore the weights bit for bit.
            for name, layer in layers.items():
                if not layer.merged:
                    try:
                        layer.merged_weight(gates, safe=True)
                    except RankshareError as error:
                        raise RankshareError(f"Adapter layer {name!r}: {error} No weight was changed.") from None
        for layer in layers.values():
            layer.merge(gates)

    def unmerge(self) -> None:
        for layer in self.adapter_layers().values():
            layer.unmerge()

    def merge_and_unload(self, gates: torch.Tensor | list[float] | None = None, safe: bool = False) -> nn.Module:
        """Merge (``safe`` as in ``merge``), then put each base layer back in place of its adapter layer.

        Returns the base model; if a safe merge refuses, the model stays adapted and unmerged.
        """
        self._merge({name: layer for name, layer in self.adapter_layers().items() if not layer.merged}, gates, safe)
        return self.unload()

    def unload(self) -> nn.Module:
        """Put each base layer back in place of its adapter layer, as it is now; returns the base model.

        Layers not merged come back with their original weights, so this also takes an adapter out unused.
        """
        for name, layer in self.adapter_layers().items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), child, layer.base_layer)
        self.adapter_names = []
        return self.base_model

    # -- persistence --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter tensors only).

        Both files replace any earlier ones only once both are written in full; an adapter holding NaN or inf
        is refused rather than saved over a good one.
        """
        layers = self.adapter_layers()
        layout = {
            "modules": {name: list(linear_shape(layer.base_layer)) for name, layer in layers.items()},
            "shared": {key: [name for name, layer in layers.items() if any(m is shared for m in layer.shared_modules())]
                       for key, shared in self.shared.items()},
            "modules_to_save": self.modules_to_save,
            "base_model_class": type(self.base_model).__name__,
        }
        persistence.save_adapter(Path(directory), self.adapter_config, self.adapter_state_dict(), layout)

    def load_adapter_weights(self, directory: str | Path) -> None:
        """Copy the tensors of an adapter saved by ``save_pretrained`` into this model, in place.

        For resuming training: the saved adapter must have this model's config and modules. Both files are
        checked as ``from_pretrained`` checks them, and a refused load changes no tensor.
        """
        directory = Path(directory)
        record, saved_config = persistence.read_adapter(directory)
        if saved_config != self.adapter_config or sorted(record["modules"]) != sorted(self.adapter_names):
            raise RankshareError(
                f"The adapter in {directory} was saved with another config or other modules than this model's "
                f"({record['config']} on {len(record['modules'])} modules; this model: {self.adapter_config.to_dict()} "
                f"on {len(self.adapter_names)}). Load it into a fresh base model with AdaptedModel.from_pretrained()."
            )
        tensors = persistence.read_weights(directory, record)
        persistence.copy_tensors(self.adapter_state_dict(), tensors, directory / persistence.WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path, is_trainable: bool = False) -> AdaptedModel:
        """Adapt ``base_model`` as recorded in ``directory`` and load the saved tensors.

        The adapter is frozen for inference unless ``is_trainable``. Files that do not fit each other or
        ``base_model`` raise RankshareError and leave ``base_model`` as it was.
        """
        directory = Path(directory)
        config_path = directory / persistence.CONFIG_NAME
        record, config = persistence.read_adapter(directory)
        persistence.check_base_model(base_model, record["modules"], config_path)
        tensors = persistence.read_weights(directory, record)

        requires_grad = {parameter: parameter.requires_grad for parameter in base_model.parameters()}
        model = None
        try:
            model = adapt(base_model, config, modules_to_save=record["modules_to_save"] or None)
            persistence.check_adapted_modules(model.adapter_names, record["modules"], config_path)
            persistence.copy_tensors(model.adapter_state_dict(), tensors, directory / persistence.WEIGHTS_NAME)
        except Exception:
            # Give the caller's model back as it came, so that it can be used, or loaded into, again.
            if model is not None:
                model.unload()
            for parameter, flag in requires_grad.items():
                parameter.requires_grad_(flag)
            raise
        if not is_trainable:
            model.requires_grad_(False)  # otherwise adapt() has already chosen what trains
        return model
