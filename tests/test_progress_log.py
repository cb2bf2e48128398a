"""ProgressLog: a line at most every every_s seconds while work is left, none after the last item."""
import logging

from ssd.engine.progress_log import ProgressLog


def test_lines_come_at_most_every_interval_and_not_for_the_last_item(caplog):
    now = [0.0]
    progress = ProgressLog(logging.getLogger("test.progress"), "graphs", 5, every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for seconds in (4.0, 11.0, 15.0, 22.0, 40.0):       # clock at each step
            now[0] = seconds
            progress.step(lambda: "; 3 shapes")
    assert [r.getMessage() for r in caplog.records] == ["graphs: 2/5 after 11 s; 3 shapes", "graphs: 4/5 after 22 s; 3 shapes"]
    assert progress.done == 5
