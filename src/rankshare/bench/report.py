"""bench.md and its plots, from the figures in bench.json; every ratio is between figures of one run."""

from __future__ import annotations

import io
from pathlib import Path

from ..atomic_files import replace_file

LIMIT, LORA, CORES = "limit (frozen, grads to inputs)", "PEFT LoRA r=", "LoTR cores only"


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


def task_ratios(setup: dict) -> list[tuple[str, dict, dict, float]]:
    """The many-tasks targets: (what, numerator times, denominator times, limit on the ratio of medians)."""
    ratios = []
    lotr, cores = _find(setup, f"LoTR r={setup['rank']}"), _find(setup, CORES)
    tasks = setup.get("many_tasks")
    if tasks:
        times = tasks["times"]
        mixed = times["LoTR on one basis, mixed"]
        ratios += [(f"{tasks['tasks']}-task mixed batch, LoTR on one basis / PEFT LoRA mixed batch", mixed,
                    times["PEFT LoRA, mixed"], 1.0),
                   (f"{tasks['tasks']}-task mixed batch, LoTR on one basis / one LoTR adapter", mixed,
                    times["LoTR, one adapter"], 1.2)]
    if lotr and cores:
        ratios.append(("LoTR cores-only step (on a basis) / LoTR step", cores["step"], lotr["step"], 1.0))
    return ratios


def _verdict(value: float, bound: float, at_least: bool = False) -> str:
    return "met" if (value >= bound if at_least else value <= bound) else "MISSED"


def targets(bench: dict) -> list[str]:
    """The issue's targets, each with the figures it was judged on."""
    lines = []
    for setup in bench["setups"]:
        limit, lora = _find(setup, LIMIT), _find(setup, LORA)
        lotr, mor = _find(setup, f"LoTR r={setup['rank']}"), _find(setup, f"MoR N={setup['num_experts']} r=")
        naive = _find(setup, f"MoR N={setup['num_experts']} r={setup['rank']}, naive")

        def check(label, value, bound, name=setup["name"]):
            lines.append(f"- {name}: {label} = {value:.3f} (target ≤ {bound}) — {_verdict(value, bound)}")

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
        for label, numerator, denominator, bound in task_ratios(setup):
            check(label, numerator["median"] / denominator["median"], bound)
        for v in setup["variants"]:
            if v["file"]:
                bound = 1.05 * v["file"]["parameter_bytes"] + 16 * 1024
                if v["file"]["bytes"] > bound:
                    lines.append(f"- {setup['name']}: {v['name']} file {v['file']['bytes']:,} B > bound "
                                 f"{bound:,.0f} B — MISSED")
    if bench.get("instruction_tuning"):
        lines += sft_targets(bench["instruction_tuning"])
    return lines


def _generation(sft: dict) -> dict[str, dict]:
    return {row["name"]: row for row in sft["generation"]["variants"]}


def sft_ratios(sft: dict) -> list[tuple[str, float, float, float | None, bool]]:
    """The instruction-tuning ratios: (what, ratio of medians, ratio of fastest runs, target or None, whether the
    target is a lower bound). Step ratios are of times; generation ratios of tokens per second."""
    steps = {row["name"]: row["step"] for row in sft["sft_step"]}
    lora, lotr, mor = (row["name"] for row in sft["sft_step"])  # in this order in the record
    rows = [(f"SFT step, {lotr} / {lora}", 1.05, lotr, lora), (f"SFT step, {mor} / {lora}", 1.25, mor, lora)]
    ratios = [(label, steps[a]["median"] / steps[b]["median"], steps[a]["min"] / steps[b]["min"], bound, False)
              for label, bound, a, b in rows]
    generated = _generation(sft)
    merged, base = generated[f"LoTR r={sft['rank']} merged"], generated["base"]

    def speed(a: dict, b: dict, key: str) -> float:  # tokens per second of a over b's
        return (a["generated_tokens"] / a["time"][key]) / (b["generated_tokens"] / b["time"][key])

    ratios.append((f"generation tokens/s, {merged['name']} / base", speed(merged, base, "median"),
                   speed(merged, base, "min"), 0.98, True))
    for name in (lotr, mor):
        ratios.append((f"generation tokens/s, {name} unmerged / {lora} unmerged",
                       speed(generated[name], generated[lora], "median"),
                       speed(generated[name], generated[lora], "min"), None, False))
    return ratios


