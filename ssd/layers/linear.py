"""Tensor-parallel linear layers. Each carries a `weight_loader` that cuts its own shard from a full tensor."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssd.distributed.tp_group import TPGroup


def _shard(full, dim: int, rank: int, size: int) -> torch.Tensor:
    """`full` is a tensor or a lazily read checkpoint slice; only this rank's part is read."""
    n = full.shape[dim] // size
    return full.narrow(dim, rank * n, n)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along the output dim. `output_sizes` are the (full) sizes of fused parts."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, tp: TPGroup,
                 linear: Callable = F.linear):
        super().__init__()
        self.tp, self.linear = tp, linear
        self.output_sizes = [s // tp.size for s in output_sizes]
        out_local = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(out_local, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        offset = sum(self.output_sizes[:part])
        size = self.output_sizes[part]
        param.data.narrow(0, offset, size).copy_(_shard(full, 0, self.tp.rank, self.tp.size))


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T): W split along the input dim."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup,
                 linear: Callable = F.linear):
        super().__init__()
        self.tp, self.linear = tp, linear
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        if param is self.bias:
            param.data.copy_(full[:])
        else:
            param.data.copy_(_shard(full, 1, self.tp.rank, self.tp.size))
