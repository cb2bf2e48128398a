"""Activations for testing the fp8-activation product (ssd.layers.triton_linear.weight_dot) exactly."""
import torch

from ssd.layers.fp8 import FP8


def e4m3_exact_activations(rows: int, k: int, block_k: int, g: torch.Generator) -> torch.Tensor:
    """x [rows, k] whose K-blocks weight_dot's fp8 operands quantize without rounding: e4m3 values with
    448 the largest of each block, times a power of two per block (so x / (amax / 448) is exact).
    (Triton's CPU interpreter rounds float32 -> e4m3 wrongly where rounding up crosses a power of
    two; the GPU's conversion does not, and the engine checks each tiling's product on the GPU.)"""
    q = (torch.randn(rows, k // block_k, block_k, generator=g) * 60).to(FP8).float()
    q[:, :, 0] = 448.0
    powers = 2.0 ** torch.randint(-3, 4, (rows, k // block_k, 1), generator=g)
    return (q * powers).view(rows, k)
