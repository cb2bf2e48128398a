"""A decoder layer with its RMSNorms, residual adds and SiLU inside the TMA products (run here under
Triton's CPU interpreter) computes what the unfused layer does: each kernel against the unfused
chain, and whole tiny models (bias, q/k norm, tied head) against the same model unfused."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ssd.distributed.tp_group import TPGroup  # noqa: E402
from ssd.engine.model_runner import ModelRunner  # noqa: E402
from ssd.engine.runner_config import RunnerConfig  # noqa: E402
from ssd.layers.kernels import silu_and_mul  # noqa: E402
from ssd.layers.layernorm import RMSNorm, rms_norm  # noqa: E402
from ssd.layers.norm_fusion import NormFusion, tma_norm_linear  # noqa: E402
from ssd.layers.triton_linear import TmaTiling, tma_linear  # noqa: E402
from fp8_activations import e4m3_exact_activations  # noqa: E402
from tiny_models import make_checkpoint  # noqa: E402

EPS = 1e-5
TILING = TmaTiling(64, 64, 2)


def operands(rows, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(rows, k, generator=g)            # not unit scale: the norm must matter
    return x, torch.randn(n, k, generator=g) / k ** 0.5, torch.rand(k, generator=g) + 0.5, torch.randn(n, generator=g)


@pytest.mark.parametrize("rows", [1, 7, 21, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_linear_is_the_product_of_the_normed_rows(rows, bias):
    x, weight, g, b = operands(rows, 128, 256, rows)
    b = b if bias else None
    out = tma_norm_linear(x, EPS, weight * g, TILING, b)      # the gain folded into the weight
    torch.testing.assert_close(out, F.linear(rms_norm(x, g, EPS), weight, b), rtol=1e-4, atol=1e-4)


def test_norm_linear_reads_rows_of_a_wider_tensor():
    """x a column slice (row stride > K, as TMA takes it without a copy): the norm's own load of x
    (its squares) walks the same rows as the product's."""
    wide, weight, g, _ = operands(21, 128, 256 + 64, 5)
    x = wide[:, :256]
    weight, g = weight[:, :256], g[:256]
    out = tma_norm_linear(x, EPS, weight * g, TILING)
    torch.testing.assert_close(out, F.linear(rms_norm(x, g, EPS), weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 21, 64])
def test_gated_norm_linear_is_silu_of_gate_times_up(rows):
    x, weight, g, _ = operands(rows, 2 * 128, 192, rows)      # [gate; up], 128 columns each
    out = tma_norm_linear(x, EPS, weight * g, TILING, gated=True)
    assert out.shape == (rows, 128)
    torch.testing.assert_close(out, silu_and_mul(F.linear(rms_norm(x, g, EPS), weight)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 21])
