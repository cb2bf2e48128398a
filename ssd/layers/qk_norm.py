"""Qwen3's per-head q / k RMSNorm as arguments: the kernels that rotate q and k apply it on the way
(the RoPE + KV write, the fused attention), so it costs no kernel of its own."""
from __future__ import annotations

from typing import NamedTuple

import torch


class QKNorm(NamedTuple):
    """RMSNorm weights [D] of every q head and every k head, and their epsilon."""
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
