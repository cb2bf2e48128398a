"""Checking, before long work starts, that a result file could be written where the user asked."""
from __future__ import annotations

import os
from pathlib import Path


def output_file_problem(path: Path) -> str | None:
    """Why `path` could not be written (missing parent directories are fine: they are made), or None."""
    if path.is_dir():
        return "is a directory; give a file name"
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(path if path.exists() else existing, os.W_OK):
        return "not writable"
    return None
