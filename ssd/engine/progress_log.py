"""Log lines for long start-up work (graph capture timing kernels: minutes on a fresh machine)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ProgressLog:
    """`step()` once per item of `total`: a line "WHAT: done/total after N s (detail)" at most every
    `every_s` seconds while work is left, so a long start-up shows it is moving."""
    log: logging.Logger
    what: str
    total: int
    every_s: float = 15.0
    done: int = 0
    clock: Callable[[], float] = time.monotonic
    _start: float = field(default=0.0, repr=False)
    _last: float = field(default=0.0, repr=False)

    def __post_init__(self):
        self._start = self._last = self.clock()

    def step(self, detail: Callable[[], str] = lambda: "") -> None:
        self.done += 1
        now = self.clock()
        if self.done < self.total and now - self._last >= self.every_s:
            self.log.info("%s: %d/%d after %.0f s%s", self.what, self.done, self.total, now - self._start, detail())
            self._last = now
