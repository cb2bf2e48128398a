"""`--backup auto`: which backup answers a cache miss, from the measured hit rate and costs
(DESIGN.md §6).

With B sequences a round waits for the backup whenever any row misses (chance 1 - p^B). The neural
`jit` backup drafts K tokens then (its wait: W_jit) and its proposals are accepted like the draft's
cache hits; the `fast` n-gram backup costs almost nothing (W_fast) but is accepted less. Per round
and row, with T the round's length when nothing waits (the draft's build plus its idle time, i.e.
the target's verification) and a_d / a_n the mean tokens a neural / n-gram proposal yields
(accepted + 1):

    jit:  B a_d                     / (T + (1 - p^B) W_jit)
    fast: B (p a_d + (1 - p) a_n)   / (T + (1 - p^B) W_fast)

and auto takes the larger. Every quantity is measured online by the draft itself; before the first
measurement of a quantity its prior stands in (W_jit: K/(K+1) of a cache build, which runs K+1
forwards; an n-gram proposal yields PRIOR_NGRAM_TOKENS, counted as PRIOR_ROWS proposals).
Measurements — the priors too — fade: one made r rounds ago counts 0.5^(r / HALF_LIFE_ROUNDS), so
the choice follows a workload that changes (a code file the n-gram copies from well, then prose).
The arm not chosen would never be measured, so every EXPLORE_EVERY-th decision takes it while what
is known of it weighs less than PRIOR_ROWS: at first, and again once its measurements grew old — then
a few new ones outweigh them (either choice is exact).
"""
from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_ROWS = 4             # weight of a token prior, in verified proposals
PRIOR_DRAFT_TOKENS = 2.0   # tokens per neural proposal before any was verified
PRIOR_NGRAM_TOKENS = 1.5   # ... per n-gram proposal
EXPLORE_EVERY = 32         # decisions
HALF_LIFE_ROUNDS = 128     # a measurement this many rounds old counts half (~2 s at 15 ms rounds)


@dataclass
class Tally:
    """A sum and a count of observations that fade with age: one made `age` rounds ago counts
    0.5 ** (age / half_life) (half_life None: they never fade). A prior is observations at round 0."""
    half_life: float | None = None
    total: float = 0.0
    count: float = 0.0
    at: int = 0                   # the round total and count are aged to

    def age_to(self, now: int) -> None:
        if now > self.at and self.half_life:
            fade = 0.5 ** ((now - self.at) / self.half_life)
            self.total, self.count = self.total * fade, self.count * fade
        self.at = max(self.at, now)

    def add(self, total: float, count: int = 1, now: int = 0) -> None:
        self.age_to(now)
        self.total, self.count = self.total + total, self.count + count

    def weight(self, now: int = 0) -> float:
        self.age_to(now)
        return self.count

    def mean(self, default: float, now: int = 0) -> float:
        """The mean (default while nothing was observed)."""
        self.age_to(now)
        return self.total / self.count if self.count > 0 else default


def fading(prior: float = 0.0, weight: float = 0.0) -> Tally:
    """A tally of HALF_LIFE_ROUNDS, starting from `prior` counted as `weight` observations."""
    return Tally(HALF_LIFE_ROUNDS, prior * weight, weight)


@dataclass
class BackupChooser:
    k: int
    lookups: Tally = field(default_factory=lambda: fading(0.5, 2))    # hits over lookups
    round_s: Tally = field(default_factory=fading)          # T: build + idle per round
    build_s: Tally = field(default_factory=fading)
    draft_tokens: Tally = field(default_factory=lambda: fading(PRIOR_DRAFT_TOKENS, PRIOR_ROWS))   # tokens per
    ngram_tokens: Tally = field(default_factory=lambda: fading(PRIOR_NGRAM_TOKENS, PRIOR_ROWS))   # verified proposal
    waits: dict[str, Tally] = field(default_factory=lambda: {"jit": fading(), "fast": fading()})
    decisions: int = 0
    rounds: int = 0                                         # the clock the measurements fade by

    def observe_round(self, build_s: float, idle_s: float) -> None:
        """The draft built its cache for build_s, then idled idle_s until the outcome came."""
        self.rounds += 1
        self.round_s.add(build_s + idle_s, now=self.rounds)
        self.build_s.add(build_s, now=self.rounds)

    def observe_lookups(self, hits: int, lookups: int) -> None:
        self.lookups.add(hits, lookups, now=self.rounds)

    def observe_wait(self, backup: str, wait_s: float) -> None:
        """A round waited wait_s for `backup` to answer its misses."""
        self.waits[backup].add(wait_s, now=self.rounds)

    def observe_proposals(self, accepted: list[int], from_ngram: list[bool]) -> None:
        """A verified window: accepted tokens per row, whether each row's proposal was an n-gram's."""
        for tally, source in ((self.ngram_tokens, True), (self.draft_tokens, False)):
            rows = [a for a, n in zip(accepted, from_ngram) if n == source]
            tally.add(sum(rows) + len(rows), len(rows), now=self.rounds)

    def choose(self, batch: int) -> str:
        now = self.rounds
        p = self.lookups.mean(0.5, now)
        round_s = self.round_s.mean(0.0, now)
        miss_round = 1 - p ** batch
        a_d, a_n = self.draft_tokens.mean(PRIOR_DRAFT_TOKENS, now), self.ngram_tokens.mean(PRIOR_NGRAM_TOKENS, now)
        wait_jit = self.waits["jit"].mean(self.build_s.mean(0.0, now) * self.k / (self.k + 1), now)
        jit = a_d / (round_s + miss_round * wait_jit + 1e-9)
        fast = (p * a_d + (1 - p) * a_n) / (round_s + miss_round * self.waits["fast"].mean(0.0, now) + 1e-9)
        best, other = ("jit", "fast") if jit > fast else ("fast", "jit")
        self.decisions += 1
        return other if self.decisions % EXPLORE_EVERY == 0 and self.measurements(other) < PRIOR_ROWS else best

    def measurements(self, backup: str) -> float:
        """What is known of an arm (faded): jit draft waits, verified n-gram proposals (prior included)."""
        return (self.waits["jit"] if backup == "jit" else self.ngram_tokens).weight(self.rounds)
