"""The draft's whole answer to an outcome as one Triton kernel (one program per sequence): settle
the round into the token history, find the cached branch (or, on profile replay, the branch of the
replayed rank), and where it missed take the n-gram proposal from the history just written.

On the GPU host the answer is launch-bound: ~1 us of GPU work spread over many small kernels. As
PyTorch ops (settle + lookup + backup + the next window: ~35-80 launches) a hit took 0.8-1.0 ms and
a `fast` miss more; compiled by torch.compile, 0.46 ms (hit) and 0.66-1.0 ms (miss), seven kernels
and the compiled regions' guards (H200, `python bench/draft_round_bench.py --preset llama-3.2-1b`,
outcome_hit_ms / outcome_miss_fast_ms). Here it is one launch, which also writes the packed reply
(tokens, hit, recovered, timings) and what the draft keeps into one AnswerBuffer: the reply leaves
as it is, and only the `jit` backup reads `hit` back before it does.
ssd.draft_worker.outcome_lookup holds the PyTorch version the tests hold this one to.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssd.draft_worker.answer_buffer import AnswerBuffer
from ssd.draft_worker.protocol import REPLY_TIMINGS
from ssd.spec.ngram import DEFAULT_N


@triton.jit
def _latest_match_end(row, length, M: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr):
    """End (exclusive) of the latest occurrence of the row's last M tokens ending before its last
    token, or -1 (ssd.spec.ngram._latest_match_end)."""
    latest = tl.full((), -1, tl.int32)
    if L > M:
        for start in range(0, L - M + 1, BLOCK_L):
            s = start + tl.arange(0, BLOCK_L)
            match = (s <= L - M) & (s + M <= length - 1)
            for j in tl.static_range(M):
                suffix = tl.load(row + tl.maximum(length - M + j, 0))
                match = match & (tl.load(row + s + j, mask=match, other=0) == suffix)
            latest = tl.maximum(latest, tl.max(tl.where(match, s, -1), axis=0))
    return tl.where(latest >= 0, latest + M, -1)


@triton.jit
def _ngram_tokens(row, length, i, K: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr, NGRAM_N: tl.constexpr):
    """ssd.spec.ngram.ngram_propose for one row: K tokens copied after the latest match of its last
    NGRAM_N, ..., 1 tokens (longest first), repeating with the period the match implies."""
    length = tl.minimum(tl.maximum(length, 0), L).to(tl.int32)
    copy_from = tl.maximum(length - 1, 0)
    found = length < 0   # False
    for m in tl.static_range(NGRAM_N, 0, -1):
        end = _latest_match_end(row, length, m, L, BLOCK_L)
        use = (found == 0) & (end >= 0)
        copy_from = tl.where(use, end, copy_from)
        found = found | use
    period = tl.maximum(length - copy_from, 1)
    return tl.load(row + copy_from + i % period, mask=i < K, other=0)


@triton.jit
def _answer_outcome_kernel(history_ptr, window_ptr, window_len_ptr, outcome_ptr, valid_ptr, fork_ptr, rank_ptr,
                           guess_ptr, tokens_ptr, out_ptr, timings_ptr, history_stride, outcome_stride, N, B,
                           build_s, idle_s, backup_code, K: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, REPLAY: tl.constexpr,
                           NGRAM: tl.constexpr, NGRAM_N: tl.constexpr, TIMINGS: tl.constexpr):
    """Program b answers row b into out (answer_buffer's layout; outcome rows: protocol.OUTCOME_ROWS);
    program 0 also writes the reply's timings (timings_ptr: the same buffer as float64)."""
    b = tl.program_id(0)
    accepted = tl.load(outcome_ptr + b)
    recovered = tl.load(outcome_ptr + outcome_stride + b)
    length = tl.load(outcome_ptr + 3 * outcome_stride + b)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    match = n_ok & (tl.load(valid_ptr + b * N + n, mask=n_ok, other=0) != 0)
    match = match & (tl.load(fork_ptr + n, mask=n_ok, other=-1) == accepted)
    if REPLAY:   # the branch holding the replayed rank (guess ordinal = rank - 1 before the last position)
        rank = tl.load(outcome_ptr + 4 * outcome_stride + b)
        ordinal = tl.where(accepted < K, rank - 1, rank)
        match = match & (tl.load(rank_ptr + n, mask=n_ok, other=-1) == ordinal)
    else:
        match = match & (tl.load(guess_ptr + b * N + n, mask=n_ok, other=-1) == recovered)
    first = tl.min(tl.where(match, n, BLOCK_N), axis=0)
    hit = first < BLOCK_N
    branch = tl.where(hit, first, 0)
    if REPLAY:
        recovered = tl.where(hit, tl.load(guess_ptr + b * N + branch), recovered)

    # settle: the window's drafts at window_len.., then the recovered token at window_len + accepted
    i = tl.arange(0, BLOCK_K)
    row = history_ptr + b * history_stride
    window_len = tl.load(window_len_ptr + b)
    drafts = tl.load(window_ptr + b * (K + 1) + 1 + i, mask=i < K)
    tl.store(row + tl.minimum(window_len + i, L - 1), drafts, mask=i < K)
    tl.debug_barrier()
    tl.store(row + tl.minimum(window_len + accepted, L - 1), recovered)

    proposal = tl.load(tokens_ptr + (b * N + branch) * K + i, mask=i < K, other=0)
    if NGRAM:
        tl.debug_barrier()   # the history just written is read back by every thread
        proposal = tl.where(hit, proposal, _ngram_tokens(row, length, i, K, L, BLOCK_L, NGRAM_N))
    # the reply: tokens [B, K], hit [B], recovered [B], timings; then branch, window [B, K+1], lengths, accepted
    tl.store(out_ptr + b * K + i, proposal, mask=i < K)
    tl.store(out_ptr + B * K + b, hit.to(tl.int64))
    tl.store(out_ptr + B * (K + 1) + b, recovered)
    kept = out_ptr + B * (K + 2) + TIMINGS
    tl.store(kept + b, branch)
    tl.store(kept + B + b * (K + 1), recovered)   # the next window: [recovered, proposal]
    tl.store(kept + B + b * (K + 1) + 1 + i, proposal, mask=i < K)
    tl.store(kept + B * (K + 2) + b, length)
    tl.store(kept + B * (K + 3) + b, accepted)
    if b == 0:
        times = timings_ptr + B * (K + 2)
        tl.store(times, build_s)   # float32 arguments, stored as float64
        tl.store(times + 1, 0.0)   # backup time: the host's drafting of misses (jit) rewrites it
        tl.store(times + 2, idle_s)
        tl.store(times + 3, backup_code)


def answer_outcome_kernel(history, window, window_lengths, outcome, valid, fork, rank, guess, tokens,
                          replay: bool = False, ngram: bool = False, timings: tuple[float, float, int] = (0.0, 0.0, 0),
                          ngram_n: int = DEFAULT_N) -> AnswerBuffer:
    """ssd.draft_worker.outcome_lookup.answer_outcome in one launch (N >= 1 branches), into a new
    AnswerBuffer. outcome [OUTCOME_ROWS, B] (rows with unit stride; `replay`: its ranks row holds
    replayed ranks); timings (build s, idle s, backup code) go into the reply as they are, with a
    backup time of 0."""
    batch, width = window.shape
    k, branches = width - 1, guess.shape[1]
    answer = AnswerBuffer.empty(batch, k, window.device)
    build_s, idle_s, backup_code = timings
    _answer_outcome_kernel[(batch,)](
        history, window.contiguous(), window_lengths, outcome, valid.contiguous(), fork, rank, guess.contiguous(),
        tokens.contiguous(), answer.data, answer.data.view(torch.float64), history.stride(0), outcome.stride(0),
        branches, batch, float(build_s), float(idle_s), float(backup_code),
        K=k, L=history.shape[1], BLOCK_N=triton.next_power_of_2(branches), BLOCK_K=triton.next_power_of_2(width),
        BLOCK_L=1024, REPLAY=replay, NGRAM=ngram, NGRAM_N=ngram_n, TIMINGS=REPLY_TIMINGS, num_warps=4)
    return answer
