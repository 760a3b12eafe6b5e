"""``rankshare predict``: one base model holding several trained adapters, each row of a file sent to its own.

A row's task (a column of the file) names the adapter that predicts it. Rows of different adapters share
every forward pass (``adapter_names``, one per row), and each row's prediction is the one its adapter would
give alone: a label name for a classifier or a label-generating causal LM, generated text for a plain LM, or
the generated answer of an instruction-tuned one (the row's text is its prompt).

An adapter trained on a shared LoTR basis (``train --basis``) needs that basis in the model: another
``--adapter`` with the same factors serves, or else the basis run its run.json records is loaded under a
hidden name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import rankshare as rs

from ..atomic_files import replace_file
from ..config import AdapterConfig, ExternalAdapterConfig
from ..errors import RankshareError
from .data_files import read_rows
from .distributed import pick_device
from .jobs import job_objective, recorded_job
from .models import load_tokenizer, resolve_model
from .objectives import InstructionTuning, likeliest, padded, token_log_likelihoods
from .progress import progress
from .run_folder import load_run
from .trained import load_basis, run_base

HIDDEN_PREFIX = "__"  # adapter names of bases loaded only because another adapter uses them


@dataclass
class Route:
    """One ``--adapter``: its name, its run, and what it predicts."""

    name: str
    run: dict
    folder: Path
    task: str | None  # the run's task whose labels it predicts; None for a plain LM, which generates

    @property
    def kind(self) -> str:
        return self.run["kind"]

    @property
    def labels(self) -> list[str]:
        return self.run["tasks"][self.task]


def predict_file(adapters: list[tuple[str, Path]], data: Path, out: Path, text_column: str = "text",
                 task_column: str = "task", batch_size: int = 32, device: str = "auto", quiet: bool = False,
                 max_new_tokens: int = 20) -> dict:
    """Write one JSON object per row of ``data`` to ``out`` (in row order; the file is replaced whole):
    ``{"task", "adapter", "prediction"}``. What can be wrong with the input is reported before a model is
    loaded, but for a basis whose factors changed (found as it loads). Returns the row count and timings."""
    if out.is_dir():
        raise RankshareError(f"--out {out} is a folder; name the predictions file, e.g. {out}/predictions.jsonl.")
    if out.resolve() == data.resolve():
        raise RankshareError(f"--out {out} is the --data file; write the predictions to another file.")
    routes = adapter_routes(adapters)
    texts, names = _read_rows(data, text_column, task_column, routes)
    source = shared_base(routes)
    check_bases(routes)

    started = time.perf_counter()
    tokenizer = load_tokenizer(source)
    model = load_model_with(routes).to(pick_device(device)).eval()
    loaded = time.perf_counter()
    with progress(len(texts), "predict", "rows", quiet) as bar:
        rows = [routes[name] for name in names]
        predictions = _predict(model, tokenizer, rows, texts, batch_size, max_new_tokens, bar.update)
    seconds = time.perf_counter() - loaded

    lines = [json.dumps({"task": name, "adapter": name, "prediction": p}) for name, p in zip(names, predictions)]
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, ("\n".join(lines) + "\n").encode("utf-8"))
    return {"rows": len(texts), "load_seconds": loaded - started, "predict_seconds": seconds,
            "rows_per_second": len(texts) / seconds if seconds > 0 else float("inf")}


# --- what is asked, checked before any model is loaded -------------------------------------------------------


def adapter_routes(adapters: list[tuple[str, Path]]) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for name, directory in adapters:
        if not name or "." in name or name.startswith(HIDDEN_PREFIX):
            raise RankshareError(f"--adapter {name}={directory}: an adapter's name is a task name, non-empty, "
                                 f"without '.' and not starting with {HIDDEN_PREFIX!r}; rename it.")
        if name in routes:
            raise RankshareError(f"--adapter {name} is given twice ({routes[name].folder} and {directory}); give "
                                 "each task one adapter.")
        run, folder = load_run(directory)
        if isinstance(AdapterConfig.from_dict(run["settings"]["adapter"]), ExternalAdapterConfig):
            raise RankshareError(f"--adapter {name}={directory} is a {run['settings']['adapter']['method']} run, "
                                 "attached by another library, which cannot share a model with other adapters; "
                                 "use a rankshare method's run, or rankshare eval for this one.")
        routes[name] = Route(name, run, folder, _task_of(name, run, folder))
    return routes


def _task_of(name: str, run: dict, folder: Path) -> str | None:
    """The run's task whose labels adapter ``name`` predicts: its only task, or the task of that name."""
    tasks = list(run["tasks"])
    if run["kind"] in ("lm", "sft") or len(tasks) == 1:
        return None if run["kind"] in ("lm", "sft") else tasks[0]
    if name not in tasks:
        raise RankshareError(f"--adapter {name}={folder}: the run was trained on the tasks {', '.join(tasks)}, so "
                             f"its name must say which one it predicts, e.g. --adapter {tasks[0]}={folder}.")
    return name


