"""argparse value types shared by the command-line tools."""
from __future__ import annotations

import argparse
from typing import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An int >= minimum; argparse refuses anything else naming the flag ("argument --n: must be >= 1, got 0")."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"   # argparse's word for a value that is no integer at all
    return parse
