"""fp8 x fp8 products over many rows (the draft's B = 16 window and tree) in Triton, measured per shape
against torch._scaled_mm.

At a B = 16 tree step (336 rows) every fp8 product ran cuBLAS's one 128 x 128 tile kernel
(`nvjet_sm90_qqtst_128x128_...`, H100: 198 calls x 26.9 us per round,
results/draft_round_h100_llama1b_fp8_default_kernels.json). The down projection (N = 2048, K = 8192)
has only 3 x 16 such tiles for 132 SMs. This kernel tiles rows x columns (optionally also K: SPLIT_K
partial sums, added by triton_linear's _sum_splits_kernel) with both operands loaded by TMA; program
ids run over row blocks first, so the programs reading one weight tile run together and it streams
from memory once. `MeasuredRowsMatmul` times its tilings against torch._scaled_mm per (rows, N, K)
inside the engine's measuring window (CUDA-graph warm-ups) and runs the fastest that agrees; also
torch._scaled_mm with fast accumulation (ScaledMmFastAccum).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl

from ssd.layers.choice_cache import DeviceChoiceCaches
from ssd.layers.faster_of import measuring_window
from ssd.layers.fp8 import Fp8Rows, scaled_mm_rows
from ssd.layers.triton_linear import (_sum_splits_kernel, fastest_agreeing, recalled_or_measured, tma_descriptor,
                                      tma_rows)

log = logging.getLogger(__name__)


@triton.jit
def _fp8_rows_matmul_kernel(x_desc, w_desc, y_ptr, x_scale_ptr, w_scale_ptr, M, N, K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_K: tl.constexpr, STAGES: tl.constexpr):
    """Program (i, j, s): y[i-th BLOCK_M rows, j-th BLOCK_N columns] over the s-th of SPLIT_K equal
    parts of K: x fp8 [M, K] (rows past M arrive as zeros) times w fp8 [N, K]^T, float32 sums, times
    x's row scale and w's column scale. SPLIT_K > 1: y is a float32 [SPLIT_K, M, N] buffer of
    partial sums."""
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    k_start = tl.program_id(2) * (K // SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K // SPLIT_K, BLOCK_K, num_stages=STAGES):
        acc = tl.dot(x_desc.load([m0, k_start + k0]), w_desc.load([n0, k_start + k0]).T, acc)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    acc *= tl.load(x_scale_ptr + rm, mask=rm < M, other=0.0)[:, None] * tl.load(w_scale_ptr + rn)[None, :]
    y = y_ptr + tl.program_id(2) * M * N + rm[:, None] * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=rm[:, None] < M)


@dataclass(frozen=True)
class Fp8MatmulTiling:
    repeatable = True   # (not a field) no atomics: the same bits every run (triton_linear.agrees)
    block_m: int
    block_n: int
    block_k: int
    stages: int
    split_k: int = 1
    num_warps: int = 4

    def fits(self, n: int, k: int) -> bool:
        return n % self.block_n == 0 and k % (self.split_k * self.block_k) == 0

    @property
    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}_s{self.stages}_k{self.split_k}_w{self.num_warps}"

    @property
    def tolerance(self) -> float:
        """Against torch._scaled_mm on the same fp8 operands: float32 sums in another order, bf16 output."""
        return 2e-2


@dataclass(frozen=True)
class ScaledMmFastAccum:
    """torch._scaled_mm with use_fast_accum (cuBLAS's fp8 kernels without periodic float32 promotion)."""
    label = "torch._scaled_mm fast accum"
    tolerance = 2e-2


# tiles of 64-128 rows; for the 1B draft's down projection (N = 2048, K = 8192) narrower columns or
# split-K give 96-192 programs where cuBLAS's 128 x 128 tiles give 48 at 336 rows
CANDIDATES = (Fp8MatmulTiling(128, 128, 128, 4, num_warps=8), Fp8MatmulTiling(128, 256, 128, 3, num_warps=8),
              Fp8MatmulTiling(64, 128, 128, 4), Fp8MatmulTiling(128, 64, 128, 4), Fp8MatmulTiling(64, 64, 256, 3),
              Fp8MatmulTiling(128, 128, 128, 4, 2, 8), Fp8MatmulTiling(64, 128, 128, 4, 2),
              Fp8MatmulTiling(128, 128, 128, 4, 4, 8))
# how the kernel cache stores a choice (triton_linear.stored_choice)
KINDS = {"fp8_rows": Fp8MatmulTiling, "scaled_mm_fast_accum": ScaledMmFastAccum}


def fp8_rows_matmul(x: Fp8Rows, weight: torch.Tensor, scale: torch.Tensor,
                    tiling: Fp8MatmulTiling) -> torch.Tensor:
    """scaled_mm_rows with this kernel: x's fp8 rows [..., K] (scales [R, 1]) times weight fp8 [N, K]
    (scale [N], rows 16-byte aligned; tiling.fits(N, K)) -> [..., N] in x.dtype."""
    lead, k = x.values.shape[:-1], x.values.shape[-1]
    values = tma_rows(x.values.reshape(-1, k))
    rows, n = values.shape[0], weight.shape[0]
    if not tiling.fits(n, k):
        raise ValueError(f"{tiling} does not take K = {k} -> N = {n}")
    y = torch.empty((rows, n), dtype=x.dtype, device=values.device)
    out = y if tiling.split_k == 1 else torch.empty((tiling.split_k, rows, n), dtype=torch.float32,
                                                    device=values.device)
    grid = (triton.cdiv(rows, tiling.block_m), n // tiling.block_n, tiling.split_k)
    _fp8_rows_matmul_kernel[grid](
        tma_descriptor(values, [tiling.block_m, tiling.block_k]),
        tma_descriptor(weight, [tiling.block_n, tiling.block_k]),
        out, x.scales.reshape(-1), scale, rows, n, K=k, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n,
        BLOCK_K=tiling.block_k, SPLIT_K=tiling.split_k, STAGES=tiling.stages, num_warps=tiling.num_warps)
    if tiling.split_k > 1:
        _sum_splits_kernel[(triton.cdiv(rows * n, 1024),)](out, y, y, rows * n, SPLIT_K=tiling.split_k, BLOCK=1024)
    return y.view(*lead, n)


@dataclass
class MeasuredRowsMatmul:
    """(x: Fp8Rows, weight fp8 [N, K], scale [N]) -> torch._scaled_mm or one of this kernel's tilings,
    whichever measured fastest (agreeing with _scaled_mm) for (rows, N, K, dtype). Shapes are measured
    only inside `measuring_shapes` (the engine's CUDA-graph warm-ups), so a prompt of a new length
    never stalls on timing; elsewhere, and on CPU, an unmeasured shape runs _scaled_mm."""
    candidates: tuple[Fp8MatmulTiling | ScaledMmFastAccum, ...] = (ScaledMmFastAccum(), *CANDIDATES)
    choices: dict[tuple, Fp8MatmulTiling | ScaledMmFastAccum | None] = field(default_factory=dict)
    measuring: bool = False
    kernel_cache: bool = True
    _disk: DeviceChoiceCaches | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kernel_cache:
            self._disk = DeviceChoiceCaches("fp8 rows matmul", KERNEL_SOURCES)

    def __call__(self, x: Fp8Rows, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        key = (x.values.numel() // x.values.shape[-1], *weight.shape, x.dtype)
        if key not in self.choices:
            if not (self.measuring and x.values.is_cuda) or torch.cuda.is_current_stream_capturing():
                return scaled_mm_rows(x, weight, scale)
            self._choose(key, x, weight, scale)
        return product(x, weight, scale, self.choices[key])

    def measuring_shapes(self):
        return measuring_window(self)

    def _choose(self, key: tuple, x: Fp8Rows, weight: torch.Tensor, scale: torch.Tensor) -> None:
        cache = self._disk.at(weight.device) if self._disk is not None else None
        times = {}
        self.choices[key], recalled = recalled_or_measured(cache, key, lambda: self.measure(x, weight, scale, times),
                                                           kinds=KINDS)
        log.info("fp8 rows matmul %s: %s%s", "x".join(map(str, key[:3])), label(self.choices[key]),
                 " (stored by an earlier run)" if recalled else
                 " (us: " + ", ".join(f"{label(k)} {us:.1f}" for k, us in times.items()) + ")")

    def measure(self, x: Fp8Rows, weight: torch.Tensor, scale: torch.Tensor,
                times: dict | None = None) -> Fp8MatmulTiling | None:
        """The fastest tiling agreeing with torch._scaled_mm, or None (it was faster); times: filled
        with what each took (us)."""
        library_out = scaled_mm_rows(x, weight, scale)   # stays allocated (see MeasuredLinear.measure)
        candidates = {choice: (lambda w, c=choice: product(x, w, scale, c)) for choice in self.candidates
                      if isinstance(choice, ScaledMmFastAccum) or choice.fits(*weight.shape)}
        return fastest_agreeing(candidates, library_out.float(), weight,
                                baseline=lambda w: scaled_mm_rows(x, w, scale), times=times)


def product(x: Fp8Rows, weight: torch.Tensor, scale: torch.Tensor,
            choice: Fp8MatmulTiling | ScaledMmFastAccum | None) -> torch.Tensor:
    if choice is None:
        return scaled_mm_rows(x, weight, scale)
    if isinstance(choice, ScaledMmFastAccum):
        return scaled_mm_rows(x, weight, scale, fast_accum=True)
    return fp8_rows_matmul(x, weight, scale, choice)


def label(choice: Fp8MatmulTiling | ScaledMmFastAccum | None) -> str:
    return "torch._scaled_mm" if choice is None else choice.label


# the files whose source a stored choice depends on (ssd.layers.choice_cache.setup_digest)
KERNEL_SOURCES = tuple(str(Path(__file__).with_name(name))
                       for name in ("triton_fp8_matmul.py", "triton_linear.py", "fp8.py"))
