"""Start a tensor-parallel group: rank 0 is the calling process, ranks 1..N-1 are spawned.

Rendezvous goes through a TCPStore bound to an OS-chosen free port, so two engines on one host
never collide. Under torchrun / srun the environment's rendezvous is used instead."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ssd.distributed.tp_group import TPGroup

log = logging.getLogger(__name__)


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def launched_externally() -> bool:
    """True under torchrun (RANK/WORLD_SIZE) or srun with MASTER_ADDR exported by the job script."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ and "SLURM_NTASKS" in os.environ


def external_rank_and_size() -> tuple[int, int]:
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])


def init_from_environment(device_type: str, timeout_s: float) -> TPGroup:
    rank, size = external_rank_and_size()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    dist.init_process_group(backend_for(device_type), init_method="env://", rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return TPGroup(rank, size, None)


def init_with_store(host: str, port: int, rank: int, size: int, device_type: str, timeout_s: float) -> TPGroup:
    store = dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend_for(device_type), store=store, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return TPGroup(rank, size, None)


def share_cpu_threads(group_size: int) -> None:
    """Ranks on one host split its cores: oversubscribed OpenMP threads spin and crawl."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // group_size))


@dataclass
class SpawnedGroup:
    """Rank 0's handle on the group it started: its own TPGroup plus the worker processes."""
    tp: TPGroup
    processes: list[mp.Process] = field(default_factory=list)
    store: dist.TCPStore | None = None

    def dead_workers(self) -> list[int]:
        return [i + 1 for i, p in enumerate(self.processes) if not p.is_alive()]

    def join(self, timeout_s: float) -> None:
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                log.warning("worker pid %d did not exit in %.0fs; killing it", p.pid, timeout_s)
                p.kill()
                p.join(5)


def spawn_group(size: int, device_type: str, timeout_s: float,
                worker_main: Callable, worker_args: tuple) -> SpawnedGroup:
    """Spawn ranks 1..size-1 running worker_main(tp, *worker_args); rank 0 (caller) joins the group."""
    if size == 1:
        return SpawnedGroup(TPGroup())
    share_cpu_threads(size)
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, size, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, daemon=True, name=f"ssd-tp{rank}",
                         args=(host, store.port, rank, size, device_type, timeout_s, worker_main, worker_args))
             for rank in range(1, size)]
    for p in procs:
        p.start()
    dist.init_process_group(backend_for(device_type), store=store, rank=0, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return SpawnedGroup(TPGroup(0, size, None), procs, store)


def _worker_entry(host, port, rank, size, device_type, timeout_s, worker_main, worker_args) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [tp{rank}] %(levelname)s %(name)s: %(message)s")
    share_cpu_threads(size)
    tp = init_with_store(host, port, rank, size, device_type, timeout_s)
    try:
        worker_main(tp, *worker_args)
    finally:
        dist.destroy_process_group()
