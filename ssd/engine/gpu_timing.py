"""Device time of a small piece of GPU work, as it costs inside a CUDA graph.

Timing back-to-back eager calls of a few-microsecond kernel measures the host's launch rate, not
the kernel (a Triton launch costs more host time than a cuBLAS one), so the calls are captured in
one graph and the graph replayed."""
from __future__ import annotations

from typing import Callable

import torch

from ssd.engine.graph_capture import graph_capture


def graph_time_us(fn: Callable[[], object], calls: int = 10, replays: int = 5) -> float:
    """Microseconds per call of fn, captured `calls` times back to back in one CUDA graph."""
    fn()  # compiles / allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with graph_capture(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (replays * calls)
