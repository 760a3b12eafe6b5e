"""The commands' work, apart from their parsing: train one method, compare several, evaluate, merge.

A run folder holds ``command.json`` (what was asked, so ``--resume`` can finish it) and, per method,
``run.json`` (how to rebuild the model; for an adapter trained on a LoTR basis, also the basis run and its
factors' fingerprint), the adapter, ``metrics.json`` and a training checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import safetensors
import torch

import rankshare as rs

from ..atomic_files import replace_file
from ..checkpointing import enable_checkpointing
from ..config import AdapterConfig, ExternalAdapterConfig, method_class, methods
from ..errors import RankshareError
from ..export import PEFT_PREFIX
from ..targets import target_shapes
from . import distributed
from .budget import plan_all
from .data import SKILLS, DataSplits, load_data
from .models import (
    ModelSource,
    default_targets,
    head_modules,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    model_skeleton,
    resolve_model,
)
from .objectives import make_objective
from .report import write_report
from .train import (
    BASIS_ADAPTER,
    TASK_ADAPTER,
    Settings,
    attach_adapter,
    evaluate,
    parameter_counts,
    peak_memory_mb,
    train,
    versions,
)


@dataclass
class Job:
    """What a train or compare command asks for (saved as command.json)."""

    methods: list[str]
    model: str = "minilm"
    data: str = "news+sentiment"
    objective: str = "auto"  # auto: sft on instruction data, else classify (encoder) / text_to_label (causal LM)
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    task_column: str | None = None
    max_train: int | None = 1200
    max_eval: int | None = 300
    max_length: int | None = None  # None: 64 tokens, or 128 for instruction data
    max_new_tokens: int = 32  # sft: the longest answer generated at evaluation
    prompt_layout: str = "auto"  # sft: the tokenizer's chat template (auto, when it has one), or plain
    dtype: str = "float32"  # the base model's; adapters train in float32
    gradient_checkpointing: bool = False
    rank: int | None = None
    budget: int | None = None
    device: str = "auto"
    alpha: float | None = None
    target_modules: list[str] | str | None = None  # None: the architecture's default targets
    options: dict = field(default_factory=dict)  # methods' own options; each method takes those it declares
    settings: dict = field(default_factory=dict)  # the schedule: Settings fields other than the adapter
    basis: str | None = None  # a trained LoTR run (its folder, as given) whose factors the adapter uses


def write_json(path: Path, data) -> None:
    replace_file(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RankshareError(f"--out {out} is a file; choose a folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RankshareError(f"--out {out} already holds results; choose another folder, add --overwrite, or "
                             "--resume it.")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RankshareError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RankshareError("--device cuda: no CUDA GPU is available here; use --device cpu.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # a launcher's process, one per GPU
    return device


def objective_kind(job: Job, source: ModelSource, instructions: bool = False) -> str:
    """What the run trains: ``job.objective``, or (auto) what the data and the model call for. Instruction data
    (prompt and response, or messages) goes with ``sft`` alone, which needs a causal LM."""
    if instructions and job.objective not in ("auto", "sft"):
        raise RankshareError(f"--data {job.data} is instruction data (prompts and responses), which trains with "
                             f"--objective sft, not {job.objective}; leave out --objective.")
    if job.objective == "sft" and not instructions:
        raise RankshareError(f"--objective sft needs instruction data: rows with '{job.prompt_column}' and "
                             f"'{job.response_column}' (or '{job.messages_column}'), or --data skills.")
    if instructions:
        if not _causal(source):
            raise RankshareError(f"--model {source.spec} is not a causal language model, and instruction tuning "
                                 "generates answers; choose one (e.g. --model smollm2).")
        return "sft"
    if job.objective != "auto":
        return job.objective
    return "text_to_label" if _causal(source) else "classify"


def _causal(source: ModelSource) -> bool:
    if source.gguf_file:
        return True
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(source.path).architectures or []
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0]
        raise RankshareError(f"--model {source.spec}: could not read its config ({first_line}).") from None
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def recorded_job(run: dict) -> Job:
    """The Job a run.json records (fields of later versions take their defaults)."""
    known = {f.name for f in fields(Job)}
    return Job(**{name: value for name, value in run["job"].items() if name in known})


def job_data(job: Job, data: str | None = None, **columns) -> DataSplits:
    """The data of ``job``, or ``data`` read with the job's columns (``columns`` given override them), with the
    job's seed and caps: the same data gives the same splits."""
    names = ("text_column", "label_column", "prompt_column", "response_column", "messages_column", "task_column")
    chosen = {name: getattr(job, name) for name in names}
    chosen.update({name: value for name, value in columns.items() if value is not None})
    return load_data(data or job.data, seed=job.settings.get("seed", 0), max_train=job.max_train,
                     max_eval=job.max_eval, **chosen)


