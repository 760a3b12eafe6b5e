"""``rankshare generate``: answers from an instruction-tuned run, or from a merged model folder.

One prompt is answered as it is produced (streamed to stdout); a file's rows are answered in batches into a
jsonl file. ``--task`` chooses among several ``--adapter NAME=RUN`` (one base model holds them all, as in
``predict``), or fixes a routed mixture's gates to that task's mean routing, recorded when the run was
evaluated (the model is merged with them). Decoding is greedy unless a temperature is given.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_files import replace_file
from ..config import AdapterConfig
from ..errors import RankshareError
from .convert import run_gates
from .distributed import pick_device
from .instructions import InstructionColumns, read_prompts
from .jobs import job_objective, recorded_job
from .models import ModelSource, load_causal_lm, load_tokenizer
from .objectives import InstructionTuning
from .predict import adapter_routes, check_bases, load_model_with, shared_base
from .progress import progress
from .trained import load_trained


@dataclass
class Generator:
    """A model ready to answer, and the objectives that lay out its prompts: one for every prompt, or each
    adapter's own run's (its prompt layout and max length) for the prompts that name that adapter."""

    model: torch.nn.Module
    objectives: dict[str | None, InstructionTuning]  # adapter name -> its run's; None -> the one for every prompt

    @property
    def adapters(self) -> list[str]:
        """Several: each prompt names its own; empty: one model answers every prompt."""
        return [name for name in self.objectives if name is not None]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def answer(self, contexts: list[tuple[tuple[str, str], ...]], names: list[str | None], options: dict) -> list[str]:
        """Each conversation's answer by the adapter ``names`` gives it (None: the one model), its prompt laid out
        by that adapter's objective; the answers are generated in one batch."""
        prompts = [self.objectives[name].prompt_ids(context) for context, name in zip(contexts, names)]
        mixed = {"adapter_names": names} if self.adapters else {}
        # The runs share one tokenizer (one base model) and max_new_tokens, so any of their objectives generates.
        return self.objectives[names[0]].answer(self.model, prompts, self.device, **mixed, **options)


def load_generator(adapters: list[tuple[str | None, Path]], task: str | None, device: str = "auto",
                   max_new_tokens: int = 256) -> Generator:
    """The model of ``adapters``: one run, one merged model folder, or several named runs on one base."""
    if len(adapters) == 1 and _is_model_folder(adapters[0][1]):
        if task is not None:
            raise RankshareError(f"--task {task}: {adapters[0][1]} is a merged model folder, which has no tasks to "
                                 "choose from; leave out --task.")
        folder = str(adapters[0][1])
        source = ModelSource(folder, folder)
        tokenizer = load_tokenizer(source)
        model = load_causal_lm(source).to(pick_device(device)).eval()
        length = getattr(model.config, "max_position_embeddings", None) or 2048
        return Generator(model, {None: InstructionTuning(tokenizer, {}, length, max_new_tokens)})
    if len(adapters) == 1:
        return _one_run(adapters[0][1], task, device, max_new_tokens)
    return _several_runs(adapters, task, device, max_new_tokens)


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "run.json").is_file()


def _one_run(directory: Path, task: str | None, device: str, max_new_tokens: int) -> Generator:
    model, run, tokenizer, folder = load_trained(directory, device)
    _check_kind(run, directory)
    if task is not None and task not in run["tasks"]:
        raise RankshareError(f"--task {task} names no task of {directory}; its tasks are {', '.join(run['tasks'])}.")
    config = AdapterConfig.from_dict(run["settings"]["adapter"])
    if task is not None and config.merge_needs_gates:  # the task's mean routing, fixed for every token
        gates = run_gates(config, folder, task, "generate", model.targeted_module_names)
        model = model.merge_and_unload(gates=gates).eval()
    return Generator(model, {None: _run_objective(run, tokenizer, max_new_tokens)})