def _read_rows(data: Path, text_column: str, task_column: str, routes: dict[str, Route]
               ) -> tuple[list[str], list[str]]:
    """Each row's text (whitespace collapsed, as in training) and adapter name."""
    texts, names = [], []
    for number, row in enumerate(read_rows(data, {"--text-column": text_column, "--task-column": task_column}), 1):
        text, task = _cell(row, text_column), _cell(row, task_column)
        if not text or not task:
            column = text_column if not text else task_column
            raise RankshareError(f"Row {number} of '{data}' has nothing in column '{column}'; every row needs a text "
                                 "and a task.")
        texts.append(text)
        names.append(task)
    unknown = sorted(set(names) - set(routes))
    if unknown:
        first = names.index(unknown[0]) + 1
        raise RankshareError(f"Rows of '{data}' name tasks that no --adapter has: {', '.join(unknown[:5])} (first "
                             f"in row {first}); the adapters are {', '.join(routes)}. Add --adapter TASK=RUN for "
                             f"each, or fix the '{task_column}' column.")
    return texts, names


def _cell(row: dict, column: str) -> str:
    value = row.get(column)  # a .jsonl row may lack a column others have, or hold a number
    return "" if value is None else " ".join(str(value).split())


def shared_base(routes: dict[str, Route]):
    """The base model of every run, which must be one, with runs of one kind."""
    first, *others = routes.values()
    source = resolve_model(first.run["job"]["model"])
    for route in others:
        if _identity(resolve_model(route.run["job"]["model"])) != _identity(source):
            raise RankshareError(f"The adapters are on different base models: {first.name} on "
                                 f"{first.run['job']['model']}, {route.name} on {route.run['job']['model']}; predict "
                                 "with one base model's adapters at a time.")
        if route.kind != first.kind:
            raise RankshareError(f"The adapters are of different kinds: {first.name} is a {first.kind} run, "
                                 f"{route.name} a {route.kind} run; predict with one kind at a time.")
    return source


def check_bases(routes: dict[str, Route]) -> None:
    """Every adapter on a basis has one within reach: another --adapter that may be it (its factors are compared
    once loaded), or the basis run its run.json records."""
    owners = [r for r in routes.values() if not r.run.get("basis")]
    for route in routes.values():
        if not route.run.get("basis"):
            continue
        method = route.run["settings"]["adapter"]["method"]
        if any(owner.run["settings"]["adapter"]["method"] == method for owner in owners):
            continue
        try:
            load_run(Path(route.run["basis"]["run"]), "--basis")
        except RankshareError:
            raise RankshareError(f"--adapter {route.name} was trained on the shared factors of the run "
                                 f"{route.run['basis']['run']}, which is not there; give that run as another "
                                 "--adapter, or bring it back there.") from None


def _identity(source) -> tuple[str, str | None]:
    path = Path(source.path)
    return (str(path.resolve()) if path.exists() else source.path), source.gguf_file


# --- the model --------------------------------------------------------------------------------------------


def load_model_with(routes: dict[str, Route]) -> rs.AdaptedModel:
    """One base model (``shared_base``) with every adapter; those on a basis after the adapters that may be their
    basis."""
    # The first run's base serves them all: each adapter brings its own head, and the base model's is never used.
    model = rs.AdaptedModel(run_base(next(iter(routes.values())).run))
    on_basis = [route for route in routes.values() if route.run.get("basis")]
    for route in routes.values():
        if route not in on_basis:
            model.load_adapter(route.folder / "adapter", route.name)
    bases = {model.basis_fingerprint(name): name for name in routes if name in model.shared}
    for route in on_basis:
        fingerprint = route.run["basis"]["fingerprint"]
        if fingerprint not in bases:
            hidden = f"{HIDDEN_PREFIX}basis{len(bases)}"
            try:
                load_basis(model, route.run, route.folder, hidden)
            except RankshareError as error:
                raise RankshareError(f"--adapter {route.name}: {error} Or give its basis run as another --adapter."
                                     ) from None
            bases[fingerprint] = hidden
        model.load_adapter(route.folder / "adapter", route.name, basis=bases[fingerprint])
    return model


