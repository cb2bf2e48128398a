"""The draft's answer to a verified outcome, on the critical path of every asynchronous round: the
target waits for it before it can verify again.

Answering a hit used to take ~35 small PyTorch ops and two host synchronisations (~1 ms on an H200
host at B = 1 and B = 16, bench/draft_round_bench.py `outcome_hit_ms`, longer than the lookup's
arithmetic by orders of magnitude). Here the round's bookkeeping (the window's drafts and the
recovered token written into the token history the n-gram backup reads) and the cache lookup are
one function, which the draft compiles into a few fused kernels (`compiled_settle_and_look_up`);
the caller then reads `hit` back once.
"""
from __future__ import annotations

import torch


def find_branch(valid: torch.Tensor, fork: torch.Tensor, guess: torch.Tensor, tokens: torch.Tensor,
                accepted: torch.Tensor, recovered: torch.Tensor):
    """The cached branch that forked at window position accepted[b] on token recovered[b], per row.
    valid/guess [B, N], fork [N], tokens [B, N, K], accepted/recovered [B] -> hit [B] bool, branch [B]
    (the first match; 0 where none), its continuation [B, K] (branch 0's where none)."""
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


def settle_and_look_up(history: torch.Tensor, window: torch.Tensor, lengths: torch.Tensor, accepted: torch.Tensor,
                       recovered: torch.Tensor, valid: torch.Tensor, fork: torch.Tensor, guess: torch.Tensor,
                       tokens: torch.Tensor):
    """settle, then find_branch (at least one branch: N > 0)."""
    settle(history, window, lengths, accepted, recovered)
    return find_branch(valid, fork, guess, tokens, accepted, recovered)


def compiled_settle_and_look_up():
    """settle_and_look_up as fused kernels, one compiled program for every batch size above 1 (and
    one for 1, which dynamic shapes specialise)."""
    return torch.compile(settle_and_look_up, dynamic=True)
