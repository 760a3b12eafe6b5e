"""The study's tables and plots, drawn from the run records alone (no model is loaded, nothing trains).

Each point is the mean ± sample standard deviation over seeds of the test split's accuracy, for the runs at
the learning rate chosen on validation. Router specialisation is, in each adapted layer, the total-variation
distance between two tasks' mean gate vectors, ½ Σ_i |g_a,i − g_b,i| (0 when both tasks are routed alike,
1 when they use disjoint experts), averaged over layers — per layer, since each layer has its own router
and experts with the same index in two layers have nothing in common.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
from pathlib import Path

from ..atomic_files import replace_file
from ..config import method_class, methods
from ..errors import RankshareError
from ..finetune.report import compact, new_figure, router_figure
from .compression import compression_section
from .plan import BASELINES, Part, Variant, part_from_dict, rates, reference_part
from .runner import PLAN_FILE, SEARCH_FILE

SUMMARY = "summary.md"
# One colour per variant in every plot.
COLOURS = {"lora": "C0", "lotr": "C1", "lotr-by-shape": "C2", "lotr-frozen": "C3"}


def is_mixture(variant: Variant) -> bool:
    """A routed mixture: its update depends on per-token gates."""
    return variant.method not in BASELINES and method_class(variant.method).merge_needs_gates


def load_parts(out: Path) -> list[Part]:
    return [part_from_dict(part) for part in json.loads((out / PLAN_FILE).read_text())["parts"]]


def part_records(out: Path, part: Part) -> list[dict]:
    """Every run record of the part, rate-search runs included."""
    return [json.loads(p.read_text()) for p in sorted((out / part.name).glob("*.json")) if p.name != SEARCH_FILE]


def final_runs(part: Part, search: dict, records: list[dict]) -> dict[str, list[dict]]:
    """Per variant, its runs at the rate chosen in the part's learning-rate search."""
    chosen = search["learning_rates"]
    runs = {}
    for variant in part.variants:
        if variant.method == "zero-shot":  # one record, no rate and no seed
            runs[variant.name] = [r for r in records if r["variant"] == variant.name]
            continue
        if (variant.lr_from or variant.name) not in chosen:  # a part still running has not reached it
            runs[variant.name] = []
            continue
        lr = chosen[variant.lr_from or variant.name]["chosen"]
        runs[variant.name] = [r for r in records if r["variant"] == variant.name and r["config"]["lr"] == lr
                              and r["seed"] in part.seeds]
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def layer_distances(router_layers: dict[str, list[list[float]]]) -> list[float] | None:
    """Per layer, the total-variation distance between two tasks' mean gates, averaged over every pair of tasks
    (None with fewer than two tasks)."""
    tasks = sorted(router_layers)
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    if not pairs:
        return None
    layers = zip(*(router_layers[task] for task in tasks))
    return [statistics.fmean(0.5 * sum(abs(x - y) for x, y in zip(gates[tasks.index(a)], gates[tasks.index(b)]))
                             for a, b in pairs) for gates in layers]


def specialisation(router_layers: dict[str, list[list[float]]]) -> float | None:
    distances = layer_distances(router_layers)
    return statistics.fmean(distances) if distances else None


def by_rank(runs: list[dict]) -> list[tuple[int, list[dict]]]:
    """The runs grouped by rank, smallest first (each group: the seeds of one configuration)."""
    groups: dict[int, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["rank"], []).append(run)
    return sorted(groups.items())


def points(runs: list[dict], task: str = "average") -> list[dict]:
    """One point per rank: adapter parameters, and test accuracy and macro-F1 over the seeds."""
    result = []
    for rank, group in by_rank(runs):
        accuracy = mean_std([r["metrics"]["test"][task]["accuracy"] for r in group])
        macro_f1 = mean_std([r["metrics"]["test"][task]["macro_f1"] for r in group])
        result.append({"rank": rank, "parameters": group[0]["trainable_parameters"]["adapter"],
                       "head": group[0]["trainable_parameters"]["head"], "accuracy": accuracy, "macro_f1": macro_f1,
                       "seeds": len(group), "seconds": statistics.fmean(r["train_seconds"] for r in group)})
    return result


def _pm(value: tuple[float, float]) -> str:
    return f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def lotr_section(part: Part, runs: dict[str, list[dict]]) -> tuple[str, object]:
    rows = []
    for variant in part.variants:
        for point in points(runs[variant.name]):
            rows.append([variant.label, str(point["rank"]), f"{point['parameters']:,}", _pm(point["accuracy"]),
                         _pm(point["macro_f1"]), str(point["seeds"]), f"{point['seconds']:.0f}"])
    table = _table(["variant", "rank", "adapter params", "test accuracy %", "test macro-F1 %", "seeds",
                    "train s/run"], rows)
    return table, lotr_figure(part, runs)