# --- predicting ---------------------------------------------------------------------------------------------


def _predict(model, tokenizer, routes: list[Route], texts: list[str], batch_size: int, max_new_tokens: int,
             advance) -> list[str]:
    """Row i's prediction by the adapter of ``routes[i]``, in mixed batches."""
    used = {route.name: route for route in routes}.values()
    # Each run's own objective: its tasks and max length decide how a text is cut and prompted.
    objectives = {r.name: job_objective(r.kind, tokenizer, r.run["tasks"], recorded_job(r.run)) for r in used}
    tokens = _encode(objectives, routes, texts, tokenizer)
    # Plain and instruction-tuned LMs continue their rows' prompts (laid out above, each by its own run's objective)
    # as ``generate`` answers: greedily, up to max_new_tokens or the end of the turn.
    generator = InstructionTuning(tokenizer, {}, max(o.max_length for o in objectives.values()), max_new_tokens)
    device = next(model.parameters()).device
    predictions = []
    for start in range(0, len(texts), batch_size):
        batch, ids = routes[start : start + batch_size], tokens[start : start + batch_size]
        with torch.no_grad():
            if batch[0].kind == "classify":
                predictions += _classify(model, batch, ids, objectives, tokenizer, device)
            elif batch[0].kind == "text_to_label":
                predictions += _likeliest_labels(model, batch, ids, objectives, device)
            else:
                predictions += _generate(model, batch, ids, generator, device)
        advance(len(batch))
    return predictions


def _encode(objectives: dict, routes: list[Route], texts: list[str], tokenizer) -> list[list[int]]:
    """Each row's token ids as its adapter's run saw them: the text for a classifier, the prompt for a label
    generator, the text without a closing end-of-sequence token for a plain LM (it continues the text)."""
    tokens: list[list[int]] = [[] for _ in texts]
    for name, objective in objectives.items():
        rows = [i for i, route in enumerate(routes) if route.name == name]
        mine, route = [texts[i] for i in rows], routes[rows[0]]
        if route.kind == "text_to_label":
            encoded = objective.prompts(mine, [route.task] * len(rows))
        elif route.kind == "sft":  # the text is the user's turn; the answer is generated after it
            encoded = [objective.prompt_ids((("user", text),)) for text in mine]
        else:
            encoded = objective.encode(mine, objective.max_length)
        if route.kind == "lm":
            encoded = [ids[:-1] if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id else ids for ids in encoded]
        for i, ids in zip(rows, encoded):
            tokens[i] = ids
    return tokens


def _classify(model, batch: list[Route], ids, objectives, tokenizer, device) -> list[str]:
    logits = model(**padded(ids, tokenizer.pad_token_id, device), adapter_names=[r.name for r in batch]).logits
    # A row of logits: (widest head,), its adapter's head over all its run's tasks first.
    return [route.labels[objectives[route.name].label_of(row, route.task)] for row, route in zip(logits, batch)]


def _likeliest_labels(model, batch: list[Route], prompts, objectives, device) -> list[str]:
    """Each row's label whose name is likeliest after its prompt (summed log-probabilities of its tokens)."""
    pairs = [(row, k) for row, route in enumerate(batch) for k in range(len(route.labels))]
    answers = [objectives[batch[row].name].answers[batch[row].task][k] for row, k in pairs]
    inputs = objectives[batch[0].name].sequences([prompts[row] for row, _ in pairs], answers, device)
    labels = inputs.pop("labels")
    logits = model(**inputs, adapter_names=[batch[row].name for row, _ in pairs]).logits
    best = likeliest(pairs, token_log_likelihoods(logits, labels).sum(-1).tolist())
    return [route.labels[best[row]] for row, route in enumerate(batch)]


def _generate(model, batch: list[Route], prompts, generator: InstructionTuning, device) -> list[str]:
    """Greedy continuations, each by its row's adapter."""
    answers = generator.answer(model, prompts, device, adapter_names=[r.name for r in batch])
    return [answer.strip() for answer in answers]
