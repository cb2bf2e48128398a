"""The tensor-parallel group a model shard belongs to (passed explicitly; no global state)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """group carries the shard's data (all-reduces, payloads; None: the default group). Ranks > 0
    wait for rank 0's next command on `commands` and a draft worker on `draft_link` (rank 0 and the
    draft): same ranks, no practical timeout, since an engine may sit idle for any time between
    requests, while a collective of the data groups that outlasts the timeout is a real failure."""
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    commands: dist.ProcessGroup | None = None
    draft_link: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' values (each rank passes its own)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def broadcast_command(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.commands, 0), group=self.commands)
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return x


