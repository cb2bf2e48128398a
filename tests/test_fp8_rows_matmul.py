"""The many-row fp8 x fp8 Triton matmul (ssd.layers.triton_fp8_matmul, Triton's CPU interpreter) against
torch._scaled_mm, and how MeasuredRowsMatmul picks between them."""
import json

import pytest
import torch

pytest.importorskip("triton")
from ssd.layers import triton_linear  # noqa: E402
from ssd.layers.fp8 import Fp8Rows, quantize_rows, quantize_weight, scaled_mm_rows  # noqa: E402
from ssd.layers.triton_fp8_matmul import (KINDS, Fp8MatmulTiling, MeasuredRowsMatmul,  # noqa: E402
                                          ScaledMmFastAccum, fp8_rows_matmul)
from ssd.layers.triton_linear import restored_choice, stored_choice  # noqa: E402


def operands(rows: int, n: int, k: int, lead: tuple = ()):
    generator = torch.Generator().manual_seed(rows + n + k)
    x = torch.randn((*lead, rows, k), generator=generator).to(torch.bfloat16)
    weight, scale = quantize_weight(torch.randn((n, k), generator=generator) / k ** 0.5)
    return Fp8Rows(*quantize_rows(x), torch.bfloat16), weight, scale


# row counts that are not a multiple of the row block (TMA zero-fills the rows past M, the store masks them)
@pytest.mark.parametrize("rows, tiling", [(37, Fp8MatmulTiling(16, 32, 32, 2)),
                                          (40, Fp8MatmulTiling(32, 16, 32, 2, split_k=2)),
                                          (9, Fp8MatmulTiling(16, 16, 16, 2, split_k=4))])
def test_kernel_equals_scaled_mm(rows, tiling):
    x, weight, scale = operands(rows, 64, 128)
    got = fp8_rows_matmul(x, weight, scale, tiling)
    expected = scaled_mm_rows(x, weight, scale)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_kernel_keeps_leading_dims_and_refuses_a_shape_it_does_not_tile():
    x, weight, scale = operands(6, 32, 64, lead=(2,))
    got = fp8_rows_matmul(x, weight, scale, Fp8MatmulTiling(16, 32, 32, 2))
    assert got.shape == (2, 6, 32)
    torch.testing.assert_close(got.float(), scaled_mm_rows(x, weight, scale).float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="does not take"):
        fp8_rows_matmul(x, weight, scale, Fp8MatmulTiling(16, 64, 32, 2))


def test_measure_takes_the_fastest_agreeing_tiling_or_the_library(monkeypatch):
    x, weight, scale = operands(20, 32, 64)
    fast, slow, unfit = Fp8MatmulTiling(16, 16, 32, 2), Fp8MatmulTiling(16, 32, 32, 2), Fp8MatmulTiling(16, 64, 32, 2)
    times = iter([5.0, 3.0, 1.0])     # the library, then each agreeing tiling in the candidates' order
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, weight: (product(weight), next(times))[1])
    chooser = MeasuredRowsMatmul(candidates=(slow, fast, unfit), kernel_cache=False)
    assert chooser.measure(x, weight, scale) == fast
    times = iter([1.0, 3.0, 2.0])
    assert chooser.measure(x, weight, scale) is None               # torch._scaled_mm was faster


def test_a_disagreeing_tiling_is_never_chosen(monkeypatch):
    x, weight, scale = operands(20, 32, 64)
    timed = []                                    # the library is timed first; the tiling would be faster
    monkeypatch.setattr(triton_linear, "streaming_time_us",
                        lambda product, weight: 1.0 if timed.append(product) or len(timed) > 1 else 2.0)
    chooser = MeasuredRowsMatmul(candidates=(Fp8MatmulTiling(16, 32, 32, 2),), kernel_cache=False)
    assert chooser.measure(x, weight, scale) == Fp8MatmulTiling(16, 32, 32, 2)
    timed.clear()
    monkeypatch.setattr("ssd.layers.triton_fp8_matmul.fp8_rows_matmul",
                        lambda x, w, s, t: fp8_rows_matmul(x, w, s * 1.5, t))
    assert chooser.measure(x, weight, scale) is None


def test_unmeasured_shapes_run_scaled_mm_on_the_cpu_and_outside_the_window():
    x, weight, scale = operands(20, 32, 64)
    chooser = MeasuredRowsMatmul(kernel_cache=False)
    with chooser.measuring_shapes():
        got = chooser(x, weight, scale)                          # CPU tensors: never measured
    assert torch.equal(got, scaled_mm_rows(x, weight, scale)) and chooser.choices == {}
    chooser.choices[(20, 32, 64, torch.bfloat16)] = Fp8MatmulTiling(16, 32, 32, 2)
    torch.testing.assert_close(chooser(x, weight, scale).float(), got.float(), rtol=1e-2, atol=1e-2)


