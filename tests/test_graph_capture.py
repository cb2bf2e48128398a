"""CUDA-graph captures run with Python's cyclic collector paused (ssd.engine.graph_capture): a dead
cycle holding CUDA objects must not be freed mid-capture."""
import gc

import pytest

from ssd.engine.graph_capture import gc_paused


@pytest.fixture
def collector_enabled():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_collector_is_paused_inside_and_restored_after(collector_enabled):
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_collector_is_restored_when_the_capture_fails(collector_enabled):
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("capture failed")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collector_enabled):
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_no_automatic_collection_of_a_dead_cycle_inside(collector_enabled):
    """The object a finalizer would free (CUDA graphs, cuBLASLt handles) survives the block."""
    freed = []

    class Node:
        def __del__(self):
            freed.append(True)

    with gc_paused():
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        for _ in range(100_000):   # allocations that would trigger generation-0 collections
            [object()]
        assert not freed
    gc.collect()
    assert freed
