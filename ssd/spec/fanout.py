"""Fan-out lists: how many candidate recovery/bonus tokens the draft prepares per outcome.

A fan-out list has K+1 entries; entry j is F_j, the number of branches prepared
for the outcome "exactly j draft tokens accepted" (DESIGN.md §1, §5). Everything
here is host-side Python working on already-fetched ints, run once per round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# a is clamped into [_MIN_ACCEPTANCE, 1 - _MIN_ACCEPTANCE] so that log(a) and log(1 - a) stay finite.
_MIN_ACCEPTANCE = 1e-6
_MAX_MISS_EXPONENT = 20.0


def uniform_fanout(f: int, k: int) -> tuple[int, ...]:
    """The same fan-out f at each of the K+1 outcomes."""
    _check_k(k)
    if f < 0:
        raise ValueError(f"fan-out must be >= 0, got {f}")
    return (f,) * (k + 1)


def geometric_fanout(budget: int, k: int, acceptance: float, miss_exponent: float) -> tuple[int, ...]:
    """The hit-maximising fan-out list for a budget of `budget` branches (Theorem 12).

    Model: a draft token is accepted with probability a, independently per
    position, so the verification outcome "exactly j accepted" has probability
    P_j = a^j (1 - a) for j < K and P_K = a^K. With F_j candidates prepared for
    outcome j the cache misses with probability F_j^-r. The expected hit rate

        H(F) = sum_j P_j (1 - F_j^-r),  subject to  sum_j F_j = budget,

    is concave in each F_j; the Lagrange condition r P_j F_j^-(r+1) = lambda gives
    F_j ∝ P_j^(1/(1+r)). Dividing out the common (1 - a)^(1/(1+r)):

        F_j ∝ a^(j/(1+r))                          for j < K,
        F_K ∝ a^(K/(1+r)) (1 - a)^(-1/(1+r)).

    A constant factor in the miss law (miss = c F^-r) does not change the
    optimum. The real-valued optimum is scaled to the budget and rounded by the
    largest-remainder method, so the result sums to exactly `budget`; entries
    may be 0 when the budget is small. a is clamped into (0, 1); r >= 0 (r = 0
    gives the limit F_j ∝ P_j).
    """
    _check_k(k)
    if budget < 0:
        raise ValueError(f"fan-out budget must be >= 0, got {budget}")
    if not math.isfinite(miss_exponent) or miss_exponent < 0:
        raise ValueError(f"miss exponent must be finite and >= 0, got {miss_exponent}")
    if math.isnan(acceptance):
        raise ValueError("acceptance is NaN")
    return _largest_remainder(geometric_weights(k, acceptance, miss_exponent), budget)


def geometric_weights(k: int, acceptance: float, miss_exponent: float) -> list[float]:
    """The real-valued optimum of geometric_fanout, normalised to sum to 1."""
    a = min(max(acceptance, _MIN_ACCEPTANCE), 1.0 - _MIN_ACCEPTANCE)
    inv = 1.0 / (1.0 + miss_exponent)
    log_weights = [j * inv * math.log(a) for j in range(k)]
    log_weights.append(k * inv * math.log(a) - inv * math.log1p(-a))
    top = max(log_weights)  # subtract before exp so nothing overflows
    weights = [math.exp(w - top) for w in log_weights]
    total = sum(weights)
    return [w / total for w in weights]


def _largest_remainder(shares: Sequence[float], total: int) -> tuple[int, ...]:
    """Integers summing to `total`, each the floor of total * share, plus one for
    the largest fractional parts (ties go to the lower index)."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    leftover = total - sum(counts)
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    return tuple(counts)


def parse_fanout_list(value: str | Sequence[int], k: int) -> tuple[int, ...]:
    """Validate a fan-out list given as "3,2,2,1" / "3 2 2 1" or a sequence of ints.

    It must have K+1 non-negative integer entries (outcomes 0..K accepted).
    """
    _check_k(k)
    if isinstance(value, str):
        items: Sequence[object] = [part for part in value.replace(",", " ").split()]
    else:
        items = list(value)
    entries = [_parse_entry(item, index) for index, item in enumerate(items)]
    if len(entries) != k + 1:
        raise ValueError(
            f"fan-out list {value!r} has {len(entries)} entries; with K={k} it needs K+1={k + 1} "
            "(one per number of accepted draft tokens, 0..K)"
        )
    return tuple(entries)


