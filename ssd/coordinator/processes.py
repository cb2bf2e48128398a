"""Stopping the processes the coordinator stack starts: politely first, by force after a timeout."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import time

log = logging.getLogger(__name__)


def wait_for_exit(process: mp.Process, timeout_s: float) -> bool:
    process.join(timeout_s)
    return not process.is_alive()


def stop_process(process: mp.Process, timeout_s: float) -> None:
    """Wait for a process told to stop; kill it if it does not exit in time."""
    if process.pid is None or wait_for_exit(process, timeout_s):
        return
    log.warning("%s (pid %d) did not exit in %.0fs; killing it", process.name, process.pid, timeout_s)
    process.kill()
    process.join(5)


def kill_process_group(leader_pid: int) -> None:
    """End what is left of a process group (the engine leads one holding its TP ranks and draft)."""
    try:
        os.killpg(leader_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left of it


class Throttle:
    """True at most once per interval: for liveness checks on a hot path."""

    def __init__(self, interval_s: float):
        self.interval_s, self.last = interval_s, time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (over a second with torch loaded). Only for a
    process that has already stopped everything it started and closed its sockets."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
