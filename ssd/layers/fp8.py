"""FP8 (e4m3) weights for a draft model's largest products: half the bytes to stream.

The MLP's (gate/up, down) and the LM head's weights [N, K] (FP8_LAYERS: where fp8 measured faster)
are stored as float8_e4m3fn with one float32 scale per output row (the row's absolute maximum /
448), quantized once after loading, each rank its own shard. The embedding stays as loaded (a tied
LM head gets its own fp8 copy). What a draft computes only moves its acceptance rate: the target's
verification keeps the output exact.

The product, by where it runs:
- CUDA, many rows: fp8 x fp8 on the tensor cores, each activation row quantized with its own scale
  (its absolute maximum / 448): torch._scaled_mm (with or without fast accumulation) or a Triton
  matmul, whichever measured faster for the shape (ssd.layers.triton_fp8_matmul);
- CUDA, at most MAX_ROWS rows (decode, windows, the tree at small batch): torch._scaled_mm or a
  few-row Triton kernel (weights-only: the plain one widening the weight to bf16 as it loads it, or
  on Hopper the TMA one multiplying both operands as f16: triton_linear.weight_dot), whichever
  measured faster for the shape; where a layer's norms are fused into its products
  (ssd.layers.norm_fusion) the fused kernels take the fp8 weight the same way, where they measured
  faster than this layer's unfused fp8 chain;
- CPU: the weights-only product in the input's dtype, from a widened copy of the fp8 weight (fp8
  numbers at float speed: tests, accuracy checks with real checkpoints).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssd.layers.kernels import silu_and_mul
from ssd.layers.layernorm import add_rms_norm

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max           # 448
# the layers stored in fp8: where it measured faster at the 1B draft's shapes. Alone (results/
# fp8_gemm_sweep_h200.json, H200, weights rotated as in a model): gate/up 18.8 -> 14.3 us and the LM head
# 134 -> 89 us at 21 rows; the 8-13 MB attention weights are bound by each product's fixed cost (~6 us).
# Inside the fused norm / residual TMA kernels with both operands as f16 (weight_dot; H100,
# results/fp8_fusion_sweep_h100_operands.json, bf16 -> fp8 at 21 rows): gate/up 25.6 -> 15.7 us, down
# 15.8 -> 11.2, head 179 -> 98, while qkv (8.6 -> 9.8) and o (6.4 -> 7.0) lose; the 1B round (32K head,
# H100, results/draft_round_h100_llama1b_fp8_down_vocab32k.json) bf16 -> this list: B = 1 8.13 -> 6.54 ms,
# B = 16 12.98 -> 13.25 (many-row products go through torch._scaled_mm); on an H200 with the many-row
# products' rows quantized by their producers (Fp8Linear): B = 1 6.80 -> 6.03, B = 16 12.42 -> 12.24
# (results/draft_round_h200_llama1b_fp8_produced_rows.json). Smaller weights than
# FP8_MIN_ELEMENTS stay too (qwen3-0.6b's 12.6 MB gate/up: its draft round was 3 % slower with it)
FP8_LAYERS = ("gate_up_proj", "down_proj", "lm_head")
FP8_MIN_ELEMENTS = 16 << 20
_ROWS_PER_PASS = 8192                     # bounds the float32 temporary while quantizing an LM head


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], scales float32 [R, 1]): each row scaled by its absolute maximum / 448."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scales = (rows.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (rows / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(x.shape), scales


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (fp8 [N, K], scale [N] float32) with weight ~= fp8 * scale[:, None]."""
    quantized = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS_PER_PASS):
        rows, row_scale = quantize_rows(weight[start:start + _ROWS_PER_PASS])
        quantized[start:start + _ROWS_PER_PASS] = rows
        scale[start:start + _ROWS_PER_PASS] = row_scale[:, 0]
    return quantized, scale


class Fp8Rows(NamedTuple):
    """Activations already quantized for an fp8 x fp8 product, by the kernel that produced them:
    values fp8 [..., K], scales float32 [R, 1] (R = the rows of values; row r ~= values[r] * scales[r]),
    dtype: the product's output dtype."""
    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype


def scaled_mm_rows(x: Fp8Rows, weight: torch.Tensor, scale: torch.Tensor, fast_accum: bool = False) -> torch.Tensor:
    """fp8 x fp8 on the tensor cores: x's rows times weight fp8 [N, K] (scale [N]) -> [..., N] in x.dtype;
    fast_accum: Hopper's fp8 MMA accumulating in its own precision throughout (no periodic promotion to
    float32; as Triton's fp8 dot does on sm_90)."""
    lead, k = x.values.shape[:-1], x.values.shape[-1]
    y = torch._scaled_mm(x.values.reshape(-1, k), weight.t(), scale_a=x.scales, scale_b=scale[None, :],
                         out_dtype=x.dtype, use_fast_accum=fast_accum)
    return y.view(*lead, weight.shape[0])


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] (CUDA), weight fp8 [N, K], scale [N] -> [..., N] in x's dtype, fp8 x fp8 with
    per-row activation scales (compiled on the graph path: the quantization is one fused kernel)."""
    return scaled_mm_rows(Fp8Rows(*quantize_rows(x), x.dtype), weight, scale)


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rms_norm whose output rows come quantized: (fp8 values, scales, residual); compiled, one kernel."""
    normed, residual = add_rms_norm(x, residual, weight, eps)
    return *quantize_rows(normed), residual


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate) * up, its rows quantized: (fp8 values, scales); compiled, one kernel."""
    return quantize_rows(silu_and_mul(x))


def dequantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       widened: torch.Tensor | None = None) -> torch.Tensor:
    """The weights-only product on any device: x (weight * scale[:, None])^T in x's dtype; widened:
    weight already in x's dtype (spares the conversion per call)."""
    return F.linear(x, widened if widened is not None else weight.to(x.dtype)) * scale.to(x.dtype)


