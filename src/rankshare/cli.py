"""``rankshare``: fine-tune and compare LoRA, LoTR, MoR and MoE-LoRA on real data, from the command line.

Exit codes: 0 done, 2 bad input (one line on stderr says what and what to do), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

from .config import OBJECTIVES, methods
from .errors import RankshareError
from .finetune.models import DTYPES
from .finetune.report import markdown_table
from .targets import SHARES

# The rate of compress --recover-steps: at rank 4 per module, 50 steps at 3e-2 kept 90 % of eight skills LoRAs' exact
# match against 80 % at their own 3e-3 (compression study); cores alone chose 1e-2 to 3e-2 in part 3 too.
RECOVER_LR = 3e-2

DESCRIPTION = """Fine-tune pretrained models with LoTR, MoR, MoE-LoRA or PEFT's LoRA and compare them.
Defaults: the packaged all-MiniLM-L6-v2 on BBC News topics + tweet sentiment, offline."""


DEFAULT_MODEL = "minilm"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise RankshareError(f"{self.prog}: {message} (see {self.prog} --help)")


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)


def _cap(text: str) -> int | None:
    return None if text == "all" else _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _methods(text: str) -> list[str]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in methods()]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {','.join(methods())}")
    return chosen


def method_options() -> dict[str, tuple]:
    """Every method's own options: name -> (its dataclass field, the methods that take it)."""
    found: dict[str, tuple] = {}
    for name, cls in methods().items():
        for option, spec in cls.options().items():
            first, owners = found.get(option, (spec, ()))
            found[option] = (first, (*owners, name))
    return found


def _add_method_options(group) -> None:
    """``--option`` for each method option; left out, it is None and each method keeps its own default."""
    for name, (spec, owners) in method_options().items():
        flag = "--" + name.replace("_", "-")
        recipes = [f"{method} {objective}: {methods()[method].recipe(objective).options[name]}" for method in owners
                   for objective in OBJECTIVES if name in methods()[method].recipe(objective).options]
        about = (f"{spec.metadata.get('help', name.replace('_', ' '))} ({', '.join(owners)}; default: {spec.default}"
                 f"{'; '.join(['', *recipes])})")
        if isinstance(spec.default, bool):
            arguments = {"action": argparse.BooleanOptionalAction}
        elif isinstance(spec.default, int):
            arguments = {"type": _int_at_least(spec.metadata.get("min", 0)), "metavar": name.upper()}
        elif isinstance(spec.default, float):
            arguments = {"type": _finite_float, "metavar": name.upper()}
        else:
            arguments = {"type": str, "choices": spec.metadata.get("choices")}
        try:
            group.add_argument(flag, dest=_option_dest(name), default=None, help=about, **arguments)
        except argparse.ArgumentError:  # another method's option, or one of rankshare's own, holds the name
            warnings.warn(f"rankshare: {flag} of {', '.join(owners)} clashes with another option of the same name; "
                          "it cannot be set from the command line.", stacklevel=2)


def _default_rates() -> str:
    """Each method's recipe rates: one where every objective has the same, else per objective."""
    shown = []
    for name, cls in methods().items():
        rates = {objective: cls.recipe(objective).learning_rate for objective in OBJECTIVES}
        if len(set(rates.values())) == 1:
            shown.append(f"{name} {rates['classify']:g}")
        else:
            shown.append(f"{name} " + ", ".join(f"{rate:g} ({objective})" for objective, rate in rates.items()))
    return "; ".join(shown)


def _default_ranks() -> str:
    """The ranks of the recipes that set one, else 8."""
    shown = [f"{name} {cls.recipe(objective).rank} ({objective})" for name, cls in methods().items()
             for objective in OBJECTIVES if cls.recipe(objective).rank]
    return "; ".join(shown + ["8 otherwise" if shown else "8"]) + "; at most the narrowest target's side"


