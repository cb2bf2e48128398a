"""GPU kernel tables from torch.profiler: where a repeated piece of work spends its device time."""
from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_table(prof, repeats: int) -> list[dict]:
    """Per kernel name: calls and device microseconds per repeat, largest first."""
    rows = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:  # kernels only (CPU ops would count twice)
            continue
        device_us = getattr(event, "self_device_time_total", None) or event.self_cuda_time_total
        rows.append({"kernel": event.key[:120], "calls_per_step": event.count / repeats,
                     "us_per_step": round(device_us / repeats, 2)})
    return sorted(rows, key=lambda r: -r["us_per_step"])


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Mean GPU time per call of fn over `repeats` back-to-back calls (CUDA events), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def profile_kernels(fn: Callable[[], object], repeats: int = 10, top: int = 25) -> dict:
    """Run fn `repeats` times under the profiler (after a warm-up call): the kernel table, the
    kernels' summed time and the wall time per repeat (their difference: launch gaps)."""
    wall_ms = cuda_time_ms(fn, repeats)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    table = kernel_table(prof, repeats)
    kernel_ms = sum(r["us_per_step"] for r in table) / 1e3
    return {"wall_ms": round(wall_ms, 4), "kernel_ms": round(kernel_ms, 4),
            "kernels_per_repeat": round(sum(r["calls_per_step"] for r in table), 1), "kernels": table[:top]}


def collective_kernel_ms(fn: Callable[[], object]) -> dict[str, float]:
    """Device time of this process's NCCL kernels during one call of fn: all-reduces (ms, calls) and
    the other collectives (all-gathers, broadcasts). A collective's kernel also spans its wait for
    the slowest rank: this is what the collectives cost this rank, skew included."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    nccl = [row for row in kernel_table(prof, 1) if "nccl" in row["kernel"].lower()]
    all_reduce = [row for row in nccl if "allreduce" in row["kernel"].lower()]
    return {"all_reduce_ms": sum(r["us_per_step"] for r in all_reduce) / 1e3,
            "all_reduce_calls": sum(r["calls_per_step"] for r in all_reduce),
            "other_collectives_ms": sum(r["us_per_step"] for r in nccl if r not in all_reduce) / 1e3}
