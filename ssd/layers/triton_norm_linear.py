"""RMSNorm (after the residual add) fused into the next linear layer, for a few rows; for the MLP's
gate/up projection also SiLU(gate) * up in the same kernel.

At batch 1 a decoder layer runs its two norms, its qkv and gate/up projections and the SiLU-mul as
five kernels, the three small ones a few microseconds each (H200, 1B draft, 21 rows: 2.1 us per
norm, 1.7 us SiLU-mul; results/draft_round_h200_llama1b_vocab32k.json). The norm needs each row's
sum of squares over all of K, but its scale is one number per row, so it commutes with the matmul:
(h * rstd * g) W^T = rstd * ((h * g) W^T). A program streams K for its column block, accumulating
sum(h^2) next to the product, and scales once at the end: the norm has no pass of its own.

Rounding differs from the unfused path at bf16 level (h * g is rounded instead of h * rstd * g, and
gate/up are not rounded before the SiLU); `MeasuredNormLinear` checks the fused result against the
unfused one and times both per shape, as ssd.layers.triton_linear does for plain linears.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl

from ssd.layers.triton_linear import CANDIDATES, MAX_ROWS, SkinnyTiling, streaming_time_us

log = logging.getLogger(__name__)

Unfused = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@triton.jit
def _norm_matmul_kernel(x_ptr, res_ptr, res_out_ptr, g_ptr, w_ptr, y_ptr, M, N, eps,
                        sx_m, sr_m, sw_n, sy_m, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    """Program p: y[:, p*BLOCK_N : (p+1)*BLOCK_N] = rms_norm(h) W^T for h = x (+ residual), all M
    rows in one block. HAS_RESIDUAL: h is also written to res_out (by program 0; res_out rows have
    stride K). GATED: w has 2N rows [gate; up] and y = SiLU(h W_gate^T) * (h W_up^T)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        mk = m_ok[:, None] & k_ok[None, :]
        h = tl.load(x_ptr + rm[:, None] * sx_m + kk[None, :], mask=mk, other=0.0)
        if HAS_RESIDUAL:   # rounded to the activations' dtype, as the unfused add is
            h = (h.to(tl.float32) + tl.load(res_ptr + rm[:, None] * sr_m + kk[None, :], mask=mk, other=0.0)
                 .to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(res_out_ptr + rm[:, None] * K + kk[None, :], h, mask=mk & (pid == 0))
        hf = h.to(tl.float32)
        squares += tl.sum(hf * hf, axis=1)
        a = (hf * tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
        w_ok = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + rn[:, None] * sw_n + kk[None, :], mask=w_ok, other=0.0)
        acc += tl.dot(a, tl.trans(w))
        if GATED:
            w_up = tl.load(w_ptr + (rn + N)[:, None] * sw_n + kk[None, :], mask=w_ok, other=0.0)
            acc_up += tl.dot(a, tl.trans(w_up))
    rstd = tl.rsqrt(squares / K + eps)[:, None]
    acc *= rstd
    if GATED:
        acc = acc * tl.sigmoid(acc) * (acc_up * rstd)
    tl.store(y_ptr + rm[:, None] * sy_m + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, tiling: SkinnyTiling, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x alone when residual is None); returns (rms_norm(h) * norm_weight) W^T
    (gated: SiLU of its first half times its second half) and h. x [..., K] with at most MAX_ROWS
    rows in all; weight [N, K] (gated: [2N, K], gate rows first); no bias, no split-K."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = _rows(x)
    rows, n = x2.shape[0], weight.shape[0] // (2 if gated else 1)
    if rows > MAX_ROWS:
        raise ValueError(f"norm_linear takes at most {MAX_ROWS} rows, got {rows}")
    if tiling.split_k != 1:
        raise ValueError("norm_linear has no split-K (each program needs whole rows for the norm)")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"a gated weight has an even number of rows, got {weight.shape[0]}")
    res2 = _rows(residual) if residual is not None else x2
    res_out = torch.empty((rows, k), dtype=x.dtype, device=x.device) if residual is not None else x2
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _norm_matmul_kernel[(triton.cdiv(n, tiling.block_n),)](
        x2, res2, res_out, norm_weight, weight, y, rows, n, eps, x2.stride(0), res2.stride(0), weight.stride(0), n,
        K=k, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        HAS_RESIDUAL=residual is not None, GATED=gated, num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return y.view(*lead, n), (res_out.view(*lead, k) if residual is not None else x)


@dataclass
class MeasuredNormLinear:
    """norm (+ residual add) -> linear [-> SiLU-mul] as the unfused kernels or as one `norm_linear`
    kernel, whichever measured faster for this (rows, weight shape, dtype, gated, residual or not).
    One per model; the unfused path runs on CPU, for quantized or biased weights, for wide inputs
    and inside a CUDA-graph capture of a shape never measured."""
    choices: dict[tuple, SkinnyTiling | None] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                 weight: torch.Tensor, gated: bool, unfused: Unfused) -> tuple[torch.Tensor, torch.Tensor]:
        """unfused(x, residual, weight) -> (output, h): the same product by the separate kernels."""
        rows = x.numel() // x.shape[-1]
        if (not x.is_cuda or not 0 < rows <= MAX_ROWS or weight.dtype != x.dtype or weight.stride(-1) != 1
                or x.dtype not in (torch.bfloat16, torch.float16)):
            return unfused(x, residual, weight)
        key = (rows, *weight.shape, x.dtype, gated, residual is None)
        if key not in self.choices:
            if torch.cuda.is_current_stream_capturing():
                return unfused(x, residual, weight)
            self.choices[key] = self.measure(x, residual, norm_weight, eps, weight, gated, unfused)
        tiling = self.choices[key]
        if tiling is None:
            return unfused(x, residual, weight)
        return norm_linear(x, residual, norm_weight, eps, weight, tiling, gated)

    @staticmethod
    def measure(x, residual, norm_weight, eps, weight, gated, unfused: Unfused) -> SkinnyTiling | None:
        """The fastest fused tiling whose output agrees with the unfused one (None: unfused)."""
        reference, h = unfused(x, residual, weight)
        reference = reference.float()
        tolerance = 2e-2 * reference.abs().max().item() + 1e-3   # bf16 rounding at different places
        times = {None: streaming_time_us(lambda w: unfused(x, residual, w), weight)}
        for tiling in CANDIDATES:
            if tiling.split_k != 1:
                continue
            run = lambda w, t=tiling: norm_linear(x, residual, norm_weight, eps, w, t, gated)  # noqa: E731
            try:
                out, h_fused = run(weight)
                if (out.float() - reference).abs().max().item() > tolerance or not torch.equal(h_fused, h):
                    log.warning("fused norm-linear %s disagrees with the unfused kernels at %s: not used",
                                tiling, tuple(weight.shape))
                    continue
                times[tiling] = streaming_time_us(run, weight)
            except Exception as exc:   # e.g. shared memory: that tiling is not a candidate here
                log.debug("fused norm-linear %s failed at %s: %s", tiling, tuple(weight.shape), exc)
        best = min(times, key=times.get)
        log.debug("norm-linear rows=%d weight=%s gated=%s: %s -> %s", x.numel() // x.shape[-1], tuple(weight.shape),
                  gated, {str(t): round(v, 2) for t, v in times.items()}, best)
        return best
