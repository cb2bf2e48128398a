"""Vocabulary-parallel embedding and LM head (each rank owns a contiguous slice of the vocabulary)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssd.distributed.tp_group import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_shard.unsqueeze(-1)
        return self.tp.all_reduce(y)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        end = min(self.vocab_start + self.shard_size, self.vocab_size)
        rows = full[self.vocab_start:end]
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary, gathered from every rank's slice (or, restricted to some
    tokens, computed for those only and -inf elsewhere: ssd.spec.draft_vocabulary)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, linear: Callable = F.linear):
        super().__init__(vocab_size, hidden_size, tp)
        self.linear = linear
        self.register_buffer("kept_ids", None)   # [N] token ids of a restricted head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kept_ids is not None:
            return spread_logits(self.kept_logits(hidden), self.kept_ids, self.vocab_size)
        logits = self.tp.all_gather_last_dim(self.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]

    def kept_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """A restricted head's logits of its kept tokens only, [..., N] (column i: token kept_ids[i])."""
        return self.linear(hidden, self.weight)

    @torch.no_grad()
    def restrict_vocabulary(self, kept_ids: torch.Tensor) -> None:
        """Keep only the rows of kept_ids [N] (sorted, unique; one rank): a copy, so a tied
        embedding keeps its full table."""
        if self.tp.size != 1:
            raise ValueError("a restricted LM head runs on one rank (the draft)")
        self.weight = nn.Parameter(self.weight[kept_ids].clone(), requires_grad=False)
        self.register_buffer("kept_ids", kept_ids)


def spread_logits(kept_logits: torch.Tensor, kept_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., N] logits of the kept tokens -> [..., vocab_size], -inf at every other token."""
    return spread_columns(kept_logits, kept_ids, vocab_size, float("-inf"))


def spread_columns(kept: torch.Tensor, kept_ids: torch.Tensor, vocab_size: int, fill: float = 0.0) -> torch.Tensor:
    """[..., N] values of the kept tokens (e.g. probabilities) -> [..., vocab_size], `fill` at every other token."""
    return kept.new_full((*kept.shape[:-1], vocab_size), fill).index_copy_(-1, kept_ids, kept)
