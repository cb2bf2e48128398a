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
forwards; an n-gram proposal yields PRIOR_NGRAM_TOKENS). The arm not chosen would never be measured,
so every EXPLORE_EVERY-th decision takes it while it has fewer than PRIOR_ROWS measurements (a
prior that underrates it is corrected; either choice is exact).
"""
from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_ROWS = 4             # weight of a token prior, in verified proposals
PRIOR_DRAFT_TOKENS = 2.0   # tokens per neural proposal before any was verified
PRIOR_NGRAM_TOKENS = 1.5   # ... per n-gram proposal
EXPLORE_EVERY = 32         # decisions


@dataclass
class Tally:
    total: float = 0.0
    count: int = 0

    def add(self, total: float, count: int = 1) -> None:
        self.total, self.count = self.total + total, self.count + count

    def mean(self, prior: float, weight: int = 0) -> float:
        """The mean, with `prior` counted as `weight` observations (alone while nothing was observed)."""
        if self.count + weight == 0:
            return prior
        return (self.total + prior * weight) / (self.count + weight)


@dataclass
class BackupChooser:
    k: int
    lookups: Tally = field(default_factory=Tally)          # hits over lookups
    round_s: Tally = field(default_factory=Tally)          # T: build + idle per round
    build_s: Tally = field(default_factory=Tally)
    draft_tokens: Tally = field(default_factory=Tally)     # tokens per verified neural proposal
    ngram_tokens: Tally = field(default_factory=Tally)     # ... per n-gram proposal
    waits: dict[str, Tally] = field(default_factory=lambda: {"jit": Tally(), "fast": Tally()})
    decisions: int = 0

    def observe_round(self, build_s: float, idle_s: float) -> None:
        """The draft built its cache for build_s, then idled idle_s until the outcome came."""
        self.round_s.add(build_s + idle_s)
        self.build_s.add(build_s)

    def observe_proposals(self, accepted: list[int], from_ngram: list[bool]) -> None:
        """A verified window: accepted tokens per row, whether each row's proposal was an n-gram's."""
        for tally, source in ((self.ngram_tokens, True), (self.draft_tokens, False)):
            rows = [a for a, n in zip(accepted, from_ngram) if n == source]
            tally.add(sum(rows) + len(rows), len(rows))

    def choose(self, batch: int) -> str:
        p = self.lookups.mean(0.5, 2)
        round_s = self.round_s.mean(0.0)
        miss_round = 1 - p ** batch
        a_d = self.draft_tokens.mean(PRIOR_DRAFT_TOKENS, PRIOR_ROWS)
        a_n = self.ngram_tokens.mean(PRIOR_NGRAM_TOKENS, PRIOR_ROWS)
        wait_jit = self.waits["jit"].mean(self.build_s.mean(0.0) * self.k / (self.k + 1))
        jit = a_d / (round_s + miss_round * wait_jit + 1e-9)
        fast = (p * a_d + (1 - p) * a_n) / (round_s + miss_round * self.waits["fast"].mean(0.0) + 1e-9)
        best, other = ("jit", "fast") if jit > fast else ("fast", "jit")
        self.decisions += 1
        return other if self.decisions % EXPLORE_EVERY == 0 and self.measurements(other) < PRIOR_ROWS else best

    def measurements(self, backup: str) -> int:
        """What is known of an arm beyond its prior: jit draft waits, verified n-gram proposals."""
        return self.waits["jit"].count if backup == "jit" else self.ngram_tokens.count
