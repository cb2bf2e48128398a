"""Prompts admitted together are prefilled in groups of bounded size.

One forward over a right-padded batch holds len(group) x longest-prompt positions of activations
(the MLP's intermediate alone is positions x 2 x ffn values): sixteen long prompts at once could
exhaust the memory the KV cache left. Groups are runs of consecutive prompts (their cache slots are
consecutive too); a prompt longer than the budget is a group of its own, which the runner prefills
in chunks (ModelRunner.prefill)."""
from __future__ import annotations

from typing import Iterator, Sequence as Seq

from ssd.engine.sequence import Sequence


def prefill_groups(seqs: Seq[Sequence], max_tokens: int) -> Iterator[tuple[int, list[Sequence]]]:
    """(index of the group's first sequence in seqs, the group), each padding to <= max_tokens."""
    start, width = 0, 0
    for i, seq in enumerate(seqs):
        grown = max(width, len(seq.prompt_token_ids))
        if i > start and grown * (i - start + 1) > max_tokens:
            yield start, list(seqs[start:i])
            start, grown = i, len(seq.prompt_token_ids)
        width = grown
    if start < len(seqs):
        yield start, list(seqs[start:])