def job_objective(kind: str, tokenizer, tasks, job: Job):
    """The objective of a run of ``job``: its ``max_length`` is 64 tokens unless given, 128 for instructions."""
    if kind != "sft":
        return make_objective(kind, tokenizer, tasks, job.max_length or 64)
    return make_objective(kind, tokenizer, tasks, job.max_length or 128, max_new_tokens=job.max_new_tokens,
                          layout=job.prompt_layout)


def name_labels(model, tasks: dict[str, list[str]]) -> None:
    """Write ``task:label`` names into the head's config, in the order of the one head over all tasks."""
    names = [f"{task}:{label}" for task, labels in tasks.items() for label in labels]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


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
        if self.kind == "classify":
            base = load_classifier(self.source, self.objective.num_labels, self.job.dtype)
        else:
            base = load_causal_lm(self.source, self.job.dtype)
        if self.job.gradient_checkpointing:
            # Non-reentrant, before any adapter: the frozen base's activations need no gradient for the adapters'.
            enable_checkpointing(base, {"use_reentrant": False})
        return base

    def fresh_base(self):
        return copy.deepcopy(self.pristine)


def job_config(job: Job, method: str, rank: int, targets, options: dict | None = None) -> AdapterConfig:
    """One method's config for ``job``: its own options from ``job.options`` unless ``options`` are given."""
    cls = method_class(method)
    if options is None:
        options = {name: value for name, value in job.options.items() if name in cls.options()}
    on_basis = {"basis": BASIS_ADAPTER} if job.basis else {}
    return cls(rank=rank, alpha=job.alpha, target_modules=targets, **options, **on_basis)


def plan_adapters(job: Job, shapes: dict[str, tuple[int, int]], targets) -> dict[str, tuple[AdapterConfig | None, str]]:
    """Each method's config and a note: --rank for all, or the budget planner's rank (and options); a
    method the planner leaves out has no config."""
    asked = [job_config(job, method, job.rank or 8, targets) for method in job.methods]
    if job.budget is None:
        given = f"on the factors of {job.basis}" if job.basis else "given"
        return {config.method: (config, f"rank {config.rank} ({given})") for config in asked}
    plans = plan_all(asked, shapes, job.budget)
    return {plan.method: (job_config(job, plan.method, plan.rank, targets, plan.options) if plan.reachable else None,
                          plan.note) for plan in plans}


def dry_run(job: Job) -> dict[str, tuple[AdapterConfig | None, str]]:
    """The plan of ``job`` from the model's architecture alone: no weights, no data, no training."""
    source = resolve_model(job.model)
    instructions = job.objective == "sft" or job.data == SKILLS  # a file is not read to find out
    skeleton = model_skeleton(source, causal=objective_kind(job, source, instructions) != "classify")
    targets = job.target_modules or default_targets(skeleton)
    return plan_adapters(job, target_shapes(skeleton, targets), targets)


def fit(space: Workspace, settings: Settings, folder: Path, stop_after: int | None = None,
        splits: tuple[str, ...] = ("validation", "test")):
    """Train one adapter (resuming from a checkpoint in ``folder``) and evaluate it on ``splits``.

    Returns the trained model and its record (the record is empty if ``stop_after`` ended training early).
    """
    job = space.job
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    base = space.fresh_base()
    heads = head_modules(base) if space.kind == "classify" else []
    if space.kind == "classify":
        name_labels(base, space.splits.tasks)
    basis = load_run(Path(job.basis), "--basis")[1] / "adapter" if job.basis else None
    model = attach_adapter(base, settings, heads, basis).to(space.device)
    run = {"job": asdict(job), "settings": asdict(settings), "kind": space.kind, "tasks": space.splits.tasks,
           "heads": heads}
    if basis is not None:  # what load_trained needs to rebuild the model: the run whose factors it uses
        run["basis"] = {"run": job.basis, "fingerprint": model.basis_fingerprint(BASIS_ADAPTER)}
    if distributed.is_main():
        write_json(folder / "run.json", run)
    if space.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(space.device)
    timing = train(model, space.objective, space.splits.train, settings, space.device, folder, space.quiet, stop_after)
    if stop_after is not None and stop_after < timing["steps"]:
        return model, {}
    evaluation = evaluate(model, space.objective, space.splits, settings.batch_size, space.device, space.quiet, splits)
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
    """Train, evaluate and save one adapter in ``folder``; resumes from a checkpoint there."""
    settings = Settings(adapter=config.to_dict(), **space.job.settings)
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
    plans = plan_adapters(job, space.shapes, space.targets)
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


