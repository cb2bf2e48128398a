"""A spawned worker must not outlive the process that spawned it.

Over NCCL a rank waiting for rank 0 spins in a GPU kernel and never notices that rank 0 is gone
(killed by a user, the OOM killer or a job scheduler): it would hold its GPU until the process
group's timeout. A watcher thread notices the re-parenting instead and ends the worker at once."""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def parent_alive(parent_pid: int) -> bool:
    """A process whose parent died is re-parented: its parent pid changes."""
    return os.getppid() == parent_pid


def orphaned(parent_pid: int, grace_s: float = 1.0) -> bool:
    """Whether parent_pid is gone, waiting up to grace_s: a dying process closes its connections
    before its children are re-parented."""
    deadline = time.monotonic() + grace_s
    while parent_alive(parent_pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def exit_when_orphaned(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """Start a daemon thread that ends this process (exit code 1) once parent_pid is gone."""
    def watch() -> None:
        while parent_alive(parent_pid):
            time.sleep(interval_s)
        log.error("the process that started this worker (pid %d) is gone; exiting", parent_pid)
        logging.shutdown()
        os._exit(1)  # the main thread may sit in a collective that will never complete

    thread = threading.Thread(target=watch, name="orphan-watch", daemon=True)
    thread.start()
    return thread
