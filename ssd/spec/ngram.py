"""A near-free deterministic proposal for the `fast` backup: n-gram (prompt) lookup.

For each sequence, find the most recent earlier place where its last m tokens
occurred (m = n, then n-1, ..., 1: longest match first) and propose the K tokens
that followed that occurrence. If the copy reaches the end of the sequence it
wraps around, i.e. the sequence is extended as if it kept repeating with the
period the match implies. With no match at all the last token is repeated.

Losslessness: the proposal is a deterministic function of the history, so the
distribution it was drawn from is one-hot on the proposed token at every
position. Verification must be given exactly that q, `one_hot_probs(tokens, V)`
(see ngram_draft); any other q (e.g. the draft model's distribution) would make
the emitted tokens deviate from the target distribution.

Pure batched tensor ops without host syncs (a Python loop runs over the n
match lengths only), so it can run inside a CUDA graph.
"""

from __future__ import annotations

import torch

from ssd.spec.verifier import one_hot_probs

DEFAULT_N = 3   # longest suffix matched


def _latest_match_end(history: torch.Tensor, lengths: torch.Tensor, m: int) -> torch.Tensor:
    """[B] int64: end (exclusive) of the latest occurrence of each row's last m tokens
    that ends before the last token, or -1 where there is none."""
    batch, max_length = history.shape
    if max_length <= m:  # no room for an earlier occurrence
        return torch.full((batch,), -1, dtype=torch.int64, device=history.device)
    offsets = torch.arange(m, device=history.device)  # [m]
    suffix_index = (lengths[:, None] - m + offsets).clamp_min(0)  # [B, m]
    suffix = history.gather(1, suffix_index)  # [B, m]
    windows = history.unfold(1, m, 1)  # [B, L-m+1, m], window s = history[:, s:s+m]
    matches = (windows == suffix[:, None, :]).all(dim=-1)  # [B, L-m+1]
    starts = torch.arange(windows.shape[1], device=history.device)  # [L-m+1]
    # End s + m <= length - 1: the match lies in the valid prefix and is not the suffix itself.
    valid = matches & (starts[None, :] + m <= lengths[:, None] - 1)
    latest_start = torch.where(valid, starts[None, :], -1).amax(dim=1)  # [B]
    return torch.where(latest_start >= 0, latest_start + m, -1)


def ngram_propose(history: torch.Tensor, lengths: torch.Tensor, k: int, n: int = DEFAULT_N) -> torch.Tensor:
    """Propose K tokens per row by n-gram lookup in the row's own history.

    history [B, L] int64, right-padded (entries at and after lengths[b] are
    ignored); lengths [B] int64 in [0, L]. Returns [B, K] int64. A row of length
    0 (e.g. a padding row) gets history[b, 0] repeated.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if history.dim() != 2:
        raise ValueError(f"history must be [B, L], got {list(history.shape)}")
    lengths = lengths.to(device=history.device, dtype=torch.int64).clamp(0, history.shape[1])
    # Fallback: copy from the last token with period 1, i.e. repeat it.
    copy_from = (lengths - 1).clamp_min(0)  # [B]
    found = torch.zeros_like(lengths, dtype=torch.bool)
    for m in range(n, 0, -1):  # longest match wins
        end = _latest_match_end(history, lengths, m)  # [B]
        use = ~found & (end >= 0)
        copy_from = torch.where(use, end, copy_from)
        found = found | use
    period = (lengths - copy_from).clamp_min(1)  # [B]; the continuation repeats with this period
    steps = torch.arange(k, device=history.device)  # [K]
    index = copy_from[:, None] + steps[None, :] % period[:, None]  # [B, K], all < max(length, 1)
    return history.gather(1, index)


def ngram_draft(
    history: torch.Tensor, lengths: torch.Tensor, k: int, vocab_size: int, n: int = DEFAULT_N
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, K], draft_probs [B, K, V]): the n-gram proposal and the one-hot
    distribution it was drawn from, ready for verify()."""
    tokens = ngram_propose(history, lengths, k, n)
    return tokens, one_hot_probs(tokens, vocab_size)
