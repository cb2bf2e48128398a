"""One-pass producers of fp8 activation rows (Triton): SiLU-mul and add + RMSNorm quantizing as they write.

The compiled producers of ssd.layers.fp8 (add_rms_norm_fp8, silu_and_mul_fp8) are Inductor's looped
reductions: a row's values are read once for its absolute maximum and again to quantize them (H100,
1B draft, B = 16 tree step, 336 rows: SiLU-mul + quantization 9.4 us where SiLU-mul alone takes 6.3,
add + RMSNorm + quantization 4.3 where add + RMSNorm take 2.8). Here a program holds a whole row in
registers (8192 SiLU-mul outputs: 32 float32 per thread at 8 warps) and reads it from memory once.
The engine times both ways per shape at graph warm-up and runs the faster (measured_producers): on an
H200 at 336 rows SiLU-mul + quantization 9.3 -> 6.9 us (this one wins at every row count seen), add +
RMSNorm + quantization 4.1 -> 3.8 us (Inductor's wins at fewer rows) (docs/MEASUREMENTS.md, session 18).

Same arithmetic as the torch functions, bf16 roundings included: x + residual, the normed row times
the gain, SiLU(gate) and its product with up are each rounded to the input's dtype before the row's
maximum is taken; rows of zeros get the smallest positive scale (as ssd.layers.fp8.quantize_rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssd.layers.faster_of import FasterOf
from ssd.layers.fp8 import FP8, FP8_MAX

_FLOAT32_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _store_quantized(row, act, cols, mask, out_ptr, scale_ptr, stride_out, FP8_MAX: tl.constexpr,
                     TINY: tl.constexpr):
    """act: the row in float32 (already rounded to the input dtype): its fp8 values and scale."""
    scale = tl.maximum(tl.max(tl.where(mask, tl.abs(act), 0.0), 0) / FP8_MAX, TINY)
    values = tl.minimum(tl.maximum(tl.math.div_rn(act, scale), -FP8_MAX), FP8_MAX)
    tl.store(out_ptr + row * stride_out + cols, values.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _silu_mul_quant_kernel(x_ptr, out_ptr, scale_ptr, width, stride_x, stride_out,
                           FP8_MAX: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    act = (silu * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    _store_quantized(row, act, cols, mask, out_ptr, scale_ptr, stride_out, FP8_MAX, TINY)


@triton.jit
def _add_rms_norm_quant_kernel(x_ptr, residual_ptr, gain_ptr, out_ptr, scale_ptr, sum_ptr, width, eps,
                               stride_x, stride_residual, stride_out, stride_sum,
                               FP8_MAX: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + residual).to(x_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * stride_sum + cols, summed, mask=mask)
    h = summed.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(h * h, 0) / width + eps)
    gain = tl.load(gain_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (h * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    act = (gain * normed).to(x_ptr.dtype.element_ty).to(tl.float32)
    _store_quantized(row, act, cols, mask, out_ptr, scale_ptr, stride_out, FP8_MAX, TINY)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[R, width] with unit stride along a row (the kernels' column offsets)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _launch_shape(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in one program, ~32 float32 per thread at most."""
    block = triton.next_power_of_2(width)
    return block, max(1, min(16, block // 1024))


def silu_and_mul_fp8_triton(x: torch.Tensor, value_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """ssd.layers.fp8.silu_and_mul_fp8 in one pass: x [..., 2W] -> (fp8 [..., W], scales float32 [R, 1]);
    value_dtype=torch.float32: the scaled values before their rounding to fp8 (tests)."""
    rows, width = _rows(x), x.shape[-1] // 2
    values = torch.empty((rows.shape[0], width), dtype=value_dtype, device=x.device)
    scales = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
    block, warps = _launch_shape(width)
    _silu_mul_quant_kernel[(rows.shape[0],)](rows, values, scales, width, rows.stride(0), values.stride(0),
                                             FP8_MAX=FP8_MAX, TINY=_FLOAT32_TINY, BLOCK=block, num_warps=warps)
    return values.view(*x.shape[:-1], width), scales


def add_rms_norm_fp8_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            value_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssd.layers.fp8.add_rms_norm_fp8 in one pass: (fp8 values [..., K], scales [R, 1], x + residual);
    value_dtype as silu_and_mul_fp8_triton's."""
    rows, residual_rows = _rows(x), _rows(residual)
    values = torch.empty(rows.shape, dtype=value_dtype, device=x.device)
    scales = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
    summed = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block, warps = _launch_shape(rows.shape[1])
    _add_rms_norm_quant_kernel[(rows.shape[0],)](
        rows, residual_rows, weight, values, scales, summed, rows.shape[1], eps, rows.stride(0),
        residual_rows.stride(0), values.stride(0), summed.stride(0),
        FP8_MAX=FP8_MAX, TINY=_FLOAT32_TINY, BLOCK=block, num_warps=warps)
    return values.view(x.shape), scales, summed.view(x.shape)


def fp8_rows_agree(first: tuple, second: tuple) -> bool:
    """Whether two producers' outputs (fp8 values, scales[, other tensors]) agree up to rounding: each
    dequantized value within a quarter of itself plus 2^-6 of its row's scale (an e4m3 step is at most
    an eighth), scales within 1 %, other outputs within bf16 rounding."""
    (values, scales, *rest), (other_values, other_scales, *other_rest) = first, second
    if not torch.allclose(scales, other_scales, rtol=1e-2, atol=0):
        return False
    dequantized = values.float().reshape(scales.shape[0], -1) * scales
    other = other_values.float().reshape(scales.shape[0], -1) * other_scales
    if not ((dequantized - other).abs() <= dequantized.abs() / 4 + scales * 2 ** -6).all():
        return False
    return all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3) for a, b in zip(rest, other_rest))


def measured_producers(add_rms_norm, silu_and_mul) -> tuple[FasterOf, FasterOf]:
    """add_rms_norm_fp8 / silu_and_mul_fp8 (as given: compiled) or the one-pass kernels above, whichever
    is faster per shape on the GPU."""
    return (FasterOf("add + RMSNorm + fp8 rows", add_rms_norm, add_rms_norm_fp8_triton, fp8_rows_agree),
            FasterOf("SiLU-mul + fp8 rows", silu_and_mul, silu_and_mul_fp8_triton, fp8_rows_agree))
