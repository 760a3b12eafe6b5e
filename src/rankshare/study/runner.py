"""Run the study's parts: choose each variant's learning rate on validation, then train every rank and seed.

Every run's record is written to ``<out>/<part>/<run>.json`` as soon as it ends and is never trained again:
an interrupted study goes on where it stopped. The checkpoint of the run in progress lives in
``<out>/.checkpoints/<part>`` and goes when the run ends. Two processes may run two different parts in one folder
at once (``--parts``); a part must not run in two.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig, ExternalAdapterConfig, method_class
from ..errors import RankshareError
from ..finetune.budget import closest_rank
from ..finetune.evaluation import evaluate
from ..finetune.jobs import BASIS_ADAPTER, Job, job_data, job_on_basis
from ..finetune.models import head_modules
from ..finetune.run_folder import write_json
from ..finetune.running import Workspace, fit, run_method
from ..finetune.train import Settings, attach_adapter, epochs_for, versions
from .forgetting import forgetting
from .plan import BASELINES, Part, Variant, part_from_dict, rates, search_rank, search_seeds

PLAN_FILE = "plan.json"
SEARCH_FILE = "search.json"
CHECKPOINTS = ".checkpoints"
BASES = ".bases"  # the trained bases of cores-only variants (their records are kept in <part>/basis/)


def run_study(parts: list[Part], names: list[str], out: Path, quiet: bool, say) -> None:
    """Run the parts called ``names`` of the plan ``parts`` (all of which ``out`` records)."""
    prepare(parts, out)
    finished = [p for name in names for p in (out / name).glob("*.json") if p.name != SEARCH_FILE]
    if finished:
        say(f"{len(finished)} finished runs in {out} are kept, not trained again")
    for part in (p for p in parts if p.name in names):
        # Another process may have recorded a changed plan for a part this one had not started yet.
        recorded = {p["name"]: p for p in json.loads((out / PLAN_FILE).read_text())["parts"]}
        if recorded.get(part.name) != plain(part):
            raise RankshareError(f"Part {part.name} is recorded in {out / PLAN_FILE} otherwise than this process's "
                                 "plan has it (another process changed it since this one started); run it again.")
        started = time.perf_counter()
        run_part(part, out, quiet, say)
        say(f"{part.name}: done in {time.perf_counter() - started:.0f} s")
        # This part's alone: another process may be running another part in the same folder.
        shutil.rmtree(out / CHECKPOINTS / part.name, ignore_errors=True)
        with contextlib.suppress(OSError):  # the folder itself, unless another part's checkpoints are in it
            (out / CHECKPOINTS).rmdir()


def prepare(parts: list[Part], out: Path) -> None:
    """Refuse a folder that holds runs of other settings; record the plan and the machine otherwise.

    A plan may add parts to a study already run, and change the parts that have not started: the started ones
    must be as they were recorded, or add seeds to them (the runs already recorded stay valid).
    """
    if out.exists() and not out.is_dir():
        raise RankshareError(f"--out {out} is a file; choose a folder.")
    plan = [plain(part) for part in parts]
    recorded = out / PLAN_FILE
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        current = {part["name"]: part for part in plan}
        started = [plain(part_from_dict(part)) for part in before["parts"] if (out / part["name"]).is_dir()]
        if not all(_keeps(part, current.get(part["name"], part)) for part in started):
            raise RankshareError(f"--out {out} holds the runs of another study plan; choose another folder "
                                 "(or delete it to start again).")
        names = [part["name"] for part in before["parts"]]
        parts_now = [current.get(part["name"], part) for part in before["parts"]]
        write_json(recorded, {**before, "parts": parts_now + [p for p in plan if p["name"] not in names]})
        return
    if out.exists() and any(out.iterdir()):
        raise RankshareError(f"--out {out} already holds other files; choose an empty or new folder.")
    out.mkdir(parents=True, exist_ok=True)
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    write_json(recorded, {"parts": plan, "machine": machine, "versions": versions()})


def _keeps(recorded: dict, current: dict) -> bool:
    """Whether the runs recorded for part ``recorded`` are runs of part ``current``: the same, or more seeds."""
    return current == {**recorded, "seeds": current["seeds"]} and set(recorded["seeds"]) <= set(current["seeds"])


def run_part(part: Part, out: Path, quiet: bool, say) -> None:
    started = time.perf_counter()
    job = Job(methods=[], model=part.model, data=part.data, max_train=part.max_train, max_eval=part.max_eval,
              max_length=part.max_length, settings={"seed": 0})  # one split and tokenisation for every run
    space = Workspace(job, quiet)  # progress bars unless quiet
    load_seconds = time.perf_counter() - started
    folder = out / part.name
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {v.name: variant_ranks(v, space) for v in part.variants}
    spaces = {v.name: space if v.basis_data is None else basis_space(part, v, ranks[v.name][0], out, quiet, say)
              for v in part.variants}
    if part.rates_from:  # the rates another part chose, no search here
        chosen = rates_chosen_by(out / part.rates_from, part)
        write_search(folder, {name: {"chosen": lr, "from": part.rates_from} for name, lr in chosen.items()},
                     load_seconds, space)
        for seed in part.seeds:
            for variant in part.variants:
                for rank in ranks[variant.name]:
                    run_once(space, part, variant, rank, chosen[variant.name], seed, ("validation", "test"), out, say)
        return
    searched = [v for v in part.variants if not v.lr_from and v.method != "zero-shot"]
    scores: dict[str, dict[float, list[float]]] = {v.name: {lr: [] for lr in rates(part, v)} for v in searched}
    # Seed by seed, so that a study stopped early holds whole seeds of every variant and rate.
    for seed in sorted({s for v in searched for s in search_seeds(part, v)}):
        for variant in (v for v in searched if seed in search_seeds(part, v)):
            rank = search_rank(variant, ranks[variant.name])
            for lr in rates(part, variant):
                # Short search runs are scored on validation alone; a grid's runs are the final ones as well.
                splits = ("validation",) if part.search_steps else ("validation", "test")
                record = run_once(spaces[variant.name], part, variant, rank, lr, seed, splits, out, say,
                                  search=part.search_steps is not None)
                scores[variant.name][lr].append(headline(record["metrics"]["validation"]))
    chosen, search = {}, {}
    for variant in searched:
        means = {lr: statistics.fmean(values) for lr, values in scores[variant.name].items()}
        chosen[variant.name] = max(means, key=means.get)  # ties: the grid's first
        search[variant.name] = {"rank": search_rank(variant, ranks[variant.name]),
                                "seeds": list(search_seeds(part, variant)),
                                "validation_accuracy": {f"{lr:g}": s for lr, s in means.items()},
                                "chosen": chosen[variant.name]}
    # Written before the final runs: the report reads each variant's chosen rate from here.
    write_search(folder, search, load_seconds, space)
    for seed in part.seeds:
        for variant in part.variants:
            if variant.method == "zero-shot":
                if seed == part.seeds[0]:
                    zero_shot(space, part, variant, out, say)
                continue
            lr = chosen[variant.lr_from or variant.name]
            for rank in ranks[variant.name]:
                run_once(spaces[variant.name], part, variant, rank, lr, seed, ("test",), out, say)


def write_search(folder: Path, rates: dict, load_seconds: float, space: Workspace) -> None:
    """The part's search.json: each variant's rate (and how it was chosen), the targets and the split sizes."""
    write_json(folder / SEARCH_FILE, {"learning_rates": rates, "load_seconds": load_seconds, "targets": space.targets,
                                      "examples": {"train": len(space.splits.train),
                                                   "validation": len(space.splits.validation),
                                                   "test": len(space.splits.test)}})


def rates_chosen_by(folder: Path, part: Part) -> dict[str, float]:
    """The rate the part in ``folder`` chose for each variant of ``part`` (its namesake there)."""
    search = folder / SEARCH_FILE
    if not search.is_file():
        raise RankshareError(f"Part {part.name} trains at the rates part {folder.name} chooses; run that part to its "
                             f"end first (--parts {folder.name}).")
    chosen = json.loads(search.read_text())["learning_rates"]
    missing = [v.name for v in part.variants if v.name not in chosen]
    if missing:
        raise RankshareError(f"Part {folder.name} chose no rate for {', '.join(missing)}, which part {part.name} "
                             "trains; the plans disagree.")
    return {v.name: chosen[v.name]["chosen"] for v in part.variants}


def headline(split_metrics: dict) -> float:
    """A split's score: the average accuracy of a classifier, or the average exact match of instruction tuning."""
    average = split_metrics["average"]
    return average["accuracy"] if "accuracy" in average else average["exact_match"]


