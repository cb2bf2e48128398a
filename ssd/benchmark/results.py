"""Benchmark results: metrics from generate() outputs and run stats, the environment, and JSON.

Throughput definitions (the summary repeats them):
- decode_tok_s: tokens produced by decode steps / decode wall time (prefill excluded);
- e2e_tok_s: all generated tokens / wall time of the generate() calls (prefill included).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ssd.benchmark.cli import BenchConfig
from ssd.benchmark.expected_speedup import predicted_speedup

REPO_ROOT = Path(__file__).resolve().parents[2]

METRIC_NAMES = (
    "num_requests", "prompt_tokens", "generated_tokens", "decode_tokens",
    "wall_time_s", "prefill_time_s", "decode_time_s",
    "decode_tok_s", "e2e_tok_s", "ttft_s", "tpot_s", "e2e_latency_s",
    "num_rounds", "acceptance_length", "per_position_acceptance",
    "round_ms", "draft_round_ms", "verify_ms", "round_over_verify",
    "cache_hit_rate", "tokens_per_round_on_hit", "tokens_per_round_on_miss",
    "target_wait_ms", "draft_wait_ms", "backup_ms", "jit_backups", "fast_backups", "accepted_histogram",
    "cache_hit_rate_by_batch", "predicted_speedup_over_ar",
)
# Spec statistics reported per round; across batches they are averaged weighted by rounds.
ROUND_WEIGHTED = ("acceptance_length", "draft_round_ms", "verify_ms", "cache_hit_rate", "tokens_per_round_on_hit",
                  "tokens_per_round_on_miss", "target_wait_ms", "draft_wait_ms", "backup_ms")
# result metric name -> attribute of a request output's .metrics
LATENCY_FIELDS = {"ttft_s": "ttft_s", "tpot_s": "tpot_s", "e2e_latency_s": "e2e_s"}


@dataclass
class BatchRun:
    """One timed generate() call of one arm on one prompt batch."""
    arm: str
    batch_index: int
    prompt_indices: list[int]
    outputs: list[Any]  # the LLM's request outputs, in prompt order
    stats: Any  # llm.last_run_stats after the call
    wall_s: float


@dataclass
class ArmResult:
    name: str
    metrics: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- metrics

def compute_metrics(runs: Sequence[BatchRun]) -> dict[str, Any]:
    """Metrics of one arm over its timed batches; None where not applicable (e.g. spec stats of AR)."""
    outputs = [out for run in runs for out in run.outputs]
    stats = [run.stats for run in runs]
    totals = _totals(runs, outputs, stats)
    metrics = dict(totals)
    metrics["decode_tok_s"] = _ratio(totals["decode_tokens"], totals["decode_time_s"])
    metrics["e2e_tok_s"] = _ratio(totals["generated_tokens"], totals["wall_time_s"])
    metrics.update(_latency_medians(outputs))
    metrics.update({name: _round_weighted_mean(stats, name) for name in ROUND_WEIGHTED})
    # a round as the run saw it (decode time per round, host loop included): with the target's verify
    # time, what the draft and the coordination add to it (issue goal for async at B = 1: <= 1.05)
    metrics["round_ms"] = _ratio(1000 * totals["decode_time_s"], totals["num_rounds"])
    metrics["round_over_verify"] = _ratio(metrics["round_ms"], metrics["verify_ms"])
    metrics["per_position_acceptance"] = _per_position_acceptance(stats)
    metrics["accepted_histogram"] = _summed_histogram(stats)
    metrics["cache_hit_rate_by_batch"] = _hit_rate_by_batch(stats)
    metrics["predicted_speedup_over_ar"] = predicted_speedup(metrics)
    return {name: metrics.get(name) for name in METRIC_NAMES}


def _hit_rate_by_batch(stats: list) -> dict[str, float] | None:
    """Cache hit rate per running batch size (async runs), over every batch of the arm."""
    counts: dict[int, list[int]] = {}
    for s in stats:
        for batch, (hits, lookups) in (_stat(s, "lookups_by_batch") or {}).items():
            total = counts.setdefault(batch, [0, 0])
            total[0], total[1] = total[0] + hits, total[1] + lookups
    return {str(b): round(h / n, 4) for b, (h, n) in sorted(counts.items())} or None


def _summed_histogram(stats: list) -> list[int] | None:
    """Rounds with j = 0..K accepted tokens, summed over batches (async runs)."""
    histograms = [list(h) for h in (_stat(s, "accepted_histogram") for s in stats) if h]
    return [sum(column) for column in zip(*histograms)] if histograms else None


def _totals(runs: Sequence[BatchRun], outputs: list, stats: list) -> dict[str, Any]:
    return {
        "num_requests": len(outputs),
        "prompt_tokens": sum(len(out.prompt_token_ids) for out in outputs),
        "generated_tokens": sum(len(out.token_ids) for out in outputs),
        "decode_tokens": sum(_stat(s, "decode_tokens") or 0 for s in stats),
        "wall_time_s": sum(run.wall_s for run in runs),
        "prefill_time_s": sum(_stat(s, "prefill_time_s") or 0.0 for s in stats),
        "decode_time_s": sum(_stat(s, "decode_time_s") or 0.0 for s in stats),
        "num_rounds": sum(_stat(s, "num_rounds") or 0 for s in stats),
        # async rounds whose misses each backup answered (--backup auto chooses per round); None
        # for arms without a speculation cache
        **{name: sum(_stat(s, name) or 0 for s in stats) if any(_stat(s, "cache_lookups") for s in stats) else None
           for name in ("jit_backups", "fast_backups")},
    }


def _latency_medians(outputs: list) -> dict[str, float | None]:
    """Medians over requests of the per-request latencies."""
    return {name: _median([_stat(getattr(out, "metrics", None), attr) for out in outputs])
            for name, attr in LATENCY_FIELDS.items()}


def _round_weighted_mean(stats: list, name: str) -> float | None:
    pairs = [(_stat(s, name), _stat(s, "num_rounds") or 0) for s in stats]
    pairs = [(value, rounds) for value, rounds in pairs if value is not None]
    if not pairs:
        return None
    total_rounds = sum(rounds for _, rounds in pairs)
    if total_rounds == 0:
        return statistics.fmean(value for value, _ in pairs)
    return sum(value * rounds for value, rounds in pairs) / total_rounds


def _per_position_acceptance(stats: list) -> list[float] | None:
    """Position-wise mean of the per-run acceptance curves, weighted by each run's rounds."""
    curves = [(_stat(s, "per_position_acceptance"), _stat(s, "num_rounds") or 1) for s in stats]
    curves = [(list(curve), rounds) for curve, rounds in curves if curve]
    if not curves:
        return None
    width = max(len(curve) for curve, _ in curves)
    return [_weighted_at(curves, position) for position in range(width)]


