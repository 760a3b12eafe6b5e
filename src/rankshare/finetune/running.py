"""Running a job: the loaded model, tokenizer and data its methods share (``Workspace``), one method's training,
evaluation and files (``fit``, ``run_method``), and every method of the job with its report (``run_job``).

A run resumes from the checkpoint in its folder; ``run_job`` skips the methods already finished there.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..checkpointing import enable_checkpointing
from ..config import AdapterConfig
from ..errors import RankshareError
from ..model import AdaptedModel
from ..targets import target_shapes
from . import distributed
from .data import DataSplits
from .distributed import pick_device
from .evaluation import evaluate
from .jobs import BASIS_ADAPTER, TASK_ADAPTER, Job, job_data, job_objective, objective_kind, plan_adapters, recorded_job
from .models import default_targets, head_modules, load_base, load_tokenizer, resolve_model
from .report import write_report
from .run_folder import check_out, load_run, write_json
from .train import Settings, attach_adapter, epochs_for, parameter_counts, peak_memory_mb, train, versions
from .trained import load_basis


class Workspace:
    """The loaded model, tokenizer and data of one job, shared by the methods it trains."""

    def __init__(self, job: Job, quiet: bool) -> None:
        self.job, self.quiet = job, quiet
        self.device = pick_device(job.device)
        distributed.start(self.device)
        seed = job.settings.get("seed", 0)
        self.splits: DataSplits = job_data(job)
        self.source = resolve_model(job.model)
        instructions = self.splits.instructions
        self.kind = objective_kind(job, self.source, instructions)
        self.tokenizer = load_tokenizer(self.source)
        self.objective = job_objective(self.kind, self.tokenizer, self.splits.tasks, job)
        self.fitting = {}  # sft: per split, prompts cut from the left and examples left out for their length
        if self.kind == "sft":
            self.splits, self.fitting = self.objective.fit_splits(self.splits)
            if not self.splits.train or not self.splits.test:
                raise RankshareError(f"No {'training' if not self.splits.train else 'test'} example of --data "
                                     f"{job.data} has a response that fits in {self.objective.max_length} tokens; "
                                     "raise --max-length.")
        torch.manual_seed(seed)  # a new classification head is initialised here
        self.pristine = self._load_base()
        self.targets = job.target_modules or default_targets(self.pristine)
        self.shapes = target_shapes(self.pristine, self.targets)

    def _load_base(self):
        base = load_base(self.source, self.kind, self.splits.tasks, self.job.dtype)
        if self.job.gradient_checkpointing:
            # Non-reentrant, before any adapter: the frozen base's activations need no gradient for the adapters'.
            enable_checkpointing(base, {"use_reentrant": False})
        return base

    def fresh_base(self):
        return copy.deepcopy(self.pristine)


def fit(space: Workspace, settings: Settings, folder: Path, stop_after: int | None = None,
        splits: tuple[str, ...] = ("validation", "test"), prepare=None, eval_batch_size: int | None = None,
        stop_on_divergence: bool = False):
    """Train one adapter (resuming from a checkpoint in ``folder``) and evaluate it on ``splits``.

    ``prepare(base, heads)``, if given, returns the model to train in place of an adapter on ``base`` (a baseline
    such as full fine-tuning). Evaluation takes batches of ``eval_batch_size`` (default: the training batch size).
    With ``stop_on_divergence`` a loss that is not finite ends training, and the model is evaluated as it stands.
    Returns the trained model and its record (empty if ``stop_after`` ended training early).
    """
    job = space.job
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    base = space.fresh_base()
    heads = head_modules(base) if space.kind == "classify" else []
    basis = load_run(Path(job.basis), "--basis")[1] / "adapter" if job.basis else None
    model = (prepare(base, heads) if prepare else attach_adapter(base, settings, heads, basis)).to(space.device)
    run = {"job": asdict(job), "settings": asdict(settings), "kind": space.kind, "tasks": space.splits.tasks,
           "heads": heads}
    if basis is not None:  # what load_trained needs to rebuild the model: the run whose factors it uses
        run["basis"] = {"run": job.basis, "fingerprint": model.basis_fingerprint(BASIS_ADAPTER)}
    if distributed.is_main():
        write_json(folder / "run.json", run)
    if space.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(space.device)
    timing = train(model, space.objective, space.splits.train, settings, space.device, folder, space.quiet, stop_after,
                   stop_on_divergence)
    if stop_after is not None and stop_after < timing["steps"]:
        return model, {}
    evaluation = evaluate(model, space.objective, space.splits, eval_batch_size or settings.batch_size, space.device,
                          space.quiet, splits)
    record = {
        "method": settings.method,
        "rank": settings.rank,
        "config": {"model": job.model, "data": job.data, "objective": space.kind,
                   "max_length": space.objective.max_length, "dtype": job.dtype,
                   "gradient_checkpointing": job.gradient_checkpointing, **asdict(settings),
                   "learning_rate": settings.learning_rate},
        "trainable_parameters": parameter_counts(model, heads),
        **evaluation,
        **timing,
        "examples": {"train": len(space.splits.train), "validation": len(space.splits.validation),
                     "test": len(space.splits.test)},
        "peak_memory_mb": peak_memory_mb(space.device),
        "device": str(space.device),
        "seed": settings.seed,
        "versions": versions(),
    }
    if job.basis:
        record["basis"] = job.basis
    if space.fitting:
        record["fitting"] = space.fitting
    if record["router"] is None:
        del record["router"]
    if distributed.size() > 1:
        record["processes"] = distributed.size()
    return model, record


def run_method(space: Workspace, config: AdapterConfig, folder: Path, stop_after: int | None = None) -> dict:
    """Train, evaluate and save one adapter in ``folder``; resumes from a checkpoint there. Without a rate in the
    job's settings, the method's recipe for the objective gives it."""
    settings = Settings(adapter=config.to_dict(), **space.job.settings)
    if settings.lr is None:
        settings.lr = type(config).recipe(space.kind).learning_rate
    model, record = fit(space, settings, folder, stop_after)
    if record and distributed.is_main():
        model.save_pretrained(str(folder / "adapter"))
        write_json(folder / "metrics.json", record)
        (folder / "checkpoint.pt").unlink(missing_ok=True)
    return record


def run_job(job: Job, out: Path, quiet: bool, say, overwrite: bool = False, resuming: bool = False) -> list[dict]:
    """Train every method of ``job`` (skipping those already finished in ``out``) and write the report.

    Everything that can be wrong with the input is found before ``out`` is touched.
    """
    distributed.start(pick_device(job.device))  # first: which process is the main one decides what it may write
    main = distributed.is_main()
    if not resuming and main:
        check_out(out, overwrite)
    started = time.perf_counter()
    space = Workspace(job, quiet)
    plans = plan_adapters(job, space.shapes, space.targets, space.kind)
    if not resuming and main:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_json(out / "command.json", asdict(job))
    distributed.barrier()  # no process may look for a checkpoint in `out` before it is prepared
    for method, (_, note) in plans.items():
        if main:
            say(f"{method}: {note}")
    if main and space.fitting:
        say(f"max length {space.objective.max_length} tokens; prompts cut from the left / examples left out (their "
            "response alone does not fit): " + ", ".join(f"{split} {counts['cut']}/{counts['skipped']}"
                                                        for split, counts in space.fitting.items()))
    records = []
    for method, (config, _) in plans.items():
        if config is None:
            continue
        folder = out if len(job.methods) == 1 else out / method
        finished = folder / "metrics.json"
        if finished.is_file():
            records.append(json.loads(finished.read_text()))
            continue
        records.append(run_method(space, config, folder))
    for record in records:
        record["plan"] = plans[record["method"]][1]
    if main:
        if len(job.methods) > 1:
            write_json(out / "metrics.json", {"runs": records, "wall_seconds": time.perf_counter() - started})
        write_report(out, records)
    distributed.barrier()
    return records


def recover_cores(folder: Path, steps: int, quiet: bool, learning_rate: float | None = None) -> dict:
    """Train the cores of a compressed task run (``compress --adapter TASK=RUN``) for ``steps`` steps on the training
    data of the LoRA run it came from, at ``learning_rate`` (default: that run's) and its batch size; the basis and
    the head stay frozen. The adapter is saved again and run.json records what was done (``recovered``)."""
    run, folder = load_run(folder)
    job = recorded_job(run)
    space = Workspace(replace(job, basis=None), quiet)

    def compressed(base, heads):
        model = AdaptedModel(base)
        load_basis(model, run, folder, BASIS_ADAPTER)
        model.load_adapter(folder / "adapter", TASK_ADAPTER, is_trainable=True)
        model.set_adapter(TASK_ADAPTER)
        for name in model.modules_to_save:  # the cores alone train
            model.get_submodule(name).current().requires_grad_(False)
        return model

    recorded = Settings(adapter=run["settings"]["adapter"], lr=learning_rate or run["settings"]["lr"],
                        batch_size=run["settings"]["batch_size"], seed=run["settings"].get("seed", 0), max_steps=steps,
                        epochs=epochs_for(steps, run["settings"]["batch_size"], len(space.splits.train)))
    with tempfile.TemporaryDirectory() as checkpoints:
        model, record = fit(space, recorded, Path(checkpoints), splits=(), prepare=compressed)
    model.save_pretrained(str(folder / "adapter"), TASK_ADAPTER)
    recovered = {"steps": record["steps"], "learning_rate": recorded.learning_rate,
                 "train_seconds": record["train_seconds"], "trainable_parameters": record["trainable_parameters"]}
    write_json(folder / "run.json", {**run, "recovered": recovered})
    return recovered
