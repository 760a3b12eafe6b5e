"""Progress in a log file: whole lines, at most one per tenth of the work (and one per 30 s between tenths)."""

from __future__ import annotations

import io
import subprocess
import sys

from rankshare.finetune import progress as progress_module
from rankshare.finetune.progress import LineProgress, progress
from test_cli import common, topics_csv  # noqa: F401 (a fixture)


def test_a_file_gets_one_whole_line_per_tenth():
    stream = io.StringIO()
    with progress(75, "train lotr", "steps", stream=stream) as bar:
        for step in range(75):
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
            bar.update()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) == 10  # at 8 of 75 (a tenth passed), 15, 23, …, 75
    assert lines[0] == "train lotr: 8/75 steps (11 %), 0 s, loss=0.1250"
    assert lines[-1].startswith("train lotr: 75/75 steps (100 %)")


def test_slow_work_gets_a_line_every_30_seconds(monkeypatch):
    clock = iter(range(0, 10_000, 20))  # 20 s per call
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = LineProgress(1000, "eval test", "examples", stream=stream)
    for _ in range(5):
        bar.update()
    bar.close()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "eval test: 2/1000 examples (0 %)", "eval test: 4/1000 examples (0 %)", "eval test: 5/1000 examples (0 %)"]


def test_disabled_writes_nothing():
    stream = io.StringIO()
    with progress(10, "x", "steps", disable=True, stream=stream) as bar:
        bar.update(10)
    assert stream.getvalue() == ""


def test_train_into_a_log_file(tiny_bert, topics_csv, tmp_path):  # noqa: F811
    args = [sys.executable, "-m", "rankshare.cli", "train", "--method", "lotr", "--rank", "2",
            *map(str, common(tiny_bert, topics_csv)), "--out", str(tmp_path / "run")]
    quiet = subprocess.run(args, capture_output=True, text=True)
    assert quiet.returncode == 0 and "\r" not in quiet.stderr and "steps" not in quiet.stderr
    args.remove("--quiet")
    args[-1] = str(tmp_path / "loud")
    loud = subprocess.run(args, capture_output=True, text=True)
    assert loud.returncode == 0 and "\r" not in loud.stderr
    train_lines = [line for line in loud.stderr.splitlines() if line.startswith("train lotr:")]
    assert 1 <= len(train_lines) <= 10 and train_lines[-1].startswith("train lotr: 18/18 steps (100 %)")
