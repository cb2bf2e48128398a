"""The elementwise hot paths of a decoder layer, eager or fused by torch.compile.

One instance per model (held by it and handed to its layers): on GPU every small op left unfused
is a separate kernel per layer per step, which at batch 1 costs more than the op's bandwidth."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ssd.layers.attention import grouped_attention
from ssd.layers.layernorm import add_rms_norm, rms_norm
from ssd.layers.rotary import apply_rotary


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_qk(q, k, cos, sin):
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


@dataclass(frozen=True)
class Kernels:
    rms_norm: Callable = rms_norm
    add_rms_norm: Callable = add_rms_norm
    rotary_qk: Callable = rotary_qk
    silu_and_mul: Callable = silu_and_mul
    grouped_attention: Callable = grouped_attention

    @classmethod
    def compiled(cls) -> "Kernels":
        fuse = lambda fn: torch.compile(fn, dynamic=True, fullgraph=True)  # noqa: E731
        return cls(fuse(rms_norm), fuse(add_rms_norm), fuse(rotary_qk), fuse(silu_and_mul),
                   fuse(grouped_attention))


EAGER = Kernels()
