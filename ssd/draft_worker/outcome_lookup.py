"""The draft's answer to a verified outcome, on the critical path of every asynchronous round: the
target waits for it before it can verify again.

`answer_outcome` is the whole answer in PyTorch: the round's bookkeeping (the window's drafts and
the recovered token written into the token history the n-gram backup reads), the cache lookup, the
`fast` backup for the rows that missed and the next window. On the GPU the draft runs the same as
one Triton kernel (ssd.draft_worker.triton_outcome, which says why); this is its CPU path and the
reference the tests hold it to.
"""
from __future__ import annotations

import torch

from ssd.draft_worker.answer_buffer import AnswerBuffer
from ssd.spec.ngram import DEFAULT_N, ngram_propose


def find_branch(valid: torch.Tensor, fork: torch.Tensor, guess: torch.Tensor, tokens: torch.Tensor,
                accepted: torch.Tensor, recovered: torch.Tensor):
    """The cached branch that forked at window position accepted[b] on token recovered[b], per row.
    valid/guess [B, N], fork [N], tokens [B, N, K], accepted/recovered [B] -> hit [B] bool, branch [B]
    (the first match; 0 where none), its continuation [B, K] (branch 0's where none). N = 0 (a
    fan-out of zero everywhere): every row misses."""
    if guess.shape[1] == 0:
        return torch.zeros_like(accepted, dtype=torch.bool), torch.zeros_like(accepted), tokens[:, 0]
    match = valid & (fork[None, :] == accepted[:, None]) & (guess == recovered[:, None])
    branch = match.to(torch.int32).argmax(dim=1)
    continuation = tokens.gather(1, branch[:, None, None].expand(-1, 1, tokens.shape[2])).squeeze(1)
    return match.any(dim=1), branch, continuation


def settle(history: torch.Tensor, window: torch.Tensor, lengths: torch.Tensor, accepted: torch.Tensor,
           recovered: torch.Tensor) -> None:
    """history [S, L] committed tokens per slot (row b of the batch is slot b), updated in place:
    window [B, K+1] was verified from position lengths[b] - 1, so its drafts land at lengths[b]..
    (entries past the accepted ones are stale, overwritten later) and the recovered token at
    lengths[b] + accepted[b]; positions past L - 1 are clamped."""
    batch, width = window.shape
    last = history.shape[1] - 1
    rows = history[:batch]
    offsets = torch.arange(width - 1, device=window.device)
    rows.scatter_(1, (lengths[:, None] + offsets).clamp(max=last), window[:, 1:])
    rows.scatter_(1, (lengths + accepted).clamp(max=last)[:, None], recovered[:, None])


def resolve_rank(valid: torch.Tensor, fork: torch.Tensor, rank: torch.Tensor, guess: torch.Tensor,
                 accepted: torch.Tensor, replayed_rank: torch.Tensor, fallback: torch.Tensor, k: int):
    """Profile replay: the token of draft rank replayed_rank [B] at window position accepted [B] —
    the cached guess where this row's fan-out holds it, else fallback [B] — and whether it was held
    (covered [B]: the replayed hit or miss). Guesses before the last position exclude the drafted
    rank-0 token, so guess ordinal = rank - 1 there."""
    if guess.shape[1] == 0:
        return fallback, torch.zeros_like(fallback, dtype=torch.bool)
    ordinal = torch.where(accepted < k, replayed_rank - 1, replayed_rank)
    match = valid & (fork[None, :] == accepted[:, None]) & (rank[None, :] == ordinal[:, None])
    held = guess.gather(1, match.int().argmax(dim=1, keepdim=True)).squeeze(1)
    covered = match.any(dim=1)
    return torch.where(covered, held, fallback), covered


def answer_outcome(history: torch.Tensor, window: torch.Tensor, window_lengths: torch.Tensor, accepted: torch.Tensor,
                   recovered: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, fork: torch.Tensor,
                   rank: torch.Tensor, guess: torch.Tensor, tokens: torch.Tensor,
                   replayed_rank: torch.Tensor | None = None, ngram: bool = False, ngram_n: int = DEFAULT_N):
    """The draft's answer to the outcome (accepted, recovered) [B] of window [B, K+1] (verified from
    window_lengths - 1; lengths [B] the new committed lengths) from its cache (valid/guess [B, N],
    fork/rank [N], tokens [B, N, K]):
    replayed_rank [B] (profile replay): recovered becomes the cached guess of that rank where the
    fan-out holds it (a hit), stays as given elsewhere (a miss); settle; find_branch; ngram: missed
    rows take the n-gram proposal from the history just written (`fast` backup), else branch 0's.
    -> hit [B] bool, branch [B], recovered [B], proposal [B, K], the next window [B, K+1]."""
    if replayed_rank is not None:
        recovered, covered = resolve_rank(valid, fork, rank, guess, accepted, replayed_rank, recovered, tokens.shape[2])
        valid = valid & covered[:, None]   # a stand-in token that happens to equal a guess is still a miss
    settle(history, window, window_lengths, accepted, recovered)
    hit, branch, proposal = find_branch(valid, fork, guess, tokens, accepted, recovered)
    if ngram:
        batch, k = proposal.shape
        proposal = torch.where(hit[:, None], proposal, ngram_propose(history[:batch], lengths, k, ngram_n))
    return hit, branch, recovered, proposal, torch.cat([recovered[:, None], proposal], 1)


def answer_outcome_buffer(history: torch.Tensor, window: torch.Tensor, window_lengths: torch.Tensor,
                          outcome: torch.Tensor, valid: torch.Tensor, fork: torch.Tensor, rank: torch.Tensor,
                          guess: torch.Tensor, tokens: torch.Tensor, replay: bool = False, ngram: bool = False,
                          timings: tuple[float, float, int] = (0.0, 0.0, 0),
                          ngram_n: int = DEFAULT_N) -> AnswerBuffer:
    """answer_outcome as ssd.draft_worker.triton_outcome.answer_outcome_kernel gives it: outcome
    [OUTCOME_ROWS, B] in, a filled AnswerBuffer out (timings rounded through float32 as the kernel's
    arguments are), bit for bit what the kernel writes."""
    accepted, recovered, _, lengths, ranks = outcome
    hit, branch, recovered, proposal, next_window = answer_outcome(
        history, window, window_lengths, accepted, recovered, lengths, valid, fork, rank, guess, tokens,
        ranks if replay else None, ngram, ngram_n)
    answer = AnswerBuffer.empty(window.shape[0], window.shape[1] - 1, window.device)
    build_s, idle_s, backup_code = timings
    answer.timings.copy_(torch.tensor([build_s, 0.0, idle_s, backup_code], dtype=torch.float32))
    for part, value in ((answer.tokens, proposal), (answer.hit, hit), (answer.recovered, recovered),
                        (answer.branch, branch), (answer.window, next_window), (answer.lengths, lengths),
                        (answer.accepted, accepted)):
        part.copy_(value)
    return answer
