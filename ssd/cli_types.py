"""argparse value types shared by the command-line tools."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ssd.models.presets import PRESETS, is_preset
from ssd.output_files import output_file_problem


def at_least(minimum: int) -> Callable[[str], int]:
    """An int >= minimum; argparse refuses anything else naming the flag ("argument --n: must be >= 1, got 0")."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"   # argparse's word for a value that is no integer at all
    return parse


def writable_file(text: str) -> Path:
    """A result file that could be written, checked before long work ("argument --out: x: is a directory")."""
    path = Path(text)
    problem = output_file_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return path


writable_file.__name__ = "file path"


def preset_or_checkpoint(value: str) -> str:
    """A model given for its shapes: a random-weights preset name, or a checkpoint directory (its
    config.json gives the shapes)."""
    if is_preset(value) or (Path(value) / "config.json").is_file():
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                                     "directory with a config.json")