def lotr_figure(part: Part, runs: dict[str, list[dict]]):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.set_xscale("log")
    for i, variant in enumerate(part.variants):
        series = points(runs[variant.name])
        if not series:
            continue
        colour = COLOURS.get(variant.name, f"C{i + len(COLOURS)}")
        axes.errorbar([p["parameters"] for p in series], [100 * p["accuracy"][0] for p in series],
                      yerr=[100 * p["accuracy"][1] for p in series], marker="o", capsize=4, color=colour,
                      label=variant.label)
        for p in series:
            axes.annotate(f"r={p['rank']}", (p["parameters"], 100 * p["accuracy"][0]), textcoords="offset points",
                          xytext=(5, -12), fontsize=8, color=colour)
    axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: compact(value)))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("trainable adapter parameters (log scale; a classification head is not counted)")
    axes.set_ylabel("test accuracy (%), mean ± std over seeds")
    axes.set_title(f"{part.model} on {part.data}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def mor_section(part: Part, runs: dict[str, list[dict]]) -> tuple[str, object, object]:
    tasks = sorted({t for group in runs.values() for r in group for t in r["metrics"]["test"] if t != "average"})
    rows = []
    for variant in part.variants:
        group = runs[variant.name]
        if not group:
            continue
        cells = [variant.label, str(group[0]["rank"]), f"{group[0]['trainable_parameters']['adapter']:,}"]
        cells += [_pm(mean_std([r["metrics"]["test"][t]["accuracy"] for r in group])) for t in tasks + ["average"]]
        cells.append(_pm(mean_std([r["metrics"]["test"]["average"]["macro_f1"] for r in group])))
        for key in ("router_layers", "router_layers_at_init"):
            spread = [s for r in group if r.get(key) for s in [specialisation(r[key])] if s is not None]
            cells.append(f"{mean_std(spread)[0]:.3f} ± {mean_std(spread)[1]:.3f}" if spread else "—")
        cells.append(str(len(group)))
        rows.append(cells)
    header = ["variant", "rank", "adapter params"] + [f"{t} accuracy %" for t in tasks]
    header += ["average accuracy %", "average macro-F1 %", "router specialisation", "at initialisation", "seeds"]
    return _table(header, rows), mor_figure(part, runs), mor_router_figure(part, runs), routing_figure(part, runs)


def mor_figure(part: Part, runs: dict[str, list[dict]]):
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    colour = 0
    for variant in part.variants:
        group = runs[variant.name]
        if not is_mixture(variant) and group:  # the baseline: a line across the plot
            mean, std = mean_std([r["metrics"]["test"]["average"]["accuracy"] for r in group])
            axes.axhline(100 * mean, color="0.3", label=f"{variant.label}, r={group[0]['rank']}")
            axes.axhspan(100 * (mean - std), 100 * (mean + std), color="0.3", alpha=0.15)
    for method in dict.fromkeys(v.method for v in part.variants if is_mixture(v)):
        label = methods()[method].title
        mixtures = [v for v in part.variants if v.method == method and runs[v.name]]
        if not mixtures:
            continue
        experts = [v.options["num_experts"] for v in mixtures]
        stats = [mean_std([r["metrics"]["test"]["average"]["accuracy"] for r in runs[v.name]]) for v in mixtures]
        axes.errorbar(experts, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=4,
                      color=f"C{colour}", label=label)
        for v, (m, _) in zip(mixtures, stats):
            axes.annotate(f"r={runs[v.name][0]['rank']}", (v.options["num_experts"], 100 * m),
                          textcoords="offset points", xytext=(5, -12), fontsize=8, color=f"C{colour}")
        colour += 1
    axes.set_xscale("log", base=2)
    experts = sorted({v.options["num_experts"] for v in part.variants if "num_experts" in v.options})
    axes.set_xticks(experts, [str(n) for n in experts])
    axes.set_xlabel("experts N (each rank chosen to come closest to the budget)")
    axes.set_ylabel("average test accuracy (%), mean ± std")
    axes.set_title(f"{part.model} on {part.data}, a budget of {part.variants[0].budget or 0:,} adapter parameters")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def largest_mixture(part: Part) -> int:
    """The largest number of experts among the part's mixtures (0 if it has none)."""
    return max((v.options.get("num_experts", 0) for v in part.variants if is_mixture(v)), default=0)


def mor_router_figure(part: Part, runs: dict[str, list[dict]]):
    """Seed 0's routing for each mixture at the largest N (experts are not matched across seeds)."""
    largest = largest_mixture(part)
    chosen = [r for v in part.variants if is_mixture(v) and v.options.get("num_experts") == largest
              for r in runs[v.name] if r["seed"] == min(part.seeds) and r.get("router")]
    if not chosen:
        return None
    figure = router_figure(chosen)
    figure.suptitle(f"Mean gate per expert and task, averaged over layers, N={largest}, seed {min(part.seeds)}, "
                    "test split")
    return figure


def routing_figure(part: Part, runs: dict[str, list[dict]]):
    """Per adapted layer, how differently the two tasks are routed after training and at initialisation
    (mean ± std over seeds), for each mixture at the largest N."""
    largest = largest_mixture(part)
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    drawn = False
    for colour, variant in enumerate(v for v in part.variants if v.options.get("num_experts") == largest):
        lines = (("router_layers", "-", "trained"), ("router_layers_at_init", ":", "at initialisation"))
        for key, style, when in lines:
            curves = [d for r in runs[variant.name] if r.get(key) for d in [layer_distances(r[key])] if d]
            if not curves:
                continue
            stats = [mean_std(list(values)) for values in zip(*curves)]
            axes.errorbar(range(len(stats)), [m for m, _ in stats], yerr=[s for _, s in stats], linestyle=style,
                          marker="o", capsize=3, color=f"C{colour}", label=f"{variant.label}, {when}")
            drawn = True
    if not drawn:
        return None
    axes.set_xlabel("adapted layer, input to output")
    axes.set_ylabel("task routing distance (0 alike, 1 disjoint)")
    axes.set_title(f"How differently the router treats the tasks, N={largest}, mean ± std over seeds")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def merge_rows(part: Part, runs: dict[str, list[dict]]) -> list[str] | None:
    merged = [r for group in runs.values() for r in group if r.get("merged")]
    if not merged:
        return None
    def average(record: dict) -> float:
        return record["metrics"]["test"]["average"]["accuracy"]

    accuracy = max(abs(average(r["merged"]) - average(r)) for r in merged)
    same = sum(average(r["merged"]) == average(r) for r in merged)
    output = max(r["merged"]["max_abs_output_difference"] for r in merged)
    scale = max(r["merged"]["output_scale"] for r in merged)
    return [part.name, str(len(merged)), f"{same} of {len(merged)}", f"{100 * accuracy:.2f}", f"{output:.1e}",
            f"{scale:.1f}"]


def search_rows(part: Part, search: dict) -> list[list[str]]:
    if part.rates_from:  # no search of its own
        return []
    grids = {variant.name: rates(part, variant) for variant in part.variants}
    rows = []
    for name, result in search.get("learning_rates", {}).items():
        scores = ", ".join(f"{lr}: {100 * a:.1f}" for lr, a in result["validation_accuracy"].items())
        chosen, grid = result["chosen"], grids.get(name, part.learning_rates)
        edge = len(grid) > 1 and chosen in (min(grid), max(grid))  # the best rate may lie outside the grid
        seeds = ", ".join(str(seed) for seed in result.get("seeds", [0]))
        rows.append([part.name, name, str(result["rank"]), seeds, scores,
                     f"{chosen:g}" + (f" ({'top' if chosen == max(grid) else 'bottom'} of the grid)" if edge else "")])
    return rows


# A run has collapsed when at least this share of its test predictions falls in one class: it has stopped
# telling the classes apart. On sentiment (test split: 43 % negative, 39 % neutral, 18 % positive) healthy runs put
# at most about half their predictions in one class; failed ones 85-100 %.
COLLAPSE_SHARE = 0.8


def collapsed(record: dict) -> bool:
    """One class takes COLLAPSE_SHARE of the test predictions, or the loss diverged (training stopped there)."""
    if "diverged_at_step" in record:
        return True
    tasks = [m for task, m in record["metrics"]["test"].items() if task != "average" and "predicted" in m]
    return any(max(m["predicted"]) >= COLLAPSE_SHARE * m["examples"] for m in tasks)


def accuracy(record: dict, split: str = "test", task: str = "average") -> float:
    """Accuracy, or exact match for instruction tuning."""
    scores = record["metrics"][split][task]
    return scores["accuracy"] if "accuracy" in scores else scores["exact_match"]


def paired_difference(runs: list[dict], baseline: list[dict], value=accuracy) -> dict | None:
    """Mean of the per-seed differences ``runs - baseline`` in ``value`` (test accuracy unless given), with a
    two-sided 95 % confidence interval from Student's t over the seeds both have (runs with one seed are paired by
    it: the same split, batch order and head initialisation)."""
    from scipy.stats import t

    by_seed = {r["seed"]: r for r in baseline}
    differences = [value(r) - value(by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    if not differences:
        return None
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "seeds": 1}
    half = t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": len(differences)}


def _ci(difference: dict | None, scale: float = 100, digits: int = 1) -> str:
    """A paired difference as "mean [low, high]", in points unless ``scale`` says otherwise."""
    if difference is None:
        return "—"
    mean, low, high = (scale * difference[k] for k in ("mean", "low", "high"))
    if difference["seeds"] < 2:
        return f"{mean:+.{digits}f} (one seed)"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def precision_note(test_examples: int, differences: list[dict | None]) -> str:
    """What a part can tell apart: the worth of one test example, and how wide its paired intervals came out."""
    text = f"One test example is worth {100 / test_examples:.2f} points of the average."
    halves = [100 * (d["high"] - d["low"]) / 2 for d in differences if d and d["seeds"] >= 2]
    if halves:
        text += (f" The paired 95 % intervals against LoRA reach ±{min(halves):.1f} to ±{max(halves):.1f} points "
                 "either side of their means: a difference smaller than its interval's half-width cannot be told from "
                 "what another choice of seeds would give.")
    return text


def threads(record: dict) -> int:
    return int(record["versions"]["threads"])


def train_seconds(group: list[dict]) -> str:
    """Mean training seconds per run, of the runs with the most threads: a run with fewer was started beside another
    part's (two parts at a time, one thread each), which takes longer per run and says nothing of the method."""
    most = max(map(threads, group))
    timed = [r["train_seconds"] for r in group if threads(r) == most]
    return f"{statistics.fmean(timed):.0f}" + (f" ({len(timed)} at {most} threads)" if len(timed) < len(group) else "")


def power_section(part: Part, search: dict, records: list[dict]) -> tuple[str, dict]:
    """Part 1: per rate, every variant's accuracy and collapses; at the rates validation chose, the paired
    differences against LoRA; the plots of both."""
    chosen = search["learning_rates"]
    grid_rows = []
    for variant in part.variants:
        runs = [r for r in records if r["variant"] == variant.name]
        for lr in sorted({r["config"]["lr"] for r in runs if r["config"]["lr"] is not None}):
            at = [r for r in runs if r["config"]["lr"] == lr]
            validation = [accuracy(r, "validation") for r in at if "validation" in r["metrics"]]
            mark = " ←" if chosen.get(variant.lr_from or variant.name, {}).get("chosen") == lr else ""
            grid_rows.append([variant.label, f"{lr:g}{mark}", str(len(at)),
                              f"{100 * statistics.fmean(validation):.1f}" if validation else "—",
                              _pm(mean_std([accuracy(r) for r in at])), f"{sum(map(collapsed, at))} of {len(at)}"])
    grid = _table(["variant", "rate (← chosen)", "runs", "validation accuracy %", "test accuracy %", "collapsed"],
                  grid_rows)
    runs = final_runs(part, search, records)
    baseline = runs.get("lora", [])
    rows, differences = [], []
    for variant in part.variants:
        group = runs[variant.name]
        if not group:
            continue
        lr = group[0]["config"]["lr"]
        difference = None if variant.name == "lora" else paired_difference(group, baseline)
        differences.append(difference)
        rows.append([variant.label, str(group[0]["rank"]) if group[0]["rank"] else "—",
                     f"{group[0]['trainable_parameters']['adapter']:,}", f"{lr:g}" if lr else "—",
                     _pm(mean_std([accuracy(r) for r in group])),
                     _pm(mean_std([r["metrics"]["test"]["average"]["macro_f1"] for r in group])),
                     _ci(difference), f"{sum(map(collapsed, group))} of {len(group)}",
                     train_seconds(group)])
    table = _table(["variant", "rank", "trainable params", "rate", "test accuracy %", "test macro-F1 %",
                    "Δ accuracy vs LoRA, points [95 % CI]", "collapsed", "train s/run (most threads)"], rows)
    images = {f"{part.name}-rates.png": rates_figure(part, records),
              f"{part.name}-paired.png": paired_figure(part, runs)}
    note = precision_note(search["examples"]["test"], differences)
    return grid + "\n\nAt each variant's chosen rate (paired by seed):\n\n" + table + "\n\n" + note, images


def rates_figure(part: Part, records: list[dict]):
    """Test accuracy against the learning rate, mean ± std over seeds; a cross for each collapsed run."""
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.set_xscale("log")
    for i, variant in enumerate(v for v in part.variants if v.method != "zero-shot"):
        runs = [r for r in records if r["variant"] == variant.name]
        if not runs:
            continue
        grid = sorted({r["config"]["lr"] for r in runs})
        stats = [mean_std([accuracy(r) for r in runs if r["config"]["lr"] == lr]) for lr in grid]
        style = "--" if variant.method in BASELINES else "-"
        axes.errorbar(grid, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=3,
                      linestyle=style, color=f"C{i}", label=variant.label)
        fallen = [r for r in runs if collapsed(r)]
        axes.scatter([r["config"]["lr"] for r in fallen], [100 * accuracy(r) for r in fallen], marker="x", s=60,
                     color="black", zorder=3)
    axes.set_xlabel("learning rate (log scale); × a collapsed run")
    axes.set_ylabel("test accuracy (%), mean ± std over seeds")
    axes.set_title(f"{part.model} on {part.data}: every rate, {len(part.seeds)} seeds")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def paired_figure(part: Part, runs: dict[str, list[dict]]):
    """Each variant's paired difference against LoRA at the chosen rates, with its 95 % confidence interval."""
    figure = new_figure(7, 3.5)
    axes = figure.add_subplot()
    shown = [(v, paired_difference(runs[v.name], runs.get("lora", []))) for v in part.variants if v.name != "lora"]
    shown = [(v, d) for v, d in shown if d is not None]
    for y, (_, difference) in enumerate(shown):
        low, high = difference["low"], difference["high"]
        error = [[100 * (difference["mean"] - low)], [100 * (high - difference["mean"])]] if low == low else None
        axes.errorbar([100 * difference["mean"]], [y], xerr=error, marker="o", capsize=4, color=f"C{y}")
    axes.axvline(0, color="0.3")
    axes.set_yticks(range(len(shown)), [v.label for v, _ in shown])
    axes.set_xlabel("test accuracy minus LoRA's, same seed (points), mean and 95 % CI")
    axes.grid(True, axis="x", alpha=0.3)
    return figure


def comparison_section(part: Part, runs: dict[str, list[dict]], test_examples: int,
                       reference_from: tuple[str, list[dict]] | None = None) -> tuple[str, dict]:
    """A part of the powered study past the first (2, 3, 4): per variant and rank, the test scores per task, the
    paired difference against LoRA (at its smallest rank; or ``reference_from``: another part's name and its LoRA
    runs at the rate it chose), the forgetting measure, and the zero-shot floor."""
    baseline = next((v for v in part.variants if v.method == "lora"), None)
    reference = reference_from[1] if reference_from else runs[baseline.name] if baseline else []
    reference = sorted(reference, key=lambda r: r["rank"])
    reference = [r for r in reference if r["rank"] == reference[0]["rank"]] if reference else []
    tasks = sorted({t for group in runs.values() for r in group for t in r["metrics"]["test"] if t != "average"})
    tasks = tasks if len(tasks) > 1 else []
    rows, differences = [], []
    for variant in part.variants:
        for rank, group in by_rank(runs[variant.name]):
            lr = group[0]["config"]["lr"]
            cells = [variant.label, str(rank) if rank else "—", f"{group[0]['trainable_parameters']['adapter']:,}",
                     f"{lr:g}" if lr else "—"]
            cells += [_pm(mean_std([accuracy(r, task=t) for r in group])) for t in tasks]
            cells.append(_pm(mean_std([accuracy(r) for r in group])))
            same = not reference_from and (group is reference or (reference and group[0] is reference[0]))
            difference = None if same or variant.method == "zero-shot" else paired_difference(group, reference)
            differences.append(difference)
            cells.append(_ci(difference))
            change = [r["forgetting"]["change"] for r in group if "forgetting" in r]
            if part.forgetting:
                cells.append(f"{mean_std(change)[0]:+.3f} ± {mean_std(change)[1]:.3f}" if change else "—")
            spread = [d for r in group if r.get("router_layers") for d in [specialisation(r["router_layers"])]
                      if d is not None]
            if tasks:
                cells.append(f"{mean_std(spread)[0]:.3f}" if spread else "—")
            cells.append(str(len(group)) if group[0]["seed"] is not None else "—")
            rows.append(cells)
    score = "exact match" if part.data == "skills" else "accuracy"
    against = f"LoRA r={reference[0]['rank']}" if reference else "LoRA"
    if reference_from and reference:
        against += f" at {reference[0]['config']['lr']:g} ({reference_from[0]})"
    header = ["variant", "rank", "trainable params", "rate"] + [f"{t} %" for t in tasks]
    header += [f"test {score} %", f"Δ vs {against}, points [95 % CI]"]
    header += ["Δ held-out loss (nats)"] if part.forgetting else []
    header += ["router specialisation"] if tasks else []
    header += ["seeds"]
    images = {f"{part.name}.png": comparison_figure(part, runs, score)}
    if tasks:
        images[f"{part.name}-routing-by-layer.png"] = routing_figure(part, runs)
    table = _table(header, rows) + "\n\n" + precision_note(test_examples, differences)
    if part.claim in ("parameter-efficiency", "downstream") and runs.get("lora") and not reference_from:
        table += "\n\n" + equal_accuracy_note(part, runs)
    return table, {name: image for name, image in images.items() if image is not None}


def equal_accuracy_note(part: Part, runs: dict[str, list[dict]]) -> str:
    """LoTR's paper's question: for each rank of LoRA, the smallest adapter of every other variant whose mean test
    score reaches LoRA's mean, and how many fewer (or more) parameters it has."""
    lines = []
    others = [v for v in part.variants if v.method not in BASELINES and v.name != "lora"]
    for lora_rank, reference in by_rank(runs.get("lora", [])):
        target = statistics.fmean(map(accuracy, reference))
        size = reference[0]["trainable_parameters"]["adapter"]
        found = []
        for variant in others:
            groups = by_rank(runs[variant.name])
            if not groups:
                found.append(f"{variant.label}: not run yet")
                continue
            reached = [(group[0]["trainable_parameters"]["adapter"], rank) for rank, group in groups
                       if statistics.fmean(map(accuracy, group)) >= target]
            if not reached:
                found.append(f"{variant.label}: none of its ranks")
                continue
            count, rank = min(reached)
            ratio = f"{size / count:.1f}× fewer" if count <= size else f"{count / size:.1f}× more"
            found.append(f"{variant.label} r={rank}, {count:,} ({ratio})")
        lines.append(f"- LoRA r={lora_rank} ({100 * target:.1f} %, {size:,} parameters): " + "; ".join(found))
    return ("The smallest adapter whose mean test score reaches LoRA's (means alone; the intervals above say how firm "
            "each difference is):\n\n" + "\n".join(lines))


def comparison_figure(part: Part, runs: dict[str, list[dict]], score: str):
    """Test score against trainable parameters (log scale), mean ± std over seeds; zero-shot as a line."""
    from matplotlib.ticker import FuncFormatter

    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.set_xscale("log")
    for i, variant in enumerate(part.variants):
        group = runs[variant.name]
        if not group:
            continue
        if variant.method in BASELINES:  # no adapter: a line at the mean
            mean = statistics.fmean(map(accuracy, group))
            axes.axhline(100 * mean, color="0.3", linestyle=":", label=variant.label)
            continue
        groups = by_rank(group)
        xs = [runs_at[0]["trainable_parameters"]["adapter"] for _, runs_at in groups]
        stats = [mean_std([accuracy(r) for r in runs_at]) for _, runs_at in groups]
        axes.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=4,
                      color=f"C{i}", label=variant.label, linestyle="-" if len(xs) > 1 else "none")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: compact(value)))
    axes.set_xlabel("trainable adapter parameters (log scale)" + (", per added task" if part.claim == "downstream"
                                                                  else ""))
    axes.set_ylabel(f"test {score} (%), mean ± std over seeds")
    axes.set_title(f"{part.model} on {part.data}, {part.steps} steps of {part.batch_size}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def forgetting_change(record: dict) -> float:
    return record["forgetting"]["change"]


def nearest_lora(count: int, loras: list[tuple[int, list[dict]]]) -> tuple[int, list[dict]] | None:
    """The LoRA group (rank, runs) of the same part whose parameter count is nearest ``count`` by ratio."""
    def distance(group: tuple[int, list[dict]]) -> float:
        return abs(math.log(count / group[1][0]["trainable_parameters"]["adapter"]))

    return min(loras, key=distance, default=None)


def forgetting_section(parts: list[tuple[Part, dict[str, list[dict]]]]) -> tuple[str, object] | None:
    """Part 5: every SmolLM2 run's change in held-out language-modelling loss, next to its task score, and both
    paired by seed against the part's LoRA nearest in parameters."""
    rows, series = [], []
    for part, runs in parts:
        loras = [(rank, group) for v in part.variants if v.method == "lora"
                 for rank, group in by_rank([r for r in runs[v.name] if "forgetting" in r])]
        for variant in part.variants:
            measured = [run for run in runs[variant.name] if "forgetting" in run and variant.method != "zero-shot"]
            for rank, group in by_rank(measured):
                count = group[0]["trainable_parameters"]["adapter"]
                change = mean_std(list(map(forgetting_change, group)))
                lora = None if variant.method == "lora" else nearest_lora(count, loras)
                rows.append([part.name, variant.label, str(rank), f"{count:,}",
                             f"{group[0]['forgetting']['base_loss']:.3f}", f"{change[0]:+.3f} ± {change[1]:.3f}",
                             _pm(mean_std([accuracy(r) for r in group])),
                             f"r={lora[0]}" if lora else "—",
                             _ci(lora and paired_difference(group, lora[1], forgetting_change), scale=1, digits=3),
                             _ci(lora and paired_difference(group, lora[1])), str(len(group))])
                series.append((part.name, variant.label, group))
    if not rows:
        return None
    table = _table(["part", "variant", "rank", "trainable params", "base loss", "Δ held-out loss (nats)",
                    "test score %", "paired with LoRA (nearest count)", "Δ loss vs that LoRA [95 % CI]",
                    "Δ score vs that LoRA, points [95 % CI]", "seeds"], rows)
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    for i, (part_name, label, group) in enumerate(series):
        axes.scatter([r["trainable_parameters"]["adapter"] for r in group], [r["forgetting"]["change"] for r in group],
                     color=f"C{i % 10}", marker="o" if "skills" in part_name else "s", s=18,
                     label=f"{label} ({'skills' if 'skills' in part_name else 'sentiment'})")
    axes.set_xscale("log")
    axes.axhline(0, color="0.3")
    axes.set_xlabel("trainable adapter parameters (log scale)")
    axes.set_ylabel("held-out news loss, adapted minus base (nats)")
    axes.set_title("What fine-tuning costs SmolLM2 on text no run trained on")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=6, ncol=2)
    return table, figure


