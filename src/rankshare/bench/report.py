"""bench.md and its plots, from the figures in bench.json; every ratio is between figures of one run."""

from __future__ import annotations

import io
from pathlib import Path

from ..atomic_files import replace_file

LIMIT, LORA = "limit (frozen, grads to inputs)", "PEFT LoRA r="


def _find(setup: dict, prefix: str) -> dict | None:
    return next((v for v in setup["variants"] if v["name"].startswith(prefix)), None)


def _ratio(value: float, reference: dict | None, key: str) -> str:
    if reference is None or not reference[key]["median"]:
        return "—"
    return f"{value / reference[key]['median']:.2f}×"


def setup_table(setup: dict) -> str:
    limit, lora = _find(setup, LIMIT), _find(setup, LORA)
    header = ("| variant | adapter params | train step (median) | × limit | × LoRA | forward | × LoRA | "
              "train memory | × limit | × LoRA | file / (4 B × params) |")
    lines = [header, "|" + " --- |" * 11]
    for v in setup["variants"]:
        step, fwd, memory = v["step"]["median"], v["forward"]["median"], v["memory"]["total"]
        file = f"{v['file']['bytes'] / v['file']['parameter_bytes']:.4f}" if v["file"] else "—"
        memory_limit = f"{memory / limit['memory']['total']:.2f}×" if limit else "—"
        memory_lora = f"{memory / lora['memory']['total']:.2f}×" if lora else "—"
        lines.append(
            f"| {v['name']} | {v['adapter_parameters']:,} | {1000 * step:.0f} ms | {_ratio(step, limit, 'step')} | "
            f"{_ratio(step, lora, 'step')} | {1000 * fwd:.0f} ms | {_ratio(fwd, lora, 'forward')} | "
            f"{memory / 2**20:.0f} MiB | {memory_limit} | {memory_lora} | {file} |"
        )
    return "\n".join(lines)


def targets(bench: dict) -> list[str]:
    """The issue's targets, each with the figures it was judged on."""
    lines = []
    for setup in bench["setups"]:
        limit, lora = _find(setup, LIMIT), _find(setup, LORA)
        lotr, mor = _find(setup, f"LoTR r={setup['rank']}"), _find(setup, f"MoR N={setup['num_experts']} r=")
        naive = _find(setup, f"MoR N={setup['num_experts']} r={setup['rank']}, naive")

        def check(label, value, bound, name=setup["name"]):
            verdict = "met" if value <= bound else "MISSED"
            lines.append(f"- {name}: {label} = {value:.3f} (target ≤ {bound}) — {verdict}")

        check("LoTR step / PEFT LoRA step", lotr["step"]["median"] / lora["step"]["median"], 1.05)
        if setup["name"] == "minilm":
            check("LoTR step / limit step", lotr["step"]["median"] / limit["step"]["median"], 1.10)
        check("MoR step / PEFT LoRA step", mor["step"]["median"] / lora["step"]["median"], 1.25)
        if naive:
            lines.append(f"- {setup['name']}: MoR activations {mor['memory']['activations'] / 2**20:.0f} MiB fast vs "
                         f"{naive['memory']['activations'] / 2**20:.0f} MiB naive per-expert (PEFT LoRA "
                         f"{lora['memory']['activations'] / 2**20:.0f} MiB)")
        merged = setup.get("merged_inference")
        if merged:
            times = merged["times"]
            check("merged LoTR inference / base", times["LoTR merged"]["median"] / times["base"]["median"], 1.01)
            lines.append(f"- {setup['name']}: merged LoTR inference / base, fastest runs = "
                         f"{times['LoTR merged']['min'] / times['base']['min']:.3f}")
            lines.append(f"- {setup['name']}: merged outputs differ from unmerged by at most "
                         f"{merged['lotr_max_abs_difference']:.1e} (LoTR), {merged['mor_max_abs_difference']:.1e} "
                         f"(MoR, gates 1/N); output scale {merged['output_scale']:.2f}")
        for v in setup["variants"]:
            if v["file"]:
                bound = 1.05 * v["file"]["parameter_bytes"] + 16 * 1024
                if v["file"]["bytes"] > bound:
                    lines.append(f"- {setup['name']}: {v['name']} file {v['file']['bytes']:,} B > bound "
                                 f"{bound:,.0f} B — MISSED")
    return lines


