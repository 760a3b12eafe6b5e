"""Adapter files: ``adapter_config.json`` (JSON) and ``adapter_model.safetensors`` (tensors); never pickle.

This module reads, writes and checks the files; it knows no model class (``AdaptedModel`` calls it).

The tensor file holds only what the adapter adds (each shared factor once) and the modules saved whole,
so it is about 4 bytes per adapter parameter in float32.

The two files are one adapter and are checked as a pair: the config records the sha256 of the tensor file
(``weights_sha256``) and of its own content (``config_sha256``), and loading refuses files whose sums do not
match — damage on disk, a tensor file from another save, a hand edit — before it changes the base model.

Saving writes both new files beside the old ones, in full and synced to disk, and only then renames them
over the old ones, weights first, while a second name keeps the old weights until the new config is in
place. A save killed before the renames leaves the old adapter whole (and stray hidden ``.tmp`` files); one
killed between the two renames leaves the old config beside the new weights, and loading, finding that the
weights' checksum is not the config's, reads the old config's own weights under their second name: either
way the old adapter loads until a save completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .atomic_files import replace_together
from .config import AdapterConfig
from .errors import RankshareError
from .layer import is_supported, linear_shape
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREVIOUS_WEIGHTS_NAME = f".{WEIGHTS_NAME}.previous"  # the old weights, only while a save replaces them


def save_adapter(directory: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor], layout: dict) -> None:
    """Write both files; ``layout`` holds what loading checks against a base model: ``modules`` (name ->
    [d_out, d_in]), ``shared`` (key -> the modules using it), ``modules_to_save`` and ``base_model_class``."""
    tensors = {key: t.detach().contiguous() for key, t in tensors.items()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RankshareError(
                f"Tensor {key!r} holds NaN or inf, so the adapter was not saved (an earlier save in {directory} is "
                "kept as it was). Training has probably diverged: lower the learning rate, or save an earlier state."
            )
    weights = safetensors.torch.save(tensors)
    record = {
        "method": config.method,
        "config": config.to_dict(),
        "rankshare_version": __version__,
        **layout,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    record["config_sha256"] = _record_sha256(record)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first, the old ones kept under another name until the new config is in place: a crash between
    # the renames leaves the old config beside new weights, and loading finds the old config's own weights.
    _keep_previous_weights(directory)
    replace_together({
        directory / WEIGHTS_NAME: weights,
        directory / CONFIG_NAME: (json.dumps(record, indent=2) + "\n").encode("utf-8"),
    })
    (directory / PREVIOUS_WEIGHTS_NAME).unlink(missing_ok=True)


def _keep_previous_weights(directory: Path) -> None:
    current, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS_NAME
    previous.unlink(missing_ok=True)
    if current.is_file():
        try:
            os.link(current, previous)  # a second name for the same bytes: no copy
        except OSError:  # a file system without hard links
            shutil.copyfile(current, previous)


def read_adapter(directory: Path) -> tuple[dict, AdapterConfig]:
    """The checked record of ``adapter_config.json`` and the config it holds."""
    config_path = directory / CONFIG_NAME
    record = _read_record(config_path)
    try:
        config = AdapterConfig.from_dict(record["config"])
    except RankshareError as error:
        raise RankshareError(f"{config_path}: {error}") from None
    return record, config


def read_weights(directory: Path, record: dict) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``, checked against the checksum ``record`` holds."""
    return _read_tensors(directory / WEIGHTS_NAME, record.get("weights_sha256"))


def _read_record(path: Path) -> dict:
    """The parsed config file, its checksum verified and the fields loading relies on checked for type."""
    if not path.is_file():
        raise RankshareError(f"No {CONFIG_NAME} in {path.parent}; point to a folder written by save_pretrained().")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8 and bad JSON are both ValueErrors
        raise RankshareError(f"{path} is not valid JSON ({error}); save the adapter again.") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RankshareError(f"{path} has no 'config' object; it was not written by rankshare.")
    # Absent from files saved before rankshare recorded checksums; those load unchecked.
    recorded = record.get("config_sha256")
    if recorded is not None and recorded != _record_sha256(record):
        raise RankshareError(
            f"{path} does not match its own checksum (config_sha256): it was damaged, or edited by hand. Save the "
            "adapter again; to load a config you edited on purpose, delete its config_sha256 entry."
        )
    modules = record.get("modules")
    if not isinstance(modules, dict):
        raise RankshareError(
            f"{path}: 'modules' must map each adapted module's name to its [d_out, d_in], got "
            f"{reprlib.repr(modules)}; save the adapter again."
        )
    for name, shape in modules.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 1 for d in shape)):
            raise RankshareError(
                f"{path} records module {name!r} with shape {reprlib.repr(shape)}; expected [d_out, d_in], two "
                "positive integers. Save the adapter again."
            )
    saved_whole = record["modules_to_save"] = record.get("modules_to_save") or []
    if not isinstance(saved_whole, list) or not all(isinstance(name, str) and name for name in saved_whole):
        raise RankshareError(
            f"{path}: 'modules_to_save' must be a list of module names, got {reprlib.repr(saved_whole)}; save the "
            "adapter again."
        )
    return record


