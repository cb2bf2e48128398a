"""The draft's answer to an outcome in one int64 buffer: first the packed reply exactly as the
target unpacks it (protocol.pack_reply's layout: tokens, hit, recovered, timings), then what the
draft keeps for the next round (the branch each row took, the next window, the committed lengths,
the accepted counts). One allocation, filled by one kernel on the GPU (triton_outcome), sent as it
is: no repacking, no host round trip before the reply leaves."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssd.draft_worker.protocol import REPLY_TIMINGS, reply_size


def answer_size(batch: int, k: int) -> int:
    """reply_size, then branch [B], window [B, K+1], lengths [B], accepted [B]."""
    return reply_size(batch, k) + batch * (k + 4)


@dataclass(frozen=True)
class AnswerBuffer:
    data: torch.Tensor   # int64 [answer_size(batch, k)]
    batch: int
    k: int

    @classmethod
    def empty(cls, batch: int, k: int, device: torch.device) -> "AnswerBuffer":
        return cls(torch.empty(answer_size(batch, k), dtype=torch.int64, device=device), batch, k)

    def _rows(self, start: int, width: int = 1) -> torch.Tensor:
        part = self.data[start: start + self.batch * width]
        return part.view(self.batch, width) if width > 1 else part

    @property
    def message(self) -> torch.Tensor:
        """The packed reply (a contiguous prefix: sent as is)."""
        return self.data[: reply_size(self.batch, self.k)]

    @property
    def tokens(self) -> torch.Tensor:
        """[B, K] the proposal."""
        return self.data[: self.batch * self.k].view(self.batch, self.k)

    @property
    def hit(self) -> torch.Tensor:
        """[B] int64, 1 where the cache answered."""
        return self._rows(self.batch * self.k)

    @property
    def recovered(self) -> torch.Tensor:
        return self._rows(self.batch * (self.k + 1))

    @property
    def timings(self) -> torch.Tensor:
        """[REPLY_TIMINGS] float64 (by bit pattern in the int64 buffer)."""
        start = self.batch * (self.k + 2)
        return self.data[start: start + REPLY_TIMINGS].view(torch.float64)

    @property
    def branch(self) -> torch.Tensor:
        return self._rows(reply_size(self.batch, self.k))

    @property
    def window(self) -> torch.Tensor:
        """[B, K+1] the next window: [recovered, proposal]."""
        return self._rows(reply_size(self.batch, self.k) + self.batch, self.k + 1)

    @property
    def lengths(self) -> torch.Tensor:
        return self._rows(reply_size(self.batch, self.k) + self.batch * (self.k + 2))

    @property
    def accepted(self) -> torch.Tensor:
        return self._rows(reply_size(self.batch, self.k) + self.batch * (self.k + 3))
