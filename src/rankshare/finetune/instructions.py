"""Instruction data in a file: its rows as ``Instruction`` examples to learn, or as prompts to answer.

A row has a prompt and a response column, or a ``messages`` column — a list of ``{role, content}`` turns whose
last assistant turn is the answer to learn (turns after it are left out). ``task_column`` names each row's task
(default: one task named after the file). Every row must have a non-empty prompt and response; the first bad
row is an error that names the file and the row. Prompts are kept once per task (all copies are dropped when
they disagree on the response).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import RankshareError
from .data_files import Table, read_table
from .examples import Instruction

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class InstructionColumns:
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    task: str | None = None

    def found_in(self, columns: list[str]) -> bool:
        """Whether a file of these columns has a messages column, or a prompt and a response column."""
        return self.messages in columns or {self.prompt, self.response} <= set(columns)


def instruction_examples(table: Table, columns: InstructionColumns) -> dict[str, list[Instruction]]:
    """Each task's instructions in a file, in file order, each prompt once."""
    if columns.task is not None and columns.task not in table.columns:
        raise RankshareError(f"'{table.path}' has no column '{columns.task}'; name each row's task with "
                             "--task-column, or leave it out for one task.")
    by_task: dict[str, dict[str, Instruction]] = {}
    conflicting: set[tuple[str, str]] = set()
    for record, place in zip(table.rows, table.places):
        where = f"{place} of '{table.path}'"
        task = str(record.get(columns.task) or "").strip() if columns.task else table.path.stem
        if not task:
            raise RankshareError(f"{where} names no task in '{columns.task}'; give every row its task.")
        example = _instruction(record, columns, task, where)
        key = " ".join(example.prompt.split()).lower()
        kept = by_task.setdefault(task, {})
        if key not in kept:
            kept[key] = example
        elif kept[key].response != example.response:
            conflicting.add((task, key))
    return {task: [e for key, e in kept.items() if (task, key) not in conflicting] for task, kept in by_task.items()}


def read_prompts(path: Path, columns: InstructionColumns) -> list[tuple[tuple[tuple[str, str], ...], str | None]]:
    """Each row's conversation to answer — its prompt as a user turn, or its messages up to the last turn that is
    not the assistant's — and its task (None without ``columns.task``)."""
    table = read_table(path)
    if columns.messages not in table.columns and columns.prompt not in table.columns:
        raise RankshareError(f"'{path}' has no column '{columns.prompt}' or '{columns.messages}'; name the prompt "
                             "column with --prompt-column.")
    prompts = []
    for record, place in zip(table.rows, table.places):
        where = f"{place} of '{path}'"
        task = str(record.get(columns.task) or "").strip() or None if columns.task else None
        if columns.task and task is None:
            raise RankshareError(f"{where} names no task in '{columns.task}'; give every row its task.")
        if record.get(columns.messages) is None:
            prompt = record.get(columns.prompt)
            if prompt is None or not str(prompt).strip():
                raise RankshareError(f"{where} has no {columns.prompt!r} (or it is empty); every row needs a prompt.")
            prompts.append(((("user", str(prompt)),), task))
            continue
        turns = _turns(record[columns.messages], columns, where)
        while turns and turns[-1][0] == "assistant":
            turns.pop()
        if not any(role == "user" for role, _ in turns):
            raise RankshareError(f"{where}: its messages have no user turn to answer; add one.")
        prompts.append((tuple(turns), task))
    return prompts


def _turns(messages, columns: InstructionColumns, where: str) -> list[tuple[str, str]]:
    """A messages cell as (role, content) pairs."""
    if isinstance(messages, str):  # a CSV cell holds the list as JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            messages = None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RankshareError(f"{where}: {columns.messages!r} is not a list of {{\"role\", \"content\"}} turns.")
    turns = []
    for turn in messages:
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise RankshareError(f"{where}: the turn {json.dumps(turn)[:80]} needs a role ({', '.join(ROLES)}) and "
                                 "a text content.")
        turns.append((role, content))
    return turns


def _instruction(record: dict, columns: InstructionColumns, task: str, where: str) -> Instruction:
    """One row as an Instruction; a row without a usable prompt and answer is an error naming ``where``."""
    messages = record.get(columns.messages)
    if messages is None:
        prompt, response = (record.get(name) for name in (columns.prompt, columns.response))
        for name, value in ((columns.prompt, prompt), (columns.response, response)):
            if value is None or not str(value).strip():
                raise RankshareError(f"{where} has no {name!r} (or it is empty); every row needs a prompt and a "
                                     "response.")
        return Instruction.of(str(prompt), str(response), task)
    turns = _turns(messages, columns, where)
    answers = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    if not answers:
        raise RankshareError(f"{where}: its messages have no assistant turn, so there is no answer to learn; add one.")
    turns = turns[: answers[-1] + 1]
    if not turns[-1][1].strip():
        raise RankshareError(f"{where}: its last assistant turn is empty; give it the answer to learn.")
    if not any(role == "user" for role, _ in turns[:-1]):
        raise RankshareError(f"{where}: its messages have no user turn before the answer; add the prompt.")
    return Instruction(tuple(turns), task)
