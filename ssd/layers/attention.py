"""Attention over the slot KV cache: write the new keys/values at their true positions, then attend."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ForwardContext:
    """Per-forward inputs shared by every layer (built once per forward, passed explicitly)."""
    positions: torch.Tensor        # [B, T] int64, true position of each query token
    attn_mask: torch.Tensor        # [B, 1, T, L] bool, which cache positions each query sees
    k_caches: list[torch.Tensor]   # per layer [slots, kv_heads, max_len, head_dim]
    v_caches: list[torch.Tensor]
    first_slot: int = 0            # batch row b uses slot first_slot + b

    @property
    def attended_len(self) -> int:
        return self.attn_mask.shape[-1]


def causal_mask(positions: torch.Tensor, attended_len: int) -> torch.Tensor:
    """Query at position p sees cache positions 0..p. [B, T] -> [B, 1, T, L]."""
    key_pos = torch.arange(attended_len, device=positions.device)
    return (key_pos <= positions.unsqueeze(-1)).unsqueeze(1)


def write_kv(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> None:
    # cache [B, H, L, D] (this batch's slots); new [B, T, H, D]; positions [B, T]
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)
    cache[rows, :, positions] = new


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                     ctx: ForwardContext, scale: float) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq*D]."""
    batch, seq = q.shape[:2]
    rows = slice(ctx.first_slot, ctx.first_slot + batch)
    k_cache, v_cache = ctx.k_caches[layer][rows], ctx.v_caches[layer][rows]
    write_kv(k_cache, k, ctx.positions)
    write_kv(v_cache, v, ctx.positions)
    keys = k_cache[:, :, : ctx.attended_len]
    values = v_cache[:, :, : ctx.attended_len]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=ctx.attn_mask,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, seq, -1)
