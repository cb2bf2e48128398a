"""Replaying an acceptance profile on target rank 0 (random-weight runs, greedy only).

The verifier's own decisions are replaced: window position j of a row is accepted iff the replayed
rank there is 0, so acceptance lengths follow the recorded real pair while every forward pass still
costs what it costs. A request replays the trace its prompt hashes to (trace_for: the same trace in
every arm and every call, so A/B arms see the same acceptance), generated token n reading rank n of
the trace (wrapping around). The token emitted at the first rejection is, in sync mode,
the target's own argmax (made to differ from the draft's token); in async mode the draft resolves
it from its speculation cache by the replayed rank, so cache hits and misses follow the profile.
"""
from __future__ import annotations

import zlib
from array import array

import torch

from ssd.engine.sequence import Sequence
from ssd.spec.acceptance_profile import AcceptanceProfile
from ssd.spec.verifier import assemble_output, count_leading_true


def trace_for(profile: AcceptanceProfile, prompt_token_ids: list[int]) -> int:
    """Index of the trace a prompt replays: a stable hash of its token ids."""
    return zlib.crc32(array("q", prompt_token_ids).tobytes()) % len(profile.traces)


class ProfileReplay:
    def __init__(self, profile: AcceptanceProfile):
        self.profile = profile
        self.assigned: dict[int, tuple[Sequence, tuple[int, ...]]] = {}  # id(seq) -> (seq, its trace)

    def trace(self, seq: Sequence) -> tuple[int, ...]:
        entry = self.assigned.get(id(seq))
        if entry is None or entry[0] is not seq:
            entry = self.assigned[id(seq)] = (seq, self.profile.traces[trace_for(self.profile, seq.prompt_token_ids)])
        return entry[1]

    def ranks(self, running: list[Sequence], k: int, device: torch.device) -> torch.Tensor:
        """[B, K+1] replayed ranks of the window's output positions (the row's next K+1 tokens)."""
        rows = []
        for seq in running:
            trace = self.trace(seq)
            start = len(seq.output_ids)
            rows.append([trace[(start + j) % len(trace)] for j in range(k + 1)])
        return torch.tensor(rows, dtype=torch.int64).to(device)

    @staticmethod
    def outcome(ranks: torch.Tensor, draft_tokens: torch.Tensor, target_logits: torch.Tensor):
        """ranks [B, K+1], draft_tokens [B, K], target_logits [B, K+1, V] ->
        accepted [B], emitted [B, K+1] (accepted draft tokens, then the target's stand-in token),
        rank of the emitted token [B]."""
        k, vocab = draft_tokens.shape[1], target_logits.shape[-1]
        accepted = count_leading_true(ranks[:, :k] == 0)
        stand_in = target_logits.argmax(-1).gather(1, accepted[:, None]).squeeze(1)
        drafted = torch.nn.functional.pad(draft_tokens, (0, 1), value=-1).gather(1, accepted[:, None]).squeeze(1)
        stand_in = torch.where(stand_in == drafted, (stand_in + 1) % vocab, stand_in)
        emitted = assemble_output(draft_tokens, stand_in, accepted)
        return accepted, emitted, ranks.gather(1, accepted[:, None]).squeeze(1)