@pytest.mark.parametrize("split_k", [1, 4])
def test_residual_is_added_in_the_epilogue_or_with_the_split_sums(rows, split_k):
    x, weight, _, _ = operands(rows, 128, 256, split_k)
    residual = torch.randn(rows, 128, generator=torch.Generator().manual_seed(9))
    out = tma_linear(x, weight, TmaTiling(64, 32, 2, split_k), residual)
    torch.testing.assert_close(out, F.linear(x, weight) + residual, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gated,bias", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("mode", ["widen", "f16", "fp8"])
def test_fused_norm_kernels_take_fp8_weights(gated, bias, mode):
    """An fp8 weight (per-row scales) in the fused norm products: the product of the dequantized
    weight, gate and up rows each with their own scale — widened, as float16, or against activations
    quantized to e4m3 (here ones that quantize without rounding; f16: ones f16 holds exactly)."""
    from ssd.layers.fp8 import dequantized_linear, quantize_weight
    x, weight, g, b = operands(21, 256 if gated else 128, 256, 4)
    if mode == "fp8":
        x = e4m3_exact_activations(21, 256, 64, torch.Generator().manual_seed(5))
    elif mode == "f16":
        x = x.half().float()
    quantized, scale = quantize_weight(weight * g * torch.logspace(-1, 1, weight.shape[0])[:, None])
    b = b if bias else None
    out = tma_norm_linear(x, EPS, quantized, dataclasses.replace(TILING, operands=mode), b, gated=gated, scale=scale)
    product = dequantized_linear(rms_norm(x, torch.ones(256), EPS), quantized, scale)
    expected = silu_and_mul(product) if gated else product + (b if bias else 0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width,folded", [(96, True), (128, False)], ids=["no-tiling-fits", "gain-not-folded"])
def test_what_cannot_run_fused_runs_unfused(width, folded):
    """K = 96 is no multiple of the tiling's 64: the unfused chain, remembered as such; a norm whose
    gain is not folded into the weight is never fused."""
    fusion = NormFusion(silu_and_mul, norm_tilings=(TILING,), any_device=True)
    linear, norm = torch.nn.Linear(width, 128, bias=False), RMSNorm(width, EPS)
    norm.weight.data, norm.gain_folded = torch.rand(width) + 0.5, folded
    x = torch.randn(3, width)
    torch.testing.assert_close(fusion.norm_linear(x, norm, linear), linear(norm(x)))
    assert list(fusion.choices.values()) == ([None] if folded else [])


class ActivationRoundingFp8Linear(torch.nn.Module):
    """An fp8 layer whose product rounds its activations to e4m3 per row, as torch._scaled_mm's path does."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.weight, self.weight_scale, self.bias = weight, scale, None

    def linear(self, x, weight, bias=None):
        from ssd.layers.fp8 import FP8, dequantized_linear
        row_scale = x.abs().amax(-1, keepdim=True) / 448
        return dequantized_linear((x / row_scale).to(FP8).to(x.dtype) * row_scale, weight, self.weight_scale)

    def forward(self, x):
        return self.linear(x, self.weight)


def test_fp8_tilings_are_checked_against_the_weights_only_product(monkeypatch):
    """The fp8 chain's activations rounded to e4m3 put it ~3 % of the largest value off, more than a
    tiling's tolerance: the tilings are held to the product of the widened weight, not to that chain
    (against it, which tilings agreed was chance: the 1B draft's gate/up on an H100)."""
    import itertools
    from ssd.layers import triton_linear
    from ssd.layers.fp8 import dequantized_linear, quantize_weight
    times = itertools.cycle([9.0, 1.0])   # the chain, then the tiling
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: next(times))
    x, weight, _, _ = operands(21, 2 * 128, 256, 8)
    gate_up, norm = ActivationRoundingFp8Linear(*quantize_weight(weight)), RMSNorm(256, EPS)
    norm.gain_folded = True
    exact = silu_and_mul(dequantized_linear(norm(x), gate_up.weight, gate_up.weight_scale))
    chain_error = (silu_and_mul(gate_up(norm(x))) - exact).abs().max()
    assert chain_error > TILING.tolerance * exact.abs().max()      # the premise
    fusion = NormFusion(silu_and_mul, fp8_norm_tilings=(TILING,), any_device=True, kernel_cache=False)
    torch.testing.assert_close(fusion.norm_gated_linear(x, norm, gate_up), exact, rtol=1e-4, atol=1e-4)
    assert list(fusion.choices.values()) == [TILING]


SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def fusable_checkpoints(tmp_path_factory):
    """Widths the test tiling divides (TMA tiles of 64 columns x 64 of K)."""
    root = tmp_path_factory.mktemp("fusable")
    return {family: make_checkpoint(family, root / family, **SIZES) for family in ("llama", "qwen2", "qwen3")}


def fused_runner(path) -> tuple[ModelRunner, NormFusion]:
    runner = ModelRunner(RunnerConfig(model=str(path), max_len=128, num_slots=2), TPGroup())
    fusion = NormFusion(silu_and_mul, norm_tilings=(TILING,), residual_tilings=(TILING,), fp8_norm_tilings=(TILING,),
                        fp8_residual_tilings=(TILING,), any_device=True)
    for module in runner.model.modules():
        if hasattr(module, "kernels"):
            module.kernels = dataclasses.replace(module.kernels, norm_fusion=fusion)
    fusion.fold_gains(runner.model)   # as build_model does where the fusion is on
    return runner, fusion


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_model_matches_the_unfused_model(fusable_checkpoints, family):
    """Prefill of 9 tokens and 4 greedy decode steps: the same logits (up to float rounding), the
    same tokens; every op of every layer ran fused (no shape fell back to the unfused chain)."""
    path = fusable_checkpoints[family]
    (fused, fusion), plain = fused_runner(path), ModelRunner(RunnerConfig(model=str(path), max_len=128), TPGroup())
    prompt = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8, 9]])
    tokens = {}
    for name, runner in (("fused", fused), ("plain", plain)):
        ids, length, out, all_logits = prompt, prompt.shape[1], [], []
        positions = torch.arange(length)[None]
        for _ in range(5):
            logits = runner.forward(ids, positions, int(positions.max()) + 1)[:, -1]
            all_logits.append(logits)
            out.append(int(logits.argmax(-1)))
            ids, positions = torch.tensor([[out[-1]]]), positions[:, -1:] + 1
        tokens[name] = (out, torch.cat(all_logits))
    torch.testing.assert_close(tokens["fused"][1], tokens["plain"][1], rtol=1e-4, atol=1e-4)
    assert tokens["fused"][0] == tokens["plain"][0]
    assert fusion.choices and all(tiling == TILING for tiling in fusion.choices.values())
    assert {key[:2] for key in fusion.choices} == {(op, rows) for op in ("norm", "gated", "residual") for rows in (9, 1)}