def load_run(directory: Path, option: str = "--adapter") -> tuple[dict, Path]:
    """A run's record and folder: ``directory`` (given as ``option``) may be the run folder or its adapter
    folder."""
    for folder in (directory, directory.parent):
        if (folder / "run.json").is_file() and (folder / "adapter").is_dir():
            run = json.loads((folder / "run.json").read_text())
            if not isinstance(run.get("settings", {}).get("adapter"), dict):
                raise RankshareError(f"{folder}/run.json was written by an earlier rankshare, which recorded no "
                                     "adapter config in its settings; train the run again with this version.")
            return run, folder
    if (directory / "command.json").is_file():
        methods = sorted(p.name for p in directory.iterdir() if (p / "run.json").is_file())
        raise RankshareError(f"{option} {directory} holds a comparison; point {option} at one method's folder: "
                             f"{methods}.")
    raise RankshareError(f"{option} {directory} is not a rankshare run folder (no run.json and adapter/); give the "
                         "--out of a train run.")


def load_trained(directory: Path, device: str = "auto"):
    """Rebuild a trained model from its run folder: (model, run record, tokenizer, source)."""
    run, folder = load_run(directory)
    adapter = folder / "adapter"
    tokenizer = load_tokenizer(resolve_model(run["job"]["model"]))
    base = _run_base(run)
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


def methods_on_a_basis() -> list[str]:
    """The methods whose adapters can use the factors of another adapter (their config has a ``basis``)."""
    return [name for name, cls in methods().items() if "basis" in {f.name for f in fields(cls)}]


def job_on_basis(job: Job, basis: str) -> Job:
    """``job`` on the factors of the trained LoTR run in folder ``basis``: that run's model, target modules,
    share and rank, which ``job`` must leave out (None) or give alike. Checked before anything is loaded."""
    run, _ = load_run(Path(basis), "--basis")
    adapter = run["settings"]["adapter"]
    if job.methods[0] not in methods_on_a_basis():
        raise RankshareError(f"--basis trains a {', '.join(methods_on_a_basis())} adapter on another run's factors, "
                             f"not a {job.methods[0]} adapter; leave out --method or choose one of those.")
    if adapter["method"] not in methods_on_a_basis():
        raise RankshareError(f"--basis {basis} is a {adapter['method']} run; the basis must be a trained "
                             f"{', '.join(methods_on_a_basis())} run, whose factors the new adapter uses.")
    if adapter.get("basis"):
        raise RankshareError(f"--basis {basis} was itself trained on the factors of {run['basis']['run']}; give "
                             "that run as --basis.")
    if job.budget is not None:
        raise RankshareError(f"--basis {basis} fixes the rank ({adapter['rank']}); leave out --budget.")
    fixed = {"--model": (job.model, run["job"]["model"]), "--rank": (job.rank, adapter["rank"]),
             "--target-modules": (job.target_modules, adapter["target_modules"]),
             "--share": (job.options.get("share"), adapter.get("share"))}
    for option, (given, used) in fixed.items():
        if given is not None and given != used:
            raise RankshareError(f"--basis {basis} was trained with {option} {_shown(used)}, and the new adapter "
                                 f"uses its factors, so it takes the same; leave out {option} {_shown(given)}.")
    if job.objective != "auto" and (job.objective == "classify") != (run["kind"] == "classify"):
        raise RankshareError(f"--basis {basis} is a {run['kind']} run, so the new adapter needs a "
                             f"{'classification head' if run['kind'] == 'classify' else 'causal LM'} too; leave out "
                             f"--objective {job.objective}.")
    return replace(job, model=run["job"]["model"], rank=adapter["rank"], target_modules=adapter["target_modules"],
                   options={**job.options, "share": adapter["share"]}, basis=basis)


def _shown(value) -> str:
    """An option's value as it is written on the command line."""
    return ",".join(value) if isinstance(value, list) else str(value)


