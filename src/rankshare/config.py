"""Adapter configs: what every method shares (rank, alpha, targets) and how configs travel as JSON."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import RankshareError

# Far beyond any layer width; a larger rank would overflow float(rank) and alpha / rank.
LARGEST_SIZE = 2**31 - 1


@dataclass
class AdapterConfig:
    """Fields every method has.

    rank: the low rank r of the update.
    alpha: the update is scaled by s = alpha / r; ``None`` means alpha = r (s = 1).
    target_modules: a list of module-name suffixes (``"query"`` matches ``"encoder.layer.0.attention.self.query"``)
        or one regular expression matched against the whole module name.
    """

    method: ClassVar[str] = ""

    rank: int = 8
    target_modules: list[str] | str = field(default_factory=list)
    alpha: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.alpha is None and _is_int(self.rank) and 1 <= self.rank <= LARGEST_SIZE:
            self.alpha = float(self.rank)
        self.validate()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        check_positive_int(self, "rank")
        if not _is_finite_number(self.alpha):
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

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        """Rebuild a config saved by ``to_dict``; unknown methods or fields and values of the wrong type are errors."""
        if not isinstance(data, dict):
            raise RankshareError(f"An adapter config must be a JSON object, got {type(data).__name__}.")
        fields = dict(data)
        known = {cls.method: cls for cls in _all_config_classes() if cls.method}
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


def _all_config_classes() -> list[type[AdapterConfig]]:
    found, todo = [], [AdapterConfig]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range, which alpha / rank could not use
        return False


def check_positive_int(config: AdapterConfig, name: str) -> None:
    value = getattr(config, name)
    if not _is_int(value) or value < 1:
        raise RankshareError(f"{type(config).__name__}: {name} must be an integer >= 1, got {value!r}.")
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