@pytest.mark.parametrize("fused_faster", [True, False])
def test_fused_fp8_model_matches_the_same_model_unfused(fusable_checkpoints, monkeypatch, fused_faster):
    """Every product of every layer in fp8 (folded, then quantized, as build_model does): the fused
    kernels (widening the weights) give the logits of the same quantized model run unfused. For fp8
    weights the unfused chain is timed too (first, per shape; timings faked, CUDA-only): where it is
    faster it runs."""
    import itertools
    from ssd.layers import triton_linear
    from ssd.layers.fp8 import FP8, Fp8Linear, quantize_model_fp8
    from ssd.layers.linear import ColumnParallelLinear, RowParallelLinear
    times = itertools.cycle([9.0, 1.0] if fused_faster else [1.0, 9.0])   # chain, then the one tiling
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: next(times))
    runner, fusion = fused_runner(fusable_checkpoints["qwen2"])
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert quantize_model_fp8(runner.model, Fp8Linear(), (ColumnParallelLinear, RowParallelLinear), names, 0) == 8
    ids, positions = torch.tensor([[3, 14, 15, 9, 26]]), torch.arange(5)[None]
    fused = runner.forward(ids, positions, 5)
    assert len(fusion.choices) == 4 and all(key[-2] == FP8 for key in fusion.choices)   # o, down: 2 shapes
    assert all(t == (TILING if fused_faster else None) for t in fusion.choices.values())
    for module in runner.model.modules():
        if hasattr(module, "kernels"):
            module.kernels = dataclasses.replace(module.kernels, norm_fusion=None)
    torch.testing.assert_close(fused, runner.forward(ids, positions, 5), rtol=1e-4, atol=1e-4)


def test_more_rows_than_the_kernel_takes_run_the_unfused_layers(fusable_checkpoints):
    """... with the folded weights and gains of 1: the model's own logits."""
    path = fusable_checkpoints["llama"]
    (runner, fusion), plain = fused_runner(path), ModelRunner(RunnerConfig(model=str(path), max_len=128), TPGroup())
    ids, positions = torch.arange(3, 73)[None], torch.arange(70)[None]     # 70 rows > MAX_ROWS
    torch.testing.assert_close(runner.forward(ids, positions, 70), plain.forward(ids, positions, 70),
                               rtol=1e-4, atol=1e-4)
    assert fusion.choices == {}


def test_folding_multiplies_each_weight_column_by_its_gain(fusable_checkpoints, monkeypatch):
    """In row chunks (a small FOLD_ROWS here); the gains become ones."""
    from ssd.layers import norm_fusion
    monkeypatch.setattr(norm_fusion, "FOLD_ROWS", 7)
    runner = ModelRunner(RunnerConfig(model=str(fusable_checkpoints["qwen2"]), max_len=128), TPGroup())
    layer = runner.model.model.layers[0]
    expected = layer.mlp.gate_up_proj.weight * layer.post_attention_layernorm.weight[None, :]
    NormFusion(silu_and_mul).fold_gains(runner.model)
    torch.testing.assert_close(layer.mlp.gate_up_proj.weight, expected)
    assert torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(layer.post_attention_layernorm.weight))
    assert layer.input_layernorm.gain_folded and layer.post_attention_layernorm.gain_folded


# conftest runs Triton's interpreter unless TRITON_INTERPRET=0 is set: the race is the compiled kernel's
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "0",
                    reason="the race is the GPU's (Triton's software pipeline): a GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("rows", [14, 56, 64])
def test_every_tiling_agrees_and_repeats_at_a_large_qkv_on_the_gpu(rows):
    """qwen3-32b's qkv (10240 x 5120): with x's squares summed from the tile the MMA reads, 64x128
    tilings of 3-4 stages at 56 / 64 rows were ~7 % off and differed run to run (an H100, Triton 3.6;
    bench/fused_norm_agreement.py)."""
    from ssd.layers.norm_fusion import NORM_TMA_CANDIDATES
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 5120, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(10240, 5120, device="cuda", generator=g) * 0.02).bfloat16()
    reference = F.linear(rms_norm(x.float(), torch.ones(5120, device="cuda"), EPS).bfloat16(), weight).float()
    for tiling in NORM_TMA_CANDIDATES:
        try:
            outs = [tma_norm_linear(x, EPS, weight, tiling) for _ in range(5)]
        except Exception:   # shared memory: not a candidate at this shape
            continue
        for out in outs:
            assert (out.float() - reference).abs().max() <= 2e-2 * reference.abs().max(), tiling
            assert torch.equal(out, outs[0]), tiling
