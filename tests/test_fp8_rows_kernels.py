"""The one-pass fp8-row producers (ssd.layers.triton_fp8_rows, Triton's CPU interpreter) against the
torch ones of ssd.layers.fp8, and FasterOf's choice between two implementations."""
import pytest
import torch

pytest.importorskip("triton")
from ssd.layers import faster_of  # noqa: E402
from ssd.layers.faster_of import FasterOf  # noqa: E402
from ssd.layers.fp8 import FP8, add_rms_norm_fp8, silu_and_mul_fp8  # noqa: E402
from ssd.layers.triton_fp8_rows import (add_rms_norm_fp8_triton, fp8_rows_agree,  # noqa: E402
                                        silu_and_mul_fp8_triton)


def assert_same_rows(got: tuple, expected: tuple) -> None:
    """got: the kernel's values before the fp8 rounding (float32; Triton's CPU interpreter rounds float32
    -> e4m3 wrongly where rounding up crosses a power of two, the GPU's conversion does not): the
    torch producer's fp8 values once rounded, its scales to float32 rounding, its other outputs."""
    (values, scales, *rest), (expected_values, expected_scales, *expected_rest) = got, expected
    assert values.dtype == torch.float32 and values.shape == expected_values.shape
    torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
    rounded = values.to(FP8)
    assert (rounded.float() == expected_values.float()).float().mean() > 0.99   # a tie may round either way
    assert fp8_rows_agree(expected, (rounded, scales, *rest))
    for tensor, expected_tensor in zip(rest, expected_rest):
        torch.testing.assert_close(tensor, expected_tensor)


@pytest.mark.parametrize("shape", [(5, 2 * 96), (2, 3, 2 * 50)])      # a width that is not a power of two
def test_silu_mul_rows_match_the_torch_producer(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    x[0] = 0.0                                                         # a row of zeros: the smallest scale
    got = silu_and_mul_fp8_triton(x, torch.float32)
    assert_same_rows(got, silu_and_mul_fp8(x))
    assert got[1][0, 0] == torch.finfo(torch.float32).tiny and (got[0][0] == 0).all()
    assert silu_and_mul_fp8_triton(x)[0].dtype == FP8


@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 100)])
def test_add_rms_norm_rows_match_the_torch_producer(shape):
    g = torch.Generator().manual_seed(1)
    x, residual, gain = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(shape[-1]) + 0.5
    assert_same_rows(add_rms_norm_fp8_triton(x, residual, gain, 1e-6, torch.float32),
                     add_rms_norm_fp8(x, residual, gain, 1e-6))


def test_rows_disagree_where_a_row_or_a_scale_is_wrong():
    x = torch.randn(6, 2 * 64, generator=torch.Generator().manual_seed(2))
    values, scales = silu_and_mul_fp8(x)
    assert fp8_rows_agree((values, scales), (values, scales))
    assert not fp8_rows_agree((values, scales), (values, scales * 1.5))
    assert not fp8_rows_agree((values, scales), (values.flip(0), scales))


def test_faster_of_measures_each_shape_once_and_runs_the_faster_that_agrees(monkeypatch):
    calls = []
    first = lambda x: calls.append("first") or (x + 1,)     # noqa: E731
    second = lambda x: calls.append("second") or (x + 1,)   # noqa: E731
    times = {"first": 5.0, "second": 2.0}
    monkeypatch.setattr(faster_of, "graph_time_us", lambda fn: (fn(), times[calls[-1]])[1])
    agree = lambda a, b: torch.equal(a[0], b[0])           # noqa: E731
    chooser = FasterOf("x + 1", first, second, agree, devices=("cpu",))
    chooser(torch.zeros(3))
    assert calls == ["first"] and chooser.choices == {}        # outside the measuring window: not measured
    with chooser.measuring_shapes():
        chooser(torch.zeros(3))
    calls.clear()
    chooser(torch.zeros(3))
    assert calls == ["second"] and not chooser.measuring       # measured once: the faster runs
    with chooser.measuring_shapes():
        chooser(torch.zeros(4))
    calls.clear()
    times["first"] = 1.0
    chooser(torch.zeros(4))
    assert calls == ["second"] and len(chooser.choices) == 2    # each shape keeps its choice
    wrong = FasterOf("x + 1", first, lambda x: (x + 2,), agree, devices=("cpu",), measuring=True)
    calls.clear()
    wrong(torch.zeros(3))
    wrong(torch.zeros(3))
    assert calls[-1] == "first"                                 # a disagreeing second never runs
    def failing(x):
        raise RuntimeError("no kernel")
    broken = FasterOf("x + 1", first, failing, agree, devices=("cpu",), measuring=True)
    calls.clear()
    broken(torch.zeros(3))
    assert calls == ["first", "first"]                          # tried once, then the first
    plain = FasterOf("x + 1", first, second, agree, measuring=True)   # not measured on the CPU: the first
    calls.clear()
    plain(torch.zeros(3))
    assert calls == ["first"] and plain.choices == {}


def test_engine_times_its_compiled_producers_against_the_one_pass_kernels():
    from ssd.engine.model_runner import load_measured_fp8_kernels
    from ssd.layers.triton_fp8_matmul import MeasuredRowsMatmul
    norm, silu = object(), object()
    *measured, matmul = load_measured_fp8_kernels(norm, silu)
    assert [type(m) for m in measured] == [FasterOf, FasterOf] and isinstance(matmul, MeasuredRowsMatmul)
    assert (measured[0].first, measured[0].second) == (norm, add_rms_norm_fp8_triton)
    assert (measured[1].first, measured[1].second) == (silu, silu_and_mul_fp8_triton)
