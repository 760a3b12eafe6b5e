"""Many LoRAs, one basis, on real adapters: single-task LoRAs of the skills set on SmolLM2, compressed jointly into
one LoTR basis and each alone, scored on every task's test split.

The steps, each kept once done (an interrupted run goes on where it stopped):

1. One PEFT LoRA per task (``rankshare train --method lora --data skills:TASK``), the same steps and rate for each.
2. The LoRAs compressed jointly (``compress --adapter TASK=RUN ...``) at each rank of ``ranks``: one basis per
   projection, shared across layers and tasks; and at each rank of ``module_ranks`` with ``--share by_module``:
   one basis per module (layer), shared by the tasks only.
3. Each LoRA compressed alone (``compress_lora``) at the rank whose eight adapters together hold about as many
   parameters as the joint compression at each rank: the separate fit of the same size.
4. At the ranks of ``module_recover_ranks`` and ``recover_ranks``, the joint compression (a basis per module, per
   projection) with ``--recover-steps``, at each rate of ``recover_rates`` (None: the LoRA's own).
5. Every adapter of 1–4 scored on its task's test split (exact match), with its relative error and parameters.

Records: ``<out>/<name>/*.json``, one per scored adapter; the trained and compressed runs live in ``<out>/.runs``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import rankshare as rs

from ..compress import lora_shapes
from ..finetune.convert import compress_runs
from ..finetune.jobs import Job
from ..finetune.run_folder import write_json
from ..finetune.running import recover_cores, run_job
from ..finetune.skills import PHRASED, SYNTHETIC
from ..finetune.trained import evaluate_run

RUNS = ".runs"


@dataclass
class CompressionPart:
    name: str
    model: str
    tasks: tuple[str, ...]
    lora_rank: int
    max_train: int  # per task; one epoch of it is the LoRA's schedule
    max_eval: int
    max_length: int
    batch_size: int
    learning_rate: float
    ranks: tuple[int, ...]  # joint compression
    recover_ranks: tuple[int, ...]
    recover_steps: int
    recover_rates: tuple[float | None, ...] = (None,)  # None: the LoRA's own rate
    module_ranks: tuple[int, ...] = ()  # joint compression with a basis per module
    module_recover_ranks: tuple[int, ...] = ()
    claim: str = "compression"


def compression_part(quick: bool = False) -> CompressionPart:
    tasks = (*SYNTHETIC, *PHRASED)
    if quick:
        return CompressionPart("compress-smollm2-skills", "smollm2", tasks[:1], lora_rank=2, max_train=4, max_eval=1,
                               max_length=128, batch_size=4, learning_rate=1e-2, ranks=(2,), recover_ranks=(2,),
                               recover_steps=1, module_ranks=(2,))
    return CompressionPart("compress-smollm2-skills", "smollm2", tasks, lora_rank=8, max_train=1200, max_eval=50,
                           max_length=128, batch_size=8, learning_rate=3e-3, ranks=(8, 16, 32, 64),
                           recover_ranks=(8, 16), recover_steps=50, recover_rates=(None, 3e-2),
                           module_ranks=(4, 8, 16), module_recover_ranks=(4,))


def run_compression(part: CompressionPart, out: Path, quiet: bool, say) -> None:
    """The part's steps in the order that answers its question soonest: the LoRAs, every joint rank (a basis per
    projection, then per module), every separate fit, then the recoveries."""
    folder, runs = out / part.name, out / RUNS / part.name
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "part.json", asdict(part))
    loras = {task: _lora(part, task, runs / f"lora-{task}", folder, quiet, say) for task in part.tasks}
    for share, ranks in (("by_name", part.ranks), ("by_module", part.module_ranks)):
        for rank in ranks:
            if not all((folder / f"{_joint_name(rank, share)}-{task}.json").is_file() for task in part.tasks):
                _joint(part, rank, loras, runs, folder, quiet, say, share)
    for rank in part.ranks:
        _separate(part, rank, loras, runs, folder, quiet, say)
    for share, ranks in (("by_module", part.module_recover_ranks), ("by_name", part.recover_ranks)):
        for rank in ranks:
            for rate in part.recover_rates:
                _recovered(part, rank, rate, loras, runs, folder, quiet, say, share)


def _joint_name(rank: int, share: str) -> str:
    return f"joint-r{rank}" if share == "by_name" else f"joint-by-module-r{rank}"


def _joint_kind(share: str) -> str:
    return "joint" if share == "by_name" else JOINT_BY_MODULE


def _joint(part: CompressionPart, rank: int, loras: dict[str, Path], runs: Path, folder: Path | None, quiet: bool,
           say, share: str = "by_name") -> Path:
    """The LoRAs compressed jointly at ``rank``, each task scored into ``folder`` (None: fitted only)."""
    name = _joint_name(rank, share)
    joint = runs / name
    started = time.perf_counter()
    (_, _, report), = compress_runs(list(loras.items()), [rank], joint, share)
    seconds = time.perf_counter() - started
    for task in part.tasks if folder else ():
        _score(folder / f"{name}-{task}.json", joint / f"rank-{rank}" / task, quiet, say, {
            "kind": _joint_kind(share), "task": task, "rank": rank,
            "relative_error": report.task_errors[task],
            "task_parameters": report.task_parameters[task], "basis_parameters": report.basis_parameters,
            "total_parameters": report.total_parameters, "lora_parameters": report.lora_parameters[task],
            "fit_seconds": seconds, "bytes_on_disk": _bytes(joint / f"rank-{rank}")})
    return joint


def _recovered(part: CompressionPart, rank: int, rate: float | None, loras: dict[str, Path], runs: Path,
               folder: Path, quiet: bool, say, share: str = "by_name") -> None:
    """Each task's jointly fitted cores trained alone on the task (``--recover-steps``), then scored."""
    fitted = _joint_name(rank, share)
    name = f"{fitted}-recovered" + (f"-lr{rate:g}" if rate else "")
    joint = runs / fitted
    for task in part.tasks:
        record = folder / f"{name}-{task}.json"
        if record.is_file():
            continue
        if not (joint / f"rank-{rank}" / task).is_dir():  # recorded, but the run is gone: the same fit again
            _joint(part, rank, loras, runs, None, quiet, say, share)
        recovered = runs / name / task
        shutil.rmtree(recovered, ignore_errors=True)
        shutil.copytree(joint / f"rank-{rank}" / task, recovered)
        done = recover_cores(recovered, part.recover_steps, quiet, rate)
        before = json.loads((folder / f"{fitted}-{task}.json").read_text())
        # The error is the fit's, before the cores trained again: kept apart, not shown as this row's.
        kept = {k: v for k, v in before.items() if k not in ("metrics", "relative_error")}
        kind = _joint_kind(share) + ", recovered" + (f" at {rate:g}" if rate else "")
        _score(record, recovered, quiet, say, {**kept, "fit_relative_error": before["relative_error"],
                                                "kind": kind, "recovered": done})


