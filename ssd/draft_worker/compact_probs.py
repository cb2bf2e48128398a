"""A distribution over the vocabulary with few tokens of nonzero probability, kept as (token id,
probability) pairs — what a filtered (top-k / top-p) draft step samples from.

The speculation tree's filtered steps used to write every branch's full-vocabulary distribution
(B x N x K x V floats: ~1 GB for a 128k vocabulary at B = 16, F = 3, K = 6) and to run the race and
the Saguaro top-F over full rows, though a filtered draft keeps at most ~256 tokens. Kept compact,
only the branch that answers a cache hit is widened to V columns, at lookup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompactProbs:
    ids: torch.Tensor     # int64 [..., W] token ids, distinct within a row
    probs: torch.Tensor   # float32 [..., W] their probabilities (every other token: 0)
    vocab_size: int

    @classmethod
    def empty(cls, lead: tuple[int, ...], width: int, vocab_size: int, device) -> "CompactProbs":
        return cls(torch.zeros((*lead, width), dtype=torch.int64, device=device),
                   torch.zeros((*lead, width), dtype=torch.float32, device=device), vocab_size)

    def __getitem__(self, index) -> "CompactProbs":
        return CompactProbs(self.ids[index], self.probs[index], self.vocab_size)

    def view(self, *lead: int) -> "CompactProbs":
        width = self.ids.shape[-1]
        return CompactProbs(self.ids.view(*lead, width), self.probs.view(*lead, width), self.vocab_size)

    def copy_(self, ids: torch.Tensor, probs: torch.Tensor) -> "CompactProbs":
        """Into these buffers (a CUDA graph's static output), in place."""
        self.ids.copy_(ids.view(self.ids.shape))
        self.probs.copy_(probs.view(self.probs.shape))
        return self

    def dense(self) -> torch.Tensor:
        """[..., V] float32."""
        out = torch.zeros((*self.probs.shape[:-1], self.vocab_size), dtype=self.probs.dtype, device=self.probs.device)
        return out.scatter_(-1, self.ids, self.probs)

    @staticmethod
    def stack(parts: list["CompactProbs"], dim: int) -> "CompactProbs":
        """dim counts the leading dims only (the width stays last)."""
        return CompactProbs(torch.stack([p.ids for p in parts], dim), torch.stack([p.probs for p in parts], dim),
                            parts[0].vocab_size)
