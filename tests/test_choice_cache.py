"""Measured kernel choices kept on disk (ssd.layers.choice_cache): what one start-up measured, the
next takes without timing anything, for the same setup only; a broken or unwritable file costs a
measurement, never a failure."""
import itertools
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from ssd.layers import triton_linear  # noqa: E402
from ssd.layers.choice_cache import ChoiceCache, DeviceChoiceCaches, setup_digest  # noqa: E402
from ssd.layers.kernels import silu_and_mul  # noqa: E402
from ssd.layers.norm_fusion import NormFusion  # noqa: E402
from ssd.layers.triton_linear import (UNUSABLE, MeasuredLinear, SkinnyTiling, TmaTiling,  # noqa: E402
                                      recalled_or_measured, restored_choice, stored_choice)

TILINGS = (TmaTiling(64, 64, 2), TmaTiling(64, 32, 2, split_k=2))


class PlainLinear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight, requires_grad=False), None

    def forward(self, x):
        return F.linear(x, self.weight)


def residual_case(rows=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 128, generator=g), PlainLinear(torch.randn(64, 128, generator=g) / 11),
            torch.randn(rows, 64, generator=g))


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "choices.json"
    monkeypatch.setenv("SSD_KERNEL_CACHE", str(path))
    return path


def test_a_second_start_up_takes_the_stored_choice_without_timing(cache_file, monkeypatch):
    x, linear, residual = residual_case()
    times = itertools.cycle([5.0, 1.0])                # the second tiling measures faster
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: next(times))
    first = NormFusion(silu_and_mul, residual_tilings=TILINGS, any_device=True)
    expected = first.linear_residual(x, linear, residual)
    assert list(first.choices.values()) == [TILINGS[1]] and first.recalled == 0
    assert cache_file.exists()

    def no_timing(product, weight):
        raise AssertionError("a stored choice was measured again")
    monkeypatch.setattr(triton_linear, "streaming_time_us", no_timing)
    second = NormFusion(silu_and_mul, residual_tilings=TILINGS, any_device=True)
    torch.testing.assert_close(second.linear_residual(x, linear, residual), expected)
    assert second.choices == first.choices and second.recalled == 1
    assert "1 stored by an earlier run" in second.summary()


def test_other_candidates_are_another_setup(cache_file, monkeypatch):
    x, linear, residual = residual_case()
    timed = []
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: timed.append(1) or float(len(timed)))
    NormFusion(silu_and_mul, residual_tilings=TILINGS, any_device=True).linear_residual(x, linear, residual)
    count = len(timed)
    other = NormFusion(silu_and_mul, residual_tilings=TILINGS[::-1], any_device=True)
    other.linear_residual(x, linear, residual)
    assert count and len(timed) == 2 * count and other.recalled == 0
    setups = json.loads(cache_file.read_text())["setups"]
    assert len(setups) == 2                              # both kept: either list may be used again


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_KERNEL_CACHE", "off")
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: 1.0)
    x, linear, residual = residual_case()
    fusion = NormFusion(silu_and_mul, residual_tilings=TILINGS, any_device=True)
    fusion.linear_residual(x, linear, residual)
    assert fusion.choices and DeviceChoiceCaches("x", ()).at(torch.device("cpu")) is None
    assert not list(tmp_path.iterdir())


def test_setup_digest_follows_scope_and_kernel_source(tmp_path):
    source = tmp_path / "kernel.py"
    source.write_text("a = 1\n")
    cpu = torch.device("cpu")
    digest = setup_digest(cpu, "scope", (str(source),))
    assert digest == setup_digest(cpu, "scope", (str(source),))
    assert digest != setup_digest(cpu, "other scope", (str(source),))
    source.write_text("a = 2\n")
    assert digest != setup_digest(cpu, "scope", (str(source),))


