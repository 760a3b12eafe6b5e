"""The method interface: what every adapter method declares, the registry of methods, and configs as JSON.

A method is one config class, defined in the method's own file and registered there with ``@register``
(or declared by another installed package under the entry-point group ``rankshare.methods``). Everything
else in rankshare — surgery, files, the budget planner, training, the CLI, the study — asks the config,
never the method's name.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar

from torch import nn

from .errors import RankshareError

# Far beyond any layer width; a larger rank would overflow float(rank) and alpha / rank.
LARGEST_SIZE = 2**31 - 1
ENTRY_POINT_GROUP = "rankshare.methods"
COMMON_FIELDS = ("rank", "target_modules", "alpha")
# What a run trains, as the fine-tuning command names it; recipes are kept per objective.
OBJECTIVES = ("classify", "text_to_label", "lm", "sft")


@dataclass(frozen=True)
class Recipe:
    """A method's command-line defaults for one objective, and the evidence they come from.

    source: where they were chosen, as ``<study part>/<variant>`` of docs/results, or why there is no such part.
    options: the method's own options (its config's fields) that this objective sets, under those the user gives.
    rank: the rank without --rank or --budget (None: 8).
    """

    learning_rate: float
    source: str
    options: dict = field(default_factory=dict)
    rank: int | None = None


@dataclass
class AdapterConfig(abc.ABC):
    """What every method has and declares.

    rank: the low rank r of the update.
    alpha: the update is scaled by s = alpha / r; ``None`` means alpha = r (s = 1), derived anew from the rank
        (so ``dataclasses.replace(config, rank=16)`` keeps s = 1).
    target_modules: a list of module-name suffixes (``"query"`` matches ``"encoder.layer.0.attention.self.query"``)
        or one regular expression matched against the whole module name.

    A method's own options are its further dataclass fields; ``field(metadata={"help": ...})`` describes
    one for the command line, ``"choices"`` lists a string option's values and ``"min"`` an integer's least
    value (0 unless given); ``"option": False`` marks a field that is no option to plan or set per run (it
    still goes into the saved config).
    """

    method: ClassVar[str] = ""  # the registry's key, in files and on the command line
    title: ClassVar[str] = ""  # the name reports print
    merge_needs_gates: ClassVar[bool] = False  # True when the update depends on per-token gates
    # The fine-tuning command's default peak learning rate for this method, where it has no recipe for the objective.
    learning_rate: ClassVar[float] = 3e-3
    # Per objective (one of OBJECTIVES): the defaults the evidence study chose for this method (see ``recipe``).
    recipes: ClassVar[dict[str, Recipe]] = {}
    # Options the budget planner may change when no rank comes close enough to a budget, with the values to try.
    budget_alternatives: ClassVar[dict[str, tuple]] = {}
    # Whether an adapter of this method can use the shared modules of another adapter of it (a basis): such a
    # method implements on_basis and basis_options.
    uses_a_basis: ClassVar[bool] = False

    rank: int = 8
    target_modules: list[str] | str = field(default_factory=list)
    alpha: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    @abc.abstractmethod
    def create_adapters(self, targets: dict[str, nn.Module]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """Adapter layers for the target modules (name -> base layer), and the modules several layers share."""

    def basis_name(self) -> str | None:
        """The adapter (in the same model) whose shared modules this one uses; they come to ``create_adapters``
        as ``basis=``. None for an adapter that owns everything it uses."""
        return None

    def on_basis(self, basis: str) -> AdapterConfig:
        """This config for an adapter that uses the shared modules of adapter ``basis`` (``uses_a_basis``)."""
        raise RankshareError(f"A {self.title} adapter cannot use another adapter's shared modules; choose a method "
                             f"that can: {', '.join(n for n, c in methods().items() if c.uses_a_basis) or 'none'}.")

    def basis_options(self) -> dict[str, Any]:
        """What an adapter on this one's shared modules must take from this config (``rank``, ``target_modules``,
        options), by field name. Empty for a config that owns no shared modules another can use."""
        return {}

    @abc.abstractmethod
    def num_trainable_parameters(self, shapes: dict[str, tuple[int, int]]) -> int:
        """The exact trainable adapter parameters for targets name -> ``(d_out, d_in)``, from the closed form."""

    @classmethod
    def recipe(cls, objective: str) -> Recipe:
        """The defaults for ``objective``: the study's recipe, or ``learning_rate`` and the options' own defaults."""
        if objective not in OBJECTIVES:
            raise RankshareError(f"Unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}.")
        return cls.recipes.get(objective, Recipe(cls.learning_rate, f"{cls.__name__}.learning_rate"))

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        """The method's own options: its fields beyond rank, alpha and target_modules."""
        return {f.name: f for f in dataclasses.fields(cls)
                if f.name not in COMMON_FIELDS and f.metadata.get("option", True)}

    def option_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.options()}

    @property
    def scale(self) -> float:
        """s = alpha / r; 1 when alpha is None."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def validate(self) -> None:
        check_int(self, "rank", 1)
        if self.alpha is not None and not _is_finite_number(self.alpha):
            raise RankshareError(f"{type(self).__name__}: alpha must be a finite number, got {self.alpha!r}.")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise RankshareError(f"{type(self).__name__}: target_modules is an empty string; give module names.")
            try:
                re.compile(targets)
            except re.error as error:
                raise RankshareError(
                    f"{type(self).__name__}: target_modules {targets!r} is not a valid regular expression ({error}); "
                    "fix it, or give a list of module names instead."
                ) from None
        elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise RankshareError(
                f"{type(self).__name__}: target_modules must be a non-empty list of module names "
                f"(e.g. ['query', 'value']) or a regex string, got {targets!r}."
            )
        for name, option in self.options().items():
            if "choices" in option.metadata:
                check_choice(self, name, tuple(option.metadata["choices"]))
            elif isinstance(option.default, bool):
                check_bool(self, name)
            elif _is_int(option.default):
                check_int(self, name, option.metadata.get("min", 0))
            elif isinstance(option.default, float) and not _is_finite_number(getattr(self, name)):
                raise RankshareError(f"{type(self).__name__}: {name} must be a finite number, got "
                                     f"{getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        """Rebuild a config saved by ``to_dict``; unknown methods or fields and values of the wrong type are errors."""
        if not isinstance(data, dict):
            raise RankshareError(f"An adapter config must be a JSON object, got {type(data).__name__}.")
        fields = dict(data)
        known = methods()
        if "method" not in fields:
            raise RankshareError(f"The adapter config has no 'method'; give one of {sorted(known)}.")
        method = fields.pop("method")
        if not isinstance(method, str) or method not in known:
            raise RankshareError(f"Unknown adapter method {method!r}; rankshare knows {sorted(known)}.")
        cls = known[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names, key=str)  # keys of a dict built in Python need not be strings
        if unknown:
            raise RankshareError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}.")
        return cls(**fields)


class ExternalAdapterConfig(AdapterConfig):
    """A method another library implements and attaches (PEFT's LoRA): it builds, loads and saves its own model.

    ``rankshare.adapt`` hands such a config to ``attach``; what comes back has that library's
    ``save_pretrained`` and ``merge_and_unload``, and ``load`` reads what its ``save_pretrained`` wrote.
    """

    @abc.abstractmethod
    def attach(self, model: nn.Module, modules_to_save: list[str], adapter_name: str = "default") -> nn.Module:
        """Freeze ``model`` and add this adapter under ``adapter_name``, as the other library does."""

    @classmethod
    @abc.abstractmethod
    def load(cls, base_model: nn.Module, directory: str, is_trainable: bool = False) -> nn.Module:
        """The adapted model saved in ``directory``, on ``base_model``."""

    def create_adapters(self, targets):
        raise RankshareError(f"{self.title} is built by another library; attach it with "
                             "rankshare.adapt(model, config).")


_REGISTERED: dict[str, type[AdapterConfig]] = {}
_entry_points_read = False  # other packages' methods are looked up once per process


def register(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a method known by its ``method`` name (to files, the planner and the CLI)."""
    if not (isinstance(cls, type) and issubclass(cls, AdapterConfig)) or not cls.method:
        raise RankshareError(f"register() takes an AdapterConfig subclass with a 'method' name, got {cls!r}.")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise RankshareError(f"{cls.__name__} does not implement {missing}; every method must.")
    known = _REGISTERED.get(cls.method)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise RankshareError(f"Method {cls.method!r} is already registered by {known.__module__}.{known.__qualname__}.")
    _REGISTERED[cls.method] = cls
    return cls


def unregister(method: str) -> None:
    _REGISTERED.pop(method, None)


def methods() -> dict[str, type[AdapterConfig]]:
    """Every known method, ``{name: config class}``: rankshare's own and those other packages declare (read from
    the installed packages' entry points at the first call)."""
    global _entry_points_read
    if not _entry_points_read:
        _entry_points_read = True
        _register_entry_points()
    return dict(_REGISTERED)


def _register_entry_points() -> None:
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTERED:
            continue
        try:
            cls = entry.load()
            if getattr(cls, "method", None) != entry.name:
                raise RankshareError(f"the entry point is named {entry.name!r} but its class's method is "
                                     f"{getattr(cls, 'method', None)!r}")
            register(cls)
        except Exception as error:  # another package's fault: say whose, and go on without it
            warnings.warn(f"rankshare: the method {entry.name!r} that {entry.value} declares could not be loaded "
                          f"({error}); it is left out.", stacklevel=3)


def method_class(name: str) -> type[AdapterConfig]:
    known = methods()
    if name not in known:
        raise RankshareError(f"Unknown method {name!r}; choose one of {', '.join(known)}.")
    return known[name]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range, which alpha / rank could not use
        return False


def check_int(config: AdapterConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not _is_int(value) or value < minimum:
        raise RankshareError(f"{type(config).__name__}: {name} must be an integer >= {minimum}, got {value!r}.")
    if value > LARGEST_SIZE:
        raise RankshareError(f"{type(config).__name__}: {name} = {value} is too large; use at most {LARGEST_SIZE}.")


def check_choice(config: AdapterConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise RankshareError(f"{type(config).__name__}: {name} must be one of {list(choices)}, got {value!r}.")


def check_bool(config: AdapterConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise RankshareError(f"{type(config).__name__}: {name} must be true or false, got {value!r}.")