def test_a_choice_survives_the_kernel_cache():
    tiling = Fp8MatmulTiling(128, 64, 128, 4, 2, 8)
    stored = json.loads(json.dumps(stored_choice(tiling, KINDS)))
    assert stored["kind"] == "fp8_rows" and restored_choice(stored, lambda rank: None, KINDS) == tiling
    assert restored_choice(json.loads(json.dumps(stored_choice(None, KINDS))), lambda rank: None, KINDS) is None
    fast = json.loads(json.dumps(stored_choice(ScaledMmFastAccum(), KINDS)))
    assert restored_choice(fast, lambda rank: None, KINDS) == ScaledMmFastAccum()


def test_fast_accumulation_is_a_candidate_of_its_own(monkeypatch):
    x, weight, scale = operands(20, 32, 64)
    timed = []                                    # the library first, then fast accumulation: faster
    monkeypatch.setattr(triton_linear, "streaming_time_us",
                        lambda product, weight: 1.0 if timed.append(product) or len(timed) > 1 else 2.0)
    chooser = MeasuredRowsMatmul(kernel_cache=False)
    assert isinstance(chooser.candidates[0], ScaledMmFastAccum)
    chooser = MeasuredRowsMatmul(candidates=(ScaledMmFastAccum(), Fp8MatmulTiling(16, 64, 32, 2)), kernel_cache=False)
    assert chooser.measure(x, weight, scale) == ScaledMmFastAccum()
    chooser.choices[(20, 32, 64, torch.bfloat16)] = ScaledMmFastAccum()
    torch.testing.assert_close(chooser(x, weight, scale), scaled_mm_rows(x, weight, scale))


def test_the_runner_opens_the_fp8_layers_measuring_windows_around_graph_warm_ups(tiny_checkpoints):
    from ssd.distributed.tp_group import TPGroup
    from ssd.engine.model_runner import ModelRunner
    from ssd.engine.runner_config import RunnerConfig
    from ssd.layers.faster_of import FasterOf
    from ssd.layers.fp8 import Fp8Linear, add_rms_norm_fp8, quantize_model_fp8
    from ssd.layers.linear import ColumnParallelLinear, RowParallelLinear
    runner = ModelRunner(RunnerConfig(model=str(tiny_checkpoints["llama"]), max_len=64, num_slots=2), TPGroup())
    matmul = MeasuredRowsMatmul(kernel_cache=False)
    norm = FasterOf("norm", add_rms_norm_fp8, add_rms_norm_fp8, lambda a, b: True)
    linear = Fp8Linear(rows_matmul=matmul, quantizing_add_rms_norm=norm)
    assert quantize_model_fp8(runner.model, linear, (ColumnParallelLinear, RowParallelLinear),
                              ("gate_up_proj", "down_proj"), 0) > 0
    with runner.measuring_shapes():
        assert matmul.measuring and norm.measuring
    assert not matmul.measuring and not norm.measuring


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssd.layers.triton_fp8_matmul import CANDIDATES, _fp8_rows_matmul_kernel
for tiling in (CANDIDATES[0], CANDIDATES[-1]):
    t = tiling
    signature = {"x_desc": f"tensordesc<fp8e4nv[{t.block_m}, {t.block_k}]>",
                 "w_desc": f"tensordesc<fp8e4nv[{t.block_n}, {t.block_k}]>",
                 "y_ptr": "*bf16" if t.split_k == 1 else "*fp32", "x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                 "M": "i32", "N": "i32"}
    constants = {"K": 8192, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "SPLIT_K": t.split_k,
                 "STAGES": t.stages}
    source = ASTSource(fn=_fp8_rows_matmul_kernel, signature={**signature, **{c: "constexpr" for c in constants}},
                       constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": t.num_warps})
    assert "wgmma" in compiled.asm["ptx"] and compiled.asm["cubin"]
print("compiled")
"""


def test_kernel_compiles_to_hoppers_fp8_warpgroup_mma():
    """The interpreter does not compile: build two tilings for sm_90 (the down projection's K) with
    Triton's bundled ptxas, in a process of their own without the interpreter."""
    import os
    import subprocess
    import sys
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no CUDA backend")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
