"""Atomic file writing: a reader sees the old file or the new one in full, never a part of either."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` in full, then rename it over ``path``."""
    replace_together({Path(path): data})


def replace_together(files: dict[Path, bytes]) -> None:
    """Write every file in full beside its target, then rename each over its target, in order.

    Nothing is renamed before everything is written, so a writer that dies while writing changes no target.
    """
    temporaries: list[Path] = []
    try:
        for path, data in files.items():
            temporaries.append(_write_beside(path, data))
        for temporary, path in zip(temporaries, files):
            os.replace(temporary, path)
        _sync_directory(next(iter(files)).parent)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def _write_beside(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new hidden file next to ``path``, synced to disk; returns the new file."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    file = open(temporary, "xb")  # "x": never another's file; default permissions, unlike tempfile's 0600
    try:
        with file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _sync_directory(directory: Path) -> None:
    """Make the renames durable too; only POSIX systems can open a directory to sync it."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
