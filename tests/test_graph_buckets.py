"""Every batch size the engine may run has a captured CUDA graph (no silent eager fallback)."""
from ssd.engine.cuda_graphs import batch_buckets
from ssd.engine.runner_config import RunnerConfig

SIZES = RunnerConfig(model="llama-3.2-1b").graph_batch_sizes


def test_every_batch_up_to_the_slots_has_a_bucket():
    for slots in (1, 3, 12, 16, 32):
        buckets = batch_buckets(SIZES, slots)
        assert max(buckets) == slots
        assert all(any(b >= batch for b in buckets) for batch in range(1, slots + 1))


def test_buckets_are_the_usual_sizes_plus_the_slot_count():
    assert batch_buckets(SIZES, 16) == [1, 2, 4, 8, 16]
    assert batch_buckets(SIZES, 12) == [1, 2, 4, 8, 12]  # batches 9-12 ran eager before
    assert batch_buckets(SIZES, 32) == [1, 2, 4, 8, 16, 32]