def schedule_section(part: Part, records: list[dict], out: Path) -> str:
    """Each variant at twice the steps against the same seeds and rate in the part it took its rates from."""
    earlier = [json.loads(p.read_text()) for p in sorted((out / part.rates_from).glob("*.json"))
               if p.name != SEARCH_FILE]
    rows = []
    baseline = [r for r in records if r["variant"] == "lora"]
    for variant in part.variants:
        longer = [r for r in records if r["variant"] == variant.name]
        pairs = [(r, e) for r in longer for e in earlier if e["variant"] == variant.name and e["seed"] == r["seed"]
                 and e["config"]["lr"] == r["config"]["lr"]]
        if not pairs:
            continue
        cells = [variant.label, f"{pairs[0][0]['config']['lr']:g}", ", ".join(str(r["seed"]) for r, _ in pairs)]
        for split in ("validation", "test"):
            short = statistics.fmean(accuracy(e, split) for _, e in pairs)
            long = statistics.fmean(accuracy(r, split) for r, _ in pairs)
            cells.append(f"{100 * short:.1f} → {100 * long:.1f} ({100 * (long - short):+.1f})")
        rows.append([*cells, _ci(None if variant.name == "lora" else paired_difference(longer, baseline))])
    paired = [(r, e) for r in records for e in earlier if e["seed"] == r["seed"] and e["variant"] == r["variant"]]
    steps = (paired[0][1]["steps"], paired[0][0]["steps"]) if paired else (0, 0)
    return _table(["variant", "rate", "seeds", f"validation % at {steps[0]} → {steps[1]} steps",
                   f"test % at {steps[0]} → {steps[1]} steps",
                   f"Δ test vs LoRA at {steps[1]} steps, points [95 % CI]"], rows)


