"""Temperature sampling of many rows over a large vocabulary in three small Triton kernels.

The draft's sampled tree step without top-k / top-p (and Saguaro C = 1) needs, per row, the
distribution q = softmax(logits / T) — kept for verification — and one draw from it. Compiled by
torch.compile that was one program per row making three passes over the row (H200, 1B draft,
B = 16: 182 us per step, then 146 us for the race over q). Here the rows are cut into column
chunks as in ssd.engine.triton_sampling: (1) each chunk's max and sum of exp, and its argmax;
(2) each chunk combines its row's statistics, writes its part of q and races over it (the same
counter-hashed uniforms as sample_from_weights, so the draw is what sample_from_weights(q) draws);
(3) each row's best chunk. Greedy rows (T below GREEDY_TEMPERATURE_EPS) get the one-hot of their
argmax, which the race then picks.

With `ids` the logits are a restricted head's kept tokens only (column i: token ids[i]): q goes to the
tokens' columns of a vocabulary-wide row (the others stay as they are: zeros) and the race hashes the
token ids, so the token and q are exactly those of the -inf-filled full rows, read and written at a
fraction of the width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssd.engine.random import _GOLDEN32, _UNIFORM_BITS
from ssd.engine.triton_sampling import BLOCK_V, _race_pick_kernel, _race_score, _row_state, race_chunks, salt_state
from ssd.sampling_params import GREEDY_TEMPERATURE_EPS


@triton.jit
def _scaled(x_ptr, t_ptr, row, sx_r, cols, ok, EPS: tl.constexpr):
    """logits / T of one row's columns (T = 1 on greedy rows, whose argmax is then taken as is)."""
    t = tl.load(t_ptr + row)
    x = tl.load(x_ptr + row * sx_r + cols, mask=ok, other=float("-inf")).to(tl.float32)
    return x / tl.where(t < EPS, 1.0, t), t < EPS


@triton.jit
def _chunk_stats_kernel(x_ptr, t_ptr, stats_ptr, sx_r, V: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr, EPS: tl.constexpr):
    """stats [3, R, C]: the chunk's max of logits / T, sum of exp(logits / T - max), first argmax."""
    row, chunk, chunks = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    lane = tl.arange(0, BLOCK)
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    lane_arg = chunk * CHUNK + lane
    for offset in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + offset + lane
        v, _ = _scaled(x_ptr, t_ptr, row, sx_r, cols, cols < V, EPS)
        new_max = tl.maximum(lane_max, v)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)   # lanes that saw only padding
        lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(v - safe)
        lane_arg = tl.where(v > lane_max, cols, lane_arg)          # strictly: the earliest column on ties
        lane_max = new_max
    top = tl.max(lane_max, 0)
    # a chunk of -inf logits only (a restricted draft head's dropped tokens) sums to 0, not NaN
    total = tl.sum(lane_sum * tl.exp(lane_max - tl.where(top == float("-inf"), 0.0, top)), 0)
    first = tl.min(tl.where(lane_max == top, lane_arg, V + BLOCK), 0)
    slot = row * chunks + chunk
    rows = tl.num_programs(0) * chunks
    tl.store(stats_ptr + slot, top)
    tl.store(stats_ptr + rows + slot, total)
    tl.store(stats_ptr + 2 * rows + slot, first.to(tl.float32))   # exact below 2**24 columns