def _several_runs(adapters: list[tuple[str | None, Path]], task: str | None, device: str,
                  max_new_tokens: int) -> Generator:
    if any(name is None for name, _ in adapters):
        raise RankshareError("Several --adapter need a name each: --adapter NAME=RUN, and --task NAME to choose one.")
    routes = adapter_routes(adapters)
    for route in routes.values():
        _check_kind(route.run, route.folder)
    if task is not None and task not in routes:
        raise RankshareError(f"--task {task} names no --adapter; the adapters are {', '.join(routes)}.")
    source = shared_base(routes)
    check_bases(routes)
    model = load_model_with(routes).to(pick_device(device)).eval()
    tokenizer = load_tokenizer(source)
    objectives = {name: _run_objective(route.run, tokenizer, max_new_tokens) for name, route in routes.items()}
    if task is not None:
        model.set_adapter(task)
        return Generator(model, {None: objectives[task]})
    return Generator(model, objectives)


def _run_objective(run: dict, tokenizer, max_new_tokens: int) -> InstructionTuning:
    """The objective the run was evaluated with (its prompt layout and max length), generating ``max_new_tokens``."""
    job = recorded_job(run)
    job.max_new_tokens = max_new_tokens
    return job_objective("sft", tokenizer, run["tasks"], job)


def _check_kind(run: dict, directory: Path) -> None:
    if run["kind"] != "sft":
        raise RankshareError(f"{directory} is a {run['kind']} run; generate answers with instruction-tuned runs "
                             "(--objective sft) and merged models; use rankshare predict for this one.")


def sampling(temperature: float, top_p: float, seed: int) -> dict:
    """``generate``'s options: greedy at temperature 0, else sampled (seeded) with nucleus ``top_p``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise RankshareError(f"--temperature must be >= 0 and --top-p in (0, 1]; got {temperature} and {top_p}.")
    if temperature == 0:
        return {"do_sample": False}
    torch.manual_seed(seed)
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


def stream(generator: Generator, prompt: str, options: dict) -> str:
    """Answer one prompt, printing its tokens to stdout as they are generated; returns the answer."""
    from transformers import TextStreamer

    if generator.adapters:
        raise RankshareError(f"Several adapters are loaded ({', '.join(generator.adapters)}); choose the one that "
                             "answers with --task NAME.")
    streamer = TextStreamer(generator.objectives[None].tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        return generator.answer([(("user", prompt),)], [None], {"streamer": streamer, **options})[0]


def answer_file(generator: Generator, data: Path, out: Path, columns: InstructionColumns, options: dict,
                batch_size: int = 16, quiet: bool = False) -> dict:
    """Answer every row of ``data`` into ``out`` (jsonl, replaced whole): ``{"task", "prompt", "answer"}``."""
    if out.is_dir() or out.resolve() == data.resolve():
        raise RankshareError(f"--out {out} must be a new file, not a folder or the --data file.")
    rows = read_prompts(data, columns)
    if generator.adapters:
        if columns.task is None:
            raise RankshareError(f"Several adapters are loaded ({', '.join(generator.adapters)}): choose one with "
                                 "--task, or name each row's with --task-column.")
        unknown = sorted({task for _, task in rows} - set(generator.adapters))
        if unknown:
            raise RankshareError(f"Rows of '{data}' name tasks that no --adapter has: {', '.join(unknown[:5])}; the "
                                 f"adapters are {', '.join(generator.adapters)}.")
    started, answers = time.perf_counter(), []
    with progress(len(rows), "generate", "rows", quiet) as bar, torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            names = [task if generator.adapters else None for _, task in chunk]
            answers += generator.answer([context for context, _ in chunk], names, options)
            bar.update(len(chunk))
    lines = [json.dumps({"task": task, "prompt": "\n".join(c for _, c in context), "answer": answer})
             for (context, task), answer in zip(rows, answers)]
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, ("\n".join(lines) + "\n").encode("utf-8"))
    return {"rows": len(rows), "seconds": time.perf_counter() - started}
