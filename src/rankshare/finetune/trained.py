"""A trained run, loaded back: its base model (``run_base``), the model with its adapter (``load_trained``), the
LoTR basis it was trained on (``load_basis``), and its evaluation on some data (``evaluate_run``).

Nothing here trains: ``predict`` and ``generate`` load runs through this module alone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import replace
from pathlib import Path

import rankshare as rs

from ..config import AdapterConfig, ExternalAdapterConfig
from ..errors import RankshareError
from .data import DataSplits
from .distributed import pick_device
from .evaluation import evaluate
from .jobs import BASIS_ADAPTER, TASK_ADAPTER, job_data, job_objective, recorded_job
from .models import load_base, load_tokenizer, resolve_model
from .run_folder import load_run


def run_base(run: dict):
    """The base model the run recorded in ``run`` (its run.json) adapts, in the run's dtype, without adapter."""
    if run["kind"] != "classify":  # a causal LM: a copy of the one loaded last (de-quantising a GGUF file is slow)
        return copy.deepcopy(_causal_lm(run["job"]["model"], recorded_job(run).dtype))
    return load_base(resolve_model(run["job"]["model"]), run["kind"], run["tasks"], recorded_job(run).dtype)


@functools.lru_cache(maxsize=1)
def _causal_lm(model: str, dtype: str):
    return load_base(resolve_model(model), "lm", {}, dtype)


def load_trained(directory: Path, device: str = "auto"):
    """Rebuild a trained model from its run folder: (model, run record, tokenizer, source)."""
    run, folder = load_run(directory)
    adapter = folder / "adapter"
    tokenizer = load_tokenizer(resolve_model(run["job"]["model"]))
    base = run_base(run)
    config = AdapterConfig.from_dict(run["settings"]["adapter"])
    if isinstance(config, ExternalAdapterConfig):  # another library's files
        model = type(config).load(base, str(adapter))
    elif run.get("basis"):
        model = rs.AdaptedModel(base)
        load_basis(model, run, folder, BASIS_ADAPTER)
        model.load_adapter(adapter, TASK_ADAPTER)
        model.set_adapter(TASK_ADAPTER)
    else:
        model = rs.AdaptedModel.from_pretrained(base, adapter)
    return model.to(pick_device(device)).eval(), run, tokenizer, folder


def load_basis(model: rs.AdaptedModel, run: dict, folder: Path, name: str) -> None:
    """Load into ``model``, as ``name`` and frozen, the LoTR run whose factors the run in ``folder`` was trained on
    (``run["basis"]``), checking they are still the factors it was trained on."""
    recorded = run["basis"]
    try:
        basis_folder = load_run(Path(recorded["run"]), "--basis")[1]
    except RankshareError:
        raise RankshareError(f"{folder} was trained on the shared factors of the run {recorded['run']}, which is not "
                             "there (no run.json and adapter/); bring that run back there, unchanged.") from None
    model.load_adapter(basis_folder / "adapter", name)
    if model.basis_fingerprint(name) != recorded["fingerprint"]:
        model.delete_adapter(name)
        raise RankshareError(f"{folder} was trained on the shared factors of the run {recorded['run']}, but that run's "
                             "factors have changed since (their fingerprint differs); bring back the basis it was "
                             f"trained on, or train it again with --basis {recorded['run']}.")


def evaluate_run(directory: Path, data: str | None, quiet: bool, device: str = "auto",
                 text_column: str | None = None, label_column: str | None = None, peft_folder: Path | None = None,
                 base: bool = False, splits: tuple[str, ...] = ("validation", "test")) -> dict:
    """Metrics of a trained adapter on the validation and test splits of ``data`` (default: its own data);
    with ``peft_folder``, of that PEFT adapter (e.g. the run's ``export``) on the run's base model instead; with
    ``base``, of the base model alone (the adapter disabled: what the run starts from)."""
    model, run, tokenizer, _ = load_trained(directory, device)
    if peft_folder is not None:
        model = _peft_model(run, peft_folder).to(next(model.parameters()).device).eval()
    job = recorded_job(run)
    # The run's seed and caps give the run's own validation and test examples when the data is the same.
    names, splits = splits, job_data(job, data, text_column=text_column, label_column=label_column)
    if (run["kind"] == "sft") != splits.instructions:
        raise RankshareError(f"--data {data} is {'' if splits.instructions else 'not '}instruction data, but the "
                             f"adapter was trained {'on' if run['kind'] == 'sft' else 'for'} {run['kind']}; evaluate "
                             "on data of the kind it was trained on.")
    if len(splits.tasks) == len(run["tasks"]) == 1:  # one task: its name (a file's stem) may differ
        (task,), (trained,) = splits.tasks, run["tasks"]
        validation, test = ([replace(e, task=trained) for e in split] for split in (splits.validation, splits.test))
        splits = DataSplits({trained: splits.tasks[task]}, [], validation, test)
    for task, labels in splits.tasks.items():
        if run["kind"] not in ("lm", "sft") and run["tasks"].get(task) != labels:
            raise RankshareError(f"Task {task!r} of --data has labels {labels}, the adapter was trained on "
                                 f"{run['tasks'].get(task)}; evaluate on data of the same tasks.")
    tasks = splits.tasks if run["kind"] == "sft" else run["tasks"]
    objective = job_objective(run["kind"], tokenizer, tasks, job)
    if run["kind"] == "sft":
        splits = objective.fit_splits(splits)[0]
    with model.disable_adapter() if base else contextlib.nullcontext():
        return evaluate(model, objective, replace(splits, tasks=tasks), run["settings"]["batch_size"],
                        next(model.parameters()).device, quiet, names)


def _peft_model(run: dict, folder: Path):
    import peft

    if not (folder / "adapter_config.json").is_file():
        raise RankshareError(f"--peft {folder}: no adapter_config.json there; give a folder rankshare export wrote.")
    try:
        return peft.PeftModel.from_pretrained(run_base(run), str(folder))
    except (ValueError, RuntimeError, KeyError) as error:
        raise RankshareError(f"--peft {folder}: PEFT could not load it on this run's base model ({error}).") from None
