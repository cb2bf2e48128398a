"""The draft model's side of a speculation round: K autoregressive proposals per sequence."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssd.engine.model_runner import ModelRunner
from ssd.engine.random import RandomStream
from ssd.spec.saguaro import saguaro_probs
from ssd.engine.sampler import SamplingTensors, probs_from_logits, sample_from_weights
from ssd.engine.greedy import greedy_tokens
from ssd.layers.embed_head import spread_columns


@dataclass
class Proposal:
    tokens: torch.Tensor         # [B, K] int64
    probs: torch.Tensor | None   # [B, K, V] float32: the distribution each token was drawn from


# top-k / top-p filters of the draft look among this many top tokens, not the whole vocabulary: a
# sort of 336 x 128k logits per tree step cost more than the step's forward (H200, B=16)
DRAFT_FILTER_CANDIDATES = 256


def draft_distribution(logits: torch.Tensor, sampling: SamplingTensors, top_f: int | torch.Tensor, c: float,
                       max_f: int | None = None) -> torch.Tensor:
    """What the draft samples from: its filtered distribution, Saguaro-rescaled on its top-F
    (top_f may be a device tensor bounded by max_f, read inside captured graphs)."""
    return saguaro_probs(probs_from_logits(logits, sampling, DRAFT_FILTER_CANDIDATES), top_f, c, max_f)


class DraftProposer:
    """Runs on the draft's device (own process, or co-located with target rank 0).

    KV invariant: before a round, the draft's cache holds every committed token except the last two
    (`prev`, `last`); the round's first forward (width 2) rewrites `prev` — harmless, same values —
    so that the case "all K accepted" (whose last draft token was never fed) needs no special path."""

    def __init__(self, runner: ModelRunner, k: int, saguaro_c: float = 1.0,
                 saguaro_fanout: tuple[int, ...] | None = None):
        """saguaro_fanout: per position, the F whose top tokens Saguaro sampling scales by C."""
        self.runner, self.k = runner, k
        self.saguaro_c, self.saguaro_fanout = saguaro_c, saguaro_fanout
        self.kept_ids = runner.kept_logit_ids   # a restricted head's forwards: its kept tokens' logits only
        self.sampling: SamplingTensors | None = None

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int) -> None:
        last = torch.zeros(ids.shape[0], dtype=torch.int64)  # logits unused: cheapest single position
        self.runner.prefill(ids, positions, last, first_slot)

    def set_sampling(self, sampling: SamplingTensors) -> None:
        self.sampling = sampling

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.runner.move_slot(src, dst, length)

    @torch.inference_mode()
    def propose(self, prev: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor, max_length: int,
                want_probs: bool) -> Proposal:
        """prev/last/lengths [B]: the two newest committed tokens and the committed length."""
        device = self.runner.device
        prev, last, lengths = prev.to(device), last.to(device), lengths.to(device)
        horizon = max_length + self.k  # one attention bucket for the whole round
        logits = self.runner.forward(torch.stack([prev, last], 1), torch.stack([lengths - 2, lengths - 1], 1),
                                     horizon)[:, -1]
        tokens, probs = [], []
        for i in range(self.k):
            token, p = self.pick(logits, lengths + i, want_probs, i)
            tokens.append(token)
            probs.append(p)
            if i + 1 < self.k:
                logits = self.runner.forward(token[:, None], (lengths + i)[:, None], horizon)[:, -1]
        return Proposal(torch.stack(tokens, 1), torch.stack(probs, 1) if want_probs else None)

    def pick(self, logits: torch.Tensor, counter: torch.Tensor, want_probs: bool, position: int):
        """Tokens [B] and (want_probs) the distribution q [B, V] they were drawn from. logits [B, V], or
        [B, N] of a restricted head's kept tokens: q is computed over those and written at their
        columns (0 elsewhere), and the race reads the full rows — the tokens and q of the -inf-filled
        rows (kept ids sorted: the same argmax and top-F ties), with the top 256 among N, not V."""
        greedy = greedy_tokens(logits) if self.kept_ids is None else self.kept_ids[greedy_tokens(logits)]
        if not want_probs:
            return greedy, None
        if self.saguaro_c >= 1.0 or self.saguaro_fanout is None:
            q = probs_from_logits(logits, self.sampling, DRAFT_FILTER_CANDIDATES)
        else:
            q = draft_distribution(logits, self.sampling, self.saguaro_fanout[position], self.saguaro_c)
        if self.kept_ids is not None:
            q = spread_columns(q, self.kept_ids, self.runner.arch.vocab_size)
        sampled = sample_from_weights(q, self.sampling.seed, counter, RandomStream.DRAFT)
        return torch.where(self.sampling.is_greedy, greedy, sampled), q
