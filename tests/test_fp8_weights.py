"""fp8 weights (ssd.layers.fp8): the quantization's error bound, the few-row kernel with fp8 weights
(Triton's CPU interpreter) against the dequantized product, a quantized model runner, and
speculative decoding with an fp8 draft staying exact (test_spec_sync / test_spec_async add more)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ssd import LLM, SamplingParams
from ssd.distributed.tp_group import TPGroup
from ssd.engine.model_runner import ModelRunner
from ssd.engine.runner_config import RunnerConfig
from ssd.layers.fp8 import FP8, Fp8Linear, dequantized_linear, quantize_weight
from fp8_activations import e4m3_exact_activations

PROMPTS = [[5, 6, 7], [9] * 11, list(range(3, 30)), [40, 41]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_quantized_weight_is_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(33, 70, generator=g) * torch.logspace(-3, 2, 33)[:, None]
    weight[5] = 0.0                                               # an all-zero row (a padded vocab shard)
    quantized, scale = quantize_weight(weight)
    assert quantized.dtype == FP8 and scale.shape == (33,) and scale.dtype == torch.float32
    restored = quantized.float() * scale[:, None]
    # 3 mantissa bits: half an ulp is 2^-4 of the value; below e4m3's normal range (2^-6 of 448 x scale
    # ... ) the spacing is 2^-9 x scale
    assert ((restored - weight).abs() <= weight.abs() / 16 + scale[:, None] / 512).all()
    nonzero = torch.arange(33) != 5
    assert torch.equal(quantized.float().abs().amax(dim=1)[nonzero], torch.full((32,), 448.0))
    assert torch.equal(restored[5], torch.zeros(70))


def test_quantizing_in_passes_equals_one_pass(monkeypatch):
    from ssd.layers import fp8
    weight = torch.randn(50, 16)
    whole = quantize_weight(weight)
    monkeypatch.setattr(fp8, "_ROWS_PER_PASS", 7)
    parts = quantize_weight(weight)
    assert torch.equal(whole[0].float(), parts[0].float()) and torch.equal(whole[1], parts[1])


@pytest.mark.parametrize("rows", [1, 21, 64])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200)])
def test_few_row_kernel_with_fp8_weights_matches_the_dequantized_product(rows, n, k):
    pytest.importorskip("triton")
    from ssd.layers.triton_linear import SkinnyTiling, skinny_linear
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=g)
    quantized, scale = quantize_weight(torch.randn(n, k, generator=g))
    for tiling in (t for t in (SkinnyTiling(16, 64), SkinnyTiling(32, 32, split_k=2)) if t.fits(k)):
        out = skinny_linear(x, quantized, tiling, scale)
        torch.testing.assert_close(out, dequantized_linear(x, quantized, scale), rtol=1e-5, atol=1e-4)


def test_measured_choice_for_fp8_weights(monkeypatch):
    """fp8 candidates: the library product (torch._scaled_mm on GPU; here the dequantized product)
    and the fp8 tilings that divide K (timings faked: CUDA-only)."""
    pytest.importorskip("triton")
    from ssd.layers import triton_linear
    x = torch.randn(5, 64)
    quantized, scale = quantize_weight(torch.randn(48, 64))
    fitting = [t for t in triton_linear.FP8_CANDIDATES if t.fits(64)]
    assert 0 < len(fitting) < len(triton_linear.FP8_CANDIDATES)          # a split-K one does not fit K = 64
    times = iter([9.0, 7.0, 2.0] + [8.0] * len(fitting))
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: next(times))
    assert triton_linear.MeasuredLinear.measure(x, quantized, scale, dequantized_linear) == fitting[1]
    times = iter([1.0] + [8.0] * len(fitting))
    assert triton_linear.MeasuredLinear.measure(x, quantized, scale, dequantized_linear) is None


@pytest.mark.parametrize("rows", [1, 21])
@pytest.mark.parametrize("split_k,residual", [(1, False), (1, True), (2, True)])
@pytest.mark.parametrize("operands", ["widen", "f16", "fp8"])
def test_tma_kernel_multiplies_fp8_weights_and_applies_their_scales(rows, split_k, residual, operands):
    """Widened to x's dtype, both as float16 (the same product), or against x quantized per K-block
    to e4m3 (here without rounding: the product of x itself)."""
    pytest.importorskip("triton")
    from ssd.layers.triton_linear import TmaTiling, tma_linear
    g = torch.Generator().manual_seed(rows + split_k)
    x = (e4m3_exact_activations(rows, 256, 64, g) if operands == "fp8"
         else torch.randn(rows, 256, generator=g) * torch.logspace(-1, 1, 256))
    quantized, scale = quantize_weight(torch.randn(128, 256, generator=g) * torch.logspace(-2, 1, 128)[:, None])
    res = torch.randn(rows, 128, generator=g) if residual else None
    out = tma_linear(x, quantized, TmaTiling(64, 64, 2, split_k, operands=operands), res, scale)
    seen = x.half().float() if operands == "f16" else x     # (x is float32 here)
    expected = dequantized_linear(seen, quantized, scale) + (res if residual else 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


def test_f16_operands_keep_activations_past_f16_range_finite():
    """float16 tops out at 65504: larger activations are clamped there, not turned into inf."""
    pytest.importorskip("triton")
    from ssd.layers.triton_linear import TmaTiling, tma_linear
    x = torch.full((3, 128), 1.0)
    x[1, 5] = 1e6
    quantized, scale = quantize_weight(torch.ones(64, 128))
    out = tma_linear(x, quantized, TmaTiling(64, 64, 2, operands="f16"), scale=scale)
    assert torch.isfinite(out).all() and out[1, 0].item() == pytest.approx(65504 + 127)


def test_measured_choice_for_fp8_weights_may_be_a_tma_tiling(monkeypatch):
    """With tma=True the fp8 TMA tilings that fit are timed too, and the quantized product runs the
    one chosen (timings faked: CUDA-only)."""
    pytest.importorskip("triton")
    from ssd.layers import triton_linear
    x = torch.randn(5, 256)
    quantized, scale = quantize_weight(torch.randn(128, 256))
    skinny = [t for t in triton_linear.FP8_CANDIDATES if t.fits(256)]
    tma = [t for t in triton_linear.FP8_TMA_CANDIDATES if t.fits(128, 256)]
    assert tma
    times = iter([9.0] + [8.0] * len(skinny) + [3.0] + [1.0] + [8.0] * len(tma))
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: next(times))
    assert triton_linear.MeasuredLinear.measure(x, quantized, scale, dequantized_linear, tma=True) == tma[1]


def test_fp8_activation_tilings_may_differ_by_fp8_rounding_the_others_by_bf16():
    """fastest_agreeing takes a tiling whose activations are rounded to e4m3 within its own, wider
    tolerance; a tiling widening the weight is held to bf16 rounding."""
    pytest.importorskip("triton")
    from ssd.layers.triton_linear import TmaTiling, fastest_agreeing
    reference = torch.linspace(-10, 10, 64)
    off_by = lambda error: (lambda w: reference + error)  # noqa: E731
    widen, fp8 = TmaTiling(64, 64, 2), TmaTiling(64, 64, 2, operands="fp8")
    assert fastest_agreeing({widen: off_by(0.3)}, reference, torch.empty(1)) is None
    assert fastest_agreeing({fp8: off_by(0.3)}, reference, torch.empty(1)) == fp8
    assert fastest_agreeing({fp8: off_by(0.6)}, reference, torch.empty(1)) is None


def test_a_product_that_is_wrong_on_a_later_run_is_not_taken():
    """A kernel that races can agree once: each candidate is checked on several runs."""
    pytest.importorskip("triton")
    from ssd.layers.triton_linear import TmaTiling, fastest_agreeing
    reference = torch.linspace(-10, 10, 64)
    steady, flaky = TmaTiling(64, 64, 2), TmaTiling(64, 64, 3)
    runs = itertools.chain([reference], itertools.repeat(reference + 1.0))   # right the first time only
    assert fastest_agreeing({flaky: lambda w: next(runs)}, reference, torch.empty(1)) is None
    assert fastest_agreeing({steady: lambda w: reference}, reference, torch.empty(1)) == steady


def test_our_kernel_must_repeat_its_bits_a_library_only_its_agreement():
    """Within tolerance every run but different bits: a race in one of our kernels (no atomics), noise
    a library algorithm may have."""
    pytest.importorskip("triton")
    from ssd.layers.triton_linear import TmaTiling, fastest_agreeing
    reference = torch.linspace(-10, 10, 64)
    jitter = itertools.count()
    wobbling = lambda w: reference + 1e-4 * (next(jitter) % 2)  # noqa: E731
    assert fastest_agreeing({TmaTiling(64, 64, 2): wobbling}, reference, torch.empty(1)) is None
    assert fastest_agreeing({"library algorithm": wobbling}, reference, torch.empty(1)) == "library algorithm"


def test_cpu_product_adds_the_bias_after_the_scale():
    x, bias = torch.randn(3, 16), torch.randn(8)
    quantized, scale = quantize_weight(torch.randn(8, 16))
    expected = F.linear(x, quantized.float() * scale[:, None], bias)
    torch.testing.assert_close(Fp8Linear()(x, quantized, bias, scale=scale), expected)
    widened = Fp8Linear()(x, quantized, bias, scale=scale, widened=quantized.float())   # as the CPU model runs it
    torch.testing.assert_close(widened, expected)


@pytest.mark.parametrize("family", ["qwen2", "llama"])   # tied / untied LM head; qkv bias / none
def test_fp8_runner_quantizes_linears_and_head_not_the_embedding(tiny_checkpoints, family):
    path = str(tiny_checkpoints[family])
    exact = ModelRunner(RunnerConfig(model=path, max_len=64, num_slots=2), TPGroup())
    fp8 = ModelRunner(RunnerConfig(model=path, max_len=64, num_slots=2, weight_quant="fp8"), TPGroup())
    weights = dict(fp8.model.named_parameters())
    quantized = [name for name in weights
                 if name.endswith(("gate_up_proj.weight", "down_proj.weight")) or name == "lm_head.weight"]
    assert len(quantized) == 2 * 2 + 1 and all(weights[name].dtype == FP8 for name in quantized)
    assert all(weights[name].dtype == torch.float32 for name in weights if name not in quantized)
    assert weights["model.embed_tokens.weight"].dtype == torch.float32
    torch.testing.assert_close(fp8.model.model.embed_tokens.weight, exact.model.model.embed_tokens.weight)
    ids = torch.tensor([PROMPTS[2]])
    positions = torch.arange(ids.shape[1])[None]
    reference = exact.forward(ids, positions, ids.shape[1])
    quantized = fp8.forward(ids, positions, ids.shape[1])
    assert not torch.equal(quantized, reference)                   # the fp8 weights are really used ...
    relative = (quantized - reference).norm() / reference.norm()
    assert relative < 0.3                                          # ... and stay close to the exact ones
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() > 0.8


def test_runner_stores_the_layers_it_is_told_in_fp8(tiny_checkpoints):
    """RunnerConfig.fp8_layers: another list than the default (a choice the benches measure)."""
    cfg = RunnerConfig(model=str(tiny_checkpoints["llama"]), max_len=64, num_slots=2, weight_quant="fp8",
                       fp8_layers=("down_proj", "lm_head"))
    weights = dict(ModelRunner(cfg, TPGroup()).model.named_parameters())
    quantized = {name for name, weight in weights.items() if weight.dtype == FP8}
    layers = len([name for name in weights if name.endswith("down_proj.weight")])
    assert layers and len(quantized) == layers + 1
    assert quantized == {name for name in weights if name.endswith("down_proj.weight") or name == "lm_head.weight"}


def test_bad_quantization_name_is_refused():
    with pytest.raises(ValueError, match="fp8"):
        RunnerConfig(model="x", weight_quant="int4")
    with pytest.raises(ValueError, match="fp8"):
        LLM("llama-3.2-1b", draft="llama-3.2-1b", num_speculative_tokens=2, draft_quantization="int4")


def test_sync_speculation_with_fp8_draft_of_the_target_is_exact(tiny_checkpoints):
    """The draft is the target itself in fp8: it agrees often, not always — both paths of the
    verifier run, and the output is still the target's greedy output."""
    path = str(tiny_checkpoints["qwen2"])
    with LLM(path, max_model_len=256) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    with LLM(path, max_model_len=256, draft=path, num_speculative_tokens=4, draft_quantization="fp8") as llm:
        outs = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        stats = llm.last_run_stats
    assert outs == expected
    assert 1.0 < stats.acceptance_length < 5.0