def _parse_entry(item: object, index: int) -> int:
    if isinstance(item, bool):
        raise ValueError(f"fan-out entry {index} is a bool ({item}), expected an integer")
    if isinstance(item, str):
        try:
            number = int(item)
        except ValueError:
            raise ValueError(f"fan-out entry {index} ({item!r}) is not an integer") from None
    elif isinstance(item, int):
        number = item
    elif isinstance(item, float) and item.is_integer():
        number = int(item)
    else:
        raise ValueError(f"fan-out entry {index} ({item!r}) is not an integer")
    if number < 0:
        raise ValueError(f"fan-out entry {index} is {number}; entries must be >= 0")
    return number


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"speculation length K must be >= 1, got {k}")


@dataclass
class _LookupBucket:
    lookups: int = 0
    misses: int = 0


@dataclass
class FanoutEstimator:
    """Online estimates of the acceptance a and the miss exponent r, and the
    geometric fan-out they imply.

    Acceptance: positions before the first rejection are accepted, the
    rejected one is attempted, later ones were never tested; so a round with n
    of K accepted adds n accepted of n + [n < K] attempted (the maximum-
    likelihood estimate of the truncated-geometric model). The prior counts as
    `prior_positions` attempted positions at rate `prior_acceptance`.

    Miss exponent: lookups are bucketed by the fan-out F that was prepared for
    the real outcome. The slope of log(miss rate) against log F over the
    buckets with >= `min_bucket_lookups` lookups (weighted by lookup count, with
    a free intercept, so miss = c F^-r) is pulled toward `prior_miss_exponent`
    by a ridge penalty of weight `prior_strength`; with fewer than two distinct
    F the prior is returned. Buckets with F = 0 cannot hit and are not used.

    Counts are cumulative. Keep one estimator per fan-out list (e.g. one for
    sequences whose last speculation was a cache hit, one for misses).
    """

    prior_acceptance: float = 0.7
    prior_positions: float = 10.0
    prior_miss_exponent: float = 1.0
    prior_strength: float = 10.0
    min_bucket_lookups: int = 10
    accepted_positions: int = field(default=0, init=False)
    attempted_positions: int = field(default=0, init=False)
    _buckets: dict[int, _LookupBucket] = field(default_factory=dict, init=False, repr=False)

    def observe_round(self, num_accepted: Sequence[int], k: int) -> None:
        """Record one verification round: accepted draft tokens per sequence (each 0..K)."""
        _check_k(k)
        for n in num_accepted:
            if not 0 <= n <= k:
                raise ValueError(f"accepted count {n} outside [0, K={k}]")
            self.accepted_positions += n
            self.attempted_positions += n + (n < k)

    def observe_lookup(self, fanout_used: int, hit: bool) -> None:
        """Record one cache lookup: the fan-out prepared for the real outcome, and whether it hit."""
        if fanout_used < 0:
            raise ValueError(f"fan-out must be >= 0, got {fanout_used}")
        bucket = self._buckets.setdefault(fanout_used, _LookupBucket())
        bucket.lookups += 1
        bucket.misses += not hit

    @property
    def acceptance(self) -> float:
        accepted = self.accepted_positions + self.prior_acceptance * self.prior_positions
        return accepted / (self.attempted_positions + self.prior_positions)

    @property
    def hit_rate(self) -> float | None:
        """Fraction of all recorded lookups that hit; None before the first lookup."""
        lookups = sum(b.lookups for b in self._buckets.values())
        misses = sum(b.misses for b in self._buckets.values())
        return None if lookups == 0 else 1.0 - misses / lookups

    @property
    def miss_exponent(self) -> float:
        points = [  # (log F, log smoothed miss rate, weight)
            (math.log(f), math.log((b.misses + 0.5) / (b.lookups + 1.0)), float(b.lookups))
            for f, b in sorted(self._buckets.items())
            if f >= 1 and b.lookups >= self.min_bucket_lookups
        ]
        if len(points) < 2:
            return self.prior_miss_exponent
        total = sum(w for _, _, w in points)
        mean_x = sum(x * w for x, _, w in points) / total
        mean_y = sum(y * w for _, y, w in points) / total
        sxx = sum(w * (x - mean_x) ** 2 for x, _, w in points)
        sxy = sum(w * (x - mean_x) * (y - mean_y) for x, y, w in points)
        # Ridge toward slope -r0: argmin_s sum w (y - c - s x)^2 + lambda (s + r0)^2.
        slope = (sxy - self.prior_strength * self.prior_miss_exponent) / (sxx + self.prior_strength)
        return min(max(-slope, 0.0), _MAX_MISS_EXPONENT)

    def fanout(self, budget: int, k: int) -> tuple[int, ...]:
        """The geometric fan-out list for the current estimates."""
        a, r = self.acceptance, self.miss_exponent
        fanout = geometric_fanout(budget, k, a, r)
        logger.debug("fan-out for budget %d, K=%d: a=%.3f r=%.3f -> %s", budget, k, a, r, fanout)
        return fanout
