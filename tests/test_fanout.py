import itertools
import math
import random

import pytest

from ssd.spec.fanout import (
    FanoutEstimator,
    geometric_fanout,
    geometric_weights,
    parse_fanout_list,
    uniform_fanout,
)


def outcome_probs(a: float, k: int) -> list[float]:
    """P(exactly j accepted, then the target emits): a^j (1-a) for j < K, a^K for j = K."""
    return [a**j * (1 - a) for j in range(k)] + [a**k]


def expected_hits(fanout: tuple[int, ...], a: float, r: float) -> float:
    """sum_j P_j (1 - F_j^-r); F_j = 0 prepares nothing and never hits."""
    return sum(p * (1 - f**-r) for p, f in zip(outcome_probs(a, len(fanout) - 1), fanout) if f > 0)


def brute_force_fanout(budget: int, k: int, a: float, r: float) -> tuple[int, ...]:
    """The best integer allocation with every F_j >= 1, by enumerating all of them."""
    best, best_value = None, -math.inf
    for cuts in itertools.combinations(range(1, budget), k):  # compositions of budget into K+1 parts >= 1
        bounds = (0, *cuts, budget)
        fanout = tuple(hi - lo for lo, hi in zip(bounds, bounds[1:]))
        value = expected_hits(fanout, a, r)
        if value > best_value:
            best, best_value = fanout, value
    return best


# ----------------------------------------------------------------- allocations


def test_uniform_fanout() -> None:
    assert uniform_fanout(3, 4) == (3, 3, 3, 3, 3)
    assert uniform_fanout(0, 1) == (0, 0)
    with pytest.raises(ValueError, match="K must be >= 1"):
        uniform_fanout(2, 0)
    with pytest.raises(ValueError, match=">= 0"):
        uniform_fanout(-1, 3)


@pytest.mark.parametrize(
    "budget, k, a, r",
    [(12, 3, 0.8, 1.0), (16, 3, 0.6, 0.5), (20, 4, 0.75, 0.8), (18, 3, 0.9, 2.0), (14, 2, 0.5, 1.5)],
)
def test_geometric_matches_brute_force_integer_optimum(budget: int, k: int, a: float, r: float) -> None:
    weights = geometric_weights(k, a, r)
    continuous = [budget * w for w in weights]
    assert min(continuous) >= 1, "pick cases where the real optimum has every F_j >= 1, as the brute force does"
    best = brute_force_fanout(budget, k, a, r)
    ours = geometric_fanout(budget, k, a, r)
    # For a separable concave objective the integer optimum lies between floor and ceil of the real optimum.
    for x, f in zip(continuous, best):
        assert math.floor(x) <= f <= math.ceil(x), (continuous, best)
    assert all(abs(f - g) <= 1 for f, g in zip(ours, best)), (ours, best)
    assert expected_hits(ours, a, r) >= expected_hits(best, a, r) - 2e-3, (ours, best)


def test_geometric_weights_satisfy_the_lagrange_condition() -> None:
    """Marginal gains r P_j F_j^-(r+1) are equal at the real-valued optimum."""
    for k, a, r in [(3, 0.8, 1.0), (5, 0.4, 0.3), (6, 0.95, 2.5)]:
        weights = geometric_weights(k, a, r)
        marginals = [r * p * w ** -(r + 1) for p, w in zip(outcome_probs(a, k), weights)]
        assert max(marginals) == pytest.approx(min(marginals), rel=1e-9)


@pytest.mark.parametrize("budget", [0, 1, 5, 7, 24, 100, 1001])
@pytest.mark.parametrize("a, r", [(0.0, 1.0), (0.3, 0.0), (0.7, 1.0), (0.95, 3.0), (1.0, 1.0), (-0.5, 0.2), (1.5, 0.5)])
def test_geometric_sums_to_budget(budget: int, a: float, r: float) -> None:
    for k in (1, 4, 8):
        fanout = geometric_fanout(budget, k, a, r)
        assert len(fanout) == k + 1
        assert sum(fanout) == budget and min(fanout) >= 0


@pytest.mark.parametrize("a", [0.2, 0.6, 0.9, 0.99])
def test_geometric_is_non_increasing_before_the_last_outcome(a: float) -> None:
    for budget, k, r in [(30, 5, 1.0), (64, 7, 0.5), (11, 4, 2.0)]:
        fanout = geometric_fanout(budget, k, a, r)
        assert all(x >= y for x, y in zip(fanout[:k], fanout[1:k])), fanout