def _weighted_at(curves: list[tuple[list[float], int]], position: int) -> float:
    present = [(curve[position], rounds) for curve, rounds in curves if position < len(curve)]
    return sum(v * r for v, r in present) / max(sum(r for _, r in present), 1)


def _stat(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) if obj is not None else None


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(numerator: float, denominator: float) -> float | None:
    """None for no tokens (one-token outputs have no decode phase) or no time."""
    return numerator / denominator if numerator and denominator and denominator > 0 else None


def outputs_as_records(runs: Sequence[BatchRun]) -> list[dict[str, Any]]:
    records = [{"prompt_index": index, "token_ids": [int(t) for t in out.token_ids],
                "finish_reason": getattr(out, "finish_reason", None)}
               for run in runs for index, out in zip(run.prompt_indices, run.outputs)]
    return sorted(records, key=lambda record: record["prompt_index"])


# ---------------------------------------------------------------- environment

def collect_env() -> dict[str, Any]:
    import torch
    import transformers
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "ssd": _ssd_version(), **_git_info(), "hostname": socket.gethostname(),
            **_device_info(torch)}


def _ssd_version() -> str | None:
    from importlib import metadata
    try:
        return metadata.version("ssd")
    except metadata.PackageNotFoundError:
        return getattr(sys.modules.get("ssd"), "__version__", None)


def _git_info() -> dict[str, Any]:
    """SSD_GIT_COMMIT when set (dirtiness unknown): a copy sent to a lent GPU machine may have no .git,
    or one whose HEAD is an older commit than the files sent; else from the checkout."""
    if os.environ.get("SSD_GIT_COMMIT"):
        return {"git_commit": os.environ["SSD_GIT_COMMIT"], "git_dirty": None}
    commit = _git("rev-parse", "HEAD")
    return {"git_commit": commit, "git_dirty": None if commit is None else bool(_git("status", "--porcelain"))}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _device_info(torch) -> dict[str, Any]:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cuda_version": torch.version.cuda, "device_count": count,
            "device_names": [torch.cuda.get_device_name(i) for i in range(count)],
            "cpu_count": _cpu_count()}


def _cpu_count() -> int | None:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---------------------------------------------------------------- result object

def config_as_dict(config: BenchConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(config), "target_tp_size": config.target_tp_size}


def build_result(config: BenchConfig, arms: Sequence[ArmResult], ab: dict[str, Any] | None = None,
                 env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result object; top-level metrics/outputs are the primary arm's (the last one listed)."""
    primary = arms[-1]
    return {
        "config": config_as_dict(config),
        "env": env if env is not None else collect_env(),
        "primary_arm": primary.name,
        "metrics": primary.metrics,
        "simulated_acceptance": config.simulated_acceptance,
        "random_acceptance": config.random_acceptance,
        "outputs": primary.outputs,
        "arms": {arm.name: {"metrics": arm.metrics, "outputs": arm.outputs} for arm in arms},
        "ab": ab,
    }


def write_result_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
