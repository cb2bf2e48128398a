"""y = x W^T for a few rows (decode, verification windows, the draft's tree at small batch), in Triton.

At M <= 64 rows a linear layer is a weight stream: the time is the weight's bytes over the memory
bandwidth plus the kernel's ramp-up. cuBLAS reaches ~3.6 TB/s on an H200 for a 1B model's 67 MB
gate/up weight at M = 21, but ~1.4-2.1 TB/s on its 8-12 MB attention weights (measured), where a
few microseconds of fixed cost weigh most. This kernel gives each program a narrow column block of
W over the whole K (or over 1/SPLIT_K of it, then a small kernel sums the parts) and pipelines its
loads deeply. Measured on
an H200 it wins some shapes only (the 1B LM head at 7 rows: 122.7 vs 128.9 us) and a draft round
gains ~1 % (results/draft_kernel_sweep_h200.json, docs/MEASUREMENTS.md "2026-12-03 (afternoon)").

On Hopper a second kernel loads both operands by TMA and puts the weight on the MMA's M side
(`tma_linear`): at the 1B draft's 21-row tree products it streams weights faster than cuBLAS (H200:
qkv 6.5 vs 7.6 us, down 12.1 vs 13.3 with split-K; results/tma_gemm_sweep_h200.json). In tiles of
rows past 64 (the B = 16 window and tree) it lost to cuBLAS by 4-42 % at every product and was removed
(results/tma_gemm_sweep_h200_wide_rows_negative.json). It can also add a residual to the product
(ssd.layers.norm_fusion, which also fuses the RMSNorm and SiLU around these products).

Which one runs is measured, not assumed: `MeasuredLinear` times F.linear, a few tilings of these
kernels and cuBLASLt's listed algorithms for the problem (ssd.layers.cublaslt) once per (rows,
weight shape) when it first sees the shape outside CUDA-graph capture (graph warm-up runs every
shape eagerly first) and uses the fastest from then on. Each candidate is timed inside a small
CUDA graph of its own, as the engine runs it. The choices are kept on disk for the next start-up on
the same setup (ssd.layers.choice_cache).
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ssd.engine.gpu_timing import graph_time_us as time_us
from ssd.layers.choice_cache import ChoiceCache, DeviceChoiceCaches
from ssd.layers.cublaslt import LISTED_ALGORITHMS, CublasLt, LtAlgorithm, row_matrix
from ssd.layers.fp8 import dequantized_linear

log = logging.getLogger(__name__)

MAX_ROWS = 64          # the Triton kernel's limit
AGREEMENT_RUNS = 3     # each candidate product checked this many times before it is timed (fastest_agreeing)
WIDE_ROWS = 512        # wider shapes measured inside measuring_wide (a B = 16 tree step has 336 rows)


@triton.jit
def _skinny_matmul_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, M, N, sx_m, sw_n, sy_m, K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          HAS_SCALE: tl.constexpr, SPLIT_K: tl.constexpr):
    """Program (p, s): y[:, p*BLOCK_N : (p+1)*BLOCK_N] over the s-th of SPLIT_K equal parts of K (x
    is re-read from L2 by every program). K is a constant: a weight has one, and a constant loop
    bound is what the interpreter runs. HAS_SCALE: w is stored narrower (fp8) with one scale per
    output column: widened to x's dtype as it is loaded, the column's scale applied to the fp32 sum.
    SPLIT_K > 1: y is a float32 [SPLIT_K, M, N] buffer of partial sums (_sum_splits_kernel adds them)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K // SPLIT_K, BLOCK_K):
        kk = split * (K // SPLIT_K) + k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * sx_m + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * sw_n + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + split * M * sy_m + rm[:, None] * sy_m + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, y_ptr, res_ptr, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr = False):
    """y = sum over s of part[s] (+ res) (part float32 [SPLIT_K, size], y and res size elements)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        total += tl.load(part_ptr + s * size + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        total += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tma_matmul_kernel(x_desc, w_desc, y_ptr, res_ptr, scale_ptr, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr = False, HAS_SCALE: tl.constexpr = False,
                       OPERANDS: tl.constexpr = 0):
    """Program (p, s): y[:, p*BLOCK_N : (p+1)*BLOCK_N] over the s-th of SPLIT_K equal parts of K, as
    (W x^T)^T: the weight tile is the MMA's M side (Hopper's warpgroup MMA wants M >= 64; the few rows
    of x are its N side) and both operands arrive by TMA (x's rows past M as zeros). SPLIT_K > 1: y
    is a float32 [SPLIT_K, M, N] buffer of partial sums (_sum_splits_kernel adds them and the
    residual); else HAS_RESIDUAL adds res [M, N] to the product here. HAS_SCALE: W is stored in fp8
    with one scale per row (ssd.layers.fp8), multiplied as weight_dot's OPERANDS say, the row's scale
    applied to the sums."""
    n0 = tl.program_id(0) * BLOCK_N
    k_start = tl.program_id(1) * (K // SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(0, K // SPLIT_K, BLOCK_K, num_stages=STAGES):
        acc = weight_dot(w_desc.load([n0, k_start + k0]), x_desc.load([0, k_start + k0]), acc, OPERANDS)
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rn)[:, None]
    if HAS_RESIDUAL:
        if SPLIT_K == 1:
            acc += tl.load(res_ptr + rm[None, :] * N + rn[:, None], mask=rm[None, :] < M, other=0.0).to(tl.float32)
    y = y_ptr + tl.program_id(1) * M * N + rm[None, :] * N + rn[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=rm[None, :] < M)


@dataclass(frozen=True)
class SkinnyTiling:
    repeatable = True   # (not a field) no atomics: the same bits every run (agrees)
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1

    def fits(self, k: int) -> bool:
        """Every split is a whole number of BLOCK_K steps."""
        return self.split_k == 1 or k % (self.split_k * self.block_k) == 0


# split-K tilings (SkinnyTiling(32, 128, 4, 4, 4), (16, 128, 4, 4, 8)) were tried among these: chosen
# for the 1B draft's down weight at 1-16 and 32 rows but not at the tree's 21, and its window forward
# came out 1.141 -> 1.176 ms (H200, results/draft_round_h200_llama1b_splitk_candidates_negative.json)
CANDIDATES = (SkinnyTiling(16, 256), SkinnyTiling(32, 128), SkinnyTiling(32, 256, 4, 3), SkinnyTiling(64, 128, 4, 3),
              SkinnyTiling(16, 512, 4, 3))
# fp8 weights: half the bytes per column, so wider column blocks (each program re-reads x from L2);
# the best of results/fp8_gemm_sweep_h200.json at the 1B draft's shapes
FP8_CANDIDATES = (SkinnyTiling(64, 128), SkinnyTiling(64, 256, 4, 3), SkinnyTiling(128, 256, 8, 3),
                  SkinnyTiling(32, 256, 4, 4, 4))


# how an fp8 weight tile meets the activations in weight_dot (TmaTiling.operands)
OPERAND_MODES = {"widen": 0, "f16": 1, "fp8": 2}


@triton.jit
def weight_dot(w, x, acc, OPERANDS: tl.constexpr):
    """acc [BN, BM] + w x^T for a weight tile w [BN, BK] (the MMA's M side) and activations x [BM, BK].
    A bf16 / fp16 w: as is (0). An fp8 w by OPERANDS: 0 widened to x's dtype in registers (on an H100
    e4m3 -> bf16 is several conversions per pair of weights); 1 both as float16 (e4m3 -> f16 is one
    conversion per pair, x's small tile converted instead, clamped to f16's range; the same sums as 0
    up to rounding); 2 x quantized to e4m3 per row of the tile (scale amax / 448), the fp8 MMA on w as
    loaded, the row scales applied to the tile's sums (activations rounded to fp8, as torch._scaled_mm)."""
    if OPERANDS == 0:
        return tl.dot(w.to(x.dtype), x.T, acc)
    elif OPERANDS == 1:
        x16 = tl.clamp(x.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        return tl.dot(w.to(tl.float16), x16.T, acc)
    else:
        xf = x.to(tl.float32)
        x_scale = tl.maximum(tl.max(tl.abs(xf), 1), 1e-30) / 448.0
        x8 = (xf / x_scale[:, None]).to(w.dtype)
        return acc + tl.dot(w, x8.T) * x_scale[None, :]


@dataclass(frozen=True)
class TmaTiling:
    """A tiling of _tma_matmul_kernel (Hopper and later: TMA); operands: how an fp8 weight is
    multiplied (OPERAND_MODES, see weight_dot)."""
    repeatable = True   # (not a field) no atomics: the same bits every run (agrees)
    block_n: int
    block_k: int
    stages: int
    split_k: int = 1
    num_warps: int = 4
    operands: str = "widen"

    def fits(self, n: int, k: int) -> bool:
        return n % self.block_n == 0 and k % (self.split_k * self.block_k) == 0

    def operand_mode(self, fp8_weight: bool) -> int:
        """weight_dot's OPERANDS: this tiling's way for an fp8 weight; a bf16 / fp16 one goes as is."""
        return OPERAND_MODES[self.operands] if fp8_weight else 0

    @property
    def label(self) -> str:
        return (f"{self.block_n}x{self.block_k}_s{self.stages}_k{self.split_k}"
                + ("" if self.operands == "widen" else f"_{self.operands}"))

    @property
    def tolerance(self) -> float:
        """Agreement with the reference product, relative to its largest value: bf16 rounding, or with
        activations rounded to fp8 (3 mantissa bits) a few times that."""
        return 5e-2 if self.operands == "fp8" else 2e-2


# the best of `python bench/draft_kernel_sweep.py --parts tma` (H200, llama-3.2-1b products cycled past
# L2, results/tma_gemm_sweep_h200.json), us at 21 rows, F.linear -> best: qkv 7.59 -> 6.49, o 6.25 ->
# 6.08, gate/up 18.40 -> 18.04, down 13.26 -> 12.08 (K = 8192 has only 32 column blocks of 64: split-K)
TMA_CANDIDATES = (TmaTiling(64, 128, 6), TmaTiling(64, 128, 4), TmaTiling(128, 128, 4), TmaTiling(64, 256, 3, 4),
                  TmaTiling(64, 128, 4, 4), TmaTiling(64, 128, 6, 2))

# fp8 weights (HAS_SCALE): a byte per weight, so the same bytes per stage at twice the BLOCK_K; both operands
# as f16 (weight_dot), the fastest way on an H100 at every product (results/fp8_fusion_sweep_h100_operands.json,
# 21 rows, best f16 / fp8 activations / widened: gate/up 15.7 / 19.2 / 29.4 us, down 11.2 / 15.6 / 15.4, LM head
# 98 / 116 / 105), so the others are left to `draft_kernel_sweep.py --parts fp8_fusion` (fewer kernels to
# compile and time at start-up)
FP8_TMA_CANDIDATES = tuple(TmaTiling(64, block_k, stages, split_k, operands="f16") for block_k, stages, split_k in
                           ((256, 3, 1), (256, 4, 1), (256, 4, 2), (256, 4, 4), (128, 6, 1), (128, 4, 4)))


def tma_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def tma_aligned(weight: torch.Tensor) -> bool:
    """TMA reads rows that start on 16-byte boundaries."""
    return weight.stride(-1) == 1 and not (weight.stride(0) * weight.element_size()) % 16 and not weight.data_ptr() % 16


def tma_linear(x: torch.Tensor, weight: torch.Tensor, tiling: TmaTiling,
               residual: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows), weight [N, K] (tiling.fits(N, K); rows 16-byte aligned) ->
    [..., N]; residual [..., N]: added to the product (in the kernel's epilogue, or as the split-K
    parts are summed); scale [N] (float32): weight is fp8, the product x (weight * scale[:, None])^T."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = tma_rows(x.reshape(-1, k))
    rows, n = x2.shape[0], weight.shape[0]
    if rows > MAX_ROWS or not tiling.fits(n, k):
        raise ValueError(f"{tiling} does not take {rows} rows x K = {k} -> N = {n}")
    res = residual.reshape(rows, n).contiguous() if residual is not None else x2   # any pointer when unused
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    out = y if tiling.split_k == 1 else torch.empty((tiling.split_k, rows, n), dtype=torch.float32, device=x.device)
    block_m = tma_block_rows(rows)
    _tma_matmul_kernel[(n // tiling.block_n, tiling.split_k)](
        tma_descriptor(x2, [block_m, tiling.block_k]), tma_descriptor(weight, [tiling.block_n, tiling.block_k]),
        out, res, scale if scale is not None else res, rows, n, K=k, BLOCK_M=block_m, BLOCK_N=tiling.block_n,
        BLOCK_K=tiling.block_k, SPLIT_K=tiling.split_k, STAGES=tiling.stages, HAS_RESIDUAL=residual is not None,
        HAS_SCALE=scale is not None, OPERANDS=tiling.operand_mode(scale is not None),
        num_warps=tiling.num_warps)
    if tiling.split_k > 1:
        _sum_splits_kernel[(triton.cdiv(rows * n, 1024),)](out, y, res, rows * n, SPLIT_K=tiling.split_k, BLOCK=1024,
                                                           HAS_RESIDUAL=residual is not None)
    return y.view(*lead, n)


def tma_rows(x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] as TMA reads it: a 16-byte aligned base and row stride (else a contiguous copy)."""
    if x2.stride(-1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        return x2.contiguous()
    return x2


def tma_block_rows(rows: int) -> int:
    """The x tile's rows (the MMA's N side): a power of two >= 16; TMA fills the rows past M with zeros."""
    return max(16, triton.next_power_of_2(rows))


def tma_descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, tiling: SkinnyTiling,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows in all), weight [N, K] -> [..., N]; no bias. scale [N]
    (float32): weight is quantized (fp8), the result is x (weight * scale[:, None])^T."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape[0], weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {rows}")
    if not tiling.fits(k):
        raise ValueError(f"{tiling} does not divide K = {k}")
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    out = y if tiling.split_k == 1 else torch.empty((tiling.split_k, rows, n), dtype=torch.float32, device=x.device)
    _skinny_matmul_kernel[(triton.cdiv(n, tiling.block_n), tiling.split_k)](
        x2, weight, out, scale if scale is not None else weight, rows, n, x2.stride(0), weight.stride(0), n,
        K=k, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        HAS_SCALE=scale is not None, SPLIT_K=tiling.split_k, num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if tiling.split_k > 1:
        _sum_splits_kernel[(triton.cdiv(rows * n, 1024),)](out, y, out, rows * n, SPLIT_K=tiling.split_k, BLOCK=1024)
    return y.view(*lead, n)


@dataclass
class MeasuredLinear:
    """F.linear, a Triton tiling (the few-row kernel, or on Hopper the TMA kernel) or one of cuBLASLt's
    algorithms (ssd.layers.cublaslt), whichever measured fastest for this (rows, N, K, dtype). One per
    model (the choices are its own); on CPU and for wide inputs it is F.linear. For fp8 weights (`quantized`) the library candidate is
    torch._scaled_mm (`library_fp8`: ssd.layers.fp8).

    Shapes of up to MAX_ROWS rows are measured when first seen; wider ones (cuBLASLt's algorithms
    only) up to `wide_rows`, which is 0 except inside `measuring_wide` — CUDA-graph warm-ups open
    it, so the batched tree and window shapes are measured once at start-up, and prompts of every
    length are not."""
    choices: dict[tuple, SkinnyTiling | TmaTiling | LtAlgorithm | None] = field(default_factory=dict)
    library_fp8: Callable | None = None
    lt_algorithms: int = LISTED_ALGORITHMS
    tma: bool = True           # also the TMA kernel's tilings (Hopper and later)
    wide_rows: int = 0
    measuring_s: float = 0.0   # spent timing candidates so far (start-up cost)
    kernel_cache: bool = True  # keep the choices on disk for the next start-up (ssd.layers.choice_cache)
    recalled: int = 0          # choices taken from there
    _lt: dict[torch.device, CublasLt | None] = field(default_factory=dict, repr=False)
    _disk: DeviceChoiceCaches | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kernel_cache:
            self._disk = DeviceChoiceCaches(f"linear lt={self.lt_algorithms} tma={self.tma}", KERNEL_SOURCES)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (bias is not None or not x.is_cuda or rows == 0 or weight.stride(-1) != 1
                or x.dtype not in (torch.bfloat16, torch.float16)):
            return F.linear(x, weight, bias)
        key = (rows, *weight.shape, x.dtype)
        if key not in self.choices:
            if not self.measures(rows) or torch.cuda.is_current_stream_capturing():   # no timing inside a capture
                return F.linear(x, weight)
            lt = self.cublaslt(x.device)
            self._choose(key, x, weight, lambda: self.measure(x, weight, lt=lt, lt_count=self.lt_algorithms,
                                                              tma=self.tma and tma_available(x.device)))
        choice = self.choices[key]
        if choice is None:
            return F.linear(x, weight)
        if isinstance(choice, SkinnyTiling):
            return skinny_linear(x, weight, choice)
        if isinstance(choice, TmaTiling):   # chosen for an aligned weight of this shape; another may not be
            return tma_linear(x, weight, choice) if tma_aligned(weight) else F.linear(x, weight)
        return self.cublaslt(x.device).apply(x, weight, choice)

    def _choose(self, key: tuple, x: torch.Tensor, weight: torch.Tensor, measure: Callable[[], object]) -> None:
        """choices[key]: as stored on disk for this setup, else measure()'s (then stored)."""
        start = time.perf_counter()
        cache = self._disk.at(x.device) if self._disk is not None else None
        self.choices[key], recalled = recalled_or_measured(cache, key, measure,
                                                           lambda rank: self.lt_algorithm(x, weight, rank))
        self.recalled += recalled
        self.measuring_s += time.perf_counter() - start

    def lt_algorithm(self, x: torch.Tensor, weight: torch.Tensor, rank: int) -> LtAlgorithm | None:
        """cuBLASLt's algorithm of this rank for x times weight^T (a stored choice), or None; the
        heuristic is asked for as many as when measuring, so that ranks mean the same."""
        lt = self.cublaslt(x.device)
        if lt is None or rank >= self.lt_algorithms:
            return None
        return next((a for a in lt.algorithms(row_matrix(x), weight, self.lt_algorithms) if a.rank == rank), None)

    def summary(self) -> str:
        """How many shapes run what, and what measuring them cost."""
        kinds = Counter("F.linear" if c is None else "Triton" if isinstance(c, SkinnyTiling)
                        else "Triton TMA" if isinstance(c, TmaTiling) else "cuBLASLt" for c in self.choices.values())
        return (f"{len(self.choices)} linear shapes measured in {self.measuring_s:.1f} s ("
                + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
                + (f"; {self.recalled} stored by an earlier run" if self.recalled else "") + ")")

    def measures(self, rows: int) -> bool:
        """Whether a new shape of this many rows is measured (else it runs F.linear)."""
        return 0 < rows <= MAX_ROWS or (self.lt_algorithms > 0 and rows <= self.wide_rows)

    @contextmanager
    def measuring_wide(self, rows: int = WIDE_ROWS):
        """Shapes of up to `rows` rows seen inside are measured too (cuBLASLt's algorithms)."""
        previous, self.wide_rows = self.wide_rows, rows
        try:
            yield
        finally:
            self.wide_rows = previous

    def cublaslt(self, device: torch.device) -> CublasLt | None:
        """This device's cuBLASLt handle, or None (not asked for, or the library did not load)."""
        if not self.lt_algorithms:
            return None
        if device not in self._lt:
            try:
                self._lt[device] = CublasLt(device)
            except (OSError, RuntimeError, AttributeError) as exc:
                log.warning("cuBLASLt's algorithms are not measured (%s): F.linear and the Triton kernels only", exc)
                self._lt[device] = None
        return self._lt[device]

    def quantized(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [..., K] (at most MAX_ROWS rows, CUDA), weight fp8 [N, K], scale [N]: library_fp8 or the
        skinny kernel widening the weight on load, whichever measured faster for the shape."""
        key = (x.numel() // x.shape[-1], *weight.shape, weight.dtype, x.dtype)
        if key not in self.choices:
            if torch.cuda.is_current_stream_capturing():
                return self.library_fp8(x, weight, scale)
            self._choose(key, x, weight, lambda: self.measure(x, weight, scale, self.library_fp8,
                                                              tma=self.tma and tma_available(x.device)))
        tiling = self.choices[key]
        if isinstance(tiling, SkinnyTiling):
            return skinny_linear(x, weight, tiling, scale)
        if isinstance(tiling, TmaTiling) and tma_aligned(weight):
            return tma_linear(x, weight, tiling, scale=scale)
        return self.library_fp8(x, weight, scale)

    @staticmethod
    def measure(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                library_fp8: Callable | None = None, lt: CublasLt | None = None,
                lt_count: int = 0, tma: bool = False) -> SkinnyTiling | TmaTiling | LtAlgorithm | None:
        """The fastest candidate that agrees with the library product (None: the library product:
        F.linear, or library_fp8(x, weight, scale) for an fp8 weight with its scale). Candidates: the
        Triton tilings (up to MAX_ROWS rows; with `tma` also the TMA kernel's) and, given a CublasLt
        `lt`, up to lt_count of its algorithms (bf16 / fp16 weights)."""
        rows = x.numel() // x.shape[-1]
        if scale is None:
            library, tilings = (lambda w: F.linear(x, w)), CANDIDATES
            library_out = F.linear(x, weight)
        else:
            library, tilings = (lambda w: library_fp8(x, w, scale)), FP8_CANDIDATES
            library_out = dequantized_linear(x, weight, scale)
        # library_out stays allocated: a candidate that wrote nothing would otherwise be handed its
        # freed block back, holding the very values it is compared with
        reference = library_out.float()
        candidates = {tiling: (lambda w, t=tiling: skinny_linear(x, w, t, scale))
                      for tiling in tilings if rows <= MAX_ROWS and tiling.fits(weight.shape[1])}
        if tma and rows <= MAX_ROWS and tma_aligned(weight):
            candidates.update({tiling: (lambda w, t=tiling: tma_linear(x, w, t, scale=scale))
                               for tiling in (TMA_CANDIDATES if scale is None else FP8_TMA_CANDIDATES)
                               if tiling.fits(*weight.shape)})
        if lt is not None and lt_count and scale is None:
            x2 = row_matrix(x)
            candidates.update({algorithm: (lambda w, a=algorithm: lt.linear(x2, w, a))
                               for algorithm in lt.algorithms(x2, weight, lt_count)})
        best = fastest_agreeing(candidates, reference, weight, baseline=library)
        log.debug("linear rows=%d weight=%s %s -> %s", rows, tuple(weight.shape), weight.dtype, best)
        return best


# the files whose source a stored choice depends on (ssd.layers.choice_cache.setup_digest): a change
# elsewhere (e.g. the fused norm kernels, which add norm_fusion.py to theirs) keeps these choices
KERNEL_SOURCES = tuple(str(Path(__file__).with_name(name)) for name in ("triton_linear.py", "cublaslt.py", "fp8.py"))
UNUSABLE = object()   # a stored choice this process cannot use (another format, an algorithm gone)


# a tiling's kind in the kernel cache -> its class (another kernel's chooser passes its own)
TILING_KINDS = {"skinny": SkinnyTiling, "tma": TmaTiling}


def stored_choice(choice, kinds: dict[str, type] = TILING_KINDS) -> dict:
    """A measured choice (None: the library product; a tiling of one of `kinds`; a cuBLASLt algorithm)
    as the kernel cache stores it (an algorithm by its heuristic rank)."""
    if choice is None:
        return {"kind": "library"}
    kind = next((name for name, cls in kinds.items() if isinstance(choice, cls)), None)
    if kind is not None:
        return {"kind": kind, **asdict(choice)}
    return {"kind": "lt", "rank": choice.rank}


def restored_choice(stored: dict, lt_algorithm: Callable[[int], LtAlgorithm | None],
                    kinds: dict[str, type] = TILING_KINDS):
    """stored_choice's inverse (lt_algorithm(rank) finds the algorithm again), or UNUSABLE."""
    params = {name: value for name, value in stored.items() if name != "kind"}
    try:
        if stored.get("kind") == "library":
            return None
        if stored.get("kind") in kinds:
            return kinds[stored["kind"]](**params)
        if stored.get("kind") == "lt":
            algorithm = lt_algorithm(int(params["rank"]))
            return UNUSABLE if algorithm is None else algorithm
    except (TypeError, ValueError, KeyError):
        pass
    return UNUSABLE


def recalled_or_measured(cache: ChoiceCache | None, key: tuple, measure: Callable[[], object],
                         lt_algorithm: Callable[[int], LtAlgorithm | None] = lambda rank: None,
                         kinds: dict[str, type] = TILING_KINDS) -> tuple[object, bool]:
    """(choice, whether it came from the cache): the one `cache` stores for key, else measure()'s,
    which is then stored."""
    stored = cache.get(key) if cache is not None else None
    if stored is not None:
        choice = restored_choice(stored, lt_algorithm, kinds)
        if choice is not UNUSABLE:
            return choice, True
    choice = measure()
    if cache is not None:
        cache.put(key, stored_choice(choice, kinds))
    return choice, False


def agrees(key, product: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, reference: torch.Tensor,
           tolerance: float) -> bool:
    """Whether product(weight) is within `tolerance` of `reference` in each of AGREEMENT_RUNS runs (a
    kernel that races may be right once) and, for our own kernels (key.repeatable: no atomics), the
    same bits every run (one that is not races, however close it came). A safety net: the interpreter
    tests pin the math."""
    first = None
    for _ in range(AGREEMENT_RUNS):
        out = product(weight)
        if (out.float().view_as(reference) - reference).abs().max().item() > tolerance:
            log.warning("%s disagrees with the library / unfused result at %s: not used", key, tuple(weight.shape))
            return False
        if getattr(key, "repeatable", False):
            if first is None:
                first = out.clone()
            elif not torch.equal(out, first):
                log.warning("%s differs from run to run at %s: not used", key, tuple(weight.shape))
                return False
    return True


def fastest_agreeing(candidates: dict[object, Callable[[torch.Tensor], torch.Tensor]], reference: torch.Tensor,
                     weight: torch.Tensor, baseline: Callable[[torch.Tensor], object] | None = None,
                     times: dict | None = None):
    """The fastest of `candidates` (key -> product(weight)) whose product agrees with `reference`
    (agrees), each timed by streaming_time_us, or None: `baseline` (product(weight), timed first)
    was faster, or nothing agreed. Without a baseline a lone agreeing candidate is taken untimed.
    times: filled with the microseconds measured (key -> us; None: the baseline)."""
    largest = reference.abs().max().item()
    agreeing = []
    for key, product in candidates.items():
        try:
            if agrees(key, product, weight, reference, getattr(key, "tolerance", 2e-2) * largest + 1e-3):
                agreeing.append(key)
        except Exception as exc:  # e.g. shared memory: that tiling is not a candidate here
            log.debug("%s failed at %s: %s", key, tuple(weight.shape), exc)
    if not agreeing or (baseline is None and len(agreeing) == 1):   # nothing to time against
        return agreeing[0] if agreeing else None
    times = {} if times is None else times
    if baseline is not None:
        times[None] = streaming_time_us(baseline, weight)
    for key in agreeing:
        try:
            times[key] = streaming_time_us(candidates[key], weight)
        except Exception as exc:
            log.debug("%s failed at %s: %s", key, tuple(weight.shape), exc)
    log.debug("timed at %s: %s", tuple(weight.shape), {str(k): round(v, 2) for k, v in times.items()})
    return min(times, key=times.get) if times else None


def streaming_time_us(product: Callable[[torch.Tensor], object], weight: torch.Tensor) -> float:
    """Graph-timed product(weight) as a model runs it: back-to-back calls cycle through copies of the
    weight twice the L2 cache in all, so each call streams its weight from memory, as a model's
    layers do (one small weight timed alone is read from L2 after the first call and flatters the
    kernels with the least fixed cost)."""
    nbytes = weight.numel() * weight.element_size()
    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 64 << 20)
    copies = [weight] + [weight.clone() for _ in range(min(15, -(-2 * l2 // nbytes) - 1))]
    turn = itertools.count()
    return time_us(lambda: product(copies[next(turn) % len(copies)]), calls=2 * len(copies))
