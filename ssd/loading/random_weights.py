"""Random weights at real shapes, generated directly on the model's device (each rank its own shard)."""
from __future__ import annotations

import torch

from ssd.models.decoder import CausalLM


@torch.no_grad()
def init_random_weights(model: CausalLM, seed: int, rank: int = 0) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed * 7919 + rank)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            # std 1/sqrt(fan_in) keeps activations O(1) through the stack
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
