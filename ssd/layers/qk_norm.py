"""Qwen3's per-head q / k RMSNorm, handed to the kernels that rotate q and k so that they apply it on
the way (the RoPE + KV write; the fused attention for q) instead of two norm kernels a layer. A tree
step whose attention writes its own k/v normalises both in one kernel first (Kernels.qk_rms_norm)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class QKNorm(NamedTuple):
    """RMSNorm weights [D] of every q head and every k head, and their epsilon."""
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
