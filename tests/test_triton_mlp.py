"""The fused MLP block (run here under Triton's CPU interpreter, one launch per phase) computes
down(SiLU(gate) * up) of RMSNorm(x + residual) and the residual stream x + residual."""
import pytest
import torch

pytest.importorskip("triton")

from ssd.layers.kernels import silu_and_mul  # noqa: E402
from ssd.layers.layernorm import add_rms_norm  # noqa: E402
from ssd.layers.triton_mlp import FusedMlp, MlpTiling  # noqa: E402

TILING = MlpTiling(block_i=16, block_h=32, block_n=16, block_k=32)


def unfused(x, residual, norm_weight, eps, gate_up, down):
    normed, residual = add_rms_norm(x, residual, norm_weight, eps)
    return silu_and_mul(normed @ gate_up.T) @ down.T, residual


def weights(hidden, intermediate, seed):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.1 * torch.randn(hidden, generator=g), torch.randn(2 * intermediate, hidden, generator=g) / hidden ** 0.5,
            torch.randn(hidden, intermediate, generator=g) / intermediate ** 0.5)


@pytest.mark.parametrize("rows", [1, 7, 21, 64])
@pytest.mark.parametrize("hidden,intermediate", [(64, 96), (128, 64)])
def test_matches_the_unfused_block(rows, hidden, intermediate):
    norm_weight, gate_up, down = weights(hidden, intermediate, rows + hidden)
    g = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    out, new_residual = FusedMlp(TILING)(x, residual, norm_weight, 1e-6, gate_up, down)
    want_out, want_residual = unfused(x, residual, norm_weight, 1e-6, gate_up, down)
    torch.testing.assert_close(new_residual, want_residual)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)


def test_leading_dims_are_kept():
    norm_weight, gate_up, down = weights(64, 96, 0)
    x, residual = torch.randn(3, 7, 64), torch.randn(3, 7, 64)
    out, new_residual = FusedMlp(TILING)(x, residual, norm_weight, 1e-5, gate_up, down)
    assert out.shape == new_residual.shape == (3, 7, 64)
    torch.testing.assert_close(out, unfused(x, residual, norm_weight, 1e-5, gate_up, down)[0], rtol=1e-4, atol=1e-4)


def test_applies_only_where_the_kernel_can_run():
    fused = FusedMlp(TILING, max_rows=32)
    _, gate_up, down = weights(64, 96, 1)
    assert fused.applies(torch.zeros(21, 64), gate_up, down)
    assert not fused.applies(torch.zeros(33, 64), gate_up, down)                       # too many rows
    assert not fused.applies(torch.zeros(4, 64), gate_up.half(), down)                 # mixed dtypes (e.g. fp8)
    _, gate_up, down = weights(64, 40, 1)
    assert not fused.applies(torch.zeros(4, 64), gate_up, down)                        # 40 features: no whole tiles
