"""The k largest logits of each row (values sorted descending, and their indices), in one Triton
kernel per call: the draft's top-k / top-p filters look among its 256 largest logits only
(ssd.draft_worker.proposer.DRAFT_FILTER_CANDIDATES), and torch.topk's radix select over 336 x 128k
logits cost ~540 us per tree step at B = 16 on an H200 (four digit-count passes of ~90 us, a
gather of ~170 us) — more than the step's token choice.

One program per row, a radix select on the order-preserving 32-bit key of each float: three passes
over the row count the keys per 12-, 12- and 8-bit digit (tl.histogram) among those that match
the digits found so far, which fixes the k-th largest key; a fourth pass writes every element
above it and, in index order, as many equal to it as are needed; the k entries are then sorted by
(key, lower index first) in registers. Ties at the k-th value are taken lowest index first (torch.topk
takes any of them): the values are the same.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
BINS = 4096   # 12-bit digits (the last pass uses 8 bits: 12 + 12 + 8 = 32)


@triton.jit
def _order_key(x):
    """float32 -> uint32 with the same order (-inf lowest; larger floats larger keys)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _digit_pass(row_ptr, V: tl.constexpr, prefix, remaining, SHIFT: tl.constexpr, WIDTH: tl.constexpr, FIRST: tl.constexpr,
                BLOCK: tl.constexpr, BINS: tl.constexpr):
    """Among the keys whose bits above SHIFT + WIDTH equal `prefix`, the WIDTH-bit digit at SHIFT
    that holds the `remaining`-th largest: returns (prefix extended by it, what remains to take
    among the keys with that digit)."""
    hist = tl.zeros((BINS,), dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < V
        key = _order_key(tl.load(row_ptr + offs, mask=ok, other=0.0))
        if not FIRST:
            ok = ok & ((key >> (SHIFT + WIDTH)) == prefix)
        digit = ((key >> SHIFT) & ((1 << WIDTH) - 1)).to(tl.int32)
        hist += tl.histogram(digit, BINS, mask=ok)
    above = tl.sum(hist, 0) - tl.cumsum(hist, 0)            # keys with a larger digit than each bin
    chosen = tl.sum((above >= remaining).to(tl.int32), 0)   # the bin holding the remaining-th largest
    taken = tl.sum(tl.where(tl.arange(0, BINS) == chosen, above, 0), 0)
    return (prefix << WIDTH) | chosen.to(tl.uint32), remaining - taken


@triton.jit
def _top_candidates_kernel(x_ptr, value_ptr, index_ptr, sx_r, V: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
                           BINS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = x_ptr + row.to(tl.int64) * sx_r
    prefix, remaining = _digit_pass(row_ptr, V, tl.full((), 0, tl.uint32), K, 20, 12, True, BLOCK, BINS)
    prefix, remaining = _digit_pass(row_ptr, V, prefix, remaining, 8, 12, False, BLOCK, BINS)
    threshold, remaining = _digit_pass(row_ptr, V, prefix, remaining, 0, 8, False, BLOCK, BINS)
    # every key above the threshold (K - remaining of them), then `remaining` equal to it, in index order
    above_count = K - remaining
    out_index = index_ptr + row * K
    taken_above, taken_equal = 0, 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < V
        key = _order_key(tl.load(row_ptr + offs, mask=ok, other=0.0))
        above, equal = ok & (key > threshold), ok & (key == threshold)
        slot_above = taken_above + tl.cumsum(above.to(tl.int32), 0) - 1
        slot_equal = taken_equal + tl.cumsum(equal.to(tl.int32), 0) - 1
        tl.store(out_index + slot_above, offs, mask=above)
        tl.store(out_index + above_count + slot_equal, offs, mask=equal & (slot_equal < remaining))
        taken_above += tl.sum(above.to(tl.int32), 0)
        taken_equal += tl.sum(equal.to(tl.int32), 0)
    tl.debug_barrier()   # the stores above are read back by other threads of the program
    index = tl.load(out_index + tl.arange(0, K))
    key = _order_key(tl.load(row_ptr + index))
    # sort by key, then lower index first: (key, ~index) packed into 64 bits, descending
    packed = (key.to(tl.uint64) << 32) | (0xFFFFFFFF - index.to(tl.uint32)).to(tl.uint64)
    packed = tl.sort(packed, descending=True)
    index = (0xFFFFFFFF - (packed & 0xFFFFFFFF)).to(tl.int32)
    tl.store(out_index + tl.arange(0, K), index)
    tl.store(value_ptr + row * K + tl.arange(0, K), tl.load(row_ptr + index))


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [R, V] (rows contiguous), k a power of two <= V -> (values [R, k] sorted
    descending, indices [R, k] int64), as logits.topk(k)."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError("top_candidates takes float32 logits with contiguous rows")
    if k & (k - 1) or not 0 < k <= min(vocab, BLOCK):
        raise ValueError(f"k must be a power of two in 1..{min(vocab, BLOCK)}, got {k}")
    values = torch.empty((rows, k), dtype=torch.float32, device=logits.device)
    index = torch.empty((rows, k), dtype=torch.int32, device=logits.device)
    if rows:
        _top_candidates_kernel[(rows,)](logits, values, index, logits.stride(0), V=vocab, K=k, BLOCK=BLOCK,
                                        BINS=BINS, num_warps=8)
    return values, index.long()


@torch.library.custom_op("ssd::top_candidates", mutates_args=())
def top_candidates_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits.topk(k) over the last dim of float32 [R, V], an opaque op for torch.compile: the
    Triton kernel on CUDA, torch.topk elsewhere (k not a power of two: torch.topk too)."""
    if logits.is_cuda and not k & (k - 1) and k <= min(logits.shape[-1], BLOCK):
        return top_candidates(logits.contiguous(), k)
    values, index = logits.topk(k, dim=-1)
    return values, index


@top_candidates_op.register_fake
def _(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    return logits.new_empty((rows, k)), logits.new_empty((rows, k), dtype=torch.int64)