def provisional_search(part: Part, records: list[dict]) -> dict:
    """For a grid part still running: each variant's rate chosen on the seeds it has finished so far."""
    search = {}
    for variant in part.variants:
        runs = [r for r in records if r["variant"] == variant.name and "validation" in r["metrics"]]
        if variant.lr_from or not runs:
            continue
        means = {lr: statistics.fmean(accuracy(r, "validation") for r in runs if r["config"]["lr"] == lr)
                 for lr in sorted({r["config"]["lr"] for r in runs})}
        search[variant.name] = {"rank": runs[0]["rank"], "seeds": sorted({r["seed"] for r in runs}),
                                "validation_accuracy": {f"{lr:g}": m for lr, m in means.items()},
                                "chosen": max(means, key=means.get)}
    examples = records[0]["examples"]
    targets = next((r["config"]["adapter"]["target_modules"] for r in records
                    if "target_modules" in r["config"].get("adapter", {})), [])
    return {"learning_rates": search, "load_seconds": 0.0, "targets": targets,
            "examples": examples, "provisional": True}


def searching(folder: Path) -> str | None:
    """For a part still choosing its rates with short runs: the validation score of each run so far."""
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not records:
        return None
    rows = [[r["variant"], str(r["rank"]), f"{r['config']['lr']:g}", str(r["seed"]), str(r["steps"]),
             f"{100 * accuracy(r, 'validation'):.1f}"] for r in records]
    return (f"**Still choosing its rates**: {len(records)} short runs so far.\n\n"
            + _table(["variant", "rank", "rate", "seed", "steps", "validation score %"], rows))


