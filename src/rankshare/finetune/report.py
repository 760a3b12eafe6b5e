"""The comparison report: one markdown table of all runs and the plots that go with it, in one folder.

A run record is one training run's metrics.json::

    {"method": "lotr", "rank": 8, "config": {"model": ..., "data": ...},
     "trainable_parameters": {"adapter": 26112, "head": 1925},
     "metrics": {"test": {"news": {"accuracy": 0.9, "macro_f1": 0.88, "examples": 200}, ...,
                          "average": {"accuracy": ..., "macro_f1": ...}},
                 "validation": {...same shape...}},
     "train_seconds": 61.2, "median_step_seconds": 0.71, "peak_memory_mb": 812.0, "steps": 80, "seed": 0,
     "router": {"news": [mean gate of each expert], ...}}          # mixtures (MoR, MoE-LoRA) only

Language-modelling runs score each task as ``{"perplexity", "loss", "tokens"}`` instead of accuracy and
macro-F1; their table shows perplexity and their plot puts it on an axis where lower is better. Instruction
tuning (sft) runs score ``{"exact_match", "loss", "examples", "samples"}``: the table shows exact match and the
response loss, and the report lists each task's sample generations.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from ..atomic_files import replace_file
from ..config import methods
from ..errors import RankshareError

REPORT_NAME = "report.md"
PARAMETERS_PLOT_NAME = "accuracy_vs_params.png"
ROUTER_PLOT_NAME = "router.png"

MISSING = "—"

# The scores each kind of run reports per task, with their column titles.
CLASSIFICATION = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
LANGUAGE_MODELLING = {"perplexity": "perplexity"}
INSTRUCTIONS = {"exact_match": "exact match"}  # and the average response loss


def write_report(out_dir: Path, runs: list[dict]) -> list[Path]:
    """Writes report.md and accuracy_vs_params.png (and router.png if any run has a "router" entry);
    returns the paths written. Each file is written to a temporary name in out_dir and renamed."""
    split, scores = _split_and_scores(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The images are written first, so that report.md never links to an image that is not there yet.
    images = {PARAMETERS_PLOT_NAME: _parameters_figure(runs, split, scores)}
    if any(run.get("router") for run in runs):
        images[ROUTER_PLOT_NAME] = router_figure([run for run in runs if run.get("router")])
    for name, figure in images.items():
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=120)
        replace_file(out_dir / name, png.getvalue())
    report = out_dir / REPORT_NAME
    replace_file(report, _report_markdown(runs, split, scores, list(images)).encode("utf-8"))
    return [report, *(out_dir / name for name in images)]


def markdown_table(runs: list[dict]) -> str:
    """The comparison table alone, one row per run: sizes, each task's scores and their average, costs.

    Scores are from the test split (from validation if some run has no test scores).
    """
    split, scores = _split_and_scores(runs)
    tasks = _tasks(runs, split)
    averaged = len(tasks) > 1
    header = ["method", "rank", "adapter params", "head params"]
    header += [f"{task} {title}" for task in tasks for title in scores.values()]
    header += [f"average {title}" for title in scores.values()] if averaged else []
    header += ["response loss"] if scores is INSTRUCTIONS else []
    header += ["train time", "median step", "peak memory"]
    lines = [_row(header), _row([":---"] + ["---:"] * (len(header) - 1))]
    for run in runs:
        metrics = run["metrics"][split]
        counts = run.get("trainable_parameters") or {}
        cells = [_method_name(run), _integer(run.get("rank"))]
        cells += [_integer(counts.get("adapter")), _integer(counts.get("head"))]
        cells += [_score(key, (metrics.get(task) or {}).get(key)) for task in tasks for key in scores]
        cells += [_score(key, _average(metrics, key)) for key in scores] if averaged else []
        cells += [_score("loss", _average(metrics, "loss"))] if scores is INSTRUCTIONS else []
        cells += [
            _seconds(run.get("train_seconds"), digits=1),
            _seconds(run.get("median_step_seconds"), digits=3),
            _megabytes(run.get("peak_memory_mb")),
        ]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


# -- the markdown ------------------------------------------------------------------------------------------


def _report_markdown(runs: list[dict], split: str, scores: dict[str, str], images: list[str]) -> str:
    measured = {id(LANGUAGE_MODELLING): "perplexity, lower is better",
                id(INSTRUCTIONS): "exact match of the greedy answer, whitespace-collapsed and lower-cased, and the "
                "response's mean token loss"}.get(id(scores), "accuracy and macro-F1")
    parts = [
        "# rankshare: adapter comparison",
        "",
        f"{_setup_sentence(runs)} Scores on the {split} split ({measured}). Adapter params count every trainable "
        "adapter tensor once, shared factors included; head params are the modules trained whole beside them.",
        "",
        markdown_table(runs).rstrip("\n"),
        "",
    ]
    if PARAMETERS_PLOT_NAME in images:
        parts += [f"![{split} {next(iter(scores.values()))} against adapter parameters]({PARAMETERS_PLOT_NAME})", ""]
    if ROUTER_PLOT_NAME in images:
        parts += [f"![Mean router gate per expert and task]({ROUTER_PLOT_NAME})", ""]
    if scores is INSTRUCTIONS:
        parts += _samples_markdown(runs, split)
    return "\n".join(parts)


def _samples_markdown(runs: list[dict], split: str) -> list[str]:
    """Each run's first generations per task, and how many examples their length cut or left out."""
    parts = ["## Sample generations", ""]
    for run in runs:
        parts += [f"### {_method_name(run)}", ""]
        fitting = run.get("fitting") or {}
        if fitting:
            counts = ", ".join(f"{name}: {c.get('cut', 0)} prompts cut, {c.get('skipped', 0)} left out"
                               for name, c in fitting.items())
            parts += [f"Length: {counts} (responses too long for --max-length are left out, never cut).", ""]
        parts += ["| task | prompt (end) | expected | generated |", "| :--- | :--- | :--- | :--- |"]
        for task, scores in run["metrics"][split].items():
            for sample in (scores.get("samples") or []) if isinstance(scores, dict) else []:
                prompt = " ".join(str(sample.get("prompt", "")).split())
                cells = [task, ("…" + prompt[-80:]) if len(prompt) > 80 else prompt, str(sample.get("expected", "")),
                         str(sample.get("answer", ""))]
                parts.append(_row([cell.replace("|", "\\|") for cell in cells]))
        parts.append("")
    return parts


