"""Progress for people: a live bar on a terminal, a few whole lines in a log file.

A bar redraws itself with carriage returns, which a file keeps as fragments. When the output is not a
terminal, a line is written each time another tenth of the work is done, and between tenths at most one
every 30 seconds — each line whole.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LINE_SECONDS = 30.0


def progress(total: int, desc: str, unit: str, disable: bool = False, initial: int = 0, stream=None):
    """A tqdm bar on a terminal, a ``LineProgress`` elsewhere; with ``disable`` nothing is written."""
    stream = stream or sys.stderr
    if disable or stream.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                    file=stream)
    return LineProgress(total, desc, unit, initial, stream)


class LineProgress:
    """Whole progress lines, ``train lotr: 30/75 steps (40 %), 21 s, loss=0.5123``; tqdm's interface."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream=None) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream or sys.stderr
        self.done = self.shown = initial
        self.started = self.last_line = time.monotonic()
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def update(self, count: int = 1) -> None:
        self.done += count
        whole = self.total or 1
        if 10 * self.done // whole > 10 * self.shown // whole or time.monotonic() - self.last_line >= LINE_SECONDS:
            self._line()

    def close(self) -> None:
        if self.done != self.shown:
            self._line()

    def _line(self) -> None:
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        elapsed = time.monotonic() - self.started
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}{share}, {elapsed:.0f} s"
        print(text + (f", {self.postfix}" if self.postfix else ""), file=self.stream, flush=True)
        self.shown, self.last_line = self.done, time.monotonic()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
