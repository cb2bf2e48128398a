"""CUDA-graph capture that Python's cyclic garbage collector cannot break.

torch.cuda.graph no longer runs gc.collect() before it captures (torch.compiler.config.
force_cudagraph_gc is off by default), so a dead reference cycle — an earlier model with its CUDA
graphs and cuBLASLt handles, say — can be collected by an automatic GC pass in the middle of a
capture. Freeing those objects calls the driver (graph destruction, cublasLtDestroy), which a
capturing stream does not allow: the capture is invalidated ("operation failed due to a previous
error during capture"; seen once on an H200 when a benchmark built a second draft in one process).
With the collector paused for the capture, such cycles are collected between captures instead."""
from __future__ import annotations

import gc
from contextlib import contextmanager

import torch


@contextmanager
def gc_paused():
    """No automatic cyclic collection inside the block (reference counting still frees objects)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph, pool=None):
    """torch.cuda.graph(graph, pool) with the collector paused."""
    with gc_paused(), torch.cuda.graph(graph, pool=pool):
        yield