@dataclass
class Fp8Linear:
    """The `linear` of an fp8 layer: (x, weight, bias=None, *, scale). few_rows: the measured few-row
    Triton linear (ssd.layers.triton_linear.MeasuredLinear) where Triton runs, else None.

    Where a product runs fp8 x fp8 (takes_fp8_rows), the kernel producing its input may quantize the
    rows as it writes them and hand over Fp8Rows: the post-attention norm for gate/up, SiLU-mul for
    down (normed_rows / activated_rows, compiled on the graph path) — one kernel fewer per product
    (H200, 1B draft round, B = 16, 32K head: 12.67 -> 12.24 ms;
    results/draft_round_h200_llama1b_fp8_produced_rows.json).
    produced_rows=False: always quantized here (the benches' A/B).
    rows_matmul: the fp8 x fp8 product of Fp8Rows (scaled_mm_rows, or on the GPU's graph path the
    measured choice between it and a Triton kernel: ssd.layers.triton_fp8_matmul); quantize: the
    rows' quantization where no producer did it (quantize_rows, compiled on the graph path)."""
    few_rows: Callable | None = None
    rows_matmul: Callable = scaled_mm_rows
    quantize: Callable = quantize_rows
    max_rows: int = 64
    quantizing_add_rms_norm: Callable = add_rms_norm_fp8
    quantizing_silu_and_mul: Callable = silu_and_mul_fp8
    produced_rows: bool = True
    scaled_mm_devices: tuple[str, ...] = ("cuda",)   # where fp8 x fp8 runs (elsewhere: widened weights)

    def __call__(self, x: torch.Tensor | Fp8Rows, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 scale: torch.Tensor, widened: torch.Tensor | None = None) -> torch.Tensor:
        """widened: the fp8 weight already widened to x's dtype (CPU, see quantize_model_fp8)."""
        if isinstance(x, Fp8Rows):
            y = self.rows_matmul(x, weight, scale)
        elif x.device.type not in self.scaled_mm_devices:
            y = dequantized_linear(x, weight, scale, widened)
        elif self.is_many_rows(x):
            y = self.rows_matmul(Fp8Rows(*self.quantize(x), x.dtype), weight, scale)
        else:
            y = self.few_rows.quantized(x, weight, scale)
        return y + bias if bias is not None else y

    def measuring_shapes(self) -> contextlib.ExitStack:
        """A context in which the measured parts (rows_matmul, the producers) measure new shapes."""
        stack = contextlib.ExitStack()
        for part in (self.rows_matmul, self.quantizing_add_rms_norm, self.quantizing_silu_and_mul):
            if hasattr(part, "measuring_shapes"):
                stack.enter_context(part.measuring_shapes())
        return stack

    def normed_rows(self, x: torch.Tensor, residual: torch.Tensor,
                    norm: nn.Module) -> tuple[Fp8Rows, torch.Tensor]:
        """norm(x + residual) (an RMSNorm: .weight, .eps) as Fp8Rows, and x + residual."""
        values, scales, residual = self.quantizing_add_rms_norm(x, residual, norm.weight, norm.eps)
        return Fp8Rows(values, scales, x.dtype), residual

    def activated_rows(self, gate_up: torch.Tensor) -> Fp8Rows:
        return Fp8Rows(*self.quantizing_silu_and_mul(gate_up), gate_up.dtype)

    def is_many_rows(self, x: torch.Tensor) -> bool:
        """More rows than the few-row kernel takes (or none runs): fp8 x fp8 where scaled_mm_devices says."""
        return self.few_rows is None or x.numel() // x.shape[-1] > self.max_rows

    def takes_fp8_rows(self, x: torch.Tensor) -> bool:
        """Whether the product over x's rows runs fp8 x fp8 and takes them quantized by their producer."""
        return self.produced_rows and x.device.type in self.scaled_mm_devices and self.is_many_rows(x)


def fp8_rows_wanted(module: nn.Module, x: torch.Tensor) -> Fp8Linear | None:
    """The Fp8Linear of a layer quantize_model_fp8 converted when its product over x's rows takes
    them quantized (Fp8Rows) from their producer, else None."""
    fp8 = getattr(module, "fp8", None)
    return fp8 if fp8 is not None and fp8.takes_fp8_rows(x) else None


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, linear: Fp8Linear, layer_types: tuple[type, ...],
                       names: tuple[str, ...] = FP8_LAYERS, min_elements: int = FP8_MIN_ELEMENTS) -> int:
    """Every module of layer_types named (last part of its name) one of `names` (each has .weight
    [N, K] and .linear) with at least min_elements weights to fp8 weights computed by `linear`;
    returns how many. A weight shared with another module (tied LM head) is copied, not changed in
    place."""
    count = 0
    for name, module in model.named_modules():
        if (isinstance(module, layer_types) and name.rsplit(".", 1)[-1] in names
                and module.weight.numel() >= min_elements):
            dtype = module.weight.dtype
            quantized, scale = quantize_weight(module.weight)
            module.weight = nn.Parameter(quantized, requires_grad=False)
            module.register_buffer("weight_scale", scale)
            # CPU: fp8 values kept widened too (fp8 numbers at float speed, for accuracy checks)
            widened = quantized.to(dtype) if quantized.device.type == "cpu" else None
            module.linear = functools.partial(linear, scale=scale, widened=widened)
            module.fp8 = linear
            count += 1
    return count
