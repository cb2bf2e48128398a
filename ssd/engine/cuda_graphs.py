"""CUDA graphs of the model forward, one per (batch bucket, tokens per row), captured once at start-up.

Rows beyond the real batch are ghost rows: they compute on free slots (the scheduler keeps the
live sequences in the leading slots) and their outputs are ignored."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ssd.engine.graph_capture import graph_capture
from ssd.engine.progress_log import ProgressLog

if TYPE_CHECKING:
    from ssd.engine.model_runner import ModelRunner
    from ssd.engine.runner_config import RunnerConfig

log = logging.getLogger(__name__)


def batch_buckets(sizes: tuple[int, ...], num_slots: int) -> list[int]:
    """The batch sizes captured: those below num_slots, and num_slots itself, so that every batch
    the engine may run has a graph (a batch is padded up to the next bucket)."""
    return sorted({b for b in sizes if b < num_slots} | {num_slots})


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(8, limit.bit_length() + 1)] + [limit]


@dataclass
class CapturedForward:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor   # [Bb, T]
    positions: torch.Tensor   # [Bb, T]
    logits: torch.Tensor      # [Bb, T, V]


class GraphPool:
    def __init__(self, runner: "ModelRunner", cfg: "RunnerConfig"):
        self.runner = runner
        self.buckets = batch_buckets(cfg.graph_batch_sizes, cfg.num_slots)
        self.widths = sorted({1, *cfg.window_sizes})
        self.attend_lens = sorted({runner.attend_bucket(n) for n in _powers_of_two(runner.max_len)})
        self.pool = None
        self.graphs: dict[tuple[int, int, int], CapturedForward] = {}
        total = len(self.buckets) * len(self.widths) * len(self.attend_lens)
        log.info("capturing %d CUDA graphs; kernels are timed per new shape first (on a fresh machine Triton "
                 "compiles them too: minutes; the choices are kept for the next start-up)", total)
        progress = ProgressLog(log, "CUDA graphs captured", total)
        for attend_len in reversed(self.attend_lens):  # largest first: smaller graphs reuse its memory
            for width in reversed(self.widths):
                for bucket in reversed(self.buckets):
                    self.graphs[bucket, width, attend_len] = self._capture(bucket, width, attend_len)
                    progress.step(runner.linear_summary)
        log.info("captured %d CUDA graphs (batch buckets %s, widths %s, attention lengths %s)%s",
                 len(self.graphs), self.buckets, self.widths, self.attend_lens, runner.linear_summary())

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def has(self, batch: int, width: int, attend_len: int) -> bool:
        bucket = self.bucket_for(batch)
        return bucket is not None and (bucket, width, attend_len) in self.graphs

    @torch.inference_mode()
    def _capture(self, bucket: int, width: int, attend_len: int) -> CapturedForward:
        device = self.runner.device
        ids = torch.zeros((bucket, width), dtype=torch.int64, device=device)
        pos = torch.arange(width, device=device).expand(bucket, width).contiguous()
        with self.runner.measuring_shapes():
            for _ in range(2):  # warm-up (also triggers torch.compile and the linears' measurements) before capture
                self.runner.run_forward(ids, pos, None, 0, attend_len)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, pool=self.pool):
            logits = self.runner.run_forward(ids, pos, None, 0, attend_len)
        self.pool = graph.pool()
        return CapturedForward(graph, ids, pos, logits)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, attend_len: int) -> torch.Tensor:
        batch, width = input_ids.shape
        g = self.graphs[self.bucket_for(batch), width, attend_len]
        g.input_ids[:batch].copy_(input_ids)
        g.positions[:batch].copy_(positions)
        if batch < g.positions.shape[0]:
            g.positions[batch:].zero_()
        g.graph.replay()
        return g.logits[:batch]