def write_summary(out: Path) -> Path:
    """summary.md and the plots of every part in ``out``, from the records there."""
    sections, searches, merges, times, generative = [], [], [], [], []
    chosen: dict[str, dict[str, list[dict]]] = {}  # per part drawn so far, its runs at the rates it chose
    for part in load_parts(out):
        search_path = out / part.name / SEARCH_FILE
        records = part_records(out, part) if (out / part.name).is_dir() else []
        if search_path.is_file():
            search = json.loads(search_path.read_text())
        elif records and not part.search_steps and not part.rates_from:  # a grid still running, seed 0 first
            search = provisional_search(part, records)
        else:
            sections.append(f"## {part.name}\n\n{searching(out / part.name / 'search') or 'Not run yet.'}\n")
            continue
        runs = chosen[part.name] = final_runs(part, search, records)
        images = {}
        if part.claim == "power":
            table, images = power_section(part, search, records)
        elif part.claim == "schedule":
            table = schedule_section(part, records, out)
        elif part.steps:  # the parts of the powered study
            # A check's reference part comes before it in the plan (checks are added after the parts they check).
            reference = reference_part(part)
            lora = (reference, chosen[reference].get("lora", [])) if reference in chosen else None
            table, images = comparison_section(part, runs, search["examples"]["test"], lora)
            if part.forgetting:
                generative.append((part, runs))
        elif part.claim == "parameter-efficiency":
            table, images[f"{part.name}.png"] = lotr_section(part, runs)
        else:
            table, images[f"{part.name}.png"], router, routing = mor_section(part, runs)
            if router is not None:
                images[f"{part.name}-router.png"] = router
            if routing is not None:
                images[f"{part.name}-routing-by-layer.png"] = routing
        for name, figure in images.items():
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=110)
            replace_file(out / name, png.getvalue())
        examples = search["examples"]
        steps = part.steps or math.ceil(examples["train"] / part.batch_size)
        state = (f"**Still running**: {len(records)} runs so far; rates chosen on the seeds finished.\n\n"
                 if search.get("provisional") else "")
        sections.append(f"## {part.name}\n\n{state}{part.model}, {part.data}: {examples['train']:,} training examples "
                        f"({steps} steps of {part.batch_size}), {examples['validation']:,} validation, "
                        f"{examples['test']:,} test; {part.max_length} tokens; "
                        f"targets {', '.join(search['targets'])}.\n\n{table}\n\n"
                        + "".join(f"![{name}]({name})\n" for name in images))
        searches += search_rows(part, search)
        merges.append(merge_rows(part, runs))
        searched = [json.loads(p.read_text()) for p in sorted((out / part.name / "search").glob("*.json"))]
        minutes = (sum(r["wall_seconds"] for r in records + searched) + search["load_seconds"]) / 60
        counts = sorted({threads(r) for r in records + searched}, reverse=True)
        times.append([part.name, str(len(records) + len(searched)), f"{minutes:.1f}", ", ".join(map(str, counts))])
    forgetting = forgetting_section(generative)
    if forgetting:
        table, figure = forgetting
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110)
        replace_file(out / "forgetting.png", png.getvalue())
        sections.append(f"## Forgetting: held-out news loss of every SmolLM2 run\n\n{table}\n\n![forgetting.png]"
                        "(forgetting.png)\n")
    for part_file in sorted(out.glob("*/part.json")):  # compression studies (compression.py)
        drawn = compression_section(part_file.parent)
        if drawn:
            table, figure = drawn
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=110)
            name = f"{part_file.parent.name}.png"
            replace_file(out / name, png.getvalue())
            sections.append(f"## {part_file.parent.name}\n\n{table}\n\n![{name}]({name})\n")
    text = "# Study results\n\nTest scores, mean ± std over seeds, at each variant's chosen learning rate.\n\n"
    text += "\n".join(sections)
    text += "\n## Learning rates (validation score %, mean over the seeds searched)\n\n"
    text += _table(["part", "variant", "rank", "seeds", "validation score by rate", "chosen"], searches) + "\n"
    merges = [row for row in merges if row]
    if merges:
        text += "\n## Merged LoTR against unmerged (test split)\n\n"
        text += _table(["part", "runs", "equal accuracy", "max |Δ accuracy| (points)", "max |Δ output|",
                        "max |output|"], merges) + "\n"
    text += ("\n## Wall time\n\nEach part's runs, one after another. Runs with one thread (of the machine's two) "
             "were started as one of two study processes, two parts at a time; while both ran, each run took longer. "
             "Times of runs with different threads are not compared.\n\n")
    text += _table(["part", "runs", "minutes (runs + loading)", "threads per run"], times) + "\n"
    total = sum(float(row[2]) for row in times)
    text += f"\nTotal: {total:.1f} minutes.\n"
    path = out / SUMMARY
    replace_file(path, text.encode("utf-8"))
    return path