def _record_sha256(record: dict) -> str:
    """The sha256 of a record's content, blind to layout and key order, leaving out ``config_sha256`` itself."""
    content = {key: value for key, value in record.items() if key != "config_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def check_base_model(base_modules: dict[str, nn.Module], modules: dict[str, list[int]], config_path: Path) -> None:
    """Every recorded module is a linear layer of the recorded shape among ``base_modules`` (name -> module, as
    the base model has them)."""
    for name, shape in modules.items():
        module = base_modules.get(name)
        if module is None:
            raise RankshareError(
                f"{config_path} records an adapted module {name!r}, which this base model lacks; load the adapter "
                "into the model it was trained on."
            )
        if not is_supported(module):
            raise RankshareError(
                f"{config_path} records {name!r} as a linear layer, but in this base model it is a "
                f"{type(module).__name__}; load the adapter into the model it was trained on."
            )
        found = list(linear_shape(module))
        if found != shape:
            raise RankshareError(
                f"Module {name!r} is {found[0]}×{found[1]} (d_out×d_in) here but {shape[0]}×{shape[1]} in the "
                f"saved adapter ({config_path}); load it into the model it was trained on."
            )


def check_adapted_modules(adapted: list[str], modules: dict[str, list[int]], config_path: Path) -> None:
    """The modules the config selects in this base model are the ones the adapter was saved for."""
    adapted, recorded = set(adapted), set(modules)
    if adapted != recorded:
        raise RankshareError(
            f"The target_modules of {config_path} select {len(adapted)} modules of this base model, but the adapter "
            f"was saved for {len(recorded)}: selected here only {sorted(adapted - recorded)[:5]}, saved only "
            f"{sorted(recorded - adapted)[:5]}. Load the adapter into the model it was trained on."
        )


def _read_tensors(path: Path, recorded_sha256: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RankshareError(f"{path} is missing; save the adapter again with save_pretrained().")
    data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
    if recorded_sha256 is not None and hashlib.sha256(data).hexdigest() != recorded_sha256:
        previous = path.with_name(PREVIOUS_WEIGHTS_NAME)  # a save killed between its renames leaves it
        if previous.is_file() and hashlib.sha256(kept := previous.read_bytes()).hexdigest() == recorded_sha256:
            return _parse_tensors(previous, kept)
        _parse_tensors(path, data)  # an unreadable file is reported as such
        raise RankshareError(
            f"{path} does not belong with the {CONFIG_NAME} beside it: its sha256 differs from the one the "
            "config records. One of them was damaged or replaced. Save the adapter again."
        )
    return _parse_tensors(path, data)


def _parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as error:  # safetensors raises several types for damaged files
        raise RankshareError(
            f"{path} is not a readable safetensors file ({error}){_pickle_hint(data)}; save it again."
        ) from None


def _pickle_hint(data: bytes) -> str:
    # torch.save writes a zip archive around a pickle; a bare pickle starts with the PROTO opcode 0x80, and a
    # safetensors file has its JSON header at byte 8.
    if data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[8:9] != b"{"):
        return "; it looks like a pickle or torch.save() file, which rankshare never opens: unpickling can run code"
    return ""


def copy_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the file's tensors into the adapter's (``expected``), every one checked before any is copied."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise RankshareError(
            f"{path} does not fit its config: missing tensors {missing[:5]}, unexpected tensors "
            f"{unexpected[:5]}. The file may come from another adapter; save it again."
        )
    for key, target in expected.items():
        stored = tensors[key]
        if stored.shape != target.shape:
            raise RankshareError(
                f"Tensor {key!r} in {path} has shape {tuple(stored.shape)}, the model expects {tuple(target.shape)}."
            )
        # Precision may differ (a bf16 or float64 save loads into float32); the kind of number may not.
        if stored.dtype != target.dtype and not (stored.is_floating_point() and target.is_floating_point()):
            raise RankshareError(
                f"Tensor {key!r} in {path} is stored as {stored.dtype}, the model expects {target.dtype}; only "
                "floating-point tensors convert between precisions. Save the adapter again."
            )
        if stored.is_floating_point() and not torch.isfinite(stored).all():
            raise RankshareError(
                f"Tensor {key!r} in {path} holds NaN or inf: the adapter had diverged when it was saved. Retrain "
                "it, or load an earlier checkpoint."
            )
    for key, target in expected.items():
        target.data.copy_(tensors[key])
