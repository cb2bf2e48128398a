"""The draft filters' candidate tokens: about the k largest logits of each row (values sorted
descending, and their indices), in two Triton kernels. The draft's top-k / top-p filters look among
its 256 largest logits only (ssd.draft_worker.proposer.DRAFT_FILTER_CANDIDATES), and torch.topk's
radix select over 336 x 128k logits cost ~540 us per tree step at B = 16 on an H200 (four
digit-count passes, then a gather) — more than the step's token choice.

1. every chunk of consecutive logits of a row (chunk_width: 512 at 128k) keeps its PER_CHUNK
   largest (many programs per row, one read of the logits, no sort: PER_CHUNK rounds of max over a
   tile of chunks);
2. per row, those candidates are sorted in registers by (value, lower index first) and the first k
   taken.

`scaled_top_candidates` does the same for logits / T (per-row temperature, divided as they are
loaded) and also returns each row's log-sum-exp, combined from every chunk's max and sum of exp in
the second kernel: the filtered draft step needs no scaled copy of the logits and no logsumexp
pass of its own (H200, 1B draft, B = 16 tree step: that pass took 111 us).

That is exactly logits.topk(k)'s values whenever no chunk holds more than PER_CHUNK of the row's
k largest (a chunk of 512 ids holds 1 of the top 256 of 128k on average); otherwise the lowest of
them are replaced by the next largest — a slightly different draft distribution, never an inexact
verification (the verifier is given the distribution the draft sampled from). A radix select in
one kernel (tl.histogram of 12-bit digits) was ~100x slower on the H200: Triton's histogram
compares every element with every bin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssd.sampling_params import GREEDY_TEMPERATURE_EPS

# a row of 128k logits gives 2008 candidates (a 2048-entry sort; 256-id chunks keeping 8 gave 4008,
# whose sort took 186 us per tree step at B = 16 on the H200, half of the selection)
CHUNK = 512        # consecutive token ids per chunk, at most
MIN_CHUNK = 64
PER_CHUNK = 8      # candidates each chunk keeps
TILE_CHUNKS = 8    # chunks per program of the first kernel


@triton.jit
def _order_key(x):
    """float32 -> uint32 with the same order (-inf lowest, above 0 = no candidate)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _scaled_load(x_ptr, t_ptr, row, offsets, ok, SCALED: tl.constexpr, EPS: tl.constexpr):
    """float32 logits of one row (SCALED: divided by the row's temperature T, T = 1 below EPS —
    greedy rows —, as probs_from_logits divides them)."""
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if SCALED:
        t = tl.load(t_ptr + row)
        x = x / tl.where(t < EPS, 1.0, t)
    return x


