"""Token choice over the vocabulary in Triton: the exponential race of `sample_from_weights`, and
the greedy argmax (the same kernel without the random numbers).

In PyTorch the race draws one counter-hashed uniform per (row, vocabulary entry) through ~20
elementwise int64 kernels, each a full pass over [rows, V]: at the draft's tree step with B = 16
(336 rows x 128k entries) that was ~18 ms of a 80 ms sampled round on an H200. Here one program
per row walks its weights once, hashing in registers (uint32 arithmetic is the same function as
the int64-emulated mod-2**32 one of ssd.engine.random), and keeps the running best score. Rows
are cut into column chunks, one program each, so that a few rows still fill the GPU; a second
small kernel takes each row's best chunk (H200, 21 rows x 128k: the race took ~126 us per tree step
in one program per row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssd.engine.random import _GOLDEN32, _MASK32, _UNIFORM_BITS, _mix32 as _mix32_host

BLOCK_V = 2048
# H200, graph-timed (results/sampling_kernels_sweep_h200.json): 336 rows x 128k in 2 chunks (4 per SM)
# argmax 36 / race 240 / temperature 400 us, in 8 chunks 27 / 207 / 336; 21 rows change by < 5 %
PROGRAMS_PER_SM = 16


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (wrapping multiplies, logical shifts): ssd.engine.random._mix32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_state(seed_ptr, counter_ptr, row, SALT_STATE: tl.constexpr):
    """ssd.engine.random._row_hash of (seed[row], counter[row]) in uint32, in the kernel (in PyTorch
    it was ~45 small int64 kernels, ~57 us per tree step): from the salt's state (host), the seed's
    low and high words, then the counter's high and low words."""
    seed, counter = tl.load(seed_ptr + row), tl.load(counter_ptr + row)   # int64; >> is arithmetic
    state = _mix32(tl.full((), SALT_STATE, tl.uint32) ^ (seed & 0xFFFFFFFF).to(tl.uint32))
    state = _mix32(state ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    state = _mix32(state ^ ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return _mix32(state ^ (counter & 0xFFFFFFFF).to(tl.uint32))


def salt_state(salt: int) -> int:
    """The hash state after the salt, before seed and counter (as _row_hash starts)."""
    return int(_mix32_host((salt & _MASK32) ^ _GOLDEN32))


@triton.jit
def _race_score(w, state, cols, ok, GOLDEN: tl.constexpr, SHIFT: tl.constexpr, SCALE: tl.constexpr):
    """w / E with E = -log u, u the uniform hashed from (row state, column); -1 past the row's end."""
    bits = _mix32(state ^ _mix32(cols.to(tl.uint32) * GOLDEN)) >> SHIFT
    return tl.where(ok, w / -tl.log((bits * 2 + 1).to(tl.float32) * SCALE), -1.0)


@triton.jit
def _race_chunk_kernel(w_ptr, seed_ptr, counter_ptr, score_ptr, index_ptr, sw_r, V: tl.constexpr,
                       CHUNK: tl.constexpr, SALT_STATE: tl.constexpr, GOLDEN: tl.constexpr, SHIFT: tl.constexpr,
                       SCALE: tl.constexpr, BLOCK: tl.constexpr, RACE: tl.constexpr):
    """Program (r, c): the best w[r, i] / E[r, i] over columns c*CHUNK .. (c+1)*CHUNK - 1 (E = -log u,
    u from (row state, column i)) and its column, the first on ties, into score / index [R, C].
    RACE False: the best w[r, i] itself (an argmax; state unused). Each lane keeps its own best
    (the earliest on ties: columns come in order) and the lanes are reduced once at the end: a
    reduction per block made the loop latency-bound (H200, 336 rows: 1.5 TB/s)."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    best_score = tl.full((BLOCK,), -1.0 if RACE else float("-inf"), tl.float32)
    best_index = chunk * CHUNK + lane
    if RACE:
        state = _row_state(seed_ptr, counter_ptr, row, SALT_STATE)
    for offset in range(0, CHUNK, BLOCK):
        start = chunk * CHUNK + offset
        cols = start + lane
        ok = cols < V
        if RACE:
            w = tl.load(w_ptr + row * sw_r + cols, mask=ok, other=0.0)
            score = _race_score(w, state, cols, ok, GOLDEN, SHIFT, SCALE)
        else:
            score = tl.load(w_ptr + row * sw_r + cols, mask=ok, other=float("-inf")).to(tl.float32)
        better = score > best_score               # strictly: an earlier column keeps a tie
        best_index = tl.where(better, cols, best_index)
        best_score = tl.where(better, score, best_score)
    top = tl.max(best_score, 0)
    first = tl.min(tl.where(best_score == top, best_index, CHUNK * tl.num_programs(1) + BLOCK), 0)
    slot = row * tl.num_programs(1) + chunk
    tl.store(score_ptr + slot, top)
    tl.store(index_ptr + slot, first.to(tl.int64))


@triton.jit
def _race_pick_kernel(score_ptr, index_ptr, out_ptr, CHUNKS: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    """out[r] = the index of row r's best chunk, the first chunk on ties (so the first column overall)."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_POW2)
    score = tl.load(score_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
    best = tl.argmax(score, 0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(index_ptr + row * CHUNKS + best))


def race_chunks(rows: int, blocks: int, device: torch.device) -> int:
    """Column chunks per row: enough (row, chunk) programs to fill the GPU about PROGRAMS_PER_SM deep.
    One program per row left most SMs idle at the draft's B=1 tree step (21 rows: ~126 us on an H200)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * sms, rows)))


def exponential_race(weights: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, salt: int,
                     chunks: int | None = None) -> torch.Tensor:
    """As ssd.engine.sampler.sample_from_weights: weights [..., V] >= 0; seed, counter broadcast to
    weights.shape[:-1]; chunks: column chunks per row (default race_chunks). Returns int64 [...]."""
    lead, vocab = weights.shape[:-1], weights.shape[-1]
    seed, counter = torch.broadcast_tensors(seed.long(), counter.long())
    seed, counter = (t.expand(lead).reshape(-1).contiguous() for t in (seed, counter))
    w = weights.reshape(-1, vocab).float()
    if w.stride(-1) != 1:
        w = w.contiguous()
    return _best_per_row(w, (seed, counter, salt_state(salt)), chunks).view(lead)


def chunked_argmax(logits: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """logits.argmax(-1) (the first largest; floating dtypes, no NaN): [..., V] -> int64 [...]."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, vocab)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _best_per_row(x, None, chunks).view(lead)


def _best_per_row(w: torch.Tensor, race: tuple | None, chunks: int | None) -> torch.Tensor:
    """Per row of w [R, V] (unit column stride): the first column of the best score, in (row, chunk)
    programs and a pick over each row's chunks. race: (seed [R], counter [R] int64, salt_state) for
    the exponential race; None for a plain argmax."""
    (rows, vocab), block = w.shape, min(BLOCK_V, triton.next_power_of_2(w.shape[1]))
    blocks = triton.cdiv(vocab, block)
    chunks = min(chunks or race_chunks(rows, blocks, w.device), blocks)
    chunk = triton.cdiv(blocks, chunks) * block
    chunks = triton.cdiv(vocab, chunk)
    score = torch.empty((rows, chunks), dtype=torch.float32, device=w.device)
    index = torch.empty((rows, chunks), dtype=torch.int64, device=w.device)
    seed, counter, state = race if race is not None else (w, w, 0)   # unused by an argmax
    _race_chunk_kernel[(rows, chunks)](
        w, seed, counter, score, index, w.stride(0), V=vocab, CHUNK=chunk, SALT_STATE=state, GOLDEN=_GOLDEN32,
        SHIFT=32 - _UNIFORM_BITS, SCALE=2.0 ** -(_UNIFORM_BITS + 1), BLOCK=block, RACE=race is not None)
    out = torch.empty(rows, dtype=torch.int64, device=w.device)
    _race_pick_kernel[(rows,)](score, index, out, CHUNKS=chunks, CHUNKS_POW2=triton.next_power_of_2(chunks))
    return out