def test_only_listed_layers_at_least_the_threshold_are_quantized():
    from torch import nn
    from ssd.layers.fp8 import quantize_model_fp8
    from ssd.layers.linear import ColumnParallelLinear
    tp = TPGroup()
    model = nn.ModuleDict({"gate_up_proj": ColumnParallelLinear(64, [128, 128], False, tp),
                           "small": nn.ModuleDict({"gate_up_proj": ColumnParallelLinear(16, [8, 8], False, tp)}),
                           "qkv_proj": ColumnParallelLinear(64, [256], False, tp)})
    for p in model.parameters():
        p.data.normal_()
    assert quantize_model_fp8(model, Fp8Linear(), (ColumnParallelLinear,), min_elements=1000) == 1
    assert model["gate_up_proj"].weight.dtype == FP8
    assert model["small"]["gate_up_proj"].weight.dtype == model["qkv_proj"].weight.dtype == torch.float32
    x = torch.randn(3, 64)
    expected = F.linear(x, model["gate_up_proj"].weight.float() * model["gate_up_proj"].weight_scale[:, None])
    torch.testing.assert_close(model["gate_up_proj"](x), expected)


def test_producers_quantize_rows_as_the_separate_quantization_does():
    from ssd.layers.fp8 import add_rms_norm_fp8, quantize_rows, silu_and_mul_fp8
    from ssd.layers.layernorm import add_rms_norm
    x, residual, gain = torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.rand(64) + 0.5
    x[1, 2] = 0.0
    residual[1, 2] = 0.0                                           # an all-zero row: scale stays finite
    values, scales, summed = add_rms_norm_fp8(x, residual, gain, 1e-6)
    normed, expected_sum = add_rms_norm(x, residual, gain, 1e-6)
    expected_values, expected_scales = quantize_rows(normed)
    assert values.dtype == FP8 and values.shape == (2, 3, 64) and scales.shape == (6, 1)
    assert torch.equal(values.float(), expected_values.float()) and torch.equal(scales, expected_scales)
    assert torch.equal(summed, expected_sum) and torch.isfinite(scales).all()
    restored = values.float().reshape(6, 64) * scales
    assert ((restored - normed.reshape(6, 64)).abs() <= normed.reshape(6, 64).abs() / 16 + scales / 512).all()
    gate_up = torch.randn(4, 2 * 96)
    values, scales = silu_and_mul_fp8(gate_up)
    expected = quantize_rows(F.silu(gate_up[:, :96]) * gate_up[:, 96:])
    assert torch.equal(values.float(), expected[0].float()) and torch.equal(scales, expected[1])


