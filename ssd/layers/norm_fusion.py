"""A decoder layer's RMSNorms, residual adds and SiLU inside its few-row products (Hopper, TMA).

At a 1B draft's tree step (21 rows) a layer is ~10 kernels and the small ones cost ~2 us each on
an H200 however little they compute: add + RMSNorm twice, SiLU * up once. Here they disappear into
the TMA product of ssd.layers.triton_linear (weight tile on the MMA's M side):

    qkv = norm(h) Wqkv^T (+ b)         1 / rms(h) from the same h tiles the product reads, applied
                                       to the sums; the norm's gain g is folded into the weight once
                                       (W[:, k] g[k], fold_gains), so h goes from TMA to the MMA as is
    h   = attention(qkv) Wo^T + h      the residual added in the epilogue (or as split-K parts are summed)
    a   = silu(norm(h) Wg^T) * norm(h) Wu^T   gate and up tiles of the same columns in one program
    h   = a Wd^T + h

so the hidden state is one residual stream h with no separate norm, add or SiLU kernel. The
numbers differ from the unfused chain by bf16 rounding only (the folded weight rounds once more,
each product rounds once where the chain rounds h / rms, then * g, then the product; the unfused
chain, which runs where the fused one does not — more rows —, uses the same folded weights with
gains of 1). Tensor-parallel layers keep the unfused chain (a row-parallel product is all-reduced
before the add) and their gains.

Which tiling runs is measured per (op, rows, weight shape) when a shape is first seen outside
CUDA-graph capture, as MeasuredLinear does; a shape no tiling takes runs the unfused chain.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from ssd.layers.choice_cache import DeviceChoiceCaches
from ssd.layers.fp8 import FP8, dequantized_linear
from ssd.layers.triton_linear import (FP8_TMA_CANDIDATES, KERNEL_SOURCES, MAX_ROWS, TMA_CANDIDATES, TmaTiling,
                                      fastest_agreeing, recalled_or_measured, tma_aligned, tma_available,
                                      tma_block_rows, tma_descriptor, tma_linear, tma_rows, weight_dot)

log = logging.getLogger(__name__)

FOLD_ROWS = 4096   # weight rows widened to float32 at a time while folding the gains
# gate/up's programs stream two weight tiles per step: the 6-stage tiling does not fit shared memory there
NORM_TMA_CANDIDATES = (TmaTiling(64, 128, 4), TmaTiling(64, 128, 6), TmaTiling(64, 128, 3), TmaTiling(128, 128, 4),
                       TmaTiling(128, 128, 3), TmaTiling(64, 256, 3))
# fp8 weights (ssd.layers.fp8): a byte per weight, so twice the BLOCK_K for the same bytes per stage; both
# operands as f16 (see FP8_TMA_CANDIDATES)
FP8_NORM_TMA_CANDIDATES = tuple(TmaTiling(64, block_k, stages, operands="f16")
                                for block_k, stages in ((256, 3), (256, 4), (128, 4), (128, 6)))


@triton.jit
def _tma_norm_matmul_kernel(x_desc, w_desc, b_ptr, y_ptr, scale_ptr, x_ptr, sx_m, M, N, eps, K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                            GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr = False,
                            OPERANDS: tl.constexpr = 0):
    """Program p: y[:, p*BLOCK_N : (p+1)*BLOCK_N] = (x / rms(x)) W^T (+ b), as (W x^T)^T / rms(x) (the
    weight tile on the MMA's M side, both operands by TMA, x's rows past M as zeros: their sums are 0).
    The squares of x are summed from a load of their own (x_ptr, row stride sx_m), not from the tile the
    MMA reads: with both reading one pipelined tile, Triton 3.6 on an H100 raced (qwen3-32b's qkv, 64-row
    tiles, 3-4 stages: ~7 % off, different every run; bench/fused_norm_agreement.py). GATED: W is
    [Wg; Wu] (2N rows) and y = silu(x Wg^T / rms) * x Wu^T / rms, the gate and up tiles of the same
    columns streamed side by side. HAS_SCALE: W is fp8 with one scale per row, multiplied as weight_dot's
    OPERANDS say (as in _tma_matmul_kernel)."""
    n0 = tl.program_id(0) * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rm = tl.arange(0, BLOCK_M)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([0, k0])
        xf = tl.load(x_ptr + rm[:, None] * sx_m + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=rm[:, None] < M,
                     other=0.0).to(tl.float32)
        sum_sq += tl.sum(xf * xf, axis=1)
        acc = weight_dot(w_desc.load([n0, k0]), x, acc, OPERANDS)
        if GATED:
            acc_up = weight_dot(w_desc.load([N + n0, k0]), x, acc_up, OPERANDS)
    inv_rms = tl.rsqrt(sum_sq / K + eps)[None, :]
    rn = n0 + tl.arange(0, BLOCK_N)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rn)[:, None]
        if GATED:
            acc_up *= tl.load(scale_ptr + N + rn)[:, None]
    out = acc * inv_rms
    if HAS_BIAS:
        out += tl.load(b_ptr + rn).to(tl.float32)[:, None]
    if GATED:
        out = out * tl.sigmoid(out) * (acc_up * inv_rms)
    tl.store(y_ptr + rm[None, :] * N + rn[:, None], out.to(y_ptr.dtype.element_ty), mask=rm[None, :] < M)


def tma_norm_linear(x: torch.Tensor, eps: float, weight: torch.Tensor, tiling: TmaTiling,
                    bias: torch.Tensor | None = None, gated: bool = False,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm(x, gain, eps) W^T (+ bias) in one kernel, for weight = W with the gain folded in
    (W[:, k] gain[k]); gated: weight is [gate; up] (2N x K) and the result silu(gate) * up [..., N].
    x [..., K] at most MAX_ROWS rows; tiling without split-K (the norm needs all of K), tiling.fits(N, K).
    scale [N or 2N] (float32): weight is fp8, W = weight * scale[:, None]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = tma_rows(x.reshape(-1, k))
    rows, n = x2.shape[0], weight.shape[0] // (2 if gated else 1)
    if rows > MAX_ROWS or tiling.split_k != 1 or not tiling.fits(n, k) or (gated and bias is not None):
        raise ValueError(f"{tiling} does not take {rows} rows x K = {k} -> N = {n} (gated={gated})")
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block_m = tma_block_rows(rows)
    _tma_norm_matmul_kernel[(n // tiling.block_n,)](
        tma_descriptor(x2, [block_m, tiling.block_k]), tma_descriptor(weight, [tiling.block_n, tiling.block_k]),
        bias if bias is not None else y, y, scale if scale is not None else y, x2, x2.stride(0), rows, n, eps, K=k,
        BLOCK_M=block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k, STAGES=tiling.stages, GATED=gated,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        OPERANDS=tiling.operand_mode(scale is not None), num_warps=tiling.num_warps)
    return y.view(*lead, n)


@dataclass
class NormFusion:
    """The fused ops of a decoder layer, each taking the layer's own modules: a shape no tiling takes
    (or a tensor-parallel layer) runs those modules unfused, with the same result up to rounding.
    An fp8 layer (ssd.layers.fp8: weight and weight_scale) runs the kernels widening its weight as
    they load it. One per model (the choices are its own)."""
    silu_and_mul: Callable             # the unfused gate/up's activation (Kernels.silu_and_mul)
    norm_tilings: tuple[TmaTiling, ...] = NORM_TMA_CANDIDATES
    residual_tilings: tuple[TmaTiling, ...] = TMA_CANDIDATES
    fp8_norm_tilings: tuple[TmaTiling, ...] = FP8_NORM_TMA_CANDIDATES
    fp8_residual_tilings: tuple[TmaTiling, ...] = FP8_TMA_CANDIDATES
    any_device: bool = False           # tests: CPU tensors, under Triton's interpreter
    choices: dict[tuple, TmaTiling | None] = field(default_factory=dict)
    measuring_s: float = 0.0
    kernel_cache: bool = True          # keep the choices on disk for the next start-up (ssd.layers.choice_cache)
    recalled: int = 0                  # choices taken from there
    _disk: DeviceChoiceCaches | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kernel_cache:
            tilings = (self.norm_tilings, self.residual_tilings, self.fp8_norm_tilings, self.fp8_residual_tilings)
            self._disk = DeviceChoiceCaches(f"norm fusion {tilings}", (*KERNEL_SOURCES, __file__))

    def runs_on(self, device: torch.device) -> bool:
        """Whether the fused kernels run on this device (fold_gains is worth it there)."""
        return self.any_device or tma_available(device)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether a forward of x (its rows) runs the fused layers."""
        rows = x.numel() // x.shape[-1]
        return 0 < rows <= MAX_ROWS and self.runs_on(x.device) and (
            self.any_device or x.dtype in (torch.bfloat16, torch.float16))

    @torch.no_grad()
    def fold_gains(self, model: nn.Module) -> None:
        """Each decoder layer's two RMSNorm gains into the weights of the products they feed (qkv,
        gate/up: W[:, k] g[k], rounded once), the gains then all ones. Before any quantization."""
        for layer in model.model.layers:
            for norm, linear in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                 (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
                gain = norm.weight.float()[None, :]
                for rows in linear.weight.split(FOLD_ROWS):   # bounds the float32 temporary
                    rows.copy_(rows.float() * gain)
                norm.weight.fill_(1.0)
                norm.gain_folded = True

    def norm_linear(self, h: torch.Tensor, norm: nn.Module, linear: nn.Module) -> torch.Tensor:
        """linear(norm(h))."""
        unfused = lambda: linear(norm(h))  # noqa: E731
        if not norm.gain_folded:
            return unfused()
        scale = fp8_scale(linear)
        bias = linear.bias if linear.bias is not None else 0
        return self._run("norm", h, linear, lambda w, t: tma_norm_linear(h, norm.eps, w, t, linear.bias, scale=scale),
                         unfused, self.norm_tilings if scale is None else self.fp8_norm_tilings,
                         lambda w: linear.linear(norm(h), w, linear.bias),
                         lambda w: weights_only_linear(norm(h), w, scale) + bias)

    def norm_gated_linear(self, h: torch.Tensor, norm: nn.Module, gate_up: nn.Module) -> torch.Tensor:
        """silu(gate) * up of gate_up(norm(h))."""
        unfused = lambda: self.silu_and_mul(gate_up(norm(h)))  # noqa: E731
        if not norm.gain_folded:
            return unfused()
        scale = fp8_scale(gate_up)
        return self._run("gated", h, gate_up, lambda w, t: tma_norm_linear(h, norm.eps, w, t, gated=True, scale=scale),
                         unfused, self.norm_tilings if scale is None else self.fp8_norm_tilings,
                         lambda w: self.silu_and_mul(gate_up.linear(norm(h), w)),
                         lambda w: self.silu_and_mul(weights_only_linear(norm(h), w, scale)))

    def linear_residual(self, x: torch.Tensor, linear: nn.Module, residual: torch.Tensor) -> torch.Tensor:
        """linear(x) + residual."""
        scale = fp8_scale(linear)
        return self._run("residual", x, linear, lambda w, t: tma_linear(x, w, t, residual, scale),
                         lambda: linear(x) + residual,
                         self.residual_tilings if scale is None else self.fp8_residual_tilings,
                         lambda w: linear.linear(x, w) + residual,
                         lambda w: weights_only_linear(x, w, scale) + residual)

    def _run(self, op: str, x: torch.Tensor, module: nn.Module, fused: Callable, unfused: Callable,
             tilings: tuple[TmaTiling, ...], chain: Callable[[torch.Tensor], torch.Tensor],
             reference: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fused(weight, tiling) or unfused(), as measured for this shape; chain(weight): unfused() with
        the weight given (a timed baseline for fp8 weights, whose fused kernels must beat the fp8 chain);
        reference(weight): what the tilings must agree with, the chain in x's dtype by F.linear (an fp8
        weight's chain may round its activations to fp8 too: ~3 % of the largest value off at the 1B
        draft's gate/up, more than a tiling's tolerance, so which tilings agreed was chance)."""
        weight = module.weight
        tensor_parallel = getattr(module, "tp", None) is not None and module.tp.size > 1
        if (weight.dtype not in (x.dtype, FP8) or tensor_parallel or (op != "norm" and module.bias is not None)
                or (weight.dtype == FP8 and fp8_scale(module) is None)):
            return unfused()
        key = (op, x.numel() // x.shape[-1], *weight.shape, weight.dtype, x.dtype)
        if key not in self.choices:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():   # no timing inside a capture
                return unfused()
            start = time.perf_counter()
            cache = self._disk.at(x.device) if self._disk is not None else None
            baseline = chain if weight.dtype == FP8 else None
            self.choices[key], recalled = recalled_or_measured(
                cache, key, lambda: self._measure(fused, reference, tilings, weight, baseline))
            self.recalled += recalled
            self.measuring_s += time.perf_counter() - start
        tiling = self.choices[key]   # chosen for an aligned weight of this shape (perhaps by an earlier run)
        return unfused() if tiling is None or not tma_aligned(weight) else fused(weight, tiling)

    @staticmethod
    def _measure(fused: Callable, reference: Callable, tilings: tuple[TmaTiling, ...], weight: torch.Tensor,
                 baseline: Callable | None = None) -> TmaTiling | None:
        """The fastest tiling whose result agrees with reference(weight) (None: no tiling does, or the
        timed `baseline` — the unfused chain — was faster)."""
        if not tma_aligned(weight):
            return None
        return fastest_agreeing({tiling: (lambda w, t=tiling: fused(w, t)) for tiling in tilings},
                                reference(weight).float(), weight, baseline)

    def summary(self) -> str:
        fused = sum(tiling is not None for tiling in self.choices.values())
        return (f"{len(self.choices)} fused-norm shapes measured in {self.measuring_s:.1f} s "
                f"({fused} fused, {len(self.choices) - fused} unfused"
                + (f"; {self.recalled} stored by an earlier run" if self.recalled else "") + ")")


def weights_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x weight^T in x's dtype; an fp8 weight widened and scaled per row (scale), x as it is."""
    return F.linear(x, weight) if scale is None else dequantized_linear(x, weight, scale)


def fp8_scale(module: nn.Module) -> torch.Tensor | None:
    """An fp8 layer's per-row weight scales (ssd.layers.fp8.quantize_model_fp8), else None."""
    return getattr(module, "weight_scale", None) if module.weight.dtype == FP8 else None