def _separate(part: CompressionPart, rank: int, loras: dict[str, Path], runs: Path, folder: Path, quiet: bool,
              say) -> None:
    """Each LoRA compressed alone at the rank whose adapters together match the joint fit at ``rank``, scored."""
    separate = separate_rank(part, rank, loras)
    for task in part.tasks:
        record = folder / f"separate-r{separate}-{task}.json"
        if record.is_file():
            continue
        target = runs / f"separate-r{separate}-{task}"
        (_, _, report), = compress_runs([(task, loras[task])], [separate], target, "by_name")  # one task: k = 1
        _score(record, target / f"rank-{separate}" / task, quiet, say, {
            "kind": "separate", "task": task, "rank": separate, "matches_joint_rank": rank,
            "relative_error": report.task_errors[task], "total_parameters": report.total_parameters,
            "bytes_on_disk": _bytes(target)})


def separate_rank(part: CompressionPart, rank: int, loras: dict[str, Path]) -> int:
    """The rank at which the tasks' separate LoTR adapters hold, together, the parameters closest to the joint
    compression's at ``rank`` (basis and cores; heads aside)."""
    shapes = lora_shapes(next(iter(loras.values())) / "adapter")

    def lotr(r: int) -> int:
        return rs.LotrConfig(rank=r, target_modules=list(shapes)).num_trainable_parameters(shapes)

    cores = rs.LotrConfig(rank=rank, target_modules=list(shapes), basis="basis").num_trainable_parameters(shapes)
    joint = lotr(rank) - cores + len(part.tasks) * cores
    limit = min(min(shape) for shape in shapes.values())
    return min(range(1, limit + 1), key=lambda r: abs(len(part.tasks) * lotr(r) - joint))