def test_setup_digest_ignores_comments_docstrings_and_layout(tmp_path):
    """Prose edits keep the stored choices; a changed constant or expression does not."""
    source, cpu = tmp_path / "kernel.py", torch.device("cpu")
    source.write_text('"""Kernels."""\ndef f(x):\n    """Doubles."""\n    return x * 2  # fast\n')
    digest = setup_digest(cpu, "scope", (str(source),))
    source.write_text('"""Kernels, better told."""\n\n\ndef f(x):\n    """Twice x."""\n    return (x\n            * 2)\n')
    assert setup_digest(cpu, "scope", (str(source),)) == digest
    for code in ('def f(x):\n    return x * 3\n', 'def f(x):\n    "Doubles."\n    return x * 2\nY = "text"\n'):
        source.write_text(code)
        assert setup_digest(cpu, "scope", (str(source),)) != digest


def test_the_linear_choices_outlive_a_change_to_the_fused_norm_kernels(cache_file):
    """An A/B of a fused-norm change recalls the same linear choices in both arms (measured afresh,
    they differ by noise): the linear's setup does not hash norm_fusion.py; the fused norm's does."""
    def hashed(caches):
        return {path.rsplit("/", 1)[-1] for path in caches.sources}
    assert "norm_fusion.py" not in hashed(MeasuredLinear()._disk)
    assert {"norm_fusion.py", "triton_linear.py"} <= hashed(NormFusion(silu_and_mul)._disk)


def test_processes_sharing_the_file_keep_each_others_choices(tmp_path):
    path = tmp_path / "choices.json"
    one, two = ChoiceCache.open(path, "setup"), ChoiceCache.open(path, "setup")   # opened before either wrote
    one.put((21, 64, 128, "bf16"), {"kind": "library"})
    two.put((7, 64, 128, "bf16"), {"kind": "tma", "block_n": 64})
    assert ChoiceCache.open(path, "setup").stored == {"21|64|128|bf16": {"kind": "library"},
                                                      "7|64|128|bf16": {"kind": "tma", "block_n": 64}}
    assert ChoiceCache.open(path, "another setup").stored == {}


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "setups": {"s": {"k": {}}}}', "[]"])
def test_an_unreadable_file_means_measuring_afresh(tmp_path, content, caplog):
    path = tmp_path / "choices.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        cache = ChoiceCache.open(path, "s")
    assert cache.stored == {}
    cache.put(("k",), {"kind": "library"})            # and the next write replaces it with a good file
    assert ChoiceCache.open(path, "s").get(("k",)) == {"kind": "library"}


