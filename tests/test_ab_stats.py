"""A/B statistics: paired bootstrap ratio CIs, output identity, interleaved schedule."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ssd.benchmark.ab import (first_output_mismatch, greedy_outputs_identical, interleaved_schedule,
                              paired_bootstrap_ratio, per_unit_throughput)


def synthetic_pairs(true_ratio: float, noise: float, units: int = 60, seed: int = 1):
    """Per-prompt tokens and times where the candidate is `true_ratio`x faster, plus noise."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(100, 600, size=units).astype(float)  # prompts differ a lot in length
    base_times = tokens / 50.0 * rng.lognormal(0, 0.3, size=units)  # and in difficulty
    cand_times = base_times / true_ratio * rng.lognormal(0, noise, size=units)
    return tokens, base_times, tokens, cand_times


@pytest.mark.parametrize("true_ratio", [0.8, 1.0, 1.7, 3.0])
def test_ci_contains_the_true_ratio(true_ratio):
    estimate = paired_bootstrap_ratio(*synthetic_pairs(true_ratio, noise=0.05), seed=3)
    assert estimate.low <= true_ratio <= estimate.high
    assert estimate.low <= estimate.ratio <= estimate.high
    assert (estimate.units, estimate.resamples, estimate.confidence) == (60, 10_000, 0.95)


def test_ci_narrow_when_noise_small_and_wider_when_large():
    tight = paired_bootstrap_ratio(*synthetic_pairs(1.5, noise=0.001))
    loose = paired_bootstrap_ratio(*synthetic_pairs(1.5, noise=0.3))
    assert tight.high - tight.low < 0.005
    assert loose.high - loose.low > 10 * (tight.high - tight.low)


def test_pairing_removes_per_prompt_variation():
    """Prompt difficulty varies 3x, but the candidate is exactly 2x faster on each: CI is a point."""
    tokens = np.array([100.0, 400.0, 50.0, 300.0])
    base = np.array([1.0, 12.0, 0.5, 2.0])
    estimate = paired_bootstrap_ratio(tokens, base, tokens, base / 2)
    assert estimate.ratio == pytest.approx(2.0)
    assert (estimate.low, estimate.high) == pytest.approx((2.0, 2.0))


def test_bootstrap_is_seeded_and_ratio_is_of_sums():
    data = synthetic_pairs(1.2, noise=0.2, units=9)
    assert paired_bootstrap_ratio(*data, seed=5) == paired_bootstrap_ratio(*data, seed=5)
    tokens, base_times, _, cand_times = data
    expected = (tokens.sum() / cand_times.sum()) / (tokens.sum() / base_times.sum())
    assert paired_bootstrap_ratio(*data).ratio == pytest.approx(expected)
    with pytest.raises(ValueError):
        paired_bootstrap_ratio([], [], [], [])


def test_per_unit_throughput():
    assert per_unit_throughput([10, 20, 5], [2.0, 4.0, 0.0]) == [5.0, 5.0, None]


def test_identical_outputs_detected():
    same = {"ar": [[1, 2, 3], [4, 5]], "sync": [[1, 2, 3], [4, 5]], "async": [(1, 2, 3), (4, 5)]}
    assert greedy_outputs_identical(same)
    assert first_output_mismatch(same) is None


def test_first_mismatch_reports_arm_prompt_and_position():
    outputs = {"sync": [[1, 2, 3], [4, 5, 6]], "async": [[1, 2, 3], [4, 9, 6]]}
    assert not greedy_outputs_identical(outputs)
    mismatch = first_output_mismatch(outputs)
    assert (mismatch.arm_a, mismatch.arm_b, mismatch.prompt_index, mismatch.position) == ("sync", "async", 1, 1)
    assert (mismatch.token_a, mismatch.token_b) == (5, 9)


def test_length_and_count_mismatches():
    shorter = first_output_mismatch({"a": [[1, 2, 3]], "b": [[1, 2]]})
    assert (shorter.position, shorter.token_a, shorter.token_b) == (2, 3, None)
    missing = first_output_mismatch({"a": [[1], [2]], "b": [[1]]})
    assert missing.prompt_index == 1


@pytest.mark.parametrize("arms", [("A", "B"), ("ar", "sync", "async")])
def test_interleaved_schedule_is_balanced(arms):
    schedule = list(interleaved_schedule(arms, num_batches=8))
    assert sorted(schedule) == sorted((b, a) for b in range(8) for a in arms)  # each pair once
    assert [b for b, _ in schedule] == sorted(b for b, _ in schedule)  # batch by batch
    firsts = Counter(schedule[i * len(arms)][1] for i in range(8))
    lasts = Counter(schedule[i * len(arms) + len(arms) - 1][1] for i in range(8))
    assert firsts[arms[0]] == firsts[arms[-1]] == 4 and lasts[arms[0]] == lasts[arms[-1]] == 4


def test_two_arm_schedule_is_abba():
    order = "".join(arm for _, arm in interleaved_schedule(("A", "B"), 4))
    assert order == "ABBAABBA"


def test_theorem7_prediction_matches_hand_computation():
    from ssd.benchmark.expected_speedup import predicted_speedup, theorem7_speedup
    # all hits, draft faster than verify: the round costs one verify and yields E tokens
    assert theorem7_speedup(1.0, 5.0, 2.0, 0.5, 3.0) == 5.0
    # p = 0.5, draft round 2 verifies, backup 1 verify: (2.5 + 1) / (1 + 1) = 1.75
    assert theorem7_speedup(0.5, 5.0, 2.0, 2.0, 1.0) == 1.75
    metrics = {"cache_hit_rate": 0.5, "verify_ms": 10.0, "draft_round_ms": 20.0, "backup_ms": 10.0,
               "tokens_per_round_on_hit": 5.0, "tokens_per_round_on_miss": 2.0}
    assert predicted_speedup(metrics) == 1.75
    assert predicted_speedup({**metrics, "backup_ms": None}) is None