def _lora(part: CompressionPart, task: str, run: Path, folder: Path, quiet: bool, say) -> Path:
    """The task's trained LoRA run: trained and scored once; trained again where its record is kept but the run is
    not (``.runs`` is not kept with the records), and then it must give as many exact answers on every task as
    recorded (a retraining matches the first to about 1e-4 in loss, not bit for bit). A retraining is marked
    unchecked until its check passes, so that a stop between the two cannot skip the check."""
    record = folder / f"lora-{task}.json"
    if not record.is_file():
        trained = _train_lora(part, task, run, quiet, say)
        _score(record, run, quiet, say, {"kind": "lora", "task": task, "rank": part.lora_rank,
                                         "total_parameters": trained["trainable_parameters"]["adapter"],
                                         "steps": trained["steps"], "train_seconds": trained["train_seconds"],
                                         "bytes_on_disk": _bytes(run)})
        return run
    unchecked = run.with_name(f"{run.name}.unchecked")
    if not (run / "metrics.json").is_file():
        unchecked.touch()
        _train_lora(part, task, run, quiet, say)
    if unchecked.exists():
        _check_as_recorded(record, run, unchecked, quiet, say)
    return run


def _train_lora(part: CompressionPart, task: str, run: Path, quiet: bool, say) -> dict:
    """Train the task's LoRA into ``run``; an interrupted training goes on from its checkpoint."""
    settings = {"seed": 0, "lr": part.learning_rate, "batch_size": part.batch_size, "epochs": 1}
    job = Job(methods=["lora"], model=part.model, data=f"skills:{task}", max_train=part.max_train,
              max_eval=part.max_eval, max_length=part.max_length, rank=part.lora_rank, settings=settings)
    resuming = (run / "command.json").is_file()
    if not resuming:
        shutil.rmtree(run, ignore_errors=True)
    (trained,) = run_job(job, run, quiet, say, resuming=resuming)
    return trained


def _check_as_recorded(record: Path, run: Path, unchecked: Path, quiet: bool, say) -> None:
    """The retrained run must score as the record (the first training's, kept) on every task, or it is moved aside
    (so that no later step builds on it) and the part stops."""
    recorded = json.loads(record.read_text())["metrics"]
    scored = _test_metrics(run, quiet)
    if any(scored[t]["exact_match"] != recorded[t]["exact_match"] for t in recorded):
        apart = run.with_name(f"{run.name}-mismatched")
        shutil.rmtree(apart, ignore_errors=True)
        run.rename(apart)
        unchecked.unlink()
        task = record.stem.removeprefix("lora-")
        raise rs.RankshareError(f"the LoRA for {task} was trained again (its run was gone) and scores otherwise "
                                "than recorded, so the compressions recorded from it no longer hold: remove "
                                f"{record.parent} and run the part again (the new run is kept in {apart})")
    unchecked.unlink()
    say(f"{record.stem}: trained again, scores as recorded")


def _score(record: Path, run: Path, quiet: bool, say, fields: dict) -> None:
    """Score the run in ``run`` on its task's test split and write ``fields`` with the scores to ``record``."""
    started = time.perf_counter()
    metrics = _test_metrics(run, quiet)
    write_json(record, {**fields, "exact_match": metrics["average"]["exact_match"], "metrics": metrics,
                        "eval_seconds": time.perf_counter() - started})
    say(f"{record.stem}: exact match {metrics['average']['exact_match']:.3f}")


def _test_metrics(run: Path, quiet: bool) -> dict:
    """The run's scores on its task's test split, per task and on average."""
    return evaluate_run(run, None, quiet, splits=("test",))["metrics"]["test"]