def sft_targets(sft: dict) -> list[str]:
    lines = []
    for label, ratio, fastest, bound, at_least in sft_ratios(sft):
        if bound is None:
            lines.append(f"- {sft['name']}, instruction tuning: {label} = {ratio:.3f} (fastest runs {fastest:.3f}; "
                         "no target)")
        else:
            sign = "≥" if at_least else "≤"
            lines.append(f"- {sft['name']}, instruction tuning: {label} = {ratio:.3f} (target {sign} {bound}) — "
                         f"{_verdict(ratio, bound, at_least)}")
    check = sft["generation"]["merged_lotr"]
    lotr = _generation(sft)[f"LoTR r={sft['rank']}"]
    lines.append(f"- {sft['name']}, instruction tuning: merged LoTR generates the unmerged LoTR's tokens: "
                 f"{'yes' if check['tokens_equal'] else 'NO'} ({100 * check['token_agreement']:.1f}% of "
                 f"{lotr['generated_tokens']} tokens agree; LoTR's update changes "
                 f"{100 * lotr['differs_from_base']:.0f}% of the base's tokens)")
    return lines


def instruction_tuning(sft: dict) -> str:
    """The instruction-tuning section: how it was measured, the SFT step table and the generation table."""
    batch, generation = sft["batch"], sft["generation"]
    rows, width = batch["shape"]
    lines = [f"SFT on a skills batch: {batch['examples']} training examples (tasks {', '.join(batch['tasks'])}), "
             f"{sft['layout']} prompt layout, prompt + response within {batch['max_length']} tokens, padded to "
             f"{rows} × {width}; the loss is over the {batch['response_tokens']} response tokens. Rank "
             f"{sft['rank']} on {', '.join(sft['targets'])}; every adapter's zero-initialised factor (LoRA's and "
             f"MoR's B, LoTR's cores) is set at random with ‖ΔW‖ = {sft['relative_update']:g} ‖W‖ per layer. "
             "Train step = forward with labels + backward + AdamW step.", "",
             "| variant | adapter params | SFT step (median) | fastest | × PEFT LoRA (medians) | "
             "× PEFT LoRA (fastest) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lora = sft["sft_step"][0]["step"]
    for row in sft["sft_step"]:
        step = row["step"]
        lines.append(f"| {row['name']} | {row['adapter_parameters']:,} | {1000 * step['median']:.0f} ms | "
                     f"{1000 * step['min']:.0f} ms | {step['median'] / lora['median']:.3f}× | "
                     f"{step['min'] / lora['min']:.3f}× |")
    generated = _generation(sft)
    base, peft = generated["base"], generated[sft["sft_step"][0]["name"]]
    lines += ["", f"Greedy generation of exactly {generation['new_tokens']} new tokens from each of the {rows} "
              f"prompts (left padded to {batch['prompt_width']} tokens, KV cache on); interleaved rounds, "
              f"{base['time']['repeats']} timed. Merged LoTR: `merge_and_unload` of a copy; the other adapters "
              "unmerged.", "",
              "| model | tokens | median | tokens/s | × base | × PEFT LoRA unmerged | tokens/s (fastest) | "
              "tokens ≠ base |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in generation["variants"]:
        fastest = row["generated_tokens"] / row["time"]["min"]
        lines.append(f"| {row['name']} | {row['generated_tokens']} | {1000 * row['time']['median']:.0f} ms | "
                     f"{row['tokens_per_second']:.1f} | {row['tokens_per_second'] / base['tokens_per_second']:.3f}× | "
                     f"{row['tokens_per_second'] / peft['tokens_per_second']:.3f}× | {fastest:.1f} | "
                     f"{100 * row['differs_from_base']:.0f}% |")
    lines += ["", "| ratio | × (medians) | × (fastest runs) | target | verdict |", "| --- | ---: | ---: | ---: | --- |"]
    for label, ratio, fastest, bound, at_least in sft_ratios(sft):
        target = "—" if bound is None else f"{'≥' if at_least else '≤'} {bound}"
        verdict = "—" if bound is None else _verdict(ratio, bound, at_least)
        lines.append(f"| {label} | {ratio:.3f}× | {fastest:.3f}× | {target} | {verdict} |")
    check = generation["merged_lotr"]
    lines += ["", f"Merged LoTR against unmerged LoTR: {100 * check['token_agreement']:.1f}% of the generated tokens "
              f"agree ({'all' if check['tokens_equal'] else 'NOT all'})."]
    return "\n".join(lines)


def many_tasks(setup: dict) -> str:
    """The many-tasks section: forward and step ratios with their limits, the output check, parameters held."""
    tasks, memory = setup["many_tasks"], setup["many_tasks"]["memory"]
    lines = [f"{setup['batch']} rows, row i for task i mod {tasks['tasks']}. LoTR: task0's adapter owns U and V, "
             "the other tasks' adapters train only their cores on it (cores set at random here, so the tasks "
             f"differ); PEFT: {tasks['tasks']} LoRA adapters of rank {setup['rank']}, mixed by `adapter_names`. "
             "Forward in eval mode without gradients; the step ratio is from the table above.", "",
             "| ratio | numerator (median) | denominator (median) | × (medians) | × (fastest runs) | limit | verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, numerator, denominator, bound in task_ratios(setup):
        ratio = numerator["median"] / denominator["median"]
        lines.append(f"| {label} | {1000 * numerator['median']:.1f} ms | {1000 * denominator['median']:.1f} ms | "
                     f"{ratio:.3f}× | {numerator['min'] / denominator['min']:.3f}× | ≤ {bound} | "
                     f"{_verdict(ratio, bound)} |")
    lines += ["", f"Mixed rows against each row with its own adapter active alone: max |difference| "
              f"{tasks['max_abs_difference']:.1e}; the mixed rows differ from one adapter's outputs by up to "
              f"{tasks['difference_from_one_adapter']:.2f} (output scale {tasks['output_scale']:.2f}).", "",
              "Parameters that k tasks add to the base, counted in the models (each shared tensor once). Closed "
              "forms: LoTR on one basis Σ_groups r (d_in + d_out) + k · Σ_groups L r² = "
              f"{memory['basis']:,} + {memory['cores_per_task']:,} k; PEFT LoRA k · Σ_layers r (d_in + d_out) = "
              f"{memory['lora_per_task']:,} k.", "",
              "| tasks k | LoTR on one basis | closed form | PEFT LoRA | closed form | LoTR / LoRA |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['tasks']} | {r['lotr']:,} | {r['lotr_closed_form']:,} | {r['lora']:,} | {r['lora_closed_form']:,} "
              f"| {r['lotr'] / r['lora']:.3f} |" for r in memory["rows"]]
    return "\n".join(lines)


def scaling_table(rows: list[dict]) -> str:
    lines = ["| d | L | LoRA r=8 | LoTR r=8 | LoTR / LoRA |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['d']} | {r['L']} | {r['lora']:,} | {r['lotr']:,} | {r['lotr_over_lora']:.3f} |" for r in rows]
    return "\n".join(lines)


SHARES = {"by_name": "one basis per projection across layers and tasks",
          "by_module": "one basis per module (layer), shared by the tasks"}


def serving_section(served: dict) -> str:
    """Tokens per second of the four ways to serve k tasks, the adapters' memory, and the targets' verdicts."""
    base = served["tokens_per_second"]["(b) PEFT LoRAs, PEFT mixed batch"]
    rows = ["| way | generated tokens/s | × (b) | adapter memory |", "| --- | ---: | ---: | ---: |"]
    memory = {"(a)": served["adapter_bytes"]["(a)"], "(b)": served["adapter_bytes"]["(b)"]}
    for name, speed in served["tokens_per_second"].items():
        held = memory.get(name[:3])
        rows.append(f"| {name} | {speed:.1f} | {speed / base:.2f}× | "
                    f"{f'{held / 2**20:.2f} MiB' if held is not None else '—'} |")
    ratios = served["ratios"]
    verdicts = [
        f"- (a) ≥ 1.0× (b) in tokens/s: {ratios['a_over_b']:.2f}× — {_verdict(ratios['a_over_b'], 1.0, True)}",
        f"- (a)'s adapter memory ≤ 0.25× (b)'s at rank {served['rank']}: {ratios['memory_a_over_b']:.3f}× — "
        f"{_verdict(ratios['memory_a_over_b'], 0.25)}",
        f"- (a) ≥ 0.8× (d): {ratios['a_over_d']:.2f}× — {_verdict(ratios['a_over_d'], 0.8, True)}",
    ]
    intro = (f"{served['prompts']} prompts, one per task, {served['new_tokens']} tokens each, greedy; the "
             f"{served['tasks']} LoRAs are r = {served['lora_rank']} on q and v, compressed jointly at rank "
             f"{served['rank']}, {SHARES[served.get('share', 'by_name')]}.")
    return "\n".join([intro, "", *rows, "", *verdicts])


def _sections(bench: dict) -> str:
    sections = bench.get("sections")
    return f" (sections: {', '.join(sections)})" if sections else ""


def markdown(bench: dict) -> str:
    machine, versions = bench["machine"], bench["versions"]
    parts = [
        "# rankshare benchmark",
        f"Mode {bench['mode']}{_sections(bench)}; {machine['processor']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch threads, "
        f"device {machine['device']}; torch {versions['torch']}, transformers {versions['transformers']}, peft "
        f"{versions['peft']}. Medians of {bench['repeats']} interleaved repeats after {bench['warmup']} "
        "warm-up rounds; "
        f"wall time {bench['wall_seconds'] / 60:.1f} min.",
        *(["Train step = forward + backward + AdamW step (batch of random tokens, cross-entropy on a 4-class head). "
           "The limit is the frozen model with gradients flowing back to the input embeddings and no weight "
           "gradients. Train memory = tensors saved for backward (weights excluded) + gradients + AdamW moments."]
          if bench["setups"] else []),
        *(["## Targets", "\n".join(met)] if (met := targets(bench)) else []),  # none where only serving ran
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
        if setup.get("many_tasks"):
            parts += [f"## Many tasks on one base — {setup['name']}", many_tasks(setup)]
    sft = bench.get("instruction_tuning")
    if sft:
        parts += [f"## Instruction tuning — {sft['description']}", instruction_tuning(sft)]
    if bench.get("serving"):
        parts += [f"## Serving {bench['serving']['tasks']} tasks from one base — {bench['serving']['description']}",
                  serving_section(bench["serving"])]
    if bench.get("parameter_scaling"):
        parts += ["## Trainable parameters as d and L grow (q and v projections, r = 8)",
                  scaling_table(bench["parameter_scaling"])]
    if bench["setups"]:
        parts.append("![step time against the limit](bench_step_ratios.png)")
    if bench.get("parameter_scaling"):
        parts.append("![parameters against depth](bench_parameters.png)")
    return "\n\n".join(parts) + "\n"


def write_bench_report(out: Path, bench: dict) -> None:
    replace_file(out / "bench.md", markdown(bench).encode("utf-8"))
    figures = []
    if bench["setups"]:
        figures.append(("bench_step_ratios.png", _plot_step_ratios(bench)))
    if bench.get("parameter_scaling"):
        figures.append(("bench_parameters.png", _plot_parameters(bench)))
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
