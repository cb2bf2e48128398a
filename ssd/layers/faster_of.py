"""Whichever of two implementations of one function runs faster on the GPU, measured per argument shapes.

The first is the reference: it runs on the CPU, for a shape not yet measured, and wherever the
second's outputs disagree with it. A shape is measured when first seen inside `measuring_shapes`
(the engine's CUDA-graph warm-ups, before capture), as MeasuredLinear does: a prompt of a new length
never stalls on timing.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ssd.engine.gpu_timing import graph_time_us

log = logging.getLogger(__name__)


@dataclass
class FasterOf:
    name: str
    first: Callable
    second: Callable
    agree: Callable[[tuple, tuple], bool]    # (first's outputs, second's outputs) -> whether they agree
    choices: dict = field(default_factory=dict)   # argument shapes -> the implementation that runs
    devices: tuple[str, ...] = ("cuda",)     # where the two are measured (elsewhere the first runs)
    measuring: bool = False                  # inside measuring_shapes

    def __call__(self, *args):
        if args[0].device.type not in self.devices:
            return self.first(*args)
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        choice = self.choices.get(key)
        if choice is None:
            if not self.measuring or (args[0].is_cuda and torch.cuda.is_current_stream_capturing()):
                return self.first(*args)
            choice = self.choices[key] = self._measure(args)
        return choice(*args)

    def measuring_shapes(self):
        return measuring_window(self)

    def _measure(self, args: tuple) -> Callable:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        try:
            agree = self.agree(self.first(*args), self.second(*args))
        except Exception as exc:   # e.g. a kernel this GPU or Triton version cannot compile
            log.warning("%s at %s: the second implementation failed (%s); the first runs", self.name, shapes, exc)
            return self.first
        if not agree:
            log.warning("%s at %s: the second implementation disagrees with the first; the first runs",
                        self.name, shapes)
            return self.first
        first_us, second_us = graph_time_us(lambda: self.first(*args)), graph_time_us(lambda: self.second(*args))
        log.info("%s at %s: %.1f us, %.1f us: the %s runs", self.name, shapes, first_us, second_us,
                 "second" if second_us < first_us else "first")
        return self.second if second_us < first_us else self.first


@contextmanager
def measuring_window(chooser):
    """chooser.measuring set while inside (a chooser measures new shapes only then)."""
    previous, chooser.measuring = chooser.measuring, True
    try:
        yield
    finally:
        chooser.measuring = previous
