"""Rank 0's watch over the worker processes it spawned (target ranks, the draft worker).

Gloo notices a dead peer by its closed connection, but over NCCL a collective waiting for a dead
rank spins on the GPU until the process group's timeout (minutes) and then tears the process down.
So rank 0 watches its workers' process sentinels from a thread: at start-up it waits for each
worker's "ready" key in the rendezvous store while checking that none has exited, and while the
engine runs, a worker's exit aborts the NCCL communicators at once, which makes the waiting
collective fail (and generate raise WorkerDiedError) instead of hanging."""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from multiprocessing.connection import wait
from typing import Callable

import torch.distributed as dist

log = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A target rank or the draft worker exited while the engine was starting or running."""


def describe(processes: list[mp.Process]) -> str:
    return ", ".join(f"{p.name} (pid {p.pid}, exit code {p.exitcode})" for p in processes)


def wait_for_keys(store: dist.Store, keys: list[str], processes: list[mp.Process], timeout_s: float,
                  stage: str, poll_s: float = 0.05) -> None:
    """Wait until every key is set, failing at once (not at the timeout) when a worker exits first."""
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = [p for p in processes if not p.is_alive()]
        if dead:
            raise WorkerDiedError(f"engine worker(s) exited during {stage}: {describe(dead)}; "
                                  "their log above says why")
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine workers not done with {stage} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def abort_collectives(device_type: str) -> None:
    """NCCL only: fail every pending and future collective of this process now."""
    if device_type == "cuda" and dist.is_initialized():
        dist.distributed_c10d._abort_process_group()


class WorkerWatch:
    """Calls on_death(dead processes) from a thread the moment a watched worker exits, unless
    stop() came first (a shutdown, where exits are expected)."""

    def __init__(self, processes: list[mp.Process], on_death: Callable[[list[mp.Process]], None]):
        self.processes, self.on_death = processes, on_death
        self.dead: list[mp.Process] = []
        self._stop_reader, self._stop_writer = mp.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._watch, name="worker-watch", daemon=True)
        if processes:
            self._thread.start()

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: p for p in self.processes}
        ready = wait([*by_sentinel, self._stop_reader])
        if self._stop_reader in ready:
            return
        self.dead = [by_sentinel[s] for s in ready]
        for p in self.dead:
            p.join(1)  # reaped, so that its exit code shows
        log.error("engine worker(s) exited: %s", describe(self.dead))
        self.on_death(self.dead)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop_writer.send(None)
            self._thread.join()
        self._stop_reader.close()
        self._stop_writer.close()
