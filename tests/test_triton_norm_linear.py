"""The fused norm + projection (+ SiLU-mul) kernel (run here under Triton's CPU interpreter) equals
the separate kernels, in a whole model too, and the per-shape choice keeps the unfused path unless
a fused tiling agrees and is faster."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ssd.layers import triton_norm_linear  # noqa: E402
from ssd.layers.kernels import silu_and_mul  # noqa: E402
from ssd.layers.layernorm import add_rms_norm, rms_norm  # noqa: E402
from ssd.layers.triton_linear import CANDIDATES, SkinnyTiling  # noqa: E402
from ssd.layers.triton_norm_linear import MeasuredNormLinear, norm_linear  # noqa: E402

EPS = 1e-5


def unfused(gated, norm_weight, x, residual, weight):
    h, residual = add_rms_norm(x, residual, norm_weight, EPS) if residual is not None else (rms_norm(x, norm_weight, EPS), x)
    y = F.linear(h, weight)
    return (silu_and_mul(y) if gated else y), residual


def inputs(rows, n, k, gated, seed):
    g = torch.Generator().manual_seed(seed)
    x, residual = 3 * torch.randn(rows, k, generator=g), torch.randn(rows, k, generator=g)
    norm_weight = 1 + 0.1 * torch.randn(k, generator=g)
    weight = torch.randn(2 * n if gated else n, k, generator=g) / k ** 0.5
    return x, residual, norm_weight, weight


@pytest.mark.parametrize("rows", [1, 7, 21, 64])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200)])           # ragged N and K blocks too
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["first-layer", "residual"])
def test_matches_the_separate_kernels(rows, n, k, gated, with_residual):
    x, residual, norm_weight, weight = inputs(rows, n, k, gated, rows * n + k)
    residual = residual if with_residual else None
    out, h = norm_linear(x, residual, norm_weight, EPS, weight, SkinnyTiling(16, 64), gated)
    expected, expected_h = unfused(gated, norm_weight, x, residual, weight)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(h, expected_h) and (with_residual or h is x)


def test_leading_dims_strided_rows_and_tilings():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 2 * 128, generator=g)[..., :128]        # rows with a stride of 256
    residual, norm_weight = torch.randn(2, 5, 128, generator=g), torch.rand(128, generator=g) + 0.5
    weight = torch.randn(96, 128, generator=g) / 10
    expected, expected_h = unfused(True, norm_weight, x, residual, weight)
    for tiling in (SkinnyTiling(16, 32), SkinnyTiling(32, 128)):
        out, h = norm_linear(x, residual, norm_weight, EPS, weight, tiling, gated=True)
        assert out.shape == (2, 5, 48) and h.shape == (2, 5, 128)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(h, expected_h)


def test_refusals():
    x, w = torch.zeros(3, 16), torch.zeros(16, 16)
    with pytest.raises(ValueError, match="at most"):
        norm_linear(torch.zeros(65, 16), None, torch.ones(16), EPS, w, SkinnyTiling(16, 16))
    with pytest.raises(ValueError, match="split-K"):
        norm_linear(x, None, torch.ones(16), EPS, w, SkinnyTiling(16, 16, split_k=2))
    with pytest.raises(ValueError, match="even"):
        norm_linear(x, None, torch.ones(16), EPS, torch.zeros(15, 16), SkinnyTiling(16, 16), gated=True)


def test_choice_is_the_fastest_tiling_that_agrees(monkeypatch):
    """Timings are faked (CUDA events are GPU-only): a tiling computing something else is never
    chosen however fast; the unfused path (None) is kept when nothing beats it."""
    x, residual, norm_weight, weight = inputs(5, 24, 64, True, 0)
    reference = lambda x, r, w: unfused(True, norm_weight, x, r, w)  # noqa: E731
    fast, broken = CANDIDATES[1], CANDIDATES[2]
    real = triton_norm_linear.norm_linear

    def maybe_broken(x, r, nw, eps, w, tiling, gated):
        out, h = real(x, r, nw, eps, w, tiling, gated)
        return (out + 1.0 if tiling == broken else out), h
    monkeypatch.setattr(triton_norm_linear, "norm_linear", maybe_broken)
    tilings = [t for t in CANDIDATES if t.split_k == 1 and t != broken]
    times = iter([10.0] + [1.0 if t == broken else 5.0 if t == fast else 9.0 for t in tilings])
    monkeypatch.setattr(triton_norm_linear, "streaming_time_us", lambda product, w: next(times))
    assert MeasuredNormLinear.measure(x, residual, norm_weight, EPS, weight, True, reference) == fast
    times = iter([1.0] + [5.0] * len(tilings))
    assert MeasuredNormLinear.measure(x, residual, norm_weight, EPS, weight, True, reference) is None


def test_cpu_tensors_take_the_separate_kernels():
    x, residual, norm_weight, weight = inputs(3, 8, 16, False, 1)
    calls = []
    chooser = MeasuredNormLinear()
    chooser(x, residual, norm_weight, EPS, weight, False, lambda *a: calls.append(a) or unfused(False, norm_weight, *a))
    assert len(calls) == 1 and chooser.choices == {}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_whole_model_with_every_norm_fused(tiny_checkpoints, family):
    """Every layer's qkv and gate/up products through the fused kernel (qwen2's qkv has a bias: it
    stays unfused) give the separate kernels' logits, from the first layer (no residual) on."""
    from ssd.distributed.tp_group import TPGroup
    from ssd.engine.model_runner import ModelRunner
    from ssd.engine.runner_config import RunnerConfig
    runners = [ModelRunner(RunnerConfig(model=str(tiny_checkpoints[family]), max_len=64, num_slots=2), TPGroup())
               for _ in range(2)]
    fused_calls = []

    def always_fused(x, residual, norm_weight, eps, weight, gated, unfused):
        fused_calls.append(gated)
        return norm_linear(x, residual, norm_weight, eps, weight, SkinnyTiling(16, 32), gated)
    for module in runners[1].model.modules():
        if hasattr(module, "kernels"):
            module.kernels = dataclasses.replace(module.kernels, norm_linear=always_fused)
    ids = torch.tensor([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])
    positions = torch.arange(5).expand(2, 5).contiguous()
    logits = [runner.forward(ids, positions, 5) for runner in runners]
    layers = runners[0].model.arch.num_layers
    assert fused_calls.count(True) == layers and fused_calls.count(False) == (0 if family == "qwen2" else layers)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
