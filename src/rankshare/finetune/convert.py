"""Converting a trained run: merged into a plain model folder (``merge_run``), written as PEFT LoRA folders
(``export_runs``), or a LoRA run fitted by LoTR (``compress_run``); a routed mixture with the fixed gates of
``run_gates``. Each writes its output aside and puts it in place of ``--out`` only once all is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import safetensors

import rankshare as rs

from ..config import AdapterConfig, ExternalAdapterConfig
from ..errors import RankshareError
from ..export import PEFT_PREFIX
from .jobs import BASIS_ADAPTER
from .models import load_causal_lm, load_classifier, resolve_model
from .run_folder import load_run, write_json
from .trained import load_trained, run_base


def run_gates(config: AdapterConfig, folder: Path, gates: list[float] | str | None, command: str,
              modules: list[str]):
    """The gates to merge or export a run's adapter with: None for an adapter without a router, the weights
    given (every layer), or a task's mean routing recorded at evaluation (``gates`` a task name), each layer its
    own as ``{module name: weights}``: a layer's experts are its own, so an average over layers would mix
    unrelated experts. ``modules`` are the adapter's modules, in the order runs before the names were recorded
    kept their layers."""
    if config.merge_needs_gates and gates is None:
        options = ", ".join(f"{name}={value}" for name, value in config.option_values().items())
        raise RankshareError(f"A {config.method} adapter ({options}) routes each token differently and {command}s "
                             "only with fixed gates: pass --gates g1,...,gN (one weight per expert) or --gates TASK.")
    if not config.merge_needs_gates and gates is not None:
        raise RankshareError(f"--gates applies to routed mixtures only; a {config.method} adapter {command}s without "
                             "it.")
    if isinstance(gates, str):  # a task name: that task's mean routing per layer, measured at evaluation
        metrics = json.loads((folder / "metrics.json").read_text())
        layers = metrics.get("router_layers") or {}
        if gates not in layers:
            raise RankshareError(f"--gates {gates}: no mean routing recorded for that task; tasks: {sorted(layers)}.")
        return dict(zip(metrics.get("router_modules") or modules, layers[gates]))
    return gates


def merge_run(directory: Path, out: Path, gates: list[float] | str | None) -> Path:
    model, run, tokenizer, folder = load_trained(directory, "cpu")
    config = AdapterConfig.from_dict(run["settings"]["adapter"])
    gates = run_gates(config, folder, gates, "merge", model.targeted_module_names)
    plain = model.merge_and_unload(gates=gates) if config.merge_needs_gates else model.merge_and_unload()
    with _folder_aside(out) as temporary:
        plain.save_pretrained(str(temporary))
        tokenizer.save_pretrained(str(temporary))
    return out


def export_runs(adapters: list[tuple[str | None, Path]], out: Path, gates: list[float] | str | None) -> list[Path]:
    """Write each run's adapter as a PEFT LoRA folder: ``out`` itself for one unnamed run, ``out/NAME`` for each
    of several named ones. Everything is checked and written aside before ``out`` is replaced."""
    names = [name for name, _ in adapters]
    if len(adapters) > 1 and (None in names or len(set(names)) < len(names)):
        raise RankshareError("Several --adapter need a distinct name each: --adapter NAME=RUN (one folder per name).")
    trained = []
    for name, directory in adapters:
        run, folder = load_run(directory)
        config = AdapterConfig.from_dict(run["settings"]["adapter"])
        if isinstance(config, ExternalAdapterConfig):
            raise RankshareError(f"--adapter {directory} is a {config.method} run, already in that library's format: "
                                 f"its folder {folder / 'adapter'} loads as it is.")
        run_gates(config, folder, gates, "export", [])  # the gates' checks, before any model is loaded
        trained.append((name, folder, config))
    with _folder_aside(out) as temporary:
        for name, folder, config in trained:
            model = load_trained(folder, "cpu")[0]
            weights = run_gates(config, folder, gates, "export", model.targeted_module_names)
            rs.export_peft(model, temporary / name if name else temporary, gates=weights)
    return [out / name if name else out for name, _, _ in trained]


def compress_run(directory: Path, ranks: list[int], out: Path, share: str, model: str | None = None
                 ) -> list[tuple[int, Path, dict]]:
    """Fit LoTR at each of ``ranks`` to a PEFT LoRA run's updates (``rs.compress_lora``) and save each as a run
    folder that ``eval`` reads: ``out`` itself for one rank, ``out/rank-R`` for several. A bare PEFT folder (not a
    run) needs ``model``, its base model, and gives rankshare adapter folders. Returns, per rank, the folder and
    the fit report (group -> GroupFit)."""
    if (directory / "adapter_config.json").is_file() and not (directory / "run.json").is_file():
        return _compress_folder(directory, ranks, out, share, model)
    run, folder = load_run(directory)
    config = AdapterConfig.from_dict(run["settings"]["adapter"])
    if not isinstance(config, ExternalAdapterConfig):
        raise RankshareError(f"--adapter {directory} is a {config.title} run; compress takes a LoRA run (--method "
                             "lora), whose adapter is PEFT's.")
    fitted = []
    with _folder_aside(out) as temporary:
        for rank in ranks:
            model, report = rs.compress_lora(run_base(run), folder / "adapter", rank, share)
            target = _rank_folder(temporary, rank, ranks)
            model.save_pretrained(target / "adapter")
            settings = {**run["settings"], "adapter": model.adapter_config.to_dict()}
            write_json(target / "run.json", {**run, "settings": settings, "compressed_from": str(directory)})
            fitted.append((rank, _rank_folder(out, rank, ranks), report))
    return fitted


def _compress_folder(directory: Path, ranks: list[int], out: Path, share: str, model: str | None):
    if model is None:
        raise RankshareError(f"--adapter {directory} is a PEFT folder, not a rankshare run: give its base model with "
                             "--model (minilm, smollm2, or a model folder).")
    fitted = []
    with _folder_aside(out) as temporary:
        for rank in ranks:
            adapted, report = rs.compress_lora(_peft_base(directory, model), directory, rank, share)
            adapted.save_pretrained(_rank_folder(temporary, rank, ranks))
            fitted.append((rank, _rank_folder(out, rank, ranks), report))
    return fitted


def _peft_base(directory: Path, model: str):
    """The base model ``model`` as a PEFT folder's adapter needs it: a classifier over as many labels as its saved
    head has, or a causal LM."""
    source = resolve_model(model)
    saved = json.loads((directory / "adapter_config.json").read_text()).get("modules_to_save") or []
    heads = [name for name in ("classifier", "score") if name in saved]
    num_labels = None
    if heads:  # a classifier: as many labels as the saved head has
        with safetensors.safe_open(directory / "adapter_model.safetensors", "pt") as weights:
            key = f"{PEFT_PREFIX}{heads[0]}.weight"
            if key not in weights.keys():
                raise RankshareError(f"--adapter {directory}: its config saves {heads[0]!r}, but the tensors lack it; "
                                     "save the PEFT adapter again.")
            num_labels = weights.get_slice(key).get_shape()[0]
    return load_classifier(source, num_labels) if num_labels else load_causal_lm(source)


def compress_runs(adapters: list[tuple[str, Path]], ranks: list[int], out: Path, share: str,
                  model: str | None = None) -> list[tuple[int, Path, rs.CompressionReport]]:
    """Fit k LoRA runs (``NAME=RUN``) jointly at each of ``ranks`` into one LoTR basis (``rs.compress_loras``).

    Per rank, ``out/rank-R/basis`` is a run folder holding the basis, and ``out/rank-R/NAME`` a run folder per task on
    that basis, which eval, predict, generate, merge and export read as any run trained with ``--basis``. Bare PEFT
    folders (with ``model``, their base model) give adapter folders there instead of runs. Returns, per rank, its
    folder and the fit report."""
    names = [name for name, _ in adapters]
    if None in names or len(set(names)) < len(names):
        raise RankshareError("Several --adapter need a distinct name each: --adapter TASK=RUN (one folder per task).")
    peft_folders = [(d / "adapter_config.json").is_file() and not (d / "run.json").is_file() for _, d in adapters]
    if any(peft_folders):
        if not all(peft_folders):
            raise RankshareError("Give all --adapter as LoRA runs or all as PEFT folders (with --model), not a mix.")
        return _compress_folders(adapters, ranks, out, share, model)
    runs = {}
    for name, directory in adapters:
        run, folder = load_run(directory)
        if not isinstance(AdapterConfig.from_dict(run["settings"]["adapter"]), ExternalAdapterConfig):
            raise RankshareError(f"--adapter {name}={directory} is a {run['settings']['adapter']['method']} run; "
                                 "compress takes LoRA runs (--method lora), whose adapters are PEFT's.")
        runs[name] = run, folder
    (first, (first_run, _)), *others = runs.items()
    for name, (run, _) in others:
        if (run["job"]["model"], run["kind"]) != (first_run["job"]["model"], first_run["kind"]):
            raise RankshareError(f"--adapter {name} is a {run['kind']} run on {run['job']['model']}, --adapter {first} "
                                 f"a {first_run['kind']} run on {first_run['job']['model']}; compress runs of one base "
                                 "model and kind together.")
    fitted = []
    with _folder_aside(out) as temporary:
        for rank in ranks:
            model, report = rs.compress_loras(run_base(first_run), {n: f / "adapter" for n, (_, f) in runs.items()},
                                              rank, share, basis_name=BASIS_ADAPTER)
            written, final = temporary / f"rank-{rank}", out / f"rank-{rank}"
            model.save_pretrained(written / "basis" / "adapter", BASIS_ADAPTER)
            basis_config = model.adapter_configs[BASIS_ADAPTER].to_dict()
            write_json(written / "basis" / "run.json", {
                **first_run, "settings": {**first_run["settings"], "adapter": basis_config},
                "compressed_from": {n: str(d) for n, d in adapters}})
            fingerprint = model.basis_fingerprint(BASIS_ADAPTER)
            for name, (run, _) in runs.items():
                model.save_pretrained(written / name / "adapter", name)
                settings = {**run["settings"], "adapter": model.adapter_configs[name].to_dict()}
                write_json(written / name / "run.json", {
                    **run, "settings": settings, "basis": {"run": str(final / "basis"), "fingerprint": fingerprint},
                    "compressed_from": str(dict(adapters)[name])})
            fitted.append((rank, final, report))
    return fitted


def _compress_folders(adapters: list[tuple[str, Path]], ranks: list[int], out: Path, share: str, model: str | None):
    if model is None:
        raise RankshareError("--adapter folders that are PEFT's (not rankshare runs) need their base model: give "
                             "--model (minilm, smollm2, or a model folder).")
    fitted = []
    with _folder_aside(out) as temporary:
        for rank in ranks:
            compressed, report = rs.compress_loras(_peft_base(adapters[0][1], model),
                                                   {name: folder for name, folder in adapters}, rank, share,
                                                   basis_name=BASIS_ADAPTER)
            for name in [BASIS_ADAPTER, *(name for name, _ in adapters)]:
                compressed.save_pretrained(temporary / f"rank-{rank}" / name, name)
            fitted.append((rank, out / f"rank-{rank}", report))
    return fitted


def _rank_folder(out: Path, rank: int, ranks: list[int]) -> Path:
    return out if len(ranks) == 1 else out / f"rank-{rank}"


@contextlib.contextmanager
def _folder_aside(out: Path):
    """A fresh folder beside ``out`` to write into; put in place of ``out`` once all is written, removed if not."""
    temporary = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(temporary, out)
