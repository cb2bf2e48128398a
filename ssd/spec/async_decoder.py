"""Asynchronous speculative speculative decoding (Saguaro) from target rank 0's side.

Each round: verify the speculation in hand (the draft meanwhile builds its cache for the likely
outcomes) → commit → send the outcome and take the next speculation (a cache hit, or the backup)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ssd.draft_worker.async_draft import AsyncReply
from ssd.draft_worker.protocol import BACKUP_CODES
from ssd.spec.fanout import FanoutEstimator
from ssd.engine.sequence import Sequence
from ssd.spec.sync_decoder import SpeculativeDecoder, committed_state


REFIT_EVERY_ROUNDS = 16


@dataclass
class FanoutTuner:
    """The fan-out list the draft uses now (hit list) and, for online geometric fan-out, the estimator
    of acceptance a and miss exponent r. Owned by the engine: it outlives generate() calls."""
    fanout: tuple[int, ...]
    estimator: FanoutEstimator | None = None


class AsyncSpeculativeDecoder(SpeculativeDecoder):
    def __init__(self, *args, tuner: FanoutTuner, **kwargs):
        super().__init__(*args, **kwargs)
        self.tuner = tuner
        self.previous_accepted: list[int] = []
        self.pending: AsyncReply | None = None  # the speculation for the running batch's next round
        self.looked_up_rows = 0  # its leading rows that answered an outcome (hits were possible)
        self.joined = 0          # rows admitted after it: no speculation yet

    def prefill(self, fresh: list[Sequence], first_slot: int) -> None:
        super().prefill(fresh, first_slot)
        if self.pending is not None:  # appended after the rows in flight, which keep their speculation
            self.joined += len(fresh)

    def decode_step(self, running: list[Sequence]) -> None:
        start = time.perf_counter()
        sampling = self.sampling_for(running, self.runner.device)
        want_probs = self.sync_draft_sampling(running, sampling)
        lengths, last, prev = committed_state(running)
        if self.pending is None:
            self.pending = self.draft.speculate(prev, last, lengths, int(lengths.max()), want_probs)
            self.looked_up_rows, self.joined = 0, 0
            self.stats.fresh_speculations += 1
        elif self.joined:
            joined = self.draft.join(last, lengths, int(lengths.max()), want_probs, self.joined)
            self.pending = self.pending.extend(joined)
            self.stats.joined_rows += self.joined
            self.joined = 0
        reply = self.pending
        verify_start = time.perf_counter()
        accepted, emitted = self.verify(running, reply.proposal, last, lengths, sampling)
        self.stats.verify_time_s += time.perf_counter() - verify_start
        kept = self.commit(running, accepted, emitted)
        self.record_round(reply, accepted, kept)
        self.refit_fanout(reply, accepted)
        self.request_next(running, accepted, emitted, want_probs)
        self.stats.decode_time_s += time.perf_counter() - start
        self.stats.num_rounds += 1

    def refit_fanout(self, reply: AsyncReply, accepted: list[int]) -> None:
        """Feed the estimator this round's acceptance and lookups; every few rounds send the draft the
        geometric optimum for the current (a, r) — same budget, so the tree's shape stays fixed."""
        estimator, fanout = self.tuner.estimator, self.tuner.fanout
        if estimator is None:
            return
        estimator.observe_round(accepted, self.k)
        if self.looked_up_rows:  # this reply answered last round's outcomes (its leading rows)
            for hit, n in zip(reply.hit.tolist()[:self.looked_up_rows], self.previous_accepted):
                estimator.observe_lookup(fanout[n], bool(hit))
        self.previous_accepted = accepted
        if self.stats.num_rounds % REFIT_EVERY_ROUNDS == REFIT_EVERY_ROUNDS - 1:
            refit = estimator.fanout(sum(fanout), self.k)
            if refit != fanout:
                self.draft.set_fanout(refit)
                self.tuner.fanout = refit
                self.stats.fanout_updates += 1

    def request_next(self, running, accepted, emitted, want_probs) -> None:
        """Send the outcome, also when some sequences just finished: retire() then keeps the other
        rows' speculation (compacted like the KV slots), so their cache hits survive."""
        if all(s.finished for s in running):
            self.pending = None
            return
        lengths, recovered, prev = committed_state(running)
        wait_start = time.perf_counter()
        self.pending = self.draft.outcome(torch.tensor(accepted), recovered, prev, lengths,
                                          int(lengths.max()), want_probs, self.replayed_ranks)
        self.looked_up_rows = len(running)
        if self.replay is not None:  # the draft resolved the replayed rank to a token: commit that one
            for seq, token in zip(running, self.pending.recovered.tolist()):
                if not seq.finished:
                    seq.replace_last(token)
        self.stats.target_wait_s += time.perf_counter() - wait_start
        build_s, backup_s, idle_s, backup = self.pending.timings.tolist()
        backup = 0 if bool(self.pending.hit.all()) else backup   # the chosen backup answered no row
        self.stats.jit_backups += backup == BACKUP_CODES["jit"]
        self.stats.fast_backups += backup == BACKUP_CODES["fast"]
        self.stats.draft_time_s += build_s
        self.stats.backup_time_s += backup_s
        self.stats.draft_wait_s += idle_s

    def retire(self, running: list[Sequence]) -> None:
        before = {id(seq): row for row, seq in enumerate(running)}
        super().retire(running)
        if self.pending is None or len(running) == len(before):
            return
        if not running:
            self.pending = None
            return
        rows = [before[id(seq)] for seq in running]  # old row of each surviving sequence, in new order
        self.pending = self.pending.select_rows(rows)
        self.looked_up_rows = len(rows) if self.looked_up_rows else 0   # every row of an outcome reply
        self.previous_accepted = [self.previous_accepted[r] for r in rows] if self.previous_accepted else []
        self.draft.keep_rows(torch.tensor(rows))

    def record_round(self, reply: AsyncReply, accepted: list[int], kept: list[int]) -> None:
        hits = reply.hit.tolist()
        if self.looked_up_rows:
            looked_up = hits[:self.looked_up_rows]
            self.stats.cache_hits += sum(looked_up)
            self.stats.cache_lookups += len(looked_up)
            by_batch = self.stats.lookups_by_batch.setdefault(len(looked_up), [0, 0])
            by_batch[0], by_batch[1] = by_batch[0] + sum(looked_up), by_batch[1] + len(looked_up)
        for hit, n in zip(hits, kept):
            if hit:
                self.stats.hit_rows, self.stats.hit_tokens = self.stats.hit_rows + 1, self.stats.hit_tokens + n
            else:
                self.stats.miss_rows, self.stats.miss_tokens = self.stats.miss_rows + 1, self.stats.miss_tokens + n
