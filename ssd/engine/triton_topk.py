"""The draft filters' candidate tokens: about the k largest logits of each row (values sorted
descending, and their indices), in two Triton kernels. The draft's top-k / top-p filters look among
its 256 largest logits only (ssd.draft_worker.proposer.DRAFT_FILTER_CANDIDATES), and torch.topk's
radix select over 336 x 128k logits cost ~540 us per tree step at B = 16 on an H200 (four
digit-count passes, then a gather) — more than the step's token choice.

1. Every CHUNK consecutive logits of a row keep their PER_CHUNK largest (many programs per row, one
   read of the logits, no sort: PER_CHUNK rounds of max over a tile of chunks);
2. per row, those candidates are sorted in registers by (value, lower index first) and the first k
   taken.

That is exactly logits.topk(k)'s values whenever no CHUNK consecutive token ids hold more than
PER_CHUNK of the row's k largest (a chunk of 512 ids holds 1 of the top 256 of 128k on average);
otherwise the lowest of them are replaced by the next largest — a slightly different draft
distribution, never an inexact verification (the verifier is given the distribution the draft
sampled from). A radix select in one kernel (tl.histogram of 12-bit digits) was ~100x slower on
the H200: Triton's histogram compares every element with every bin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# a row of 128k logits gives 2008 candidates (a 2048-entry sort; 256-id chunks keeping 8 gave 4008,
# whose sort took 186 us per tree step at B = 16 on the H200, half of the selection)
CHUNK = 512        # consecutive token ids per chunk
PER_CHUNK = 8      # candidates each chunk keeps
TILE_CHUNKS = 8    # chunks per program of the first kernel


@triton.jit
def _order_key(x):
    """float32 -> uint32 with the same order (-inf lowest, above 0 = no candidate)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _chunk_candidates_kernel(x_ptr, out_ptr, sx_r, V: tl.constexpr, CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                             PER_CHUNK: tl.constexpr, TILE_CHUNKS: tl.constexpr):
    """out[row, c * PER_CHUNK + j] = the j-th largest of chunk c as (key << 32) | ~index (0: none)."""
    row, tile = tl.program_id(0), tl.program_id(1)
    chunk = tile * TILE_CHUNKS + tl.arange(0, TILE_CHUNKS)
    col = chunk[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    ok = (chunk[:, None] < CHUNKS) & (col < V)
    key = tl.where(ok, _order_key(tl.load(x_ptr + row.to(tl.int64) * sx_r + col, mask=ok, other=0.0)), 0)
    out = out_ptr + row.to(tl.int64) * (CHUNKS * PER_CHUNK) + chunk * PER_CHUNK
    for j in tl.static_range(PER_CHUNK):
        best = tl.max(key, 1)
        first = tl.min(tl.where(key == best[:, None], col, 2147483647), 1)   # lowest index among equals
        packed = (best.to(tl.uint64) << 32) | (0xFFFFFFFF - first.to(tl.uint32)).to(tl.uint64)
        tl.store(out + j, tl.where(best > 0, packed, 0), mask=chunk < CHUNKS)
        key = tl.where(col == first[:, None], 0, key)


@triton.jit
def _select_kernel(x_ptr, cand_ptr, value_ptr, index_ptr, sx_r, CANDIDATES: tl.constexpr, PADDED: tl.constexpr,
                   K: tl.constexpr):
    """Per row: the K largest (key, ~index) of its candidates, as values and indices."""
    row = tl.program_id(0)
    offs = tl.arange(0, PADDED)
    packed = tl.load(cand_ptr + row.to(tl.int64) * CANDIDATES + offs, mask=offs < CANDIDATES, other=0)
    packed = tl.sort(packed, descending=True)
    top = tl.arange(0, PADDED) < K
    index = (0xFFFFFFFF - (packed & 0xFFFFFFFF)).to(tl.int32)
    tl.store(index_ptr + row * K + offs, index, mask=top)
    tl.store(value_ptr + row * K + offs, tl.load(x_ptr + row.to(tl.int64) * sx_r + index, mask=top), mask=top)


def candidate_count(vocab: int) -> int:
    """Candidates a row of `vocab` logits yields (the last chunk may hold fewer than PER_CHUNK)."""
    full, rest = divmod(vocab, CHUNK)
    return full * PER_CHUNK + min(rest, PER_CHUNK)


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [R, V] (rows contiguous), k <= candidate_count(V) -> (values [R, k] sorted
    descending, indices [R, k] int64): logits.topk(k), up to the chunk bound of the module docstring."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError("top_candidates takes float32 logits with contiguous rows")
    chunks = triton.cdiv(vocab, CHUNK)
    candidates = chunks * PER_CHUNK
    if not 0 < k <= candidate_count(vocab):
        raise ValueError(f"k must be in 1..{candidate_count(vocab)}, got {k}")
    values = torch.empty((rows, k), dtype=torch.float32, device=logits.device)
    index = torch.empty((rows, k), dtype=torch.int32, device=logits.device)
    if rows:
        packed = torch.empty((rows, candidates), dtype=torch.uint64, device=logits.device)
        _chunk_candidates_kernel[(rows, triton.cdiv(chunks, TILE_CHUNKS))](
            logits, packed, logits.stride(0), V=vocab, CHUNKS=chunks, CHUNK=CHUNK, PER_CHUNK=PER_CHUNK,
            TILE_CHUNKS=TILE_CHUNKS, num_warps=4)
        _select_kernel[(rows,)](logits, packed, values, index, logits.stride(0), CANDIDATES=candidates,
                                PADDED=triton.next_power_of_2(candidates), K=k, num_warps=8)
    return values, index.long()


@torch.library.custom_op("ssd::top_candidates", mutates_args=())
def top_candidates_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_candidates of float32 [R, V], an opaque op for torch.compile: the Triton kernels on CUDA,
    logits.topk(k) elsewhere."""
    if logits.is_cuda and k <= candidate_count(logits.shape[-1]):
        return top_candidates(logits.contiguous(), k)
    values, index = logits.topk(k, dim=-1)
    return values, index


@top_candidates_op.register_fake
def _(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    return logits.new_empty((rows, k)), logits.new_empty((rows, k), dtype=torch.int64)
