"""The elementwise hot paths of a decoder layer, eager or fused by torch.compile.

One instance per model (held by it and handed to its layers): on GPU every small op left unfused
is a separate kernel per layer per step, which at batch 1 costs more than the op's bandwidth."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ssd.layers.attention import grouped_attention
from ssd.layers.cublaslt import LISTED_ALGORITHMS
from ssd.layers.layernorm import add_rms_norm, rms_norm
from ssd.layers.rotary import apply_rotary

log = logging.getLogger(__name__)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots, positions, qk_norm=None):
    """Rotate q/k and write k/v into the full caches at their true positions; one fused kernel
    when compiled. q [B,T,Hq,D] or None (the fused attention rotates it: returns None); k/v
    [B,T,Hkv,D]; caches [S,Hkv,L,D]; slots [B, 1] (a tensor, so a new slot offset never triggers a
    recompile); positions [B,T] cache indices; qk_norm (q weight, k weight, eps): Qwen3's per-head
    RMSNorm of q and k, before the rotation."""
    if qk_norm is not None:
        q_weight, k_weight, eps = qk_norm
        q = rms_norm(q, q_weight, eps) if q is not None else None
        k = rms_norm(k, k_weight, eps)
    q = apply_rotary(q, cos, sin) if q is not None else None
    k = apply_rotary(k, cos, sin)
    rows = slots.expand_as(positions)
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v
    return q


def qk_rms_norm(qk: torch.Tensor, q_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float) -> torch.Tensor:
    """Qwen3's q and k norms, one kernel when compiled: qk [B, T, Hq + Hkv, D] holds the q heads then
    the k heads (as the qkv projection lays them out), normalised with q_weight / k_weight [D]."""
    heads = torch.arange(qk.shape[-2], device=qk.device)[:, None]
    return rms_norm(qk, torch.where(heads < q_heads, q_weight, k_weight), eps)


@dataclass(frozen=True)
class Kernels:
    rms_norm: Callable = rms_norm
    add_rms_norm: Callable = add_rms_norm
    rope_and_cache: Callable = rope_and_cache
    qk_rms_norm: Callable = qk_rms_norm
    silu_and_mul: Callable = silu_and_mul
    grouped_attention: Callable = grouped_attention
    fused_attention: Callable | None = None  # ssd.layers.triton_attention.fused_attention, where it runs
    tree_kv_in_attention: bool = False       # a tree step's k/v written by fused_attention (new_kv)
    linear: Callable = F.linear               # (x, weight, bias=None): every linear layer and the LM head
    norm_fusion: object | None = None         # ssd.layers.norm_fusion.NormFusion: few-row layers with their
                                              # norms, residual adds and SiLU inside the products

    @classmethod
    def compiled(cls, fused_attention: bool = False, measured_linear: bool = False,
                 tree_kv_in_attention: bool = True,
                 linear_algorithms: int = LISTED_ALGORITHMS, linear_tma: bool = True,
                 norm_fusion: bool = False) -> "Kernels":
        """fused_attention: also the one-kernel Triton attention (for CUDA tensors; on CPU only
        under Triton's interpreter, as in the tests), which in tree steps also writes the step's k/v
        (tree_kv_in_attention; else the RoPE + KV-write kernel does); measured_linear: few-row
        linears take F.linear, a Triton kernel (the TMA one too with linear_tma, on Hopper) or one of
        up to linear_algorithms cuBLASLt algorithms, whichever measured fastest per shape
        (ssd.layers.triton_linear); norm_fusion: on Hopper, layers of few rows run their RMSNorms,
        residual adds and SiLU inside TMA products (ssd.layers.norm_fusion)."""
        # every (batch bucket, width, attention length) CUDA graph is a shape these see once at
        # capture: allow that many specialisations instead of falling back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        # automatic dynamic shapes: only the dims that vary (batch, tokens) become symbolic; with
        # dynamic=True the head / hidden sizes were symbolic too and the index arithmetic divided by
        # runtime values (H200, 1B draft, B=16 tree step: SiLU-mul 11.5 -> 3.7 us, RoPE + KV write
        # 12.1 -> 5.2 us, RMSNorm 3.3 -> 2.3 us; bench/draft_kernel_sweep.py)
        fuse = lambda fn: torch.compile(fn)  # noqa: E731
        attention = load_fused_attention() if fused_attention else None
        silu = fuse(silu_and_mul)
        return cls(fuse(rms_norm), fuse(add_rms_norm), fuse(rope_and_cache), fuse(qk_rms_norm), silu,
                   fuse(grouped_attention), attention, tree_kv_in_attention and attention is not None,
                   load_measured_linear(linear_algorithms, linear_tma) if measured_linear else F.linear,
                   load_norm_fusion(silu) if norm_fusion else None)


def load_fused_attention() -> Callable | None:
    try:
        from ssd.layers.triton_attention import fused_attention
    except ImportError:
        log.warning("Triton is not installed: attention runs as batched matmuls + softmax (slower)")
        return None
    return fused_attention


def load_norm_fusion(silu_and_mul: Callable):
    try:
        from ssd.layers.norm_fusion import NormFusion
    except ImportError:
        log.warning("Triton is not installed: RMSNorm, residual adds and SiLU run as kernels of their own")
        return None
    return NormFusion(silu_and_mul)


def load_measured_linear(linear_algorithms: int = LISTED_ALGORITHMS, tma: bool = True) -> Callable:
    try:
        from ssd.layers.triton_linear import MeasuredLinear
    except ImportError:
        log.warning("Triton is not installed: linear layers run as F.linear")
        return F.linear
    return MeasuredLinear(lt_algorithms=linear_algorithms, tma=tma)


EAGER = Kernels()