def _setup_sentence(runs: list[dict]) -> str:
    configs = [run.get("config") if isinstance(run.get("config"), dict) else {} for run in runs]
    models = _distinct(config.get("model") for config in configs)
    data = _distinct(config.get("data") for config in configs)
    steps = _distinct(run.get("steps") for run in runs)
    seeds = _distinct(run.get("seed") for run in runs)
    sentence = f"{len(runs)} run{'s' if len(runs) != 1 else ''} fine-tuned"
    if models:
        sentence += " from " + " and ".join(f"`{model}`" for model in models)
    if data:
        sentence += " on " + " and ".join(f"`{name}`" for name in data)
    if steps:
        sentence += f", {' or '.join(steps)} steps" + (" each" if len(runs) > 1 and len(steps) == 1 else "")
    if seeds:
        sentence += f", seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}"
    return sentence + "."


def _distinct(values) -> list[str]:
    """The values that are there, each once, in order; non-strings as compact JSON."""
    present = [value for value in values if value is not None]
    shown = [value if isinstance(value, str) else json.dumps(value, sort_keys=True) for value in present]
    return list(dict.fromkeys(shown))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _method_name(run: dict) -> str:
    """The method's title, with the options the run changed from the method's defaults (e.g. the experts a
    budget plan chose): ``MoE-LoRA (num_experts=6)``."""
    known = methods().get(run["method"])
    if known is None:
        return str(run["method"])
    adapter = (run.get("config") or {}).get("adapter") or {}
    changed = [f"{name}={adapter[name]}" for name, option in known.options().items()
               if name in adapter and adapter[name] != option.default]
    return known.title + (f" ({', '.join(changed)})" if changed else "")


def _number(value) -> float | None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if is_number else None


def _integer(value) -> str:
    return MISSING if _number(value) is None else f"{int(value):,}"


def _score(key: str, value) -> str:
    if _number(value) is None:
        return MISSING
    return f"{value:,.2f}" if key == "perplexity" else f"{value:.3f}" if key == "loss" else f"{100 * value:.1f} %"


def _seconds(value, digits: int) -> str:
    return MISSING if _number(value) is None else f"{value:,.{digits}f} s"


def _megabytes(value) -> str:
    return MISSING if _number(value) is None else f"{value:,.0f} MB"


# -- reading the records -----------------------------------------------------------------------------------


def _split_and_scores(runs: list[dict]) -> tuple[str, dict[str, str]]:
    """The split every run was scored on (test if all have it) and which scores the runs report."""
    if not runs:
        raise RankshareError("No runs to report on; train at least one method first.")
    for run in runs:
        if not isinstance(run, dict) or "method" not in run or not isinstance(run.get("metrics"), dict):
            raise RankshareError(f"A run record needs 'method' and 'metrics'; got {str(run)[:200]}.")
    split = next((s for s in ("test", "validation") if all(isinstance(r["metrics"].get(s), dict) for r in runs)), None)
    if split is None:
        raise RankshareError("Every run needs metrics for the 'test' (or else 'validation') split; some have neither.")
    keys = {key for run in runs for task in run["metrics"][split].values() if isinstance(task, dict) for key in task}
    if len({"perplexity", "accuracy", "exact_match"} & keys) > 1:
        raise RankshareError("These runs mix classification, language modelling and instruction tuning; report them "
                             "separately.")
    if "exact_match" in keys:
        return split, INSTRUCTIONS
    return split, LANGUAGE_MODELLING if "perplexity" in keys else CLASSIFICATION