def test_an_unwritable_place_is_a_warning(tmp_path, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    cache = ChoiceCache.open(blocker / "choices.json", "s")     # its folder cannot be made
    with caplog.at_level(logging.WARNING):
        cache.put(("k",), {"kind": "library"})
        cache.put(("j",), {"kind": "library"})
    assert caplog.text.count("not written") == 1                 # once, not per shape
    assert cache.get(("k",)) == cache.get(("j",)) == {"kind": "library"}


@pytest.mark.parametrize("choice", [None, SkinnyTiling(32, 256, 4, 3), TmaTiling(64, 256, 4, 4, operands="f16"),
                                    TmaTiling(128, 128, 4)])
def test_tilings_survive_the_file(choice):
    stored = json.loads(json.dumps(stored_choice(choice)))
    assert restored_choice(stored, lambda rank: None) == choice


class FakeAlgorithm:
    def __init__(self, rank):
        self.rank = rank


def test_a_cublaslt_algorithm_is_found_again_by_its_rank():
    algorithm = FakeAlgorithm(3)
    stored = json.loads(json.dumps(stored_choice(algorithm)))
    assert stored == {"kind": "lt", "rank": 3}
    assert restored_choice(stored, lambda rank: algorithm if rank == 3 else None) is algorithm
    assert restored_choice(stored, lambda rank: None) is UNUSABLE       # the library lists it no more


@pytest.mark.parametrize("stored", [{"kind": "tma", "block_n": 64, "no such field": 1}, {"kind": "lt"},
                                    {"kind": "something new"}])
def test_a_stored_choice_this_version_cannot_use_is_measured_again(tmp_path, stored):
    cache = ChoiceCache.open(tmp_path / "choices.json", "s")
    cache.put(("k",), stored)
    choice, recalled = recalled_or_measured(cache, ("k",), lambda: TILINGS[0])
    assert (choice, recalled) == (TILINGS[0], False) and cache.get(("k",)) == stored_choice(TILINGS[0])


def test_measured_linear_finds_its_cublaslt_algorithm_by_rank(monkeypatch):
    """lt_algorithm asks the heuristic for as many algorithms as measure does and takes that rank;
    none past the ones it measures, none without cuBLASLt."""
    asked = []

    class FakeLt:
        def algorithms(self, x2, weight, count):
            asked.append(count)
            return [FakeAlgorithm(rank) for rank in range(count) if rank != 1]   # rank 1 not runnable

    linear = MeasuredLinear(lt_algorithms=4, kernel_cache=False)
    monkeypatch.setattr(linear, "cublaslt", lambda device: FakeLt())
    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    assert linear.lt_algorithm(x, weight, 2).rank == 2 and asked == [4]
    assert linear.lt_algorithm(x, weight, 1) is None
    assert linear.lt_algorithm(x, weight, 4) is None and asked == [4, 4]
    monkeypatch.setattr(linear, "cublaslt", lambda device: None)
    assert linear.lt_algorithm(x, weight, 0) is None


def test_measured_linear_recalls_tilings_and_cublaslt_algorithms(cache_file, monkeypatch):
    """MeasuredLinear's choices (CUDA-only when measured) go through the same file: a tiling as it
    was, a cuBLASLt algorithm found again by its rank."""
    class FakeLt:
        def algorithms(self, x2, weight, count):
            return [FakeAlgorithm(rank) for rank in range(count)]

    x, weight = torch.randn(3, 8), torch.randn(5, 8)
    tiling_key, lt_key = (3, 5, 8, torch.bfloat16), (3, 5, 8, torch.float16)
    first = MeasuredLinear(lt_algorithms=4)
    first._choose(tiling_key, x, weight, lambda: TILINGS[1])
    first._choose(lt_key, x, weight, lambda: FakeAlgorithm(2))

    second = MeasuredLinear(lt_algorithms=4)
    monkeypatch.setattr(second, "cublaslt", lambda device: FakeLt())
    for key in (tiling_key, lt_key):
        second._choose(key, x, weight, lambda: pytest.fail("a stored choice was measured again"))
    assert second.choices[tiling_key] == TILINGS[1] and second.choices[lt_key].rank == 2 and second.recalled == 2


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    cache = ChoiceCache.open(tmp_path / "choices.json", "s")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(json, "dump", disk_full)
    cache.put(("k",), {"kind": "library"})
    assert not cache.writable and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="MeasuredLinear measures on a GPU")
@pytest.mark.parametrize("rows", [7, 21])
def test_on_a_gpu_a_second_measured_linear_recalls_every_choice(cache_file, monkeypatch, rows):
    """bf16 (Triton / cuBLASLt / F.linear) and fp8 (Triton / torch._scaled_mm) choices, measured by one
    MeasuredLinear, are recalled by the next without timing, and compute the same products."""
    from ssd.layers.fp8 import quantize_weight, scaled_mm_linear
    device = torch.device("cuda")
    x = torch.randn(rows, 2048, device=device, dtype=torch.bfloat16)
    weight = torch.randn(3072, 2048, device=device, dtype=torch.bfloat16) * 0.02
    quantized, scale = quantize_weight(torch.randn(8192, 2048, device=device) * 0.02)
    first = MeasuredLinear(library_fp8=scaled_mm_linear)
    expected = (first(x, weight), first.quantized(x, quantized, scale))
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: pytest.fail("measured again"))
    second = MeasuredLinear(library_fp8=scaled_mm_linear)
    torch.testing.assert_close(second(x, weight), expected[0])
    torch.testing.assert_close(second.quantized(x, quantized, scale), expected[1])
    assert second.recalled == 2 and {str(c) for c in second.choices.values()} == {str(c) for c in first.choices.values()}
