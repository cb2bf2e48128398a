"""Rotary position embedding. Frequencies come from transformers' own RoPE initialisation
(so "llama3" scaling and friends match Hugging Face exactly)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig


def hf_inv_freq(cfg: PretrainedConfig) -> tuple[torch.Tensor, float]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rope = LlamaRotaryEmbedding(cfg)  # v4 and v5 agree on this signature
    return rope.inv_freq.float(), float(rope.attention_scaling)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, D]; cos/sin: [B, T, 1, D/2] (non-interleaved halves, as in HF Llama)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: PretrainedConfig, max_positions: int):
        super().__init__()
        inv_freq, scaling = hf_inv_freq(cfg)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_table", angles.cos() * scaling, persistent=False)  # [P, D/2]
        self.register_buffer("sin_table", angles.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[positions].unsqueeze(-2), self.sin_table[positions].unsqueeze(-2)
