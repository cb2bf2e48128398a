"""The speedup DESIGN.md §7 (Theorem 7 of the SSD paper) predicts from an async run's own measurements,
to check a measured async/AR ratio against (times in units of one verify forward):

    speedup_over_AR = [p·E_hit + (1-p)·E_miss] / [p·max(1, T_p) + (1-p)·(1 + T_b)]

p the cache hit rate, E the tokens a round yields on a hit / a miss, T_p the draft's cache-building
round and T_b the backup, each divided by the verify time."""
from __future__ import annotations

from typing import Any, Mapping


def theorem7_speedup(hit_rate: float, tokens_on_hit: float, tokens_on_miss: float,
                     draft_round: float, backup: float) -> float:
    produced = hit_rate * tokens_on_hit + (1 - hit_rate) * tokens_on_miss
    cost = hit_rate * max(1.0, draft_round) + (1 - hit_rate) * (1 + backup)
    return produced / cost


def predicted_speedup(metrics: Mapping[str, Any]) -> float | None:
    """From an async arm's metrics; None when the run lacks what the formula needs."""
    needed = ("cache_hit_rate", "verify_ms", "draft_round_ms", "backup_ms")
    if any(metrics.get(name) is None for name in needed) or not metrics["verify_ms"]:
        return None
    verify = metrics["verify_ms"]
    on_hit = metrics.get("tokens_per_round_on_hit") or metrics.get("acceptance_length") or 1.0
    on_miss = metrics.get("tokens_per_round_on_miss") or metrics.get("acceptance_length") or 1.0
    return theorem7_speedup(metrics["cache_hit_rate"], on_hit, on_miss,
                            metrics["draft_round_ms"] / verify, metrics["backup_ms"] / verify)