def _tasks(runs: list[dict], split: str) -> list[str]:
    """Every task any run was scored on, in order of first appearance; the average is not a task."""
    return list(dict.fromkeys(task for run in runs for task in run["metrics"][split] if task != "average"))


def _average(metrics: dict, key: str) -> float | None:
    """The run's own average if it gives one, else the mean over its tasks."""
    given = _number((metrics.get("average") or {}).get(key))
    if given is not None:
        return given
    tasks = [scores for task, scores in metrics.items() if task != "average" and isinstance(scores, dict)]
    values = [_number(scores.get(key)) for scores in tasks]
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


# -- the plots ---------------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    # Imported here: the table alone (printed by the command line) needs no plotting library. The figure
    # draws on its own Agg canvas, so no interactive backend or global pyplot state is involved.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _parameters_figure(runs: list[dict], split: str, scores: dict[str, str]):
    """The runs' average score against their adapter parameters (log scale), one labelled point per run."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    perplexity = scores is LANGUAGE_MODELLING
    key = next(iter(scores))
    title = scores[key]
    colours = {method: f"C{i}" for i, method in enumerate(dict.fromkeys(run["method"] for run in runs))}
    points = []  # (parameters, score, label, colour)
    for run in runs:
        parameters = _number((run.get("trainable_parameters") or {}).get("adapter"))
        score = _average(run["metrics"][split], key)
        if parameters is None or parameters <= 0 or score is None or not math.isfinite(score):
            continue  # nothing to place on a log axis
        label = _method_name(run) + (f" r={run['rank']}" if run.get("rank") is not None else "")
        points.append((parameters, score if perplexity else 100 * score, label, colours[run["method"]]))

    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    axes.set_xscale("log")
    sizes = [parameters for parameters, *_ in points]
    middle = math.sqrt(min(sizes) * max(sizes)) if points else 1.0  # the centre of the log axis
    for parameters, score, label, colour in points:
        axes.scatter(parameters, score, s=60, color=colour, zorder=3)
        # Labels point inwards, so that none runs off the right-hand edge.
        right = parameters <= middle
        axes.annotate(label, (parameters, score), textcoords="offset points", xytext=(7 if right else -7, 6),
                      ha="left" if right else "right", fontsize=10)
    axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: compact(value)))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("trainable adapter parameters (log scale)")
    if perplexity:
        axes.set_ylabel(f"{split} perplexity (lower is better)")
        axes.set_title(f"{split.capitalize()} perplexity against adapter size")
    else:
        axes.set_ylabel(f"average {split} {title} (%)")
        axes.set_title(f"{split.capitalize()} {title} against adapter size")
    axes.grid(True, which="both", alpha=0.3)
    axes.margins(x=0.15, y=0.15)
    if perplexity:
        axes.set_ylim(bottom=max(0, axes.get_ylim()[0]))  # a perplexity is at least 1
    return figure


def compact(value: float) -> str:
    """An axis label for a parameter count: 20k, 1.5M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def router_figure(mixture_runs: list[dict]):
    """One panel per mixture run: each expert's mean gate (x) for each task (bars), and 1/N dashed."""
    columns = min(3, len(mixture_runs))
    rows = math.ceil(len(mixture_runs) / columns)
    figure = new_figure(5.5 * columns, 3.8 * rows)
    panels = list(figure.subplots(rows, columns, squeeze=False).flat)
    for axes, run in zip(panels, mixture_runs):
        router = run["router"]
        if not isinstance(router, dict) or not all(isinstance(gates, list) and gates for gates in router.values()):
            raise RankshareError(
                f"A run's 'router' must map each task to its mean gate per expert; got {str(router)[:200]}."
            )
        num_experts = max(len(gates) for gates in router.values())
        width = 0.8 / len(router)
        for i, (task, gates) in enumerate(router.items()):
            axes.bar([expert - 0.4 + width * (i + 0.5) for expert in range(len(gates))], gates, width, label=task)
        axes.axhline(1 / num_experts, color="0.3", linestyle="--", linewidth=1, label=f"uniform 1/{num_experts}")
        axes.set_xticks(range(num_experts))
        axes.set_xlabel("expert")
        axes.set_ylabel("mean gate")
        axes.set_title(_method_name(run) + (f" r={run['rank']}" if run.get("rank") is not None else ""))
        axes.grid(True, axis="y", alpha=0.3)
        highest = max(max(gates) for gates in router.values())
        axes.set_ylim(0, 1.35 * max(highest, 1 / num_experts))  # headroom for the legend above the bars
        axes.legend(fontsize=8, loc="upper center", ncols=min(len(router) + 1, 4))
    for axes in panels[len(mixture_runs):]:  # the grid's unused cells
        axes.set_visible(False)
    figure.suptitle("Mean router gate per expert and task")
    return figure
