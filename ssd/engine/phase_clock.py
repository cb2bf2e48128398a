"""Durations of the phases of a round. With all work on one CUDA device, phases end on the GPU
after the host returns, so they are measured with CUDA events (read once the round has synced);
otherwise the host clock is right (a remote draft's reply is awaited on the host)."""
from __future__ import annotations

import time

import torch


class PhaseClock:
    def __init__(self, device: torch.device, use_events: bool):
        self.use_events = use_events and device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_s(self) -> list[float]:
        """Seconds between consecutive marks (call after the work has synchronised)."""
        if self.use_events:
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
