"""Reading a user's .csv or .jsonl file: its rows as dicts, its columns, and where each row stands in it.

A file is read once (``read_table``); what is wrong with it is an error naming the file, and the line or row.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import RankshareError

FILE_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Table:
    """A file's rows in file order, its columns (a .jsonl's in first-seen order) and where each row is: "line N"
    of a .jsonl, "row N" of a .csv (after its header)."""

    path: Path
    rows: list[dict]
    columns: list[str]
    places: list[str]

    def require(self, columns: dict[str, str]) -> None:
        """``columns`` maps each option that names a column (``--text-column``) to the column, which the file must
        have."""
        for column in columns.values():
            if column not in self.columns:
                raise RankshareError(
                    f"'{self.path}' has no column '{column}'; its columns are {', '.join(map(repr, self.columns))} — "
                    f"name the right ones with {' / '.join(columns)}."
                )


def read_rows(path: Path, columns: dict[str, str]) -> list[dict]:
    """The rows of a .csv or .jsonl file as dicts, in file order; the file must have the ``columns`` (see
    ``Table.require``)."""
    table = read_table(path)
    table.require(columns)
    return table.rows


def read_table(path: Path) -> Table:
    """The rows of a .csv or .jsonl file, which must have one at least."""
    if not path.is_file():
        raise RankshareError(f"'{path}' is not a file; give a .csv or .jsonl file.")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise RankshareError(
            f"Cannot read '{path}': only .csv and .jsonl (one JSON object per line) files are supported, "
            f"not '{suffix}'."
        )
    table = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    if not table.rows:
        raise RankshareError(f"'{path}' has no rows; it needs one example per row.")
    return table


def decode(raw: bytes) -> str:
    # Files and corpora are mostly UTF-8, but some are in a single-byte encoding; Latin-1 decodes any bytes.
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_csv(path: Path) -> Table:
    reader = csv.DictReader(io.StringIO(decode(path.read_bytes())))
    rows = list(reader)
    return Table(path, rows, list(reader.fieldnames or []), [f"row {number}" for number in range(1, len(rows) + 1)])


def _read_jsonl(path: Path) -> Table:
    rows, columns, places = [], {}, []
    for number, line in enumerate(decode(path.read_bytes()).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RankshareError(
                f"Line {number} of '{path}' is not valid JSON ({error.msg}); fix or remove it."
            ) from None
        if not isinstance(record, dict):
            raise RankshareError(f"Line {number} of '{path}' is not a JSON object; write one {{...}} per line.")
        rows.append(record)
        places.append(f"line {number}")
        columns.update(dict.fromkeys(record))  # a dict keeps the columns in first-seen order
    return Table(path, rows, list(columns), places)