def plain(part: Part) -> dict:
    """A part as JSON holds it (tuples as lists), to compare with a recorded one."""
    return json.loads(json.dumps(asdict(part)))


def variant_config(variant: Variant, rank: int, targets) -> AdapterConfig:
    config = method_class(variant.method)(rank=rank, target_modules=targets, **variant.options)
    return config.on_basis(BASIS_ADAPTER) if variant.basis_data else config


def basis_space(part: Part, variant: Variant, rank: int, out: Path, quiet: bool, say) -> Workspace:
    """The workspace of a variant whose adapters train only their cores, on the factors of a LoTR run on another
    task: that run is trained first (seed 0, the part's schedule), once, and its record kept in ``<part>/basis/``."""
    name = f"{variant.basis_data}-{variant.method}-r{rank}-lr{variant.basis_lr:g}"
    folder = out / BASES / part.name / name
    job = Job(methods=[variant.method], model=part.model, data=variant.basis_data, max_train=part.max_train,
              max_eval=part.max_eval, max_length=part.max_length)
    epochs = epochs_for(part.steps, part.batch_size, len(job_data(job).train)) if part.steps else 1
    job = replace(job, settings={"seed": 0, "lr": variant.basis_lr, "batch_size": part.batch_size,
                                 "max_steps": part.steps, "epochs": epochs})
    if not (folder / "metrics.json").is_file():
        source = Workspace(job, quiet)
        _initialise_head(source, 0)
        config = method_class(variant.method)(rank=rank, target_modules=source.targets, **variant.options)
        record = run_method(source, config, folder)
        record.update(part=part.name, variant=f"basis for {variant.name}")
        (out / part.name / "basis").mkdir(parents=True, exist_ok=True)
        write_json(out / part.name / "basis" / f"{name}.json", record)
        say(f"{part.name} basis {name}: test {headline(record['metrics']['test']):.3f}")
    return Workspace(job_on_basis(replace(job, data=part.data), str(folder)), quiet)


