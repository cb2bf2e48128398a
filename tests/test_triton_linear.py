"""The few-row Triton linear (run here under Triton's CPU interpreter) computes F.linear, and the
per-shape choice takes the fastest candidate that agrees with F.linear."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ssd.layers import triton_linear  # noqa: E402
from ssd.layers.triton_linear import (CANDIDATES, TMA_CANDIDATES, MeasuredLinear, SkinnyTiling,  # noqa: E402
                                     TmaTiling, tma_aligned, tma_linear, skinny_linear)


@pytest.mark.parametrize("rows", [1, 7, 21, 64])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200), (96, 512)])    # ragged N and K blocks too
@pytest.mark.parametrize("tiling", [SkinnyTiling(16, 64), SkinnyTiling(32, 128)])
def test_matches_f_linear(rows, n, k, tiling):
    g = torch.Generator().manual_seed(rows * n + k)
    x, weight = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    torch.testing.assert_close(skinny_linear(x, weight, tiling), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_leading_dims_and_strided_rows():
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(3, 7, 2 * 64, generator=g)[..., :64], torch.randn(32, 64, generator=g)
    out = skinny_linear(x, weight, SkinnyTiling(16, 32))
    assert out.shape == (3, 7, 32)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_adds_its_partial_sums(split_k):
    g = torch.Generator().manual_seed(split_k)
    x, weight = torch.randn(21, 512, generator=g), torch.randn(40, 512, generator=g)
    out = skinny_linear(x, weight, SkinnyTiling(16, 64, split_k=split_k))
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_split_k_that_does_not_divide_k_is_refused():
    tiling = SkinnyTiling(16, 64, split_k=4)
    assert not tiling.fits(200) and tiling.fits(512)
    with pytest.raises(ValueError, match="divide"):
        skinny_linear(torch.zeros(3, 200), torch.zeros(16, 200), tiling)


def test_too_many_rows_is_refused():
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.zeros(65, 16), torch.zeros(16, 16), SkinnyTiling(16, 16))


def test_choice_is_the_fastest_candidate_that_agrees(monkeypatch):
    """Timings are faked (CUDA events are GPU-only); a candidate computing something else is never
    chosen however fast; F.linear (None) is kept when nothing beats it."""
    x, weight = torch.randn(5, 64), torch.randn(48, 64)
    fast, broken = CANDIDATES[1], CANDIDATES[2]
    real = triton_linear.skinny_linear
    monkeypatch.setattr(triton_linear, "skinny_linear",
                        lambda x, w, t, s=None: real(x, w, t, s) + (1.0 if t == broken else 0.0))
    times = iter([10.0] + [1.0 if t == broken else 5.0 if t == fast else 9.0 for t in CANDIDATES if t != broken])
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: next(times))
    assert MeasuredLinear.measure(x, weight) == fast
    times = iter([1.0] + [5.0] * len(CANDIDATES))
    assert MeasuredLinear.measure(x, weight) is None


def test_cpu_tensors_take_f_linear():
    x, weight, bias = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    linear = MeasuredLinear()
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert linear.choices == {}


@pytest.mark.parametrize("rows", [1, 7, 21, 64])
@pytest.mark.parametrize("tiling", [TmaTiling(64, 32, 2), TmaTiling(128, 64, 2), TmaTiling(64, 32, 2, split_k=4)])
def test_tma_kernel_matches_f_linear(rows, tiling):
    """The weight-as-M-side kernel with TMA loads (rows past M arrive as zeros), split-K included."""
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 256, generator=g), torch.randn(128, 256, generator=g)
    torch.testing.assert_close(tma_linear(x, weight, tiling), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_tma_kernel_copies_rows_tma_cannot_read():
    """A row stride that is no multiple of 16 bytes is copied first; leading dims are kept."""
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(3, 5, 64 + 1, generator=g)[..., :64], torch.randn(64, 64, generator=g)
    out = tma_linear(x, weight, TmaTiling(64, 32, 2))
    assert out.shape == (3, 5, 64)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_tma_tilings_refuse_what_they_do_not_tile():
    assert TmaTiling(64, 128, 4, split_k=4).fits(2048, 8192) and not TmaTiling(64, 128, 4).fits(2040, 2048)
    with pytest.raises(ValueError, match="does not take"):
        tma_linear(torch.zeros(3, 96), torch.zeros(64, 96), TmaTiling(64, 64, 2))
    assert tma_aligned(torch.zeros(64, 64)) and not tma_aligned(torch.zeros(64, 65)[:, :64])


def test_tma_tilings_are_candidates_only_when_asked(monkeypatch):
    """measure(tma=True) times the TMA tilings that fit the shape too, and may choose one."""
    x, weight = torch.randn(5, 256), torch.randn(128, 256)
    fitting = [t for t in TMA_CANDIDATES if t.fits(*weight.shape)]
    assert fitting
    timed = []
    def fake_time(product, w):
        timed.append(product)
        return 1.0 if len(timed) == 1 + len(CANDIDATES) + 1 else 5.0   # the first TMA tiling is fastest
    monkeypatch.setattr(triton_linear, "streaming_time_us", fake_time)
    monkeypatch.setattr(triton_linear, "tma_linear", lambda x, w, t, scale=None: F.linear(x, w))
    assert MeasuredLinear.measure(x, weight, tma=True) == fitting[0]
    timed.clear()
    assert not isinstance(MeasuredLinear.measure(x, weight), TmaTiling)
    assert len(timed) == 1 + len([t for t in CANDIDATES if t.fits(256)])