def scaling_table(rows: list[dict]) -> str:
    lines = ["| d | L | LoRA r=8 | LoTR r=8 | LoTR / LoRA |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['d']} | {r['L']} | {r['lora']:,} | {r['lotr']:,} | {r['lotr_over_lora']:.3f} |" for r in rows]
    return "\n".join(lines)


def markdown(bench: dict) -> str:
    machine, versions = bench["machine"], bench["versions"]
    parts = [
        "# rankshare benchmark",
        f"Mode {bench['mode']}; {machine['processor']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch threads, "
        f"device {machine['device']}; torch {versions['torch']}, transformers {versions['transformers']}, peft "
        f"{versions['peft']}. Medians of {bench['repeats']} interleaved repeats after {bench['warmup']} "
        "warm-up rounds; "
        f"wall time {bench['wall_seconds'] / 60:.1f} min.",
        "Train step = forward + backward + AdamW step (batch of random tokens, cross-entropy on a 4-class head). "
        "The limit is the frozen model with gradients flowing back to the input embeddings and no weight gradients. "
        "Train memory = tensors saved for backward (weights excluded) + gradients + AdamW moments.",
        "## Targets",
        "\n".join(targets(bench)),
    ]
    for setup in bench["setups"]:
        parts += [f"## {setup['description']} — batch {setup['batch']} × {setup['length']} tokens", setup_table(setup)]
        merged = setup.get("merged_inference")
        if merged:
            rows = ["| inference | median | × base | min | × base |", "| --- | ---: | ---: | ---: | ---: |"]
            base = merged["times"]["base"]
            rows += [f"| {name} | {1000 * t['median']:.1f} ms | {t['median'] / base['median']:.3f}× | "
                     f"{1000 * t['min']:.1f} ms | {t['min'] / base['min']:.3f}× |"
                     for name, t in merged["times"].items()]
            parts.append("\n".join(rows))
    parts += ["## Trainable parameters as d and L grow (q and v projections, r = 8)",
              scaling_table(bench["parameter_scaling"]),
              "![step time against the limit](bench_step_ratios.png)",
              "![parameters against depth](bench_parameters.png)"]
    return "\n\n".join(parts) + "\n"


def write_bench_report(out: Path, bench: dict) -> None:
    replace_file(out / "bench.md", markdown(bench).encode("utf-8"))
    figures = (("bench_step_ratios.png", _plot_step_ratios(bench)), ("bench_parameters.png", _plot_parameters(bench)))
    for name, figure in figures:
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=120)
        replace_file(out / name, png.getvalue())


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plot_step_ratios(bench: dict):
    figure = _figure(9, 4.5)
    axes = figure.subplots()
    names = [v["name"] for v in bench["setups"][0]["variants"] if v["name"] != LIMIT and "naive" not in v["name"]]
    width = 0.8 / len(bench["setups"])
    for i, setup in enumerate(bench["setups"]):
        limit = _find(setup, LIMIT)["step"]["median"]
        values = [(_find(setup, n) or {"step": {"median": float("nan")}})["step"]["median"] / limit for n in names]
        axes.bar([k + i * width for k in range(len(names))], values, width, label=setup["name"])
    axes.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="limit")
    centres = [k + width * (len(bench["setups"]) - 1) / 2 for k in range(len(names))]
    axes.set_xticks(centres, names, rotation=20, ha="right")
    axes.set_ylabel("train step / limit (median)")
    axes.set_title("Training step time relative to the frozen model's backward to the inputs")
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return figure


def _plot_parameters(bench: dict):
    figure = _figure(7, 4.5)
    axes = figure.subplots()
    for hidden in sorted({r["d"] for r in bench["parameter_scaling"]}):
        rows = [r for r in bench["parameter_scaling"] if r["d"] == hidden]
        line = axes.plot([r["L"] for r in rows], [r["lora"] for r in rows], marker="o", label=f"LoRA d={hidden}")[0]
        axes.plot([r["L"] for r in rows], [r["lotr"] for r in rows], marker="s", linestyle="--", color=line.get_color(),
                  label=f"LoTR d={hidden}")
    axes.set_yscale("log")
    axes.set_xlabel("layers L")
    axes.set_ylabel("trainable parameters (r = 8, q and v)")
    axes.set_title("LoRA's 2·2dr per layer against LoTR's shared factors + L r²")
    axes.legend(fontsize=7, ncol=2)
    axes.grid(alpha=0.3)
    return figure