def variant_ranks(variant: Variant, space: Workspace) -> list[int]:
    """The variant's ranks, or the one rank whose count comes closest to its budget at its own options (the
    study compares fixed numbers of experts, so the planner may not change them). A baseline has rank 0."""
    if variant.method in BASELINES:
        return [0]
    if variant.budget is None:
        return list(variant.ranks)
    return [closest_rank(variant_config(variant, 1, space.targets), space.shapes, variant.budget)[0]]


def run_name(variant: Variant, rank: int, lr: float, seed: int) -> str:
    if variant.method in BASELINES:
        return f"{variant.name}-lr{lr:g}-s{seed}"
    return f"{variant.name}-r{rank}-lr{lr:g}-s{seed}"


def run_once(space: Workspace, part: Part, variant: Variant, rank: int, lr: float, seed: int,
             splits: tuple[str, ...], out: Path, say, search: bool = False) -> dict:
    """One training run, or its record if it ran before. ``search``: a short rate-search run (``search_steps``),
    recorded in ``<part>/search/``."""
    name = run_name(variant, rank, lr, seed)
    path = out / part.name / ("search" if search else "") / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    steps = part.search_steps if search else part.steps
    epochs = epochs_for(steps, part.batch_size, len(space.splits.train)) if steps else 1
    adapter = ({"method": variant.method, "rank": 0} if variant.method in BASELINES
               else variant_config(variant, rank, space.targets).to_dict())
    settings = Settings(adapter=adapter, lr=lr, seed=seed, batch_size=part.batch_size, epochs=epochs, max_steps=steps)
    _initialise_head(space, seed)
    checkpoints = out / CHECKPOINTS / part.name / ("search" if search else "") / name
    prepare = _baseline(variant.method) if variant.method in BASELINES else None
    # A run whose loss diverges is a result of its rate, not a failure of the study: it is scored as it stands.
    model, record = fit(space, settings, checkpoints, splits=splits, prepare=prepare,
                        eval_batch_size=part.eval_batch_size, stop_on_divergence=True)
    record.update(part=part.name, variant=variant.name, label=variant.label, budget=variant.budget)
    if search:
        record["search"] = True
    if "router_layers" in record and space.kind != "sft":  # instruction tuning would generate every answer again
        record["router_layers_at_init"] = initial_routing(space, settings)
    if part.forgetting and not search:
        record["forgetting"] = forgetting(model, space, part.forgetting)
    if variant.method not in BASELINES:
        config = settings.adapter_config()
        # rankshare's own merges without gates (LoTR's) are checked; PEFT's are PEFT's, the mixtures' need gates.
        if seed in part.merge_seeds and not config.merge_needs_gates and not isinstance(config, ExternalAdapterConfig):
            record["merged"] = merged_evaluation(model, space, part.batch_size)
    record["wall_seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    shutil.rmtree(checkpoints, ignore_errors=True)
    scores = "  ".join(f"{split} {headline(record['metrics'][split]):.3f}" for split in splits)
    diverged = f"  diverged at step {record['diverged_at_step']}" if "diverged_at_step" in record else ""
    say(f"{part.name} {'search ' if search else ''}{name}: {scores}{diverged}  ({record['wall_seconds']:.0f} s)")
    return record


def _baseline(method: str):
    """How a baseline's model is prepared from the fresh base: which of its weights train."""
    def prepare(base: nn.Module, heads: list[str]) -> nn.Module:
        head = {id(p) for name, module in base.named_modules() if name.split(".")[-1] in heads
                for p in module.parameters()}
        for parameter in base.parameters():
            parameter.requires_grad_(method == "full" or id(parameter) in head)
        return base
    return prepare


def zero_shot(space: Workspace, part: Part, variant: Variant, out: Path, say) -> dict:
    """The base model scored as it is: the floor of a generative part."""
    path = out / part.name / f"{variant.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    model = space.fresh_base().to(space.device)
    record = {"method": "zero-shot", "variant": variant.name, "label": variant.label, "part": part.name, "rank": 0,
              "seed": None, "steps": 0, "trainable_parameters": {"adapter": 0, "head": 0},
              "config": {"model": part.model, "data": part.data, "objective": space.kind, "lr": None},
              **evaluate(model, space.objective, space.splits, part.eval_batch_size or part.batch_size, space.device,
                         True, ("validation", "test")), "versions": versions()}
    if part.forgetting:
        record["forgetting"] = forgetting(model, space, part.forgetting)
    record["wall_seconds"] = time.perf_counter() - started
    write_json(path, record)
    say(f"{part.name} {variant.name}: test {headline(record['metrics']['test']):.3f}")
    return record


@torch.no_grad()
def _initialise_head(space: Workspace, seed: int) -> None:
    """A new classification head per seed, so that the seeds vary everything a run draws at random. Drawn as
    transformers draws a new head: normal(0, initializer_range) weights, zero biases."""
    if space.kind != "classify":
        return
    torch.manual_seed(seed)
    std = getattr(space.pristine.config, "initializer_range", 0.02)
    for name in head_modules(space.pristine):
        for module in getattr(space.pristine, name).modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def initial_routing(space: Workspace, settings: Settings) -> dict:
    """Per-layer routing on the test split of the same adapter before its first step: how differently an
    untrained router already treats the tasks, the baseline for what training adds."""
    model = attach_adapter(space.fresh_base(), settings, []).to(space.device)
    evaluation = evaluate(model, space.objective, space.splits, settings.batch_size, space.device, True, ("test",))
    return evaluation["router_layers"]


@torch.no_grad()
def merged_evaluation(model, space: Workspace, batch_size: int) -> dict:
    """Merge the LoTR update into the base weights and evaluate again: the scores and the largest change in
    the model's outputs on the first test batch."""
    batch = space.objective.batch(space.splits.test[:batch_size], space.device)
    before = space.objective.forward(model, batch.inputs, batch.examples).logits.float()
    plain = model.merge_and_unload()
    after = space.objective.forward(plain, batch.inputs, batch.examples).logits.float()
    scores = evaluate(plain, space.objective, space.splits, batch_size, space.device, True, ("test",))["metrics"]
    return {"metrics": scores, "max_abs_output_difference": (after - before).abs().max().item(),
            "output_scale": before.abs().max().item()}
