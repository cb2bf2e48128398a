"""Counters of one generate() call (decode throughput excludes prefill)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    num_rounds: int = 0
    # speculative decoding (None for autoregressive runs)
    num_drafts: int = 0
    num_accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    # asynchronous speculation
    cache_hits: int = 0
    cache_lookups: int = 0
    lookups_by_batch: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [hits, lookups]
    hit_rows: int = 0               # sequence-rounds whose speculation came from the cache ...
    hit_tokens: int = 0             # ... and the tokens they produced
    miss_rows: int = 0
    miss_tokens: int = 0
    accepted_histogram: list[int] = field(default_factory=list)   # [K+1] rounds with j accepted
    target_wait_s: float = 0.0      # rank 0 waiting for the draft's reply after verifying
    draft_wait_s: float = 0.0       # the draft idle between finishing its cache and the outcome
    backup_time_s: float = 0.0
    jit_backups: int = 0             # async rounds whose misses the neural backup answered ...
    fast_backups: int = 0            # ... and the n-gram one (--backup auto chooses per round)
    fanout_updates: int = 0          # online geometric fan-out lists sent to the draft
    fresh_speculations: int = 0      # async rounds that had no speculation in hand (new batch)
    joined_rows: int = 0             # async: sequences that joined a batch in flight (the others kept theirs)

    @property
    def cache_hit_rate(self) -> float | None:
        return self.cache_hits / self.cache_lookups if self.cache_lookups else None

    @property
    def cache_hit_rate_by_batch(self) -> dict[int, float]:
        return {batch: hits / lookups for batch, (hits, lookups) in sorted(self.lookups_by_batch.items())}

    def _ms_per_round(self, seconds: float, applies: bool) -> float | None:
        return 1000 * seconds / self.num_rounds if applies and self.num_rounds else None

    @property
    def target_wait_ms(self) -> float | None:
        """Per round: rank 0 waiting for the draft's next speculation after verifying."""
        return self._ms_per_round(self.target_wait_s, self.cache_lookups > 0)

    @property
    def draft_wait_ms(self) -> float | None:
        """Per round: the draft idle between finishing its cache and receiving the outcome."""
        return self._ms_per_round(self.draft_wait_s, self.cache_lookups > 0)

    @property
    def tokens_per_round_on_hit(self) -> float | None:
        return self.hit_tokens / self.hit_rows if self.hit_rows else None

    @property
    def tokens_per_round_on_miss(self) -> float | None:
        return self.miss_tokens / self.miss_rows if self.miss_rows else None

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_time_s if self.decode_time_s else 0.0

    @property
    def acceptance_length(self) -> float | None:
        """Mean tokens per round including the bonus/recovered token (vLLM: 1 + accepted / drafts)."""
        return 1 + self.num_accepted / self.num_drafts if self.num_drafts else None

    @property
    def per_position_acceptance(self) -> list[float] | None:
        if not self.num_drafts:
            return None
        return [n / self.num_drafts for n in self.accepted_per_position]

    @property
    def backup_ms(self) -> float | None:
        """Per round: the draft building a backup speculation after a cache miss (async)."""
        return self._ms_per_round(self.backup_time_s, self.cache_lookups > 0)

    @property
    def draft_round_ms(self) -> float | None:
        return self._ms_per_round(self.draft_time_s, self.num_drafts > 0)

    @property
    def verify_ms(self) -> float | None:
        return self._ms_per_round(self.verify_time_s, self.num_drafts > 0)
