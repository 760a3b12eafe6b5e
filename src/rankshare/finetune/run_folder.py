"""A run folder's files: reading a run's record, writing its JSON, and refusing an --out that holds results.

A run folder holds ``command.json`` (what was asked, so ``--resume`` can finish it) and, per method,
``run.json`` (how to rebuild the model; for an adapter trained on a LoTR basis, also the basis run and its
factors' fingerprint), the adapter, ``metrics.json`` and a training checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic_files import replace_file
from ..errors import RankshareError


def write_json(path: Path, data) -> None:
    replace_file(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RankshareError(f"--out {out} is a file; choose a folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RankshareError(f"--out {out} already holds results; choose another folder, add --overwrite, or "
                             "--resume it.")


def load_run(directory: Path, option: str = "--adapter") -> tuple[dict, Path]:
    """A run's record and folder: ``directory`` (given as ``option``) may be the run folder or its adapter
    folder."""
    for folder in (directory, directory.parent):
        if (folder / "run.json").is_file() and (folder / "adapter").is_dir():
            run = json.loads((folder / "run.json").read_text())
            if not isinstance(run.get("settings", {}).get("adapter"), dict):
                raise RankshareError(f"{folder}/run.json was written by an earlier rankshare, which recorded no "
                                     "adapter config in its settings; train the run again with this version.")
            return run, folder
    if (directory / "command.json").is_file():
        methods = sorted(p.name for p in directory.iterdir() if (p / "run.json").is_file())
        raise RankshareError(f"{option} {directory} holds a comparison; point {option} at one method's folder: "
                             f"{methods}.")
    raise RankshareError(f"{option} {directory} is not a rankshare run folder (no run.json and adapter/); give the "
                         "--out of a train run.")
