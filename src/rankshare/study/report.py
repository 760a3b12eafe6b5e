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
import statistics
from pathlib import Path

from ..atomic_files import replace_file
from ..config import method_class, methods
from ..finetune.report import compact, new_figure, router_figure
from .plan import Part, Variant, part_from_dict
from .runner import PLAN_FILE, SEARCH_FILE

SUMMARY = "summary.md"
# One colour per variant in every plot.
COLOURS = {"lora": "C0", "lotr": "C1", "lotr-by-shape": "C2", "lotr-frozen": "C3"}


def is_mixture(variant: Variant) -> bool:
    """A routed mixture: its update depends on per-token gates."""
    return method_class(variant.method).merge_needs_gates


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
        lr = chosen[variant.lr_from or variant.name]["chosen"]
        runs[variant.name] = [r for r in records if r["variant"] == variant.name and r["config"]["lr"] == lr
                              and r["seed"] in part.seeds]
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def layer_distances(router_layers: dict[str, list[list[float]]]) -> list[float] | None:
    """Per layer, the total-variation distance between the two tasks' mean gates (None unless two tasks)."""
    tasks = sorted(router_layers)
    if len(tasks) != 2:
        return None
    return [0.5 * sum(abs(a - b) for a, b in zip(first, second))
            for first, second in zip(router_layers[tasks[0]], router_layers[tasks[1]])]


def specialisation(router_layers: dict[str, list[list[float]]]) -> float | None:
    distances = layer_distances(router_layers)
    return statistics.fmean(distances) if distances else None


def points(runs: list[dict], task: str = "average") -> list[dict]:
    """One point per rank: adapter parameters, and test accuracy and macro-F1 over the seeds."""
    by_rank: dict[int, list[dict]] = {}
    for run in runs:
        by_rank.setdefault(run["rank"], []).append(run)
    result = []
    for rank, group in sorted(by_rank.items()):
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
    rows = []
    for name, result in search.get("learning_rates", {}).items():
        scores = ", ".join(f"{lr}: {100 * a:.1f}" for lr, a in result["validation_accuracy"].items())
        chosen, grid = result["chosen"], part.learning_rates
        edge = len(grid) > 1 and chosen in (min(grid), max(grid))  # the best rate may lie outside the grid
        rows.append([part.name, name, str(result["rank"]), scores,
                     f"{chosen:g}" + (f" ({'top' if chosen == max(grid) else 'bottom'} of the grid)" if edge else "")])
    return rows


def write_summary(out: Path) -> Path:
    """summary.md and one plot per part in ``out``, from the records there."""
    sections, searches, merges, times = [], [], [], []
    for part in load_parts(out):
        search_path = out / part.name / SEARCH_FILE
        if not search_path.is_file():
            sections.append(f"## {part.name}\n\nNot run yet.\n")
            continue
        search, records = json.loads(search_path.read_text()), part_records(out, part)
        runs = final_runs(part, search, records)
        images = {}
        if part.claim == "parameter-efficiency":
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
        sections.append(f"## {part.name}\n\n{part.model}, {part.data}: {examples['train']:,} training examples "
                        f"({math.ceil(examples['train'] / part.batch_size)} steps of {part.batch_size}), "
                        f"{examples['validation']:,} validation, {examples['test']:,} test; {part.max_length} tokens; "
                        f"targets {', '.join(search['targets'])}.\n\n{table}\n\n"
                        + "".join(f"![{name}]({name})\n" for name in images))
        searches += search_rows(part, search)
        merges.append(merge_rows(part, runs))
        minutes = (sum(r["wall_seconds"] for r in records) + search["load_seconds"]) / 60
        times.append([part.name, str(len(records)), f"{minutes:.1f}"])
    text = "# Study results\n\nTest accuracy, mean ± std over seeds, at each variant's chosen learning rate.\n\n"
    text += "\n".join(sections)
    text += "\n## Learning rates (validation accuracy %, seed 0)\n\n"
    text += _table(["part", "variant", "rank", "validation accuracy by rate", "chosen"], searches) + "\n"
    merges = [row for row in merges if row]
    if merges:
        text += "\n## Merged LoTR against unmerged (test split)\n\n"
        text += _table(["part", "runs", "equal accuracy", "max |Δ accuracy| (points)", "max |Δ output|",
                        "max |output|"], merges) + "\n"
    text += "\n## Wall time\n\n" + _table(["part", "runs", "minutes (runs + loading)"], times) + "\n"
    total = sum(float(row[2]) for row in times)
    text += f"\nTotal: {total:.1f} minutes.\n"
    path = out / SUMMARY
    replace_file(path, text.encode("utf-8"))
    return path