@triton.jit
def _write_and_race_kernel(x_ptr, t_ptr, stats_ptr, seed_ptr, counter_ptr, q_ptr, score_ptr, index_ptr, ids_ptr,
                           sx_r, sq_r, V: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_POW2: tl.constexpr,
                           BLOCK: tl.constexpr, EPS: tl.constexpr, SALT_STATE: tl.constexpr, GOLDEN: tl.constexpr,
                           SHIFT: tl.constexpr, SCALE: tl.constexpr, IDS: tl.constexpr):
    """q = exp(logits / T - M) / S over the chunk (one-hot of the argmax on greedy rows), stored, and
    the chunk's best q / E with its first token into score / index [R, C] (IDS: column i is token
    ids[i], increasing)."""
    row, chunk, chunks = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    rows = tl.num_programs(0) * chunks
    c = tl.arange(0, CHUNKS_POW2)
    c_ok = c < chunks
    chunk_max = tl.load(stats_ptr + row * chunks + c, mask=c_ok, other=float("-inf"))
    top = tl.max(chunk_max, 0)
    total = tl.sum(tl.load(stats_ptr + rows + row * chunks + c, mask=c_ok, other=0.0) * tl.exp(chunk_max - top), 0)
    chunk_arg = tl.load(stats_ptr + 2 * rows + row * chunks + c, mask=c_ok, other=0.0)
    argmax = tl.min(tl.where(c_ok & (chunk_max == top), chunk_arg, float(V)), 0).to(tl.int32)
    state = _row_state(seed_ptr, counter_ptr, row, SALT_STATE)
    lane = tl.arange(0, BLOCK)
    best_score = tl.full((BLOCK,), -1.0, tl.float32)
    best_index = chunk * CHUNK + lane
    for offset in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + offset + lane
        ok = cols < V
        v, greedy = _scaled(x_ptr, t_ptr, row, sx_r, cols, ok, EPS)
        q = tl.where(greedy, (cols == argmax).to(tl.float32), tl.exp(v - top) / total)
        if IDS:
            tokens = tl.load(ids_ptr + cols, mask=ok, other=0).to(tl.int32)   # loop-carried: one type
        else:
            tokens = cols
        tl.store(q_ptr + row * sq_r + tokens, q, mask=ok)
        score = _race_score(q, state, tokens, ok, GOLDEN, SHIFT, SCALE)
        better = score > best_score
        best_index = tl.where(better, tokens, best_index)
        best_score = tl.where(better, score, best_score)
    best = tl.max(best_score, 0)
    first = tl.min(tl.where(best_score == best, best_index, 2147483647), 0)   # the first token on ties
    tl.store(score_ptr + row * chunks + chunk, best)
    tl.store(index_ptr + row * chunks + chunk, first.to(tl.int64))


def temperature_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
                       salt: int, out: torch.Tensor | None = None, chunks: int | None = None,
                       ids: torch.Tensor | None = None,
                       vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (unit column stride); temperature, seed, counter [R]. Returns (tokens int64 [R],
    q float32 [R, V]) with q = softmax(logits / T) (one-hot argmax where greedy) written into out
    when given (rows may be strided), and tokens = sample_from_weights(q, seed, counter, salt).
    ids [V] (increasing token ids) with vocab_size: logits of those tokens only; q [R, vocab_size] is
    written at their columns only — out's other columns must hold zeros (a new q is zero-filled)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    width = vocab if ids is None else vocab_size
    if out is None:
        q = torch.empty((rows, width), dtype=torch.float32, device=logits.device) if ids is None \
            else torch.zeros((rows, width), dtype=torch.float32, device=logits.device)
    else:
        q = out
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    blocks = triton.cdiv(vocab, block)
    chunks = min(chunks or race_chunks(rows, blocks, logits.device), blocks)
    chunk = triton.cdiv(blocks, chunks) * block
    chunks = triton.cdiv(vocab, chunk)
    temperature = temperature.float().contiguous()
    stats = torch.empty((3, rows, chunks), dtype=torch.float32, device=logits.device)
    _chunk_stats_kernel[(rows, chunks)](logits, temperature, stats, logits.stride(0), V=vocab, CHUNK=chunk,
                                        BLOCK=block, EPS=GREEDY_TEMPERATURE_EPS)
    seed, counter = seed.long().contiguous(), counter.long().contiguous()
    score = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
    index = torch.empty((rows, chunks), dtype=torch.int64, device=logits.device)
    _write_and_race_kernel[(rows, chunks)](
        logits, temperature, stats, seed, counter, q, score, index, index if ids is None else ids, logits.stride(0),
        q.stride(0), V=vocab, CHUNK=chunk, CHUNKS_POW2=triton.next_power_of_2(chunks), BLOCK=block,
        EPS=GREEDY_TEMPERATURE_EPS, SALT_STATE=salt_state(salt), GOLDEN=_GOLDEN32, SHIFT=32 - _UNIFORM_BITS,
        SCALE=2.0 ** -(_UNIFORM_BITS + 1), IDS=ids is not None)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _race_pick_kernel[(rows,)](score, index, tokens, CHUNKS=chunks, CHUNKS_POW2=triton.next_power_of_2(chunks))
    return tokens, q
