"""The tensor-parallel group's small agreements (two gloo processes)."""
import logging

import pytest
import torch

from ssd.distributed.launch import Role, spawn_group
from ssd.engine.kv_cache import check_draft_fits

CPU = torch.device("cpu")


def least_of_ranks(tp, value: int, expected: int, on_ready=None) -> None:
    assert tp.min_over_ranks(value, CPU) == expected


def test_ranks_agree_on_the_least_value():
    """Each rank fits its KV cache to its own GPU's free memory: the group must take the least, or a
    rank with less room is written past its cache."""
    group = spawn_group(2, "cpu", 60, [Role("tp1", least_of_ranks, (3, 3))])
    try:
        assert group.tp.min_over_ranks(9, CPU) == 3
    finally:
        group.join(30)
        group.destroy_process_group()
    assert group.processes[0].exitcode == 0  # the worker saw the same


def test_a_draft_with_a_shorter_cache_than_the_target_is_refused():
    check_draft_fits(2048, 2048)
    with pytest.raises(RuntimeError, match="room for 1000 positions per sequence but the target may use 2048"):
        check_draft_fits(1000, 2048)


def log_both_levels(tp, on_ready=None) -> None:
    logging.getLogger("ssd.test_worker").info("worker info line")
    logging.getLogger("ssd.test_worker").warning("worker warning line")
    tp.min_over_ranks(0, CPU)   # after the lines: rank 0 waits for them


@pytest.mark.parametrize("level, info_shown", [(logging.INFO, True), (logging.WARNING, False)])
def test_workers_log_at_rank_zeros_level(capfd, level, info_shown):
    """A quiet engine (Coordinator(log_level=WARNING), a script without logging set up) has quiet workers."""
    root = logging.getLogger()
    saved = root.level
    root.setLevel(level)
    try:
        group = spawn_group(2, "cpu", 60, [Role("tp1", log_both_levels, ())])
        group.tp.min_over_ranks(0, CPU)
        group.join(30)
        group.destroy_process_group()
    finally:
        root.setLevel(saved)
    written = capfd.readouterr()
    assert "worker warning line" in written.err and ("worker info line" in written.err) == info_shown
