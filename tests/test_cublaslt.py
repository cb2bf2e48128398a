"""cuBLASLt's algorithms as MeasuredLinear candidates: the column-major problem describes
y = x W^T (checked by reading the layouts back out of memory on CPU), the choice keeps only an
algorithm that agrees with F.linear, wide shapes are measured only where graphs are warmed up,
and on a GPU every listed algorithm computes F.linear, eagerly and inside a CUDA graph."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ssd.layers import triton_linear  # noqa: E402
from ssd.layers.cublaslt import Layout, problem_layouts  # noqa: E402
from ssd.layers.triton_linear import MAX_ROWS, MeasuredLinear  # noqa: E402


def column_major(memory: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The [rows, cols] matrix whose (i, j) entry is memory[i + j * ld]."""
    return torch.as_strided(memory, (layout.rows, layout.cols), (1, layout.ld))


@pytest.mark.parametrize("rows,n,k,x_ld", [(21, 48, 64, 64), (3, 40, 24, 80), (1, 8, 16, 16)])
def test_problem_layouts_describe_x_times_w_transposed(rows, n, k, x_ld):
    g = torch.Generator().manual_seed(rows + n)
    x_memory, weight = torch.randn(rows * x_ld, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g,
                                                                                                 dtype=torch.float64)
    x = torch.as_strided(x_memory, (rows, k), (x_ld, 1))      # rows with padding past K when x_ld > k
    a, b, d = problem_layouts(rows, n, k, x_ld, weight.stride(0))
    product = column_major(weight.reshape(-1), a).T @ column_major(x_memory, b)   # op(A) = A^T, op(B) = B
    assert (product.shape[0], product.shape[1]) == (d.rows, d.cols)
    y_memory = torch.empty(rows * n, dtype=torch.float64)
    column_major(y_memory, d).copy_(product)
    torch.testing.assert_close(y_memory.view(rows, n), F.linear(x, weight))


class FakeLt:
    """Two 'algorithms': one computes the product, the other is off by one."""
    def __init__(self):
        self.good, self.broken = "lt-good", "lt-broken"

    def algorithms(self, x2, weight, count):
        return [self.broken, self.good][:count]

    def linear(self, x2, weight, algorithm):
        return F.linear(x2, weight) + (1.0 if algorithm == self.broken else 0.0)


def test_choice_takes_a_faster_cublaslt_algorithm_that_agrees(monkeypatch):
    x, weight, lt = torch.randn(MAX_ROWS + 36, 64), torch.randn(48, 64), FakeLt()
    times = iter([10.0, 4.0])          # F.linear, then the good algorithm (the broken one is never timed)
    monkeypatch.setattr(triton_linear, "streaming_time_us", lambda product, w: next(times))
    assert MeasuredLinear.measure(x, weight, lt=lt, lt_count=2) == lt.good
    times = iter([3.0, 4.0])
    assert MeasuredLinear.measure(x, weight, lt=lt, lt_count=2) is None
    times = iter([3.0])
    assert MeasuredLinear.measure(x, weight, lt=lt, lt_count=0) is None   # not asked for: F.linear only


def test_wide_shapes_are_measured_only_inside_graph_warm_ups():
    linear = MeasuredLinear()
    assert linear.measures(1) and linear.measures(MAX_ROWS) and not linear.measures(336)
    with linear.measuring_wide():
        assert linear.measures(336) and linear.measures(MAX_ROWS)
    assert not linear.measures(336)
    without = MeasuredLinear(lt_algorithms=0)
    with without.measuring_wide():
        assert not without.measures(336)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt runs on a GPU")
@pytest.mark.parametrize("rows", [1, 21, 336])
def test_every_listed_algorithm_computes_f_linear_eager_and_in_a_graph(rows):
    from ssd.layers.cublaslt import CublasLt
    device = torch.device("cuda")
    lt = CublasLt(device)
    x = torch.randn(rows, 256, device=device, dtype=torch.bfloat16)
    weight = torch.randn(384, 256, device=device, dtype=torch.bfloat16) * 0.05
    algorithms = lt.algorithms(x, weight, 8)
    assert algorithms, "the heuristic listed no algorithm"
    for algorithm in algorithms:
        x.copy_(torch.randn_like(x))
        # poison the allocator's free blocks: an algorithm that wrote nothing must not pass by
        # handing back a block that held F.linear's result
        torch.full((rows, 384), float("nan"), device=device, dtype=torch.bfloat16)
        torch.testing.assert_close(lt.linear(x, weight, algorithm).float(), F.linear(x, weight).float(),
                                   rtol=2e-2, atol=2e-2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = lt.linear(x, weight, algorithm)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(captured.float(), F.linear(x, weight).float(), rtol=2e-2, atol=2e-2)
    # apply: leading dims kept; strided rows copied into the layout the algorithm was made for; a
    # pointer off the 16-byte alignment the heuristic was promised runs F.linear instead
    torch.testing.assert_close(lt.apply(x.view(1, rows, 256), weight, algorithms[0]),
                               F.linear(x, weight).view(1, rows, 384), rtol=2e-2, atol=2e-2)
    strided = torch.randn(rows, 2, 256, device=device, dtype=torch.bfloat16)[:, 0]
    torch.testing.assert_close(lt.apply(strided, weight, algorithms[0]).float(), F.linear(strided, weight).float(),
                               rtol=2e-2, atol=2e-2)
    misaligned = torch.empty(rows * 256 + 1, device=device, dtype=torch.bfloat16)[1:].view(rows, 256).copy_(x)
    assert torch.equal(lt.apply(misaligned, weight, algorithms[0]), F.linear(misaligned, weight))


def test_summary_counts_what_each_shape_runs():
    linear = MeasuredLinear()
    linear.choices = {(1, 8, 8, torch.bfloat16): None, (2, 8, 8, torch.bfloat16): triton_linear.CANDIDATES[0],
                      (3, 8, 8, torch.bfloat16): "an LtAlgorithm"}
    linear.measuring_s = 1.25
    assert linear.summary() == "3 linear shapes measured in 1.2 s (F.linear 1, Triton 1, cuBLASLt 1)"
