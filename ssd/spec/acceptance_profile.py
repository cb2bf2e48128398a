"""Acceptance profiles: how well a real draft predicts a real target, replayable over random weights.

A profile holds, for each recorded greedy generation of a real target, the rank of every generated
token in the real draft's next-token distribution given the same prefix (0 = the draft's argmax).
Along the committed sequence that trace decides everything greedy speculation does: a window
position is accepted iff its rank is 0; at the first rejection the target's token has rank r >= 1,
and an asynchronous cache holds it iff the fan-out at that position covers rank r (ranks 1..F_j
before the last position, whose drafted rank-0 token is excluded; ranks 0..F_K-1 at the last).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ssd.profiles import load_shipped_json

FORMAT = "ssd-acceptance-profile"
VERSION = 1
MAX_RANK = 255          # ranks at or above this are stored as MAX_RANK: never covered by a fan-out
SHIPPED = ("code", "chat")


SUMMARY_K = 6   # the K a profile's saved summary predicts for (with F = 3)


@dataclass(frozen=True)
class AcceptanceProfile:
    name: str
    traces: tuple[tuple[int, ...], ...]  # per generation: draft rank of each generated token
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.traces or any(len(t) < 2 for t in self.traces):
            raise ValueError(f"acceptance profile {self.name!r} needs traces of at least 2 tokens")
        if any(not 0 <= r <= MAX_RANK for t in self.traces for r in t):
            raise ValueError(f"acceptance profile {self.name!r} has ranks outside [0, {MAX_RANK}]")

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.traces)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "source": self.source,
                "max_rank": MAX_RANK, "summary": self.summary(), "traces": [list(t) for t in self.traces]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")

    def summary(self, k: int = SUMMARY_K, fan_out: int = 3) -> dict:
        ranks = [r for t in self.traces for r in t[1:]]
        predicted = predict(self, k, (fan_out,) * (k + 1))
        return {"num_traces": len(self.traces), "num_tokens": self.num_tokens,
                "draft_top1_rate": sum(r == 0 for r in ranks) / len(ranks),
                f"k{k}_f{fan_out}": predicted}


def load_profile(name_or_path: str | Path) -> AcceptanceProfile:
    """A shipped profile by name (code, chat) or a profile file written by the record command."""
    _, data = load_shipped_json(name_or_path, SHIPPED, ".json", "acceptance profile", FORMAT, VERSION)
    return AcceptanceProfile(data["name"], tuple(tuple(t) for t in data["traces"]), data.get("source", {}))


def covered(rank: int, position: int, fanout: tuple[int, ...]) -> bool:
    """Whether a cache forking fanout[j] guesses at window position j holds the token of `rank`."""
    k = len(fanout) - 1
    return 1 <= rank <= fanout[position] if position < k else rank < fanout[k]


def predict(profile: AcceptanceProfile, k: int, fanout: tuple[int, ...], max_tokens: int | None = None,
            traces: list[int] | None = None) -> dict:
    """Greedy rounds walked along the traces as the engine replays them: the statistics a replay of
    this profile should reproduce. Without max_tokens every trace is walked once to its end; with it,
    each request (given by the index of the trace it replays, see profile_replay.trace_for) walks its
    trace (wrapping) until it has max_tokens tokens, as a replay does. Each request's first token
    comes from prefill, not a round; the round that ends a request sends no outcome, so it counts no
    cache lookup."""
    histogram, hits, lookups = [0] * (k + 1), 0, 0
    for index in (range(len(profile.traces)) if traces is None else traces):
        trace = profile.traces[index]
        end = max_tokens if max_tokens is not None else len(trace) - k
        cursor = 1
        while cursor < end:
            window = [trace[(cursor + j) % len(trace)] for j in range(k + 1)]
            accepted = next((j for j in range(k) if window[j] != 0), k)
            histogram[accepted] += 1
            cursor += accepted + 1
            if cursor < end:
                hits += covered(window[accepted], accepted, fanout)
                lookups += 1
    rounds = sum(histogram)
    if rounds == 0:
        raise ValueError(f"acceptance profile {profile.name!r} has no trace longer than K + 1 = {k + 1}")
    return {"rounds": rounds, "acceptance_length": sum((n + 1) * c for n, c in enumerate(histogram)) / rounds,
            "hit_rate": hits / lookups if lookups else None, "accepted_histogram": histogram,
            "cache_hits": hits, "cache_lookups": lookups}
