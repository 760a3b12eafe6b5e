"""Adapter files: ``adapter_config.json`` (JSON) and ``adapter_model.safetensors`` (tensors); never pickle.

The tensor file holds only what the adapter adds (each shared factor once) and the modules saved whole,
so it is about 4 bytes per adapter parameter in float32. Each file is written beside its target and
renamed over it, so an interrupted save leaves the previous file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
from torch import nn

from .config import AdapterConfig
from .errors import RankshareError
from .layer import linear_shape
from .model import AdaptedModel, adapt

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: AdaptedModel, directory: Path) -> None:
    from . import __version__

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().contiguous() for key, t in model.adapter_state_dict().items()}
    record = {
        "method": model.adapter_config.method,
        "config": model.adapter_config.to_dict(),
        "rankshare_version": __version__,
        "modules": {name: list(linear_shape(layer.base_layer)) for name, layer in model.adapter_layers().items()},
        "shared": {
            key: [name for name, layer in model.adapter_layers().items() if any(m is shared for m in layer.shared_modules())]
            for key, shared in model.shared.items()
        },
        "modules_to_save": model.modules_to_save,
        "base_model_class": type(model.base_model).__name__,
    }
    _write_atomically(directory / WEIGHTS_NAME, lambda path: safetensors.torch.save_file(tensors, str(path)))
    _write_atomically(directory / CONFIG_NAME, lambda path: path.write_text(json.dumps(record, indent=2) + "\n"))


def load_adapter(base_model: nn.Module, directory: Path, is_trainable: bool) -> AdaptedModel:
    record = _read_record(directory)
    config = AdapterConfig.from_dict(record.get("config"))
    _check_base_model(base_model, record.get("modules", {}))
    model = adapt(base_model, config, modules_to_save=record.get("modules_to_save") or None)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise RankshareError(f"{weights_path} is missing; save the adapter again with save_pretrained().")
    try:
        tensors = safetensors.torch.load_file(str(weights_path))
    except Exception as error:  # safetensors raises several types for damaged files
        raise RankshareError(f"{weights_path} is not a readable safetensors file ({error}); save it again.") from None
    expected = model.adapter_state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise RankshareError(
            f"{weights_path} does not fit its config: missing tensors {missing[:5]}, unexpected tensors "
            f"{unexpected[:5]}. The file may come from another adapter; save it again."
        )
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise RankshareError(
                f"Tensor {key!r} in {weights_path} has shape {tuple(tensors[key].shape)}, the model expects "
                f"{tuple(target.shape)}."
            )
        target.data.copy_(tensors[key])
    if not is_trainable:
        model.requires_grad_(False)  # otherwise adapt() has already chosen what trains
    return model


def _read_record(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise RankshareError(f"No {CONFIG_NAME} in {directory}; point to a folder written by save_pretrained().")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RankshareError(f"{path} is not valid JSON ({error}); save the adapter again.") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RankshareError(f"{path} has no 'config' object; it was not written by rankshare.")
    return record


def _check_base_model(base_model: nn.Module, modules: dict) -> None:
    for name, shape in modules.items():
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise RankshareError(
                f"The adapter was saved for a model with a module {name!r}, which this base model lacks; "
                "load it into the model it was trained on."
            ) from None
        found = list(linear_shape(module))
        if found != list(shape):
            raise RankshareError(
                f"Module {name!r} is {found[0]}×{found[1]} (d_out×d_in) here but {shape[0]}×{shape[1]} in the "
                "saved adapter; load it into the model it was trained on."
            )


def _write_atomically(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