def _bytes(folder: Path) -> int:
    """The adapter files' bytes in ``folder`` (every ``adapter`` folder below it): what serving must hold."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and "adapter" in path.parts[
        len(folder.parts) - 1:])


# -- report ----------------------------------------------------------------------------------------------------

JOINT_BY_MODULE = "joint, a basis per module"
# In this order; "KIND, recovered at RATE" after its kind.
KINDS = ("lora", "joint", "joint, recovered", JOINT_BY_MODULE, f"{JOINT_BY_MODULE}, recovered", "separate")


def _order(kind: str) -> tuple[int, str]:
    return KINDS.index(kind.split(" at ")[0]), kind


def compression_rows(records: list[dict]) -> list[dict]:
    """One row per adapter set (the LoRAs, each joint rank, each separate rank): its total parameters and bytes,
    and per-task and average exact match."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["kind"], record["rank"]), []).append(record)
    rows = []
    for (kind, rank), group in sorted(groups.items(), key=lambda item: (_order(item[0][0]), item[0][1])):
        if kind.startswith("joint"):
            total, size = group[0]["total_parameters"], group[0]["bytes_on_disk"]
        else:  # one adapter per task
            total = sum(r["total_parameters"] for r in group)
            size = sum(r["bytes_on_disk"] for r in group)
        rows.append({"kind": kind, "rank": rank, "parameters": total, "bytes": size,
                     "tasks": {r["task"]: r["exact_match"] for r in group},
                     "average": sum(r["exact_match"] for r in group) / len(group),
                     "error": sum(r.get("relative_error", 0.0) for r in group) / len(group)})
    return rows


def compression_section(folder: Path) -> tuple[str, object] | None:
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "part.json"]
    if not records:
        return None
    from ..finetune.report import compact, new_figure

    rows = compression_rows(records)
    tasks = sorted({task for row in rows for task in row["tasks"]})
    lora = next((row for row in rows if row["kind"] == "lora"), None)
    kinds = sorted({row["kind"] for row in rows} | set(KINDS), key=_order)
    header = ["adapters", "rank", "parameters", "MiB on disk", *tasks, "average", "of the LoRAs'",
              "fit's mean rel. error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    # A set scored on only some of the tasks so far (a part still running): its average is over those, said so,
    # and it is left out of the answer and the plot.
    complete = [row for row in rows if len(row["tasks"]) == len(tasks)]
    for row in rows:
        share = f"{100 * row['average'] / lora['average']:.0f} %" if lora and lora["average"] else "—"
        average = f"{100 * row['average']:.1f}" + ("" if row in complete else
                                                    f" ({len(row['tasks'])} of {len(tasks)} tasks)")
        lines.append("| " + " | ".join([row["kind"], str(row["rank"]), f"{row['parameters']:,}",
                                        f"{row['bytes'] / 2**20:.2f}",
                                        *(f"{100 * row['tasks'][t]:.0f}" if t in row["tasks"] else "—" for t in tasks),
                                        average, share,
                                        "—" if row["kind"] == "lora" or "recovered" in row["kind"]
                                        else f"{row['error']:.3f}"]) + " |")
    text = "\n".join(lines)
    if lora:
        keep = []
        for kind in kinds[1:]:
            measured = [row for row in complete if row["kind"] == kind]
            enough = [row for row in measured if row["average"] >= 0.95 * lora["average"]]
            best = min(enough, key=lambda row: row["parameters"], default=None)
            keep.append(f"- {kind}: " + (f"{best['parameters']:,} parameters (rank {best['rank']}), "
                                          f"{best['parameters'] / lora['parameters']:.3f}× the LoRAs'" if best else
                                          "no rank measured keeps 95 %" if measured else
                                          "not measured on every task yet"))
        text += "\n\nThe fewest parameters that keep 95 % of the LoRAs' average exact match:\n\n" + "\n".join(keep)
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.set_xscale("log")
    for i, kind in enumerate(kinds[1:]):
        series = sorted((row["parameters"], 100 * row["average"]) for row in complete if row["kind"] == kind)
        if series:
            axes.plot(*zip(*series), marker="o", color=f"C{i}", label=kind)
    if lora:
        axes.scatter([lora["parameters"]], [100 * lora["average"]], color="0.2", marker="*", s=120, zorder=3,
                     label=f"the {len(lora['tasks'])} LoRAs")
        axes.axhline(95 * lora["average"], color="0.5", linestyle=":", label="95 % of the LoRAs'")
    from matplotlib.ticker import FuncFormatter

    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: compact(value)))
    axes.set_xlabel("adapter parameters for all tasks (log scale)")
    axes.set_ylabel("average test exact match (%)")
    axes.set_title("Many LoRAs, one basis: SmolLM2 on the skills tasks")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return text, figure
