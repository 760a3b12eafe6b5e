"""Which modules of a model get adapters, and which of them share factors. Pure functions over names."""

from __future__ import annotations

import re

from torch import nn

from .errors import RankshareError
from .layer import is_supported, linear_shape
from .slots import AdaptedLinear, SavedModule

ALL_LINEAR = "all-linear"
CLASSIFIER_HEADS = ("score", "classifier")  # the names transformers gives a sequence classifier's head


def matches(name: str, patterns: list[str] | str) -> bool:
    """A list entry matches a name equal to it or ending in ``"." + entry``; a string is a full-match regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def masked_name(name: str) -> str:
    """The name with its numeric components masked: ``layers.3.q_proj`` -> ``layers.*.q_proj``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


# How targets group into factors they share (``share``): the key of a target's group, beside its shape.
SHARE_KEYS = {"by_name": masked_name, "by_shape": lambda name: "", "by_module": lambda name: name}
SHARES = tuple(SHARE_KEYS)


def model_modules(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The model's modules by name as the base model has them: a layer holding adapters stands for its base layer,
    a module saved per adapter for its original, and nothing inside either is listed."""
    found = {}
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, AdaptedLinear):
            found[full] = child.base_layer
        elif isinstance(child, SavedModule):
            found[full] = child.original
            found.update(model_modules(child.original, full + "."))
        else:
            found[full] = child
            found.update(model_modules(child, full + "."))
    return found


def find_targets(model: nn.Module, patterns: list[str] | str) -> dict[str, nn.Module]:
    """The modules ``patterns`` names, in model order; each must be a supported linear layer. ``"all-linear"``
    names every supported linear layer but the output layer, as in PEFT."""
    modules = model_modules(model)
    if isinstance(patterns, str) and patterns.lower() == ALL_LINEAR:
        heads = _output_layers(model, modules)
        return {name: module for name, module in modules.items() if is_supported(module) and name not in heads}
    targets = {name: module for name, module in modules.items() if matches(name, patterns)}
    if not targets:
        linear = sorted({masked_name(n) for n, m in modules.items() if is_supported(m)})
        shown = ", ".join(linear[:30]) + (f", … ({len(linear)} in all)" if len(linear) > 30 else "")
        raise RankshareError(
            f"No module matched target_modules={patterns!r}. "
            f"Linear layers in this model: {shown or 'none'}. Name some of these."
        )
    for name, module in targets.items():
        if not is_supported(module):
            raise RankshareError(
                f"target_modules={patterns!r} matched {name!r}, a {type(module).__name__}; rankshare adapts "
                "torch.nn.Linear and transformers' Conv1D only. Name linear layers."
            )
    return targets


def _output_layers(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    """The names of the layers that give a model's outputs: its output embeddings (an LM head) or, for a model
    without them, its classification head (``score`` or ``classifier``)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, AdaptedLinear):
        output = output.base_layer
    elif isinstance(output, SavedModule):
        output = output.original
    if output is not None:
        return {name for name, module in modules.items() if module is output}
    return {name for name in CLASSIFIER_HEADS if name in modules}


def target_shapes(model: nn.Module, patterns: list[str] | str) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of every module ``patterns`` names."""
    return {name: linear_shape(module) for name, module in find_targets(model, patterns).items()}


def group_targets(shapes: dict[str, tuple[int, int]], share: str) -> dict[str, list[str]]:
    """Groups of targets (name -> ``(d_out, d_in)``) that share factors, keyed by a name usable as a module key.

    ``"by_name"``: same masked name and same shape (key ``encoder/layer/*/attention/self/query``; a shape
    suffix ``@768x3072`` is added only where one masked name covers several shapes).
    ``"by_shape"``: same ``(d_out, d_in)`` (key ``768x768``).
    ``"by_module"``: every target alone (key ``encoder/layer/0/attention/self/query``): a basis per module, which
    only adapters on one basis (tasks) share.
    """
    by_key: dict[tuple, list[str]] = {}
    for name, shape in shapes.items():
        by_key.setdefault((SHARE_KEYS[share](name), tuple(shape)), []).append(name)
    names_with_shapes: dict[str, int] = {}
    for masked, _ in by_key:
        names_with_shapes[masked] = names_with_shapes.get(masked, 0) + 1
    groups = {}
    for (masked, (d_out, d_in)), names in by_key.items():
        shape = f"{d_out}x{d_in}"
        if not masked:
            key = shape
        elif names_with_shapes[masked] > 1:
            key = f"{masked.replace('.', '/')}@{shape}"
        else:
            key = masked.replace(".", "/")
        groups[key] = names
    return groups