def _option_dest(name: str) -> str:
    # Apart from rankshare's own arguments, so that an option skipped for a clash is never read from theirs.
    return f"method_option:{name}"


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("model and data")
    # Left out, it is None: minilm, or a --basis run's own model.
    data.add_argument("--model", help="minilm (packaged all-MiniLM-L6-v2), smollm2 (packaged SmolLM2-135M, 30 "
                      f"layers), a local transformers folder, or a hub id (default: {DEFAULT_MODEL})")
    data.add_argument("--data", default="news+sentiment", help="news (BBC News, 5 topics), sentiment (tweets, 3 "
                      "classes), news+sentiment (multi-task), skills (generated multi-task instructions), a "
                      ".csv/.jsonl file, or a datasets hub name (default: %(default)s)")
    data.add_argument("--text-column", default="text",
                      help="text column of a file or hub dataset (default: %(default)s)")
    data.add_argument("--label-column", default="label",
                      help="label column of a file or hub dataset (default: %(default)s)")
    data.add_argument("--prompt-column", default="prompt", help="instruction data: the prompt column "
                      "(default: %(default)s)")
    data.add_argument("--response-column", default="response", help="instruction data: the response column "
                      "(default: %(default)s)")
    data.add_argument("--messages-column", default="messages", help="instruction data: a column of {role, content} "
                      "turns, used instead of prompt and response (default: %(default)s)")
    data.add_argument("--task-column", help="instruction data: the column naming each row's task (default: one "
                      "task, named after the file)")
    data.add_argument("--objective", choices=["auto", "classify", "text_to_label", "lm", "sft"], default="auto",
                      help="auto: sft on instruction data, else a classification head on encoders and label names "
                      "generated by causal LMs; lm: language modelling on the texts, reported as perplexity; sft: "
                      "loss on the responses, scored by exact match of generated answers (default: %(default)s)")
    data.add_argument("--prompt-layout", choices=["auto", "chat", "plain"], default="auto",
                      help="sft: the tokenizer's chat template (auto: when it has one) or plain 'prompt\\nresponse' "
                      "(default: %(default)s)")
    data.add_argument("--max-new-tokens", type=_positive_int, default=32,
                      help="sft: the longest answer generated at evaluation (default: %(default)s)")
    data.add_argument("--max-train", type=_cap, default=1200, metavar="N|all",
                      help="training examples per task, sampled by label (default: %(default)s)")
    data.add_argument("--max-eval", type=_cap, default=300, metavar="N|all",
                      help="validation and test examples per task (default: %(default)s)")
    data.add_argument("--max-length", type=_positive_int, help="tokens per example; longer prompts are cut from the "
                      "left (default: 64, instruction data 128)")
    data.add_argument("--dtype", choices=DTYPES, default="float32", help="the base model's dtype; adapters train "
                      "in float32 (default: %(default)s)")
    data.add_argument("--gradient-checkpointing", action="store_true",
                      help="recompute the base model's activations in backward: less memory, more time")

    size = parser.add_argument_group("adapter size")
    size.add_argument("--rank", type=_positive_int, help="rank r of every method (default unless --budget: "
                      f"{_default_ranks()})")
    size.add_argument("--budget", type=_positive_int, help="trainable adapter parameters (head excluded): each "
                      "method's rank is chosen to fit within −10 %%/+5 %% (a mixture may change its experts), or the "
                      "method is left out")
    size.add_argument("--alpha", type=_positive_float, help="scale s = alpha / r (default: alpha = r)")
    size.add_argument("--target-modules", help="comma-separated module-name suffixes, or a regex (default: the "
                      "attention query and value projections of the architecture)")
    size.add_argument("--dry-run", action="store_true", help="print each method's rank for --budget and stop, "
                      "without loading data or training")

    schedule = parser.add_argument_group("training")
    schedule.add_argument("--epochs", type=_positive_int, default=1, help="(default: %(default)s)")
    schedule.add_argument("--max-steps", type=_positive_int, help="stop after this many steps")
    schedule.add_argument("--lr", type=_positive_float, help=f"peak learning rate, AdamW, linear warm-up and decay "
                          f"(default per method and objective: {_default_rates()})")
    schedule.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    schedule.add_argument("--seed", type=int, default=0,
                          help="decides the split, init and order (default: %(default)s)")
    schedule.add_argument("--checkpoint-every", type=_positive_int, default=50, metavar="K",
                          help="save a checkpoint every K steps (default: %(default)s)")
    schedule.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, help="results folder (default: runs/<time>-<method or compare>)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    output.add_argument("--resume", type=Path, metavar="DIR",
                        help="finish the interrupted run in DIR (other options are taken from DIR/command.json)")
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    # Last, so that a method's option can never take the name of one of the options above.
    _add_method_options(parser.add_argument_group("method options"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rankshare", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="fine-tune one adapter and evaluate it",
                                description="Fine-tune one adapter, evaluate it on validation and test, save it.")
    names = list(methods())
    train.add_argument("--method", choices=names, default="lotr", help=f"one of {', '.join(names)} (lora is PEFT's) "
                       "(default: %(default)s)")
    train.add_argument("--basis", metavar="DIR", help="train an adapter on the frozen shared factors of a trained run "
                       "of a method with a basis (LoTR: cores only, on the U and V of its --out, or a compare's lotr "
                       "folder); the model and what the method ties to its basis (LoTR: target modules, share, rank) "
                       "are that run's")
    _add_job_arguments(train)
    train.set_defaults(run=_run_training)

    compare = commands.add_parser("compare", help="train several methods on the same data, seed and schedule",
                                  description="Train several methods at matched budgets on the same split, seed and "
                                  "schedule; write metrics.json, report.md and plots.")
    compare.add_argument("--methods", type=_methods, default=names, help="comma-separated (default: all)")
    _add_job_arguments(compare)
    compare.set_defaults(budget=150_000, run=_run_training)
    compare.description += " Default budget: 150,000 adapter parameters."

    evaluate = commands.add_parser("eval", help="evaluate a trained adapter", description="Evaluate a trained adapter "
                                   "on the validation and test splits of some data.")
    evaluate.add_argument("--adapter", type=Path, required=True,
                          help="a train run's --out (or a compare's method folder)")
    evaluate.add_argument("--data", help="data of the same tasks (default: the data it was trained on)")
    evaluate.add_argument("--text-column", help="text column of a --data file (default: the training run's)")
    evaluate.add_argument("--label-column", help="label column of a --data file (default: the training run's)")
    evaluate.add_argument("--peft", type=Path, metavar="DIR", help="evaluate this PEFT LoRA folder (e.g. the run's "
                          "export) on the run's base model instead of the run's own adapter")
    evaluate.add_argument("--base", action="store_true", help="evaluate the base model alone, the adapter and any "
                          "trained head disabled: the score before training (e.g. zero-shot for sft)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(run=_run_eval)

    merge = commands.add_parser("merge", help="fold an adapter into its base model and save a plain model folder",
                                description="Fold the adapter into the base weights; the output folder loads with "
                                "transformers' AutoModel*.from_pretrained.")
    merge.add_argument("--adapter", type=Path, required=True, help="a train run's --out")
    merge.add_argument("--out", type=Path, required=True, help="the merged model folder")
    _add_gates_and_overwrite(merge)
    merge.set_defaults(run=_run_merge)

    export = commands.add_parser("export", help="write adapters as PEFT LoRA folders (for PEFT, vLLM, TGI, ...)",
                                 description="Write a trained adapter as a plain PEFT LoRA adapter folder, exact: "
                                 "LoTR as it is, MoR and MoE-LoRA with fixed gates. Several --adapter NAME=RUN write "
                                 "one folder per name under --out, loadable together into one PeftModel.")
    export.add_argument("--adapter", type=_run_maybe_named, action="append", required=True, metavar="[NAME=]DIR",
                        help="a train run's --out (or a compare's method folder); repeat as NAME=DIR for several")
    export.add_argument("--out", type=Path, required=True, help="the PEFT folder (or the folder of PEFT folders)")
    _add_gates_and_overwrite(export)
    export.set_defaults(run=_run_export)

    compress = commands.add_parser("compress", help="fit LoTR to trained LoRA runs' updates: one, or many into "
                                   "one shared basis", description="Compress a LoRA run (--method lora) into LoTR: one "
                                   "Tucker-2 basis per group of layers, fitted to the per-layer updates; prints each "
                                   "group's relative error and parameters. The result is a run folder that eval, merge "
                                   "and export read. Several --adapter TASK=RUN are fitted jointly into one basis: per "
                                   "rank, --out/rank-R/basis and a run per task on it, which predict and generate "
                                   "serve together in mixed batches.")
    compress.add_argument("--adapter", type=_run_maybe_named, action="append", required=True, metavar="[TASK=]DIR",
                          help="a LoRA train run's --out, or a PEFT LoRA adapter folder (then give --model); repeat "
                          "as TASK=DIR to compress several into one basis")
    compress.add_argument("--model", help="the base model of a PEFT folder: minilm, smollm2, or a model folder")
    compress.add_argument("--rank", type=_ranks, required=True,
                          help="the LoTR rank, or comma-separated ranks for the error-size curve (one folder each)")
    compress.add_argument("--share", choices=SHARES, default="by_name",
                          help="one basis per projection across layers (by_name), per shape, or per module, shared "
                          "only by the tasks (by_module) (default: %(default)s)")
    compress.add_argument("--recover-steps", type=_positive_int, help="several LoRA runs: then train each task's "
                          "cores alone for this many steps on its run's training data (the basis and heads frozen)")
    compress.add_argument("--recover-lr", type=_positive_float, help=f"the rate of --recover-steps (default: "
                          f"{RECOVER_LR:g}: cores alone want a higher rate than the LoRA had; docs/RESULTS.md)")
    compress.add_argument("--out", type=Path, required=True, help="the compressed run (or a folder of them)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    compress.set_defaults(run=_run_compress)

    predict = commands.add_parser("predict", help="predict each row of a file with its task's adapter, several "
                                  "adapters on one base model", description="Load one base model with every "
                                  "--adapter and predict each row with the adapter its task column names; rows of "
                                  "different tasks share each batch. Writes one JSON object per row, in order: its "
                                  "task, the adapter and the prediction (a label name, or generated text for a plain "
                                  "language model).")
    predict.add_argument("--adapter", type=_named_run, action="append", required=True, metavar="TASK=DIR",
                         help="a task name and a train run's --out (or a compare's method folder); repeat for each "
                         "task. A run on a --basis finds it among these adapters, or where it was trained")
    predict.add_argument("--data", type=Path, required=True, help="a .csv or .jsonl file of rows to predict")
    predict.add_argument("--task-column", default="task",
                         help="the column naming each row's task, i.e. its adapter (default: %(default)s)")
    predict.add_argument("--text-column", default="text", help="(default: %(default)s)")
    predict.add_argument("--out", type=Path, required=True, help="the predictions file (.jsonl), replaced whole")
    predict.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    predict.add_argument("--max-new-tokens", type=_positive_int, default=20,
                         help="plain language models: tokens generated per row (default: %(default)s)")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--quiet", action="store_true")
    predict.set_defaults(run=_run_predict)

    generate = commands.add_parser("generate", help="answer a prompt (streamed) or every row of a file with an "
                                   "instruction-tuned run", description="Answer with an sft run (or a merged model "
                                   "folder): --prompt streams one answer to stdout; --data answers each row (its "
                                   "prompt column, or its messages) into --out, one JSON object per row.")
    generate.add_argument("--adapter", type=_run_maybe_named, action="append", required=True, metavar="[NAME=]DIR",
                          help="an sft run's --out, a merged model folder, or several NAME=DIR on one base model")
    asked = generate.add_mutually_exclusive_group(required=True)
    asked.add_argument("--prompt", help="the user's message to answer")
    asked.add_argument("--data", type=Path, help="a .csv or .jsonl file of prompts (or messages) to answer")
    generate.add_argument("--out", type=Path, help="with --data: the answers file (.jsonl), replaced whole")
    generate.add_argument("--task", help="the adapter (of several NAME=DIR) that answers, or the task whose recorded "
                          "mean routing a mixture uses")
    generate.add_argument("--prompt-column", default="prompt", help="(default: %(default)s)")
    generate.add_argument("--messages-column", default="messages", help="(default: %(default)s)")
    generate.add_argument("--task-column", help="with several adapters: the column naming each row's adapter")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=256, help="(default: %(default)s)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="for sampling (default: %(default)s)")
    generate.add_argument("--batch-size", type=_positive_int, default=16, help="with --data (default: %(default)s)")
    generate.add_argument("--device", default="auto")
    generate.add_argument("--quiet", action="store_true")
    generate.set_defaults(run=_run_generate)

    bench = commands.add_parser("bench",
                                help="measure time, memory and file size against PEFT LoRA and the frozen base",
                                description="Benchmark LoTR, MoR and MoE-LoRA against PEFT's LoRA and the frozen base "
                                "in one process (interleaved repeats). Quick: MiniLM, a couple of minutes. Full: also "
                                "SmolLM2-135M and random LLaMA models (d 1024 with 12 and 24 layers, d 2048 with 12), "
                                "under 30 minutes "
                                "on 2 CPU cores. Writes bench.json, bench.md and plots.")
    bench.add_argument("--full", action="store_true", help="all models and variants (default: quick)")
    bench.add_argument("--only", choices=["models", "sft", "serving"],
                       help="run one section: models (the tables above), sft (the SFT step and generation speed on "
                       "SmolLM2), or serving (8 LoRAs compressed into one basis, served in one mixed batch); default: "
                       "models, and with --full all three")
    bench.add_argument("--repeats", type=_positive_int, default=10, help="timed rounds (default: %(default)s)")
    bench.add_argument("--out", type=Path, help="results folder (default: runs/<time>-bench)")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(run=_run_bench)

    study = commands.add_parser("study", help="the evidence study behind docs/RESULTS.md (resumable)",
                                description="Test LoTR's and MoR's claims (docs/RESULTS.md): the first study's rank "
                                "sweeps and budget comparison (3 seeds), and the powered study: every method at 4 "
                                "rates x 5 seeds on MiniLM, LoTR against LoRA on SmolLM2's 30 layers, cheap tasks on a "
                                "shared basis, MoR on the skills set at two budgets, forgetting; and many LoRAs "
                                "compressed into one basis. The full study takes many CPU hours and runs in parts "
                                "(--parts); --quick: a few minutes. Finished runs are kept in --out and not trained "
                                "again.")
    study.add_argument("--quick", action="store_true", help="one seed, one rank, a few steps: checks the machinery")
    study.add_argument("--parts", help="comma-separated part names to run (default: all)")
    study.add_argument("--out", type=Path, help="results folder (default: docs/results, or runs/study-quick)")
    study.add_argument("--redraw", action="store_true", help="only redraw summary.md and the plots from the records")
    study.add_argument("--page", type=Path, action="append", default=[],
                       help="also refresh the study's tables and plots in this hand-written page (its '<!-- summary: "
                       "PART -->' ... '<!-- /summary -->' blocks), e.g. docs/RESULTS.md; may be given again")
    study.add_argument("--quiet", action="store_true")
    study.set_defaults(run=_run_study)
    return parser


def _add_gates_and_overwrite(parser: argparse.ArgumentParser) -> None:
    """The options merge and export share: a routed mixture's fixed gates, and replacing --out."""
    parser.add_argument("--gates", help="mor/moelora only: N comma-separated gate weights, or a task name to use its "
                        "mean routing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _run_study(args) -> None:
    from .study.compression import compression_part, run_compression
    from .study.plan import full_plan, quick_plan
    from .study.report import fill_page, write_summary
    from .study.runner import prepare, run_study

    parts = quick_plan() if args.quick else full_plan()
    compression = compression_part(args.quick)
    out = args.out or Path("runs/study-quick" if args.quick else "docs/results")
    names = [p.name for p in parts] + [compression.name]
    chosen = names if not args.parts else [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise RankshareError(f"--parts: no part named {', '.join(unknown)}; the parts are {', '.join(names)}.")
    for page in args.page:
        if not page.is_file():
            raise RankshareError(f"--page: {page} is not a file; give the markdown page whose blocks to refresh.")
    if not args.redraw:
        def say(text: str) -> None:
            print(text, file=sys.stderr)

        prepare(parts, out)
        if set(chosen) - {compression.name}:
            run_study(parts, [name for name in chosen if name != compression.name], out, args.quiet, say)
        if compression.name in chosen:
            run_compression(compression, out, args.quiet, say)
    elif not (out / "plan.json").is_file():
        raise RankshareError(f"--redraw: {out} holds no study (no plan.json); run the study first.")
    summary = write_summary(out)
    print(f"summary in {summary}", file=sys.stderr)
    for page in args.page:
        filled = fill_page(page, summary)
        blocks = f"{len(filled)} block{'' if len(filled) == 1 else 's'}"
        print(f"{page}: {blocks} refreshed ({', '.join(filled) or 'none'})", file=sys.stderr)


def _job_from_args(args):
    from .finetune.jobs import Job, job_on_basis
    from .finetune.train import Settings

    settings = {f.name: getattr(args, f.name) for f in fields(Settings) if f.name != "adapter"}
    targets = args.target_modules
    if targets and any(c in targets for c in "\\^$*+?[(|"):
        try:
            re.compile(targets)
        except re.error as error:
            raise RankshareError(f"--target-modules {targets!r} is not a valid regular expression ({error}); fix it, "
                                 "or give comma-separated module names.") from None
    elif targets:
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    chosen = [args.method] if args.command == "train" else args.methods
    if args.rank is not None and args.budget is not None and args.command == "train":
        raise RankshareError("Give --rank or --budget, not both.")
    declared = method_options()
    given = {name: getattr(args, _option_dest(name), None) for name in declared}
    options = {name: value for name, value in given.items() if value is not None}
    for name in options:
        if not set(chosen) & set(declared[name][1]):
            owners = ", ".join(declared[name][1])
            raise RankshareError(f"--{name.replace('_', '-')} is an option of {owners}, not of {', '.join(chosen)}; "
                                 "leave it out or choose a method that takes it.")
    job = Job(methods=chosen, model=args.model, data=args.data, objective=args.objective, text_column=args.text_column,
              label_column=args.label_column, prompt_column=args.prompt_column, response_column=args.response_column,
              messages_column=args.messages_column, task_column=args.task_column, max_train=args.max_train,
              max_eval=args.max_eval, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
              prompt_layout=args.prompt_layout, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
              rank=args.rank, budget=None if args.rank is not None else args.budget,
              device=args.device, alpha=args.alpha, target_modules=targets or None, options=options,
              settings=settings)
    if getattr(args, "basis", None) is not None:
        return job_on_basis(job, args.basis)
    return replace(job, model=job.model or DEFAULT_MODEL)


def _run_training(args) -> None:
    from .finetune.jobs import Job
    from .finetune.running import run_job
    from .finetune.train import Settings

    if args.resume:
        command = args.resume / "command.json"
        if not command.is_file():
            raise RankshareError(f"--resume {args.resume}: no command.json there; give the --out of an "
                                 "interrupted run.")
        if args.dry_run:
            raise RankshareError("--dry-run plans a new run; leave it out to --resume one.")
        try:
            job, out = Job(**json.loads(command.read_text())), args.resume
            Settings(adapter={}, **job.settings)  # an earlier version kept other fields here
        except (TypeError, ValueError) as error:
            raise RankshareError(f"--resume {args.resume}: its command.json is not one this version wrote "
                                 f"({error}); start the run again.") from None
    else:
        job = _job_from_args(args)
        if args.dry_run:
            from .finetune.jobs import dry_run

            for method, (_, note) in dry_run(job).items():
                print(f"{method}: {note}")
            return
        name = job.methods[0] if args.command == "train" else "compare"
        out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    def say(text: str) -> None:  # the budget plan is a result, shown even with --quiet
        print(text, file=sys.stderr)

    try:
        records = run_job(job, out, args.quiet, say, overwrite=args.overwrite, resuming=args.resume is not None)
    except KeyboardInterrupt:
        print(f"rankshare: interrupted; continue with: rankshare {args.command} --resume {out}", file=sys.stderr)
        raise SystemExit(130) from None
    from .finetune import distributed

    if distributed.is_main():
        print(markdown_table(records))
        print(f"results in {out}", file=sys.stderr)


def _run_generate(args) -> None:
    from .finetune.generate import answer_file, load_generator, sampling, stream
    from .finetune.instructions import InstructionColumns

    if args.data is not None and args.out is None:
        raise RankshareError("--data needs --out, the file to write the answers to.")
    options = sampling(args.temperature, args.top_p, args.seed)
    generator = load_generator(args.adapter, args.task, args.device, args.max_new_tokens)
    if args.prompt is not None:
        stream(generator, args.prompt, options)
        return
    columns = InstructionColumns(prompt=args.prompt_column, messages=args.messages_column, task=args.task_column)
    done = answer_file(generator, args.data, args.out, columns, options, args.batch_size, args.quiet)
    print(f"{done['rows']} answers in {args.out} ({done['seconds']:.1f} s)", file=sys.stderr)


def _named_run(text: str) -> tuple[str, Path]:
    name, equals, folder = text.partition("=")
    if not equals or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=DIR (e.g. news=runs/news), got {text!r}")
    return name.strip(), Path(folder.strip())


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rank or comma-separated ranks, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be positive integers, got {text!r}")
    return ranks


def _run_maybe_named(text: str) -> tuple[str | None, Path]:
    return _named_run(text) if "=" in text else (None, Path(text))


def _gates(text: str | None):
    if text is None:
        return None
    try:
        return [float(g) for g in text.split(",")]
    except ValueError:
        return text  # a task name


def _run_bench(args) -> None:
    from .bench import run_bench
    from .bench.report import markdown
    from .finetune.run_folder import check_out

    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-bench"
    check_out(out, args.overwrite)
    bench = run_bench(out, args.full, args.repeats, quiet=args.quiet, sections=(args.only,) if args.only else None,
                      say=lambda text: print(text, file=sys.stderr))
    print(markdown(bench))
    print(f"results in {out}", file=sys.stderr)


def _run_predict(args) -> None:
    from .finetune.predict import predict_file

    done = predict_file(args.adapter, args.data, args.out, args.text_column, args.task_column, args.batch_size,
                        args.device, args.quiet, args.max_new_tokens)
    print(f"{done['rows']} predictions in {args.out}: {done['rows_per_second']:.1f} rows/s "
          f"({done['predict_seconds']:.1f} s; loading took {done['load_seconds']:.1f} s)", file=sys.stderr)


def _run_eval(args) -> None:
    from .finetune.trained import evaluate_run

    if args.base and args.peft:
        raise RankshareError("--base evaluates the model without any adapter; leave out --peft.")
    result = evaluate_run(args.adapter, args.data, args.quiet, args.device, args.text_column, args.label_column,
                          args.peft, args.base)
    print(json.dumps(result, indent=2))


def _run_compress(args) -> None:
    from .finetune.convert import compress_run, compress_runs
    from .finetune.run_folder import check_out

    (name, adapter), *others = args.adapter
    single = name is None and not others
    if args.recover_steps and single:
        raise RankshareError("--recover-steps trains the cores of several LoRAs compressed into one basis: give "
                             "them as --adapter TASK=RUN, or leave it out.")
    if args.recover_lr and not args.recover_steps:
        raise RankshareError("--recover-lr is the rate of --recover-steps: give both, or neither.")
    if args.recover_steps and any(not (folder / "run.json").is_file() for _, folder in args.adapter):
        raise RankshareError("--recover-steps trains on each LoRA run's own data: give rankshare LoRA runs, not PEFT "
                             "folders, or leave it out.")
    check_out(args.out, args.overwrite)
    if single:
        print("| rank | group | LoRA params | LoTR params | LoTR / LoRA | relative error |")
        print("| ---: | :--- | ---: | ---: | ---: | ---: |")
        for rank, folder, report in compress_run(adapter, args.rank, args.out, args.share, args.model):
            for group, fit in report.items():
                print(f"| {rank} | {group} | {fit.lora_parameters:,} | {fit.lotr_parameters:,} | "
                      f"{fit.parameter_ratio:.3f} | {fit.relative_error:.4f} |")
            print(f"LoTR rank {rank} in {folder}", file=sys.stderr)
        return
    print("| rank | task | relative error | LoRA params | params on the basis | ratio |")
    print("| ---: | :--- | ---: | ---: | ---: | ---: |")
    fitted = compress_runs(args.adapter, args.rank, args.out, args.share, args.model)
    for rank, folder, report in fitted:
        for task, error in report.task_errors.items():
            lora, own = report.lora_parameters[task], report.task_parameters[task]
            print(f"| {rank} | {task} | {error:.4f} | {lora:,} | {own:,} | {own / lora:.3f} |")
        loras = sum(report.lora_parameters.values())
        print(f"| {rank} | all, with the basis ({report.basis_parameters:,}) | | {loras:,} | "
              f"{report.total_parameters:,} | {report.parameter_ratio:.3f} |")
        print(f"LoTR rank {rank}: the basis and a run per task in {folder}", file=sys.stderr)
    if args.recover_steps:
        from .finetune.running import recover_cores

        for rank, folder, report in fitted:
            for task in report.task_errors:
                done = recover_cores(folder / task, args.recover_steps, args.quiet, args.recover_lr or RECOVER_LR)
                print(f"rank {rank}, {task}: cores trained {done['steps']} steps ({done['train_seconds']:.0f} s)",
                      file=sys.stderr)


def _run_export(args) -> None:
    from .finetune.convert import export_runs
    from .finetune.run_folder import check_out

    check_out(args.out, args.overwrite)
    for folder in export_runs(args.adapter, args.out, _gates(args.gates)):
        print(f"PEFT LoRA adapter in {folder}", file=sys.stderr)


def _run_merge(args) -> None:
    from .finetune.convert import merge_run
    from .finetune.run_folder import check_out

    check_out(args.out, args.overwrite)
    print(f"merged model in {merge_run(args.adapter, args.out, _gates(args.gates))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # PEFT still asks transformers an old question; the answer is right and the warning is noise to users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except RankshareError as error:
        message = str(error)
        print(message if message.startswith("rankshare") else f"rankshare: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
