"""Weight prefetch into the GPU's L2 cache on a side stream, beside a layer's latency-bound kernels.

At a few query rows (the draft's tree steps at small batch) a decoder layer alternates between
kernels that stream weights from memory (the MLP's GEMMs) and kernels bound by latency (RMSNorm,
RoPE, the attention and its small projections) during which the memory bus is mostly idle (H200,
1B draft, B = 1: ~25 us of a layer's ~62 us use well under a third of the bandwidth). While those
run, a side stream asks the L2 for the leading columns of the next GEMM's weight, so that GEMM
finds that part of its stream there. The prefetches are hints (PTX `prefetch.global.L2::evict_last`),
issued by a few programs and not waited for: nothing reads their result, nothing depends on them
for correctness, and the layer's kernels see the same data either way.

Which part of a weight: the first `cols` bytes of every row, so that every program of the GEMM
(each takes a block of rows over the whole K, in order) finds the same share of its loop in L2,
rather than some programs all of theirs and the rest none (those would then set the time).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

LINE = 128          # bytes per L2 line: one prefetch per line
PROGRAMS = 16       # prefetch programs (few: the layer's own kernels keep the other SMs)
BLOCK = 1024        # lines per program per iteration


def _prefetch_kernel():
    """The Triton kernel, built on first use (Triton and a GPU needed only where prefetch runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_rows(base, rows, row_stride, lines_per_row, BLOCK: tl.constexpr, LINE: tl.constexpr):
        """Line i (of rows * lines_per_row) is row i // lines_per_row, bytes (i % lines_per_row) * LINE."""
        total = rows * lines_per_row
        for start in range(tl.program_id(0) * BLOCK, total, tl.num_programs(0) * BLOCK):
            i = start + tl.arange(0, BLOCK)
            row, col = i // lines_per_row, i % lines_per_row
            offset = tl.where(i < total, row.to(tl.int64) * row_stride + col * LINE, 0)
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                      [base + offset], dtype=tl.int32, is_pure=False, pack=1)
    return prefetch_rows


def rows_and_columns(weight: torch.Tensor, budget_bytes: int) -> tuple[int, int]:
    """(rows, leading bytes per row) to prefetch of weight [N, K]: the budget spread evenly over
    the rows, in whole lines."""
    rows, row_bytes = weight.shape[0], weight.shape[-1] * weight.element_size()
    per_row = min(row_bytes, budget_bytes // max(rows, 1))
    return rows, per_row // LINE * LINE


@dataclass
class L2Prefetch:
    """Prefetches the first bytes of a weight (spread over its rows) into L2 on a side stream:
    `start(weight, budget)` forks the side stream off the current one and issues the prefetches,
    `join(device)` makes the current stream wait for it (before the weight's GEMM: in a CUDA graph,
    the fork and join become a branch of the graph). One per model. gate_up_bytes: the MLP's
    gate/up weight, beside the attention; down_bytes: its down weight, beside the gate/up GEMM."""
    gate_up_bytes: int
    down_bytes: int = 0
    _streams: dict = field(default_factory=dict)
    _kernel: object = None

    def start(self, weight: torch.Tensor, budget_bytes: int) -> bool:
        """Issue the prefetches on the side stream; False (nothing issued) off the GPU."""
        if not weight.is_cuda or budget_bytes <= 0:
            return False
        rows, cols = rows_and_columns(weight, budget_bytes)
        if cols == 0:
            return False
        if self._kernel is None:
            self._kernel = _prefetch_kernel()
        side = self._side_stream(weight.device)
        side.wait_stream(torch.cuda.current_stream(weight.device))
        with torch.cuda.stream(side):
            self._kernel[(PROGRAMS,)](weight.view(torch.uint8), rows, weight.stride(0) * weight.element_size(),
                                      cols // LINE, BLOCK=BLOCK, LINE=LINE, num_warps=4)
        return True

    def join(self, device: torch.device) -> None:
        torch.cuda.current_stream(device).wait_stream(self._side_stream(device))

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]
