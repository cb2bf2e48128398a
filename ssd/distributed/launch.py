"""Start a tensor-parallel group: rank 0 is the calling process, ranks 1..N-1 are spawned.

Rendezvous goes through a TCPStore bound to an OS-chosen free port, so two engines on one host
never collide. Under torchrun / srun the environment's rendezvous is used instead."""
from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ssd.distributed.orphan_watch import exit_when_orphaned, orphaned
from ssd.distributed.tp_group import TPGroup
from ssd.distributed.worker_watch import wait_for_keys

log = logging.getLogger(__name__)


# how long a worker may wait for rank 0's next command: an engine may idle between requests for any time
IDLE_TIMEOUT = timedelta(days=365)


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


def check_external_world_size(needed: int, tp_size: int, remote_draft: bool) -> None:
    """Under torchrun / srun the launcher, not the engine, decides how many processes there are:
    a count that does not match the engine's layout would otherwise fail late or hang."""
    rank, size = external_rank_and_size()
    if size != needed:
        layout = f"{tp_size} target rank(s)" + (" + 1 draft rank" if remote_draft else "")
        raise ValueError(f"launched as rank {rank} of {size} processes, but this configuration runs {needed} "
                         f"({layout}): start {needed} tasks (srun --ntasks / torchrun --nproc-per-node) "
                         f"or change the tensor-parallel size")


def make_tp_group(rank: int, tp_size: int, world_size: int) -> TPGroup:
    """The target's TP group is world ranks 0..tp_size-1; a draft rank (if any) comes after them.
    Every world rank must call this (group creation is collective, in this order)."""
    tp_ranks = list(range(tp_size))
    data = dist.new_group(tp_ranks) if 1 < tp_size < world_size else None
    commands = dist.new_group(tp_ranks, timeout=IDLE_TIMEOUT) if tp_size > 1 else None
    draft_link = dist.new_group([0, tp_size], timeout=IDLE_TIMEOUT) if world_size > tp_size else None
    if rank >= tp_size:
        return TPGroup(draft_link=draft_link)
    return TPGroup(rank, tp_size, data, commands, draft_link if rank == 0 else None)


def init_from_environment(device_type: str, timeout_s: float, tp_size: int) -> tuple[int, TPGroup]:
    """Returns (world rank, this rank's TP group)."""
    rank, size = external_rank_and_size()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    dist.init_process_group(backend_for(device_type), init_method="env://", rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return rank, make_tp_group(rank, tp_size, size)


def share_cpu_threads(group_size: int) -> None:
    """Ranks on one host split its cores: oversubscribed OpenMP threads spin and crawl."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // group_size))


@dataclass
class SpawnedGroup:
    """Rank 0's handle on the group it started: its own TPGroup plus the worker processes."""
    tp: TPGroup
    processes: list[mp.Process] = field(default_factory=list)
    store: dist.TCPStore | None = None
    owns_process_group: bool = False   # torch.distributed's default group is this engine's (destroy it at the end)

    def destroy_process_group(self) -> None:
        """Only the group's own: an engine without workers must not end another live engine's group."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def wait_until_ready(self, timeout_s: float) -> None:
        """Until every spawned worker has built its model (WorkerDiedError as soon as one exits)."""
        if self.processes:
            wait_for_keys(self.store, [_key("ready", r) for r in range(1, len(self.processes) + 1)],
                          self.processes, timeout_s, "model loading")

    def abort(self) -> None:
        """End the workers now: they may sit in a collective that will never complete."""
        for p in self.processes:
            p.kill()
        self.join(timeout_s=10)
        self.destroy_process_group()

    def dead_workers(self) -> list[int]:
        return [i + 1 for i, p in enumerate(self.processes) if not p.is_alive()]

    def join(self, timeout_s: float) -> None:
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                log.warning("worker pid %d did not exit in %.0fs; killing it", p.pid, timeout_s)
                p.kill()
                p.join(5)


@dataclass(frozen=True)
class Role:
    """What a spawned rank runs: main(tp_group, *args, on_ready=callback); main calls on_ready once
    its model is built (under torchrun / srun there is no callback: on_ready=None)."""
    name: str
    main: Callable
    args: tuple


def spawn_group(tp_size: int, device_type: str, timeout_s: float, roles: list[Role]) -> SpawnedGroup:
    """Spawn world ranks 1..len(roles) (roles[i] runs on rank i+1); the caller becomes rank 0."""
    world_size = 1 + len(roles)
    if world_size == 1:
        return SpawnedGroup(TPGroup())
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process (another LLM with worker "
                           "processes still running?): shut that one down first (`with LLM(...) as llm:` or "
                           "llm.shutdown())")
    share_cpu_threads(world_size)
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, daemon=True, name=f"ssd-{role.name}",
                         args=(host, store.port, rank, world_size, tp_size, device_type, timeout_s, role,
                               os.getpid(), logging.getLogger().getEffectiveLevel()))
             for rank, role in enumerate(roles, start=1)]
    for p in procs:
        p.start()
    try:  # a worker that dies before it joins would leave rank 0 waiting in the rendezvous until the timeout
        wait_for_keys(store, [_key("started", r) for r in range(1, world_size)], procs, timeout_s, "start-up")
        dist.init_process_group(backend_for(device_type), store=store, rank=0, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        tp = make_tp_group(0, tp_size, world_size)
    except BaseException:
        SpawnedGroup(TPGroup(), procs, store, owns_process_group=True).abort()
        raise
    return SpawnedGroup(tp, procs, store, owns_process_group=True)


def _key(stage: str, rank: int) -> str:
    return f"ssd/{stage}/{rank}"


def _worker_entry(host, port, rank, world_size, tp_size, device_type, timeout_s, role: Role,
                  parent_pid: int, log_level: int) -> None:
    """log_level: rank 0's, so that a quiet engine has quiet workers."""
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s [{role.name}] %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; rank 0 decides what stops
    exit_when_orphaned(parent_pid)
    share_cpu_threads(world_size)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    store.set(_key("started", rank), "1")
    dist.init_process_group(backend_for(device_type), store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        role.main(make_tp_group(rank, tp_size, world_size), *role.args,
                  on_ready=functools.partial(store.set, _key("ready", rank), "1"))
    except Exception:
        if orphaned(parent_pid):   # its connection broke because rank 0 died: say that, not a traceback
            log.error("rank 0 (pid %d) is gone; exiting", parent_pid)
            logging.shutdown()
            os._exit(1)
        raise
    finally:
        dist.destroy_process_group()
