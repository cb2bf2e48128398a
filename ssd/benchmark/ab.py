"""A/B statistics: interleaved scheduling, paired-bootstrap throughput ratios, output identity.

The unit of pairing is a prompt batch: every arm runs the same batches, so a batch's
tokens and time under arm A pair with the same batch under arm B (with --b 1 a batch is
one prompt). Resampling batches jointly keeps that pairing, which cancels per-prompt
difficulty (long vs short acceptance runs) out of the ratio's uncertainty.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ssd.benchmark.results import BatchRun

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_BLOCK = 1_000  # resamples drawn at a time, to bound memory for many batches


@dataclass(frozen=True)
class RatioEstimate:
    """Candidate throughput / baseline throughput, with a paired-bootstrap confidence interval."""
    ratio: float
    low: float
    high: float
    confidence: float
    units: int
    resamples: int


@dataclass(frozen=True)
class OutputMismatch:
    arm_a: str
    arm_b: str
    prompt_index: int
    position: int  # first differing token position (or the shorter length)
    token_a: int | None
    token_b: int | None


# ---------------------------------------------------------------- schedule

def interleaved_schedule(arms: Sequence[str], num_batches: int) -> Iterator[tuple[int, str]]:
    """(batch_index, arm) in ABBA order: arms forward on even batches, reversed on odd ones.

    Each batch runs under every arm back to back, so slow drift (thermals, clocks, caches)
    hits all arms alike, and the alternation cancels first-vs-second position effects.
    """
    for batch_index in range(num_batches):
        order = arms if batch_index % 2 == 0 else tuple(reversed(arms))
        for arm in order:
            yield batch_index, arm


# ---------------------------------------------------------------- bootstrap

def paired_bootstrap_ratio(base_tokens: Sequence[float], base_times: Sequence[float],
                           cand_tokens: Sequence[float], cand_times: Sequence[float], *,
                           resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = 0.95,
                           seed: int = 0) -> RatioEstimate:
    """Ratio of summed-tokens/summed-time throughputs, resampling paired units with replacement."""
    data = np.array([base_tokens, base_times, cand_tokens, cand_times], dtype=np.float64)
    if data.shape[1] == 0:
        raise ValueError("paired bootstrap needs at least one paired unit")
    rng = np.random.default_rng(seed)
    samples = np.concatenate([_resampled_ratios(data, rng, size)
                              for size in _blocks(resamples, BOOTSTRAP_BLOCK)])
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return RatioEstimate(ratio=float(_ratio_of_sums(data.sum(axis=1))), low=float(low),
                         high=float(high), confidence=confidence, units=data.shape[1],
                         resamples=resamples)


def _resampled_ratios(data: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    picks = rng.integers(0, data.shape[1], size=(size, data.shape[1]))
    sums = data[:, picks].sum(axis=2)  # (4, size)
    return _ratio_of_sums(sums)


def _ratio_of_sums(sums: np.ndarray) -> np.ndarray:
    base_tokens, base_times, cand_tokens, cand_times = sums
    return (cand_tokens / cand_times) / (base_tokens / base_times)


def _blocks(total: int, block: int) -> list[int]:
    return [min(block, total - start) for start in range(0, total, block)]


def per_unit_throughput(tokens: Sequence[float], times: Sequence[float]) -> list[float | None]:
    return [t / s if s > 0 else None for t, s in zip(tokens, times)]


# ---------------------------------------------------------------- arms

def batch_samples(runs: Sequence[BatchRun], timing: str) -> tuple[list[float], list[float]]:
    """(tokens, seconds) per batch, ordered by batch index; timing 'decode' or 'e2e'."""
    ordered = sorted(runs, key=lambda run: run.batch_index)
    if timing == "decode":
        return ([float(getattr(run.stats, "decode_tokens", 0) or 0) for run in ordered],
                [float(getattr(run.stats, "decode_time_s", 0.0) or 0.0) for run in ordered])
    return ([float(sum(len(out.token_ids) for out in run.outputs)) for run in ordered],
            [run.wall_s for run in ordered])


def compare_arms(runs_by_arm: Mapping[str, Sequence[BatchRun]], *, seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Every later arm against the first (the baseline), for decode and end-to-end throughput."""
    names = list(runs_by_arm)
    baseline = names[0]
    return {f"{name}/{baseline}": {timing: _estimate(batch_samples(runs_by_arm[baseline], timing),
                                                     batch_samples(runs_by_arm[name], timing), resamples, seed)
                                   for timing in ("decode", "e2e")}
            for name in names[1:]}


def _estimate(base: tuple[list[float], list[float]], cand: tuple[list[float], list[float]], resamples: int,
              seed: int) -> dict[str, Any] | None:
    """None where an arm has no tokens or no time to divide (one-token outputs have no decode phase)."""
    if not all(sum(values) > 0 for values in (*base, *cand)):
        return None
    return asdict(paired_bootstrap_ratio(*base, *cand, resamples=resamples, seed=seed))


def per_batch_throughput(runs_by_arm: Mapping[str, Sequence[BatchRun]], timing: str) -> dict[str, list]:
    return {name: per_unit_throughput(*batch_samples(runs, timing)) for name, runs in runs_by_arm.items()}


# ---------------------------------------------------------------- outputs

def greedy_outputs_identical(arm_outputs: Mapping[str, Sequence[Sequence[int]]]) -> bool:
    """True when every arm produced the same token ids for every prompt (greedy lossless check)."""
    return first_output_mismatch(arm_outputs) is None


def first_output_mismatch(arm_outputs: Mapping[str, Sequence[Sequence[int]]]) -> OutputMismatch | None:
    names = list(arm_outputs)
    reference = names[0]
    for name in names[1:]:
        mismatch = _first_mismatch_between(reference, arm_outputs[reference], name, arm_outputs[name])
        if mismatch is not None:
            return mismatch
    return None


def _first_mismatch_between(name_a: str, outputs_a: Sequence[Sequence[int]],
                            name_b: str, outputs_b: Sequence[Sequence[int]]) -> OutputMismatch | None:
    for prompt_index, (a, b) in enumerate(zip(outputs_a, outputs_b)):
        position = _first_difference(list(a), list(b))
        if position is not None:
            return OutputMismatch(name_a, name_b, prompt_index, position, _at(a, position), _at(b, position))
    if len(outputs_a) != len(outputs_b):  # one arm is missing prompts
        return OutputMismatch(name_a, name_b, min(len(outputs_a), len(outputs_b)), 0, None, None)
    return None


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def _at(tokens: Sequence[int], position: int) -> int | None:
    return int(tokens[position]) if position < len(tokens) else None


def greedy_prefix_match_rate(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Share of the reference's tokens produced identically before the first divergence.
    In bf16 on GPU a window forward and a one-token step round differently, so near-tied argmaxes
    can flip; this is the number to report there (CPU fp32 runs must be exactly 1.0)."""
    total = sum(len(a) for a in reference)
    same = sum(_first_difference(list(a), list(b)) if _first_difference(list(a), list(b)) is not None
               else len(a) for a, b in zip(reference, other))
    return same / total if total else 1.0
