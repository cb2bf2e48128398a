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
    """Logits over the full vocabulary, gathered from every rank's slice."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, linear: Callable = F.linear):
        super().__init__(vocab_size, hidden_size, tp)
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(self.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