def test_model_with_producer_quantized_rows_matches_the_separate_quantization(tiny_checkpoints, monkeypatch):
    """fp8 x fp8 products (here on the CPU too): the post-attention norm and SiLU-mul hand gate/up and
    down their rows quantized (one kernel fewer each on GPU), with the same logits as quantizing
    them in the product; few enough rows for the few-row kernel keep the bf16 activations."""
    from ssd.layers import fp8 as fp8_module
    from ssd.layers.embed_head import ParallelLMHead
    from ssd.layers.fp8 import quantize_model_fp8
    from ssd.layers.linear import ColumnParallelLinear, RowParallelLinear
    runner = ModelRunner(RunnerConfig(model=str(tiny_checkpoints["llama"]), max_len=64, num_slots=2), TPGroup())
    calls = {"norm": 0, "silu": 0, "separate": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper
    few_rows = type("FewRows", (), {"quantized": staticmethod(fp8_module.scaled_mm_linear)})()
    linear = Fp8Linear(few_rows, quantize=counted("separate", fp8_module.quantize_rows), max_rows=4,
                       quantizing_add_rms_norm=counted("norm", fp8_module.add_rms_norm_fp8),
                       quantizing_silu_and_mul=counted("silu", fp8_module.silu_and_mul_fp8),
                       scaled_mm_devices=("cuda", "cpu"))
    assert quantize_model_fp8(runner.model, linear, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead),
                              ("gate_up_proj", "down_proj", "lm_head"), 0) == 2 * 2 + 1
    ids = torch.tensor([PROMPTS[2][:9]])
    positions = torch.arange(9)[None]
    produced = runner.forward(ids, positions, 9)
    layers = runner.arch.num_layers
    assert calls == {"norm": layers, "silu": layers, "separate": 1}        # the head quantizes its own rows
    linear.produced_rows = False
    separate = runner.forward(ids, positions, 9)
    assert calls["separate"] == 1 + 2 * layers + 1 and calls["norm"] == layers
    torch.testing.assert_close(produced, separate, rtol=0, atol=0)
    linear.produced_rows = True
    runner.forward(ids[:, :3], positions[:, :3], 3)                        # 3 rows <= max_rows: few-row kernel
    assert calls["norm"] == layers and calls["silu"] == layers
