"""Model surgery: put named adapters into a model in place, switch and mix them, merge them, take them out.

Nothing here knows a method's math: a config's ``create_adapters`` builds the layers (and any modules they
share), and every layer answers the ``AdapterLayer`` interface. Each adapted base layer becomes an
``AdaptedLinear`` holding every adapter's update of it; each module trained whole becomes a ``SavedModule``
with one copy per adapter. Saving and loading the adapters are ``pretrained``'s (``AdapterFiles``), gradient
checkpointing ``checkpointing``'s.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .checkpointing import checkpoint_frozen_base
from .config import AdapterConfig, ExternalAdapterConfig
from .errors import RankshareError
from .layer import AdapterLayer
from .pretrained import AdapterFiles
from .slots import AdaptedLinear, MixedRows, SavedModule
from .targets import find_targets, matches, model_modules

BASE = MixedRows.BASE  # in adapter_names: this row gets the base model
Gates = torch.Tensor | list[float] | dict[str, torch.Tensor | list[float]]  # one vector, or one per module name


def adapt(model: nn.Module, config: AdapterConfig, modules_to_save: list[str] | None = None,
          adapter_name: str = "default") -> AdaptedModel:
    """Freeze ``model``, put adapter ``adapter_name`` into each target module in place, and wrap the result.

    ``modules_to_save`` names modules (suffixes, as target_modules) that train fully and are saved with the
    adapter, e.g. a classification head; each adapter gets its own copy. A method another library implements
    (``ExternalAdapterConfig``, e.g. PEFT's LoRA) is attached by that library, and its model comes back.
    """
    _check_config(config)
    check_adapter_name(adapter_name)
    if isinstance(model, AdaptedModel) or any(isinstance(m, (AdaptedLinear, SavedModule)) for m in model.modules()):
        raise RankshareError("This model already has rankshare adapters; add another with model.add_adapter(name, "
                             "config), or adapt the original base model.")
    if isinstance(config, ExternalAdapterConfig):
        return config.attach(model, list(modules_to_save or []), adapter_name)
    adapted = AdaptedModel(model)
    adapted.add_adapter(adapter_name, config, modules_to_save)
    return adapted


def _check_config(config: AdapterConfig) -> None:
    if not isinstance(config, AdapterConfig) or not config.method:
        raise RankshareError(f"adapt() needs the config of a registered method (rankshare.methods()), got "
                             f"{type(config).__name__}.")


@dataclass
class _Adapter:
    """What the model knows of one adapter besides its tensors."""

    config: AdapterConfig
    modules: list[str]  # the adapted modules, in model order
    modules_to_save: list[str]
    trains: list[nn.Parameter]  # what trains while the adapter is active (nothing when loaded for inference)


class AdaptedModel(AdapterFiles, nn.Module):
    """A base model with named adapters inside; calls and unknown attributes go to the base model.

    One adapter is active at a time (``set_adapter``), and only its parameters train; a mixed batch gives each
    row its own adapter (``model(**batch, adapter_names=[...])``). ``shared[name]`` owns the tensors that
    several layers of adapter ``name`` use (LoTR's factors), once; an adapter on a basis uses another's.
    """

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self.shared = nn.ModuleDict()
        self._adapters: dict[str, _Adapter] = {}
        self._active: str | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_adapters"):
                raise
            return getattr(self.base_model, name)

    # -- which adapters there are -------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def adapter_configs(self) -> dict[str, AdapterConfig]:
        """Every adapter's config, by name, in the order they were added."""
        return {name: adapter.config for name, adapter in self._adapters.items()}

    @property
    def adapter_config(self) -> AdapterConfig:
        """The active adapter's config."""
        return self._adapters[self._require_active()].config

    @property
    def modules_to_save(self) -> list[str]:
        """The modules the active adapter trains whole."""
        return list(self._adapters[self._active].modules_to_save) if self._active else []

    def modules_to_save_of(self, adapter_name: str) -> list[str]:
        """The modules adapter ``adapter_name`` trains whole."""
        return list(self._require(adapter_name).modules_to_save)

    @property
    def targeted_module_names(self) -> list[str]:
        """The names of the modules the active adapter adapts (``adapter_layers(name)`` for another)."""
        return list(self._adapters[self._active].modules) if self._active else []

    def _require_active(self) -> str:
        if self._active is None:
            raise RankshareError("This model has no adapter left; add one with add_adapter(name, config).")
        return self._active

    def _require(self, name: str) -> _Adapter:
        if name not in self._adapters:
            raise RankshareError(f"No adapter named {name!r}; this model has {sorted(self._adapters) or 'none'}.")
        return self._adapters[name]

    def _hosts(self) -> dict[str, AdaptedLinear]:
        return {name: module for name, module in self.base_model.named_modules() if isinstance(module, AdaptedLinear)}

    def _saved(self) -> dict[str, SavedModule]:
        return {name: module for name, module in self.base_model.named_modules() if isinstance(module, SavedModule)}

    def adapter_layers(self, adapter_name: str | None = None) -> dict[str, AdapterLayer]:
        """Adapter ``adapter_name``'s layer (the active adapter's by default) for each module it adapts."""
        name = adapter_name or self._active
        if name is None:
            return {}
        adapter = self._require(name)
        hosts = self._hosts()
        return {module: hosts[module].adapters[name] for module in adapter.modules}

    def basis_of(self, adapter_name: str) -> str | None:
        """The adapter whose shared modules (LoTR's U and V) ``adapter_name`` uses, if any."""
        return self._require(adapter_name).config.basis_name()

    # -- adding, switching and removing adapters ----------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdapterConfig, modules_to_save: list[str] | None = None) -> None:
        """Put a new adapter into the model beside the others (they are left as they are).

        The first adapter becomes active; a later one is activated (and made trainable) by ``set_adapter``.
        Anything wrong (a name in use, no matching module, a basis that does not fit) raises RankshareError
        before the model changes.
        """
        _check_config(config)
        if isinstance(config, ExternalAdapterConfig):
            raise RankshareError(f"{config.title} is attached by another library and cannot live beside rankshare "
                                 "adapters; adapt a fresh base model with it.")
        check_adapter_name(adapter_name)
        if adapter_name in self._adapters:
            raise RankshareError(f"This model already has an adapter named {adapter_name!r}; choose another name, or "
                                 "delete_adapter() it first.")
        targets = find_targets(self.base_model, config.target_modules)
        saved = self._find_modules_to_save(modules_to_save or [], targets)
        basis = config.basis_name()
        if basis is not None:
            if basis not in self._adapters:
                raise RankshareError(
                    f"Adapter {adapter_name!r} uses the factors of adapter {basis!r} (basis={basis!r}), which this "
                    f"model does not have (it has {sorted(self._adapters) or 'none'}). Add or load the basis first."
                )
            layers, owned = config.create_adapters(targets, basis=dict(self.shared[basis]) if basis in self.shared
                                                   else {})
        else:
            layers, owned = config.create_adapters(targets)

        # Nothing has changed so far; from here on nothing can fail.
        if not self._adapters:
            self.base_model.requires_grad_(False)
        hosts = self._hosts()
        for name, layer in layers.items():
            if name not in hosts:
                parent_name, _, child = name.rpartition(".")
                hosts[name] = AdaptedLinear(targets[name])
                setattr(self.base_model.get_submodule(parent_name), child, hosts[name])
            hosts[name].adapters[adapter_name] = layer
        if owned:
            self.shared[adapter_name] = nn.ModuleDict(owned)
        slots = self._saved()
        for name in saved:
            if name not in slots:
                parent_name, _, child = name.rpartition(".")
                parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
                slots[name] = SavedModule(saved[name])
                setattr(parent, child, slots[name])
            slots[name].add_copy(adapter_name).requires_grad_(True)
        own = [*(p for layer in layers.values() for p in layer.adapter_parameters().values()),
               *(p for module in owned.values() for p in module.parameters()),
               *(p for name in saved for p in slots[name].copies[adapter_name].parameters())]
        self._adapters[adapter_name] = _Adapter(config, list(layers), list(saved), [p for p in own if p.requires_grad])
        if self._active is None:
            self.set_adapter(adapter_name)
        else:
            for parameter in own:
                parameter.requires_grad_(False)

    def _find_modules_to_save(self, patterns: list[str], targets: dict) -> dict[str, nn.Module]:
        if isinstance(patterns, str):
            patterns = [patterns]
        modules = model_modules(self.base_model)
        found = {name: m for name, m in modules.items() if matches(name, patterns)}
        # A module inside another that is saved whole is saved with it.
        found = {name: m for name, m in found.items() if not any(name.startswith(o + ".") for o in found)}
        unmatched = [p for p in patterns if not any(matches(name, [p]) for name in found)]
        if unmatched:
            children = ", ".join(name for name, _ in self.base_model.named_children())
            raise RankshareError(f"modules_to_save {unmatched} matched no module; top-level modules are: {children}.")
        saved = set(found) | set(self._saved())
        adapted = set(targets) | set(self._hosts())
        clash = sorted(n for n in saved for t in adapted if n == t or t.startswith(n + ".") or n.startswith(t + "."))
        if clash:
            raise RankshareError(f"modules_to_save {clash} overlap the adapted modules; a module is either adapted or "
                                 "saved whole.")
        return found

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter: the one used, merged and saved, and the only one that trains."""
        adapter = self._require(adapter_name)
        if self._merged_adapter() not in (None, adapter_name):
            raise RankshareError(f"Adapter {self._merged_adapter()!r} is merged into the base weights; unmerge() "
                                 f"before switching to {adapter_name!r}.")
        for other in self._adapters.values():
            for parameter in other.trains:
                parameter.requires_grad_(False)
        for parameter in adapter.trains:
            parameter.requires_grad_(True)
        for slot in [*self._hosts().values(), *self._saved().values()]:
            slot.active = adapter_name
        self._active = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Take adapter ``adapter_name`` out; refused for the basis of another adapter, or a merged adapter."""
        self._require(adapter_name)
        users = sorted(name for name in self._adapters if name != adapter_name and self.basis_of(name) == adapter_name)
        if users:
            raise RankshareError(f"Adapter {adapter_name!r} is the basis of {users}, which use its factors; delete "
                                 "those first.")
        if self._merged_adapter() == adapter_name:
            raise RankshareError(f"Adapter {adapter_name!r} is merged into the base weights; unmerge() it first.")
        for name, host in self._hosts().items():
            if adapter_name in host.adapters:
                del host.adapters[adapter_name]
            if not host.adapters:
                self._replace(name, host.base_layer)
        for name, slot in self._saved().items():
            if adapter_name in slot.copies:
                del slot.copies[adapter_name]
            if not slot.copies:
                self._replace(name, slot.original)
        if adapter_name in self.shared:
            del self.shared[adapter_name]
        del self._adapters[adapter_name]
        if self._active == adapter_name:
            self._active = None
            if self._adapters:
                self.set_adapter(next(iter(self._adapters)))

    def _replace(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.base_model.get_submodule(parent_name) if parent_name else self.base_model, child, module)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside this context the model computes the base model's outputs (no adapter is applied)."""
        if self._merged_adapter() is not None:
            raise RankshareError(f"Adapter {self._merged_adapter()!r} is merged into the base weights, so the base "
                                 "model cannot be recovered by skipping it; unmerge() first.")
        slots = [*self._hosts().values(), *self._saved().values()]
        for slot in slots:
            slot.disabled = True
        try:
            yield self
        finally:
            for slot in slots:
                slot.disabled = False

    # -- calling ------------------------------------------------------------------------------------------

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward, with the active adapter, or with ``adapter_names``: one adapter per example
        (``"__base__"`` for none), each example's output as it would be with that adapter active."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed(adapter_names, _batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's ``generate``; ``adapter_names`` as in ``forward``, one per prompt (each prompt's beams
        or returned sequences get its adapter)."""
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        config = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        beams, sequences = (kwargs.get(key, getattr(config, key, 1)) or 1 for key in ("num_beams",
                                                                                     "num_return_sequences"))
        # generate repeats each prompt this many times, consecutively, before the first forward.
        with self._mixed(adapter_names, _batch_size(args, kwargs), expansion=max(beams, sequences)):
            return self.base_model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The base model's gradient checkpointing, made safe for a frozen base (``checkpoint_frozen_base``: the
        same loss and adapter gradients as without it). This replaces the base model's method of the same name,
        which attribute lookup would otherwise reach; ``gradient_checkpointing_disable()`` still goes to it."""
        checkpoint_frozen_base(self.base_model, gradient_checkpointing_kwargs)

    @contextlib.contextmanager
    def _mixed(self, adapter_names: list[str], batch_size: int | None, expansion: int = 1):
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise RankshareError("adapter_names must be a list of adapter names, one per example of the batch.")
        adapter_names = list(adapter_names)
        unknown = sorted({name for name in adapter_names if name != BASE and name not in self._adapters})
        if unknown:
            raise RankshareError(f"adapter_names holds {unknown}, which name no adapter; this model has "
                                 f"{sorted(self._adapters)} (and {BASE!r} for the base model).")
        if batch_size is not None and batch_size != len(adapter_names):
            raise RankshareError(f"adapter_names gives {len(adapter_names)} names for a batch of {batch_size} "
                                 "examples; give one name per example.")
        if not adapter_names:
            raise RankshareError("adapter_names is empty; give one name per example of the batch.")
        hosts = list(self._hosts().values())  # one walk of the model per call: this runs before every forward
        merged = self._merged_adapter(hosts)
        if merged is not None:
            raise RankshareError(f"Adapter {merged!r} is merged into the base weights, so each row "
                                 "cannot get its own adapter; unmerge() before a mixed batch.")
        if any(host.disabled for host in hosts):
            raise RankshareError("Inside disable_adapter() every example gets the base model; leave out "
                                 "adapter_names.")
        rows = MixedRows(adapter_names, expansion)
        slots = [*hosts, *self._saved().values()]
        for slot in slots:
            slot.rows = rows
        try:
            yield
        finally:
            for slot in slots:
                slot.rows = None

    # -- parameters ---------------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Every tensor one adapter (the active one by default) adds or trains, each once: its layers' tensors,
        the shared factors it owns, and its copies of the modules saved whole. A basis it uses is not included."""
        name = adapter_name or self._require_active()
        adapter = self._require(name)
        state = {}
        for module, layer in self.adapter_layers(name).items():
            state.update({f"{module}.{key}": p for key, p in layer.adapter_parameters().items()})
        for key, shared in (self.shared[name].items() if name in self.shared else []):
            state.update({f"shared.{key}.{pname}": p for pname, p in shared.named_parameters()})
        slots = self._saved()
        for module in adapter.modules_to_save:
            state.update({f"{module}.{key}": t for key, t in slots[module].copies[name].state_dict().items()})
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

    def _merged_adapter(self, hosts: list[AdaptedLinear] | None = None) -> str | None:
        hosts = self._hosts().values() if hosts is None else hosts
        return next((host.merged for host in hosts if host.merged is not None), None)

    def merge(self, gates: Gates | None = None, safe: bool = False) -> None:
        """Fold the active adapter's update into each base weight (in place, reversible by ``unmerge``).

        Mixture methods (MoR, MoE-LoRA) merge only with ``gates``: one weight per expert, used in every layer, or
        ``{module name: weights}`` for every layer the adapter adapts (a layer's experts are its own, so each layer
        may have its own mean routing). ``safe=True`` checks every layer before changing any: if one would put NaN
        or inf into its base weight, RankshareError names it and all weights are left exactly as they were. A
        weight tied to another module's (an output layer tied to the input embeddings) is untied first, with a
        warning, so that the other module keeps its weight.
        """
        self._merge(gates, safe)

    def layer_gates(self, gates: Gates | None, adapter_name: str | None = None) -> dict[str, Gates | None]:
        """``gates`` for each layer of adapter ``adapter_name`` (the active one by default): one vector for all, or
        a ``{module name: vector}`` that must name every adapted module and no other."""
        modules = self._require(adapter_name or self._require_active()).modules
        if not isinstance(gates, dict):
            return dict.fromkeys(modules, gates)
        missing, unknown = [m for m in modules if m not in gates], sorted(set(gates) - set(modules))
        if missing:
            raise RankshareError(f"Per-layer gates give no gates for {len(missing)} of the adapter's {len(modules)} "
                                 f"layers ({missing[:3]}...); give one vector per adapted module "
                                 "(model.targeted_module_names), or one vector for all.")
        if unknown:
            raise RankshareError(f"Per-layer gates {unknown[:3]} name no layer of adapter "
                                 f"{adapter_name or self._active!r}; its layers are model.targeted_module_names.")
        return {module: gates[module] for module in modules}

    def _merge(self, gates, safe: bool) -> None:
        name = self._require_active()
        hosts = {module: host for module, host in self._hosts().items() if name in host.adapters}
        per_layer = self.layer_gates(gates)
        if safe:
            # All checks come first: undoing a merge by subtraction would not restore the weights bit for bit.
            for module, host in hosts.items():
                if host.merged is None:
                    try:
                        host.merged_weight(name, per_layer[module], safe=True)
                    except RankshareError as error:
                        raise RankshareError(f"Adapter layer {module!r}: {error} No weight was changed.") from None
        self._untie({module: host for module, host in hosts.items() if host.merged is None})
        for module, host in hosts.items():
            host.merge(per_layer[module])

    def _untie(self, hosts: dict[str, AdaptedLinear]) -> None:
        """Give each of ``hosts``' base layers a weight of its own where it shares one with another module."""
        holders: dict[int, list[str]] = {}
        for pname, parameter in self.base_model.named_parameters(remove_duplicate=False):
            holders.setdefault(id(parameter), []).append(pname.removesuffix(".weight"))
        for module, host in hosts.items():
            layer = host.base_layer
            others = [n for n in holders.get(id(layer.weight), []) if n != f"{module}.base_layer"]
            if not others:
                continue
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
            config = getattr(self.base_model, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False  # or save_pretrained and from_pretrained tie them again
            warnings.warn(f"{module}'s weight is tied to {others}; merging gives {module} a weight of its own, so that "
                          f"{others} keep theirs (the tie is broken).", stacklevel=4)

    def unmerge(self) -> None:
        """Take the merged update out of each base weight again, by subtraction: to float32 rounding for a float32
        base, to within one ulp of the merged weight for a bfloat16 or float16 one (``AdaptedLinear.unmerge``)."""
        for host in self._hosts().values():
            host.unmerge()

    def merge_and_unload(self, gates: Gates | None = None, safe: bool = False) -> nn.Module:
        """Merge the active adapter (``safe`` as in ``merge``), then put the base layers back in place of the
        adapter layers, with the active adapter's copies of the modules saved whole. Returns the base model;
        if a safe merge refuses, the model stays adapted and unmerged."""
        if self._merged_adapter() is None:
            self._merge(gates, safe)
        slots = self._saved()
        for name in self.modules_to_save:  # trained in float32; the merged model is all of the base's dtype
            slots[name].original = slots[name].copy_as_original(self._active)
        return self.unload()

    def unload(self) -> nn.Module:
        """Take every adapter out: each base layer comes back as it is now (merged or not), each saved module as
        the base model had it. Returns the base model."""
        for name, host in self._hosts().items():
            self._replace(name, host.base_layer)
        for name, slot in self._saved().items():
            self._replace(name, slot.original)
        self._adapters, self._active = {}, None
        self.shared = nn.ModuleDict()
        return self.base_model

def check_adapter_name(name: str) -> None:
    """One clear error for a name that cannot name an adapter."""
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise RankshareError(f"An adapter name must be a non-empty string without '.' and not {BASE!r}, got "
                             f"{name!r}.")
    if hasattr(nn.ModuleDict, name) or hasattr(nn.ModuleDict(), name):
        # Adapters live in nn.ModuleDicts keyed by their names, and a key cannot shadow a module's attribute.
        raise RankshareError(f"{name!r} is the name of an attribute of torch modules, so it cannot name an adapter; "
                             f"choose another name (e.g. {name + '_adapter'!r}).")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The number of examples in a call's inputs, where it can be told (the first tensor argument's rows)."""
    for value in [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None