def test_geometric_extremes() -> None:
    assert geometric_fanout(20, 4, 1.0, 1.0) == (0, 0, 0, 0, 20)  # everything accepted
    assert geometric_fanout(20, 4, 0.0, 1.0) == (20, 0, 0, 0, 0)  # everything rejected at once
    with pytest.raises(ValueError, match="miss exponent"):
        geometric_fanout(10, 3, 0.5, -0.1)
    with pytest.raises(ValueError, match="NaN"):
        geometric_fanout(10, 3, math.nan, 1.0)
    with pytest.raises(ValueError, match="budget"):
        geometric_fanout(-1, 3, 0.5, 1.0)


# ----------------------------------------------------------------- estimator


def simulate_accepted(rng: random.Random, a: float, k: int) -> int:
    n = 0
    while n < k and rng.random() < a:
        n += 1
    return n


def test_estimator_priors_without_data() -> None:
    estimator = FanoutEstimator(prior_acceptance=0.6, prior_miss_exponent=0.9)
    assert estimator.acceptance == pytest.approx(0.6)
    assert estimator.miss_exponent == 0.9
    assert estimator.hit_rate is None
    assert estimator.fanout(12, 3) == geometric_fanout(12, 3, 0.6, 0.9)
    estimator.observe_lookup(4, hit=True)  # one bucket says nothing about the slope
    assert estimator.miss_exponent == 0.9 and estimator.hit_rate == 1.0


@pytest.mark.parametrize("true_a, true_r", [(0.8, 0.7), (0.45, 1.6)])
def test_estimator_converges_on_synthetic_data(true_a: float, true_r: float) -> None:
    rng = random.Random(0)
    k = 5
    estimator = FanoutEstimator()
    for _ in range(2_000):
        estimator.observe_round([simulate_accepted(rng, true_a, k) for _ in range(8)], k)
    for _ in range(40_000):
        fanout = rng.randint(0, 8)
        hit = fanout > 0 and rng.random() >= fanout**-true_r
        estimator.observe_lookup(fanout, hit)
    assert estimator.acceptance == pytest.approx(true_a, abs=0.01)
    assert estimator.miss_exponent == pytest.approx(true_r, abs=0.05)
    assert estimator.fanout(24, k) == geometric_fanout(24, k, estimator.acceptance, estimator.miss_exponent)


def test_estimator_counts_only_attempted_positions() -> None:
    estimator = FanoutEstimator(prior_positions=0.0)
    estimator.observe_round([0, 2, 4], k=4)  # attempted: 1, 3, 4 (nothing after a rejection)
    assert (estimator.accepted_positions, estimator.attempted_positions) == (6, 8)
    assert estimator.acceptance == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="outside"):
        estimator.observe_round([5], k=4)
    with pytest.raises(ValueError, match=">= 0"):
        estimator.observe_lookup(-1, hit=False)


def test_estimator_miss_exponent_is_clamped_non_negative() -> None:
    estimator = FanoutEstimator(prior_strength=0.0)
    for fanout, misses in [(1, 5), (4, 50)]:  # more fan-out, more misses: a nonsense negative slope
        for i in range(100):
            estimator.observe_lookup(fanout, hit=i >= misses)
    assert estimator.miss_exponent == 0.0


# ----------------------------------------------------------------- parsing


def test_parse_fanout_list() -> None:
    assert parse_fanout_list("3,2,2,1", 3) == (3, 2, 2, 1)
    assert parse_fanout_list(" 3 2, 0 ,1 ", 3) == (3, 2, 0, 1)
    assert parse_fanout_list([4, 0], 1) == (4, 0)
    assert parse_fanout_list((1.0, 2), 1) == (1, 2)


@pytest.mark.parametrize(
    "value, k, message",
    [
        ("3,2,1", 3, "has 3 entries; with K=3 it needs K\\+1=4"),
        ([1, 2, 3, 4, 5], 3, "has 5 entries"),
        ("", 1, "has 0 entries"),
        ("3,-1", 1, "entry 1 is -1; entries must be >= 0"),
        ("3,x", 1, "entry 1 \\('x'\\) is not an integer"),
        ("3,1.5", 1, "is not an integer"),
        ([2, 1.5], 1, "is not an integer"),
        ([True, 2], 1, "is a bool"),
        ("1,1", 0, "K must be >= 1"),
    ],
)
def test_parse_fanout_list_errors(value, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fanout_list(value, k)
