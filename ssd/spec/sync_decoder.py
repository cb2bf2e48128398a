"""Synchronous speculative decoding: draft proposes K tokens → target verifies the K+1 window → commit."""
from __future__ import annotations

import dataclasses
import time

import torch

from ssd.draft_worker.proposer import DraftProposer
from ssd.engine.autoregressive import AutoregressiveDecoder
from ssd.engine.phase_clock import PhaseClock
from ssd.engine.sampler import SamplingTensors
from ssd.engine.sequence import Sequence
from ssd.spec.profile_replay import ProfileReplay
from ssd.spec.verifier import verify


def draft_params(seqs: list[Sequence], draft_temperature: float | None):
    if draft_temperature is None:
        return [s.params for s in seqs]
    return [dataclasses.replace(s.params, temperature=draft_temperature) for s in seqs]


def committed_state(running: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: committed length, its last token and the one before ([B] each)."""
    lengths = torch.tensor([s.num_tokens for s in running])
    last = torch.tensor([s.last_token for s in running])
    prev = torch.tensor([s.token_at(s.num_tokens - 2) for s in running])
    return lengths, last, prev


class SpeculativeDecoder(AutoregressiveDecoder):
    def __init__(self, runner, stats, engine_seed, draft, k: int, draft_temperature: float | None = None,
                 on_finish=lambda s: None, replay: ProfileReplay | None = None):
        super().__init__(runner, stats, engine_seed, on_finish)
        self.draft, self.k, self.draft_temperature = draft, k, draft_temperature
        self.replay = replay
        self.replayed_ranks: torch.Tensor | None = None  # [B] rank of each row's last emitted token
        self.stats.accepted_per_position = [0] * k
        self.stats.accepted_histogram = [0] * (k + 1)
        self.draft_sampling: SamplingTensors | None = None
        self.draft_synced_for: SamplingTensors | None = None  # target sampling the draft's was built with
        self.any_sampled = False

    def prefill_padded(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                       first_slot: int) -> torch.Tensor:
        self.draft.prefill(ids, positions, first_slot)
        return super().prefill_padded(ids, positions, last, first_slot)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.draft.move_slot(src, dst, length)
        super().move_slot(src, dst, length)

    def decode_step(self, running: list[Sequence]) -> None:
        """One round: speculate → verify → commit."""
        start = time.perf_counter()
        clock = PhaseClock(self.runner.device, use_events=isinstance(self.draft, DraftProposer))
        clock.mark()
        target_sampling = self.sampling_for(running, self.runner.device)
        want_probs = self.sync_draft_sampling(running, target_sampling)
        lengths, last, prev = committed_state(running)
        proposal = self.draft.propose(prev, last, lengths, int(lengths.max()), want_probs)
        clock.mark()
        accepted, emitted = self.verify(running, proposal, last, lengths, target_sampling)
        clock.mark()
        self.commit(running, accepted, emitted)
        draft_s, verify_s = clock.durations_s()
        self.stats.draft_time_s += draft_s
        self.stats.verify_time_s += verify_s
        self.stats.decode_time_s += time.perf_counter() - start
        self.stats.num_rounds += 1

    def verify(self, running, proposal, last, lengths, sampling):
        device = self.runner.device
        draft_tokens = proposal.tokens.to(device)
        window = torch.cat([last.to(device)[:, None], draft_tokens], 1)  # [B, K+1]
        positions = lengths.to(device)[:, None] - 1 + torch.arange(self.k + 1, device=device)
        logits = self.runner.forward(window, positions, int(lengths.max()) - 1 + self.k)
        if self.replay is not None:
            ranks = self.replay.ranks(running, self.k, device)
            accepted, emitted, self.replayed_ranks = self.replay.outcome(ranks, draft_tokens, logits)
            return accepted.tolist(), emitted.tolist()
        result = verify(draft_tokens, proposal.probs, logits, sampling, lengths.to(device))
        return result.num_accepted.tolist(), result.output_tokens.tolist()

    def commit(self, running: list[Sequence], accepted: list[int], emitted: list[list[int]]) -> list[int]:
        """Append each row's accepted tokens and its recovered/bonus token; returns the tokens kept
        per row (fewer at EOS / max_tokens)."""
        kept = [seq.append(tokens[: n + 1]) for seq, n, tokens in zip(running, accepted, emitted)]
        self.stats.decode_tokens += sum(kept)
        self.stats.num_accepted += sum(accepted)
        self.stats.num_drafts += len(running)
        for n in accepted:
            self.stats.accepted_histogram[n] += 1
            for i in range(n):
                self.stats.accepted_per_position[i] += 1
        return kept

    def sync_draft_sampling(self, running: list[Sequence], target: SamplingTensors) -> bool:
        """Send the draft its sampling tensors when the batch changed. Returns whether the
        verifier needs the draft's probabilities (some row samples on either side)."""
        if target is not self.draft_synced_for:
            self.draft_synced_for = target
            self.draft_sampling = SamplingTensors.from_params(
                draft_params(running, self.draft_temperature), self.runner.device, self.engine_seed,
                request_ids=[s.index for s in running])
            self.draft.set_sampling(self.draft_sampling)
            self.any_sampled = bool((~target.is_greedy).any() or (~self.draft_sampling.is_greedy).any())
        return self.any_sampled
