"""A fixed-width, logging-friendly summary table of one or several arms' metrics."""
from __future__ import annotations

from typing import Any, Callable, Mapping

THROUGHPUT_NOTE = ("decode tok/s = decode-step tokens / decode time (prefill excluded); "
                   "e2e tok/s = all generated tokens / wall time (prefill included)")
RANDOM_ACCEPTANCE = "random weights, no --profile: acceptance is chance agreement, not a real draft's"
MIN_COLUMN_WIDTH = 12


def _number(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:,.{digits}f}"


def _scaled(factor: float, digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value * factor:,.{digits}f}"


def _curve(value: Any) -> str:
    return " ".join(f"{p:.2f}" for p in value)


# (label, metric name, formatter) in display order
ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("requests", "num_requests", str),
    ("generated tokens", "generated_tokens", str),
    ("decode tok/s (no prefill)", "decode_tok_s", _number(1)),
    ("e2e tok/s", "e2e_tok_s", _number(1)),
    ("TTFT median (ms)", "ttft_s", _scaled(1000, 1)),
    ("TPOT median (ms)", "tpot_s", _scaled(1000, 2)),
    ("request latency median (s)", "e2e_latency_s", _number(2)),
    ("wall time (s)", "wall_time_s", _number(2)),
    ("prefill time (s)", "prefill_time_s", _number(2)),
    ("decode time (s)", "decode_time_s", _number(2)),
    ("rounds", "num_rounds", str),
    ("acceptance length", "acceptance_length", _number(2)),
    ("per-position acceptance", "per_position_acceptance", _curve),
    ("round (ms): decode time / rounds", "round_ms", _number(2)),
    ("draft round (ms)", "draft_round_ms", _number(2)),
    ("verify (ms)", "verify_ms", _number(2)),
    ("round / verify", "round_over_verify", _number(3)),
    ("cache hit rate (%)", "cache_hit_rate", _scaled(100, 1)),
    ("tokens/round on hit", "tokens_per_round_on_hit", _number(2)),
    ("tokens/round on miss", "tokens_per_round_on_miss", _number(2)),
    ("target waits for draft (ms/round)", "target_wait_ms", _number(2)),
    ("draft waits for target (ms/round)", "draft_wait_ms", _number(2)),
    ("backup after a miss (ms/round)", "backup_ms", _number(2)),
    ("rounds answered by jit backup", "jit_backups", str),
    ("rounds answered by fast backup", "fast_backups", str),
    ("DESIGN §7 predicted speedup vs AR", "predicted_speedup_over_ar", _number(2)),
    ("accepted-length histogram", "accepted_histogram", lambda h: " ".join(map(str, h))),
)


def format_summary(arm_metrics: Mapping[str, Mapping[str, Any]], *, simulated: bool = False,
                   comparisons: Mapping[str, Mapping[str, Mapping[str, float] | None]] | None = None,
                   greedy_identical: bool | None = None, title: str = "SSD benchmark",
                   match_rates: dict[str, float] | None = None, random_acceptance: bool = False) -> str:
    """The table, then A/B ratio lines and the greedy-identity verdict when given."""
    heading = f"{title} (simulated acceptance)" if simulated else title
    if random_acceptance:
        heading += f" ({RANDOM_ACCEPTANCE})"
    table = _table(arm_metrics)
    rule = "=" * max(len(line) for line in table)
    lines = [rule, heading, rule, *table, rule, f"note: {THROUGHPUT_NOTE}"]
    lines += _comparison_lines(comparisons or {})
    if greedy_identical is not None:
        lines.append(f"greedy outputs identical across arms: {'yes' if greedy_identical else 'NO'}")
    for arm, rate in (match_rates or {}).items():
        lines.append(f"greedy token match rate of {arm} vs the first arm (prefix before divergence): {rate:.3f}")
    return "\n".join(lines)


def _table(arm_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    cells = [[label] + [_cell(metrics.get(key), fmt) for metrics in arm_metrics.values()]
             for label, key, fmt in ROWS]
    header = ["metric", *arm_metrics]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    widths = [widths[0]] + [max(w, MIN_COLUMN_WIDTH) for w in widths[1:]]
    return [_row(header, widths), _row(["-" * w for w in widths], widths),
            *(_row(row, widths) for row in cells)]


def _row(cells: list[str], widths: list[int]) -> str:
    first, rest = cells[0].ljust(widths[0]), [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
    return "  ".join([first, *rest]).rstrip()


def _cell(value: Any, fmt: Callable[[Any], str]) -> str:
    return "-" if value is None else fmt(value)


def _comparison_lines(comparisons: Mapping[str, Mapping[str, Mapping[str, float] | None]]) -> list[str]:
    return [f"{pair} {timing} throughput ratio: {_ratio_text(est)}"
            for pair, by_timing in comparisons.items() for timing, est in by_timing.items()]


def _ratio_text(est: Mapping[str, float] | None) -> str:
    if est is None:
        return "- (an arm generated no tokens in this phase)"
    return (f"{est['ratio']:.3f} [{est['low']:.3f}, {est['high']:.3f}] ({est['confidence']:.0%} paired bootstrap, "
            f"{est['units']} batches)")