def load_basis(model: rs.AdaptedModel, run: dict, folder: Path, name: str) -> None:
    """Load into ``model``, as ``name`` and frozen, the LoTR run whose factors the run in ``folder`` was trained on
    (``run["basis"]``), checking they are still the factors it was trained on."""
    recorded = run["basis"]
    try:
        basis_folder = load_run(Path(recorded["run"]), "--basis")[1]
    except RankshareError:
        raise RankshareError(f"{folder} was trained on the LoTR factors of the run {recorded['run']}, which is not "
                             "there (no run.json and adapter/); bring that run back there, unchanged.") from None
    model.load_adapter(basis_folder / "adapter", name)
    if model.basis_fingerprint(name) != recorded["fingerprint"]:
        model.delete_adapter(name)
        raise RankshareError(f"{folder} was trained on the LoTR factors of the run {recorded['run']}, but that run's "
                             "factors have changed since (their fingerprint differs); bring back the basis it was "
                             f"trained on, or train it again with --basis {recorded['run']}.")


def evaluate_run(directory: Path, data: str | None, quiet: bool, device: str = "auto",
                 text_column: str | None = None, label_column: str | None = None, peft_folder: Path | None = None,
                 base: bool = False) -> dict:
    """Metrics of a trained adapter on the validation and test splits of ``data`` (default: its own data);
    with ``peft_folder``, of that PEFT adapter (e.g. the run's ``export``) on the run's base model instead; with
    ``base``, of the base model alone (the adapter disabled: what the run starts from)."""
    model, run, tokenizer, _ = load_trained(directory, device)
    if peft_folder is not None:
        model = _peft_model(run, peft_folder).to(next(model.parameters()).device).eval()
    job = recorded_job(run)
    # The run's seed and caps give the run's own validation and test examples when the data is the same.
    splits = job_data(job, data, text_column=text_column, label_column=label_column)
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
                        next(model.parameters()).device, quiet)


def run_gates(config: AdapterConfig, folder: Path, gates: list[float] | str | None, command: str):
    """The gates to merge or export a run's adapter with: None for an adapter without a router, the weights
    given, or a task's mean routing recorded at evaluation (``gates`` a task name)."""
    if config.merge_needs_gates and gates is None:
        options = ", ".join(f"{name}={value}" for name, value in config.option_values().items())
        raise RankshareError(f"A {config.method} adapter ({options}) routes each token differently and {command}s "
                             "only with fixed gates: pass --gates g1,...,gN (one weight per expert) or --gates TASK.")
    if not config.merge_needs_gates and gates is not None:
        raise RankshareError(f"--gates applies to routed mixtures only; a {config.method} adapter {command}s without "
                             "it.")
    if isinstance(gates, str):  # a task name: that task's mean routing, measured at evaluation
        router = json.loads((folder / "metrics.json").read_text()).get("router") or {}
        if gates not in router:
            raise RankshareError(f"--gates {gates}: no mean routing recorded for that task; tasks: {sorted(router)}.")
        gates = router[gates]
    return gates


def merge_run(directory: Path, out: Path, gates: list[float] | str | None) -> Path:
    model, run, tokenizer, folder = load_trained(directory, "cpu")
    config = AdapterConfig.from_dict(run["settings"]["adapter"])
    gates = run_gates(config, folder, gates, "merge")
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
        trained.append((name, folder, run_gates(config, folder, gates, "export")))
    with _folder_aside(out) as temporary:
        for name, folder, weights in trained:
            rs.export_peft(load_trained(folder, "cpu")[0], temporary / name if name else temporary, gates=weights)
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
            model, report = rs.compress_lora(_run_base(run), folder / "adapter", rank, share)
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
    fitted = []
    with _folder_aside(out) as temporary:
        for rank in ranks:
            base = load_classifier(source, num_labels) if num_labels else load_causal_lm(source)
            adapted, report = rs.compress_lora(base, directory, rank, share)
            adapted.save_pretrained(_rank_folder(temporary, rank, ranks))
            fitted.append((rank, _rank_folder(out, rank, ranks), report))
    return fitted


def _rank_folder(out: Path, rank: int, ranks: list[int]) -> Path:
    return out if len(ranks) == 1 else out / f"rank-{rank}"


def _peft_model(run: dict, folder: Path):
    import peft

    if not (folder / "adapter_config.json").is_file():
        raise RankshareError(f"--peft {folder}: no adapter_config.json there; give a folder rankshare export wrote.")
    try:
        return peft.PeftModel.from_pretrained(_run_base(run), str(folder))
    except (ValueError, RuntimeError, KeyError) as error:
        raise RankshareError(f"--peft {folder}: PEFT could not load it on this run's base model ({error}).") from None


def _run_base(run: dict):
    source = resolve_model(run["job"]["model"])
    if run["kind"] == "classify":
        base = load_classifier(source, sum(len(v) for v in run["tasks"].values()), recorded_job(run).dtype)
        name_labels(base, run["tasks"])
        return base
    return load_causal_lm(source, recorded_job(run).dtype)


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