def fill_page(page: Path, summary: Path) -> list[str]:
    """Refresh the study's blocks in a hand-written page (docs/RESULTS.md) from ``summary``: each block between
    ``<!-- summary: HEADING -->`` and ``<!-- /summary -->`` becomes the text of summary.md's ``## HEADING``, its plots
    linked from where the page lies. Returns the headings filled; a block naming no section is an error."""
    text = summary.read_text()
    sections = dict(re.findall(r"^## (.+?)\n\n(.*?)\n*(?=^## |\Z)", text, flags=re.M | re.S))
    folder = os.path.relpath(summary.parent, page.parent)
    filled = []

    def section(match: re.Match) -> str:
        heading = match.group(1).strip()
        if heading not in sections:
            raise RankshareError(f"{page}: its block '<!-- summary: {heading} -->' names no section of {summary}; "
                                 f"the sections are: {', '.join(sections)}.")
        filled.append(heading)
        body = re.sub(r"!\[([^]]+)\]\(([^)/]+)\)", rf"![\1]({folder}/\2)", sections[heading])
        return f"<!-- summary: {heading} -->\n{body}\n<!-- /summary -->"

    page_text = page.read_text()
    refreshed = re.sub(r"<!-- summary: (.+?) -->.*?<!-- /summary -->", section, page_text, flags=re.S)
    if refreshed != page_text:
        replace_file(page, refreshed.encode("utf-8"))
    return filled
