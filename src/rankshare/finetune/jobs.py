"""What a train or compare command asks for (a ``Job``), and what follows from it before anything trains.

A job gives each method's adapter config and plan (--rank, or the budget planner's), its data, its objective
(``objective_kind``: what the data and the model call for), and, on another run's LoTR factors, the options that
run fixes (``job_on_basis``). ``dry_run`` plans from the model's architecture alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..config import AdapterConfig, Recipe, method_class, methods
from ..errors import RankshareError
from ..targets import target_shapes
from .budget import plan_all
from .data import DataSplits, is_skills, load_data
from .models import ModelSource, default_targets, model_skeleton, resolve_model
from .objectives import make_objective
from .run_folder import load_run

# The adapter a run trains, and the frozen one whose factors it uses when trained on a basis.
TASK_ADAPTER, BASIS_ADAPTER = "default", "basis"


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


def recorded_job(run: dict) -> Job:
    """The Job a run.json records (fields of later versions take their defaults)."""
    known = {f.name for f in fields(Job)}
    return Job(**{name: value for name, value in run["job"].items() if name in known})


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


def job_config(job: Job, method: str, rank: int, targets, kind: str, options: dict | None = None) -> AdapterConfig:
    """One method's config for ``job``: its own options from ``job.options`` over its recipe's for objective ``kind``
    (none on a basis, which fixes them), unless ``options`` are given."""
    cls = method_class(method)
    if options is None:
        given = {name: value for name, value in job.options.items() if name in cls.options()}
        options = given if job.basis else {**cls.recipe(kind).options, **given}
    config = cls(rank=rank, alpha=job.alpha, target_modules=targets, **options)
    return config.on_basis(BASIS_ADAPTER) if job.basis else config


def default_rank(recipe: Recipe, shapes: dict[str, tuple[int, int]]) -> int:
    """The recipe's rank (8 where it sets none), at most the narrowest side of a target: the study chose it on a
    wider model than some a user may adapt."""
    return min([recipe.rank or 8, *(min(shape) for shape in shapes.values())])


def plan_adapters(job: Job, shapes: dict[str, tuple[int, int]], targets,
                  kind: str) -> dict[str, tuple[AdapterConfig | None, str]]:
    """Each method's config for objective ``kind`` and a note: --rank for all, or the budget planner's rank (and
    options); a method the planner leaves out has no config."""
    asked = [job_config(job, method, job.rank or default_rank(method_class(method).recipe(kind), shapes), targets,
                        kind) for method in job.methods]
    if job.budget is None:
        given = f"on the factors of {job.basis}" if job.basis else "given"
        return {config.method: (config, f"rank {config.rank} ({given})") for config in asked}
    plans = plan_all(asked, shapes, job.budget)
    return {plan.method: (job_config(job, plan.method, plan.rank, targets, kind, plan.options) if plan.reachable
                          else None, plan.note) for plan in plans}


def dry_run(job: Job) -> dict[str, tuple[AdapterConfig | None, str]]:
    """The plan of ``job`` from the model's architecture alone: no weights, no data, no training."""
    source = resolve_model(job.model)
    instructions = job.objective == "sft" or is_skills(job.data)  # a file is not read to find out
    kind = objective_kind(job, source, instructions)
    skeleton = model_skeleton(source, causal=kind != "classify")
    targets = job.target_modules or default_targets(skeleton)
    return plan_adapters(job, target_shapes(skeleton, targets), targets, kind)


def methods_on_a_basis() -> list[str]:
    """The methods whose adapters can use the shared modules of another adapter (``uses_a_basis``)."""
    return [name for name, cls in methods().items() if cls.uses_a_basis]


def job_on_basis(job: Job, basis: str) -> Job:
    """``job`` on the shared factors of the trained run in folder ``basis``: that run's model, and what its config
    says an adapter on it takes (``basis_options``: LoTR's target modules, share and rank), which ``job`` must
    leave out (None) or give alike. Checked before anything is loaded."""
    run, _ = load_run(Path(basis), "--basis")
    config = AdapterConfig.from_dict(run["settings"]["adapter"])
    usable = ", ".join(methods_on_a_basis())
    if job.methods[0] not in methods_on_a_basis():
        raise RankshareError(f"--basis trains a {usable} adapter on another run's factors, not a {job.methods[0]} "
                             "adapter; leave out --method or choose one of those.")
    if not config.uses_a_basis or job.methods[0] != config.method:
        raise RankshareError(f"--basis {basis} is a {config.method} run; the basis must be a trained "
                             f"{job.methods[0]} run, whose factors the new adapter uses.")
    if config.basis_name() is not None:
        raise RankshareError(f"--basis {basis} was itself trained on the factors of {run['basis']['run']}; give "
                             "that run as --basis.")
    taken = config.basis_options()
    if job.budget is not None:
        raise RankshareError(f"--basis {basis} fixes the rank ({taken.get('rank')}); leave out --budget.")
    given = {"model": job.model, "rank": job.rank, "target_modules": job.target_modules, **job.options}
    for name, used in {"model": run["job"]["model"], **taken}.items():
        if given.get(name) is not None and given[name] != used:
            option = f"--{name.replace('_', '-')}"
            raise RankshareError(f"--basis {basis} was trained with {option} {_shown(used)}, and the new adapter "
                                 f"uses its factors, so it takes the same; leave out {option} {_shown(given[name])}.")
    if job.objective != "auto" and (job.objective == "classify") != (run["kind"] == "classify"):
        raise RankshareError(f"--basis {basis} is a {run['kind']} run, so the new adapter needs a "
                             f"{'classification head' if run['kind'] == 'classify' else 'causal LM'} too; leave out "
                             f"--objective {job.objective}.")
    options = {name: value for name, value in taken.items() if name not in ("rank", "target_modules")}
    return replace(job, model=run["job"]["model"], rank=taken.get("rank", job.rank),
                   target_modules=taken.get("target_modules", job.target_modules),
                   options={**job.options, **options}, basis=basis)


def _shown(value) -> str:
    """An option's value as it is written on the command line."""
    return ",".join(value) if isinstance(value, list) else str(value)