@triton.jit
def _chunk_candidates_kernel(x_ptr, t_ptr, out_ptr, stats_ptr, sx_r, V: tl.constexpr, CHUNKS: tl.constexpr,
                             CHUNK: tl.constexpr, PER_CHUNK: tl.constexpr, TILE_CHUNKS: tl.constexpr,
                             SCALED: tl.constexpr, EPS: tl.constexpr):
    """out[row, c * PER_CHUNK + j] = the j-th largest of chunk c as (key << 32) | ~index (0: none).
    SCALED: of the temperature-scaled logits, and stats[row, 0 / 1, c] = chunk c's max and sum of
    exp(x - max) (0 for a chunk of -inf only), for the row's log-sum-exp."""
    row, tile = tl.program_id(0), tl.program_id(1)
    chunk = tile * TILE_CHUNKS + tl.arange(0, TILE_CHUNKS)
    col = chunk[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    ok = (chunk[:, None] < CHUNKS) & (col < V)
    x = _scaled_load(x_ptr, t_ptr, row, row.to(tl.int64) * sx_r + col, ok, SCALED, EPS)
    if SCALED:
        x_in = tl.where(ok, x, float("-inf"))
        chunk_max = tl.max(x_in, 1)
        finite = chunk_max > float("-inf")
        chunk_sum = tl.sum(tl.exp(x_in - tl.where(finite, chunk_max, 0.0)[:, None]), 1)
        stats = stats_ptr + row.to(tl.int64) * 2 * CHUNKS + chunk
        tl.store(stats, chunk_max, mask=chunk < CHUNKS)
        tl.store(stats + CHUNKS, tl.where(finite, chunk_sum, 0.0), mask=chunk < CHUNKS)
    key = tl.where(ok, _order_key(x), 0)
    out = out_ptr + row.to(tl.int64) * (CHUNKS * PER_CHUNK) + chunk * PER_CHUNK
    for j in tl.static_range(PER_CHUNK):
        best = tl.max(key, 1)
        first = tl.min(tl.where(key == best[:, None], col, 2147483647), 1)   # lowest index among equals
        packed = (best.to(tl.uint64) << 32) | (0xFFFFFFFF - first.to(tl.uint32)).to(tl.uint64)
        tl.store(out + j, tl.where(best > 0, packed, 0), mask=chunk < CHUNKS)
        key = tl.where(col == first[:, None], 0, key)


@triton.jit
def _select_kernel(x_ptr, t_ptr, cand_ptr, stats_ptr, value_ptr, index_ptr, lse_ptr, sx_r, CANDIDATES: tl.constexpr,
                   PADDED: tl.constexpr, K: tl.constexpr, CHUNKS: tl.constexpr, PADDED_CHUNKS: tl.constexpr,
                   SCALED: tl.constexpr, EPS: tl.constexpr):
    """Per row: the K largest (key, ~index) of its candidates, as values and indices; SCALED: of
    the temperature-scaled logits, and lse[row] their log-sum-exp from the chunks' stats."""
    row = tl.program_id(0)
    offs = tl.arange(0, PADDED)
    packed = tl.load(cand_ptr + row.to(tl.int64) * CANDIDATES + offs, mask=offs < CANDIDATES, other=0)
    packed = tl.sort(packed, descending=True)
    top = tl.arange(0, PADDED) < K
    index = (0xFFFFFFFF - (packed & 0xFFFFFFFF)).to(tl.int32)
    tl.store(index_ptr + row * K + offs, index, mask=top)
    value = _scaled_load(x_ptr, t_ptr, row, row.to(tl.int64) * sx_r + index, top, SCALED, EPS)
    tl.store(value_ptr + row * K + offs, value, mask=top)
    if SCALED:
        c = tl.arange(0, PADDED_CHUNKS)
        stats = stats_ptr + row.to(tl.int64) * 2 * CHUNKS + c
        chunk_max = tl.load(stats, mask=c < CHUNKS, other=float("-inf"))
        chunk_sum = tl.load(stats + CHUNKS, mask=c < CHUNKS, other=0.0)
        row_max = tl.max(chunk_max, 0)
        shift = tl.where(row_max > float("-inf"), row_max, 0.0)
        total = tl.sum(tl.where(chunk_sum > 0, chunk_sum * tl.exp(chunk_max - shift), 0.0), 0)
        tl.store(lse_ptr + row, row_max + tl.log(total))


def chunk_width(vocab: int, k: int) -> int:
    """Consecutive ids per chunk for the k largest of `vocab`. k <= PER_CHUNK: CHUNK (exact at any
    width; the fewest candidates). Larger k: about k chunks (PER_CHUNK x k candidates a row), so that
    a chunk holds one of the k largest on average at every vocabulary and every k — a restricted
    head's 32k kept logits get 128-id chunks for 256 (512-id ones would leave 512 candidates for the
    256 largest: crowded chunks in most rows), while the fork graphs' top 22 keeps 512-id ones (128-id
    chunks there made its sort of 2048 candidates cost 25 us more per round on an H100)."""
    if k <= PER_CHUNK:
        return CHUNK
    return max(MIN_CHUNK, min(CHUNK, triton.next_power_of_2(triton.cdiv(vocab, k))))


def candidate_count(vocab: int, k: int) -> int:
    """Candidates a row of `vocab` logits yields for its k largest (the last chunk may hold fewer
    than PER_CHUNK)."""
    full, rest = divmod(vocab, chunk_width(vocab, k))
    return full * PER_CHUNK + min(rest, PER_CHUNK)


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [R, V] (rows contiguous), k <= candidate_count(V, k) -> (values [R, k] sorted
    descending, indices [R, k] int64): logits.topk(k), up to the chunk bound of the module docstring."""
    if logits.dtype != torch.float32:
        raise ValueError("top_candidates takes float32 logits with contiguous rows")
    values, index, _ = _run(logits, None, k)
    return values, index


def scaled_top_candidates(logits: torch.Tensor, temperature: torch.Tensor,
                          k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] (float32, bfloat16 or float16; rows contiguous), temperature float32 [R] ->
    top_candidates of scaled = logits.float() / T (T = 1 where below GREEDY_TEMPERATURE_EPS) and
    scaled.logsumexp(-1) [R] float32, in the same two kernels: the scaled logits are never
    written, and their log-sum-exp costs no pass of its own."""
    return _run(logits, temperature, k)


def _run(logits: torch.Tensor, temperature: torch.Tensor | None, k: int):
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("top_candidates takes logits with contiguous rows")
    chunk = chunk_width(vocab, k)
    chunks = triton.cdiv(vocab, chunk)
    candidates = chunks * PER_CHUNK
    if not 0 < k <= candidate_count(vocab, k):
        raise ValueError(f"k must be in 1..{candidate_count(vocab, k)}, got {k}")
    device, scaled = logits.device, temperature is not None
    values = torch.empty((rows, k), dtype=torch.float32, device=device)
    index = torch.empty((rows, k), dtype=torch.int32, device=device)
    lse = torch.empty((rows,), dtype=torch.float32, device=device)
    if rows:
        packed = torch.empty((rows, candidates), dtype=torch.uint64, device=device)
        stats = torch.empty((rows, 2, chunks) if scaled else (1,), dtype=torch.float32, device=device)
        t = temperature.float().contiguous() if scaled else values
        _chunk_candidates_kernel[(rows, triton.cdiv(chunks, TILE_CHUNKS))](
            logits, t, packed, stats, logits.stride(0), V=vocab, CHUNKS=chunks, CHUNK=chunk, PER_CHUNK=PER_CHUNK,
            TILE_CHUNKS=TILE_CHUNKS, SCALED=scaled, EPS=GREEDY_TEMPERATURE_EPS, num_warps=4)
        _select_kernel[(rows,)](logits, t, packed, stats, values, index, lse, logits.stride(0), CANDIDATES=candidates,
                                PADDED=triton.next_power_of_2(candidates), K=k, CHUNKS=chunks,
                                PADDED_CHUNKS=triton.next_power_of_2(chunks), SCALED=scaled,
                                EPS=GREEDY_TEMPERATURE_EPS, num_warps=8)
    return values, index.long(), lse


@torch.library.custom_op("ssd::top_candidates", mutates_args=())
def top_candidates_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_candidates of float32 [R, V], an opaque op for torch.compile: the Triton kernels on CUDA,
    logits.topk(k) elsewhere."""
    if logits.is_cuda and k <= candidate_count(logits.shape[-1], k):
        return top_candidates(logits.contiguous(), k)
    values, index = logits.topk(k, dim=-1)
    return values, index


@top_candidates_op.register_fake
def _(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    return logits.new_empty((rows, k)), logits.new_empty((rows, k), dtype=torch.int64)


@torch.library.custom_op("ssd::scaled_top_candidates", mutates_args=())
def scaled_top_candidates_op(logits: torch.Tensor, temperature: torch.Tensor,
                             k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scaled_top_candidates as an opaque op for torch.compile: the Triton kernels on CUDA, PyTorch
    (topk and logsumexp of the scaled logits) elsewhere."""
    if logits.is_cuda and k <= candidate_count(logits.shape[-1], k):
        return scaled_top_candidates(logits.contiguous(), temperature, k)
    from ssd.engine.sampler import scaled_topk_reference   # (the sampler imports this module lazily)
    return scaled_topk_reference(logits, temperature, k)


@scaled_top_candidates_op.register_fake
def _(logits: torch.Tensor, temperature: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = logits.shape[0]
    return (logits.new_empty((rows, k), dtype=torch.float32), logits.new_empty((rows, k), dtype=torch.int64),
            logits.new_empty((rows,), dtype=torch.float32))
