"""A draft LM head over part of the vocabulary: the tokens a draft may propose.

A draft's LM head over a 128k vocabulary is its largest product (a 1B draft: 0.5 of its 2.5 GB,
and at B = 16 the 336 tree rows make it compute-bound). Restricted to the N most frequent tokens,
the head streams and multiplies N/V of it; every other token gets the logit -inf, so the draft
never proposes it and gives it probability 0. Nothing downstream changes: the target verifies as
ever (greedy: it rejects what it would not choose; sampled: the verifier is given the q actually
used, zero outside the kept set), so the output stays exact and only the acceptance can drop (when
the target's choice lies outside the kept set).

Which tokens: the stop tokens and the tokenizer's special tokens always; then the first ids of a
ranking file (tokens by frequency in a corpus: `python -m ssd.spec.rank_vocabulary`; shipped:
`qwen2.5`, counted over ShareGPT's model turns), then the remaining ids in order — for byte-level
BPE vocabularies (Llama-3, Qwen2/3) merge order, earlier merges being more frequent pairs of the
tokenizer's corpus. Id order alone misses frequent late merges: with the real Qwen2.5-Coder pair
and 32768 kept tokens, 18 of 512 target tokens fell outside, "```" (id 73594) among them.
"""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ssd.profiles import load_shipped_json

FORMAT, VERSION = "ssd-token-ranking", 1
SHIPPED = ("qwen2.5",)


def kept_token_ids(size: int, vocab_size: int, always: Iterable[int] = (),
                   ranking: Sequence[int] | None = None) -> tuple[int, ...]:
    """Sorted ids of the `size` tokens a restricted draft head keeps: every id of `always` (stop and
    special tokens), then the highest-ranked others (ranking: ids best first), then id order."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size must lie in [1, {vocab_size}] (the model's vocabulary), got {size}")
    kept = {i for i in always if 0 <= i < vocab_size}
    if len(kept) > size:
        raise ValueError(f"draft vocabulary size {size} is smaller than the {len(kept)} stop/special tokens "
                         "it must keep")
    for token in itertools.chain(ranking or (), range(vocab_size)):
        if len(kept) == size:
            break
        if 0 <= token < vocab_size:
            kept.add(token)
    return tuple(sorted(kept))


def frequency_ranking(token_id_lists: Iterable[Sequence[int]], vocab_size: int) -> list[int]:
    """The ids seen in the given token sequences, most frequent first (ties in id order)."""
    return ranked_by_count(Counter(t for ids in token_id_lists for t in ids), vocab_size)


def ranked_by_count(counts: Counter, vocab_size: int) -> list[int]:
    """The counted ids within the vocabulary, most frequent first (ties in id order)."""
    return sorted((t for t in counts if 0 <= t < vocab_size), key=lambda t: (-counts[t], t))


def load_ranking(name_or_path: str | Path, vocab_size: int) -> list[int]:
    """A shipped ranking by name (SHIPPED) or a file written by ssd.spec.rank_vocabulary, checked
    against the model's vocabulary size."""
    path, data = load_shipped_json(name_or_path, SHIPPED, ".ranking.json", "token ranking", FORMAT, VERSION)
    if data["vocab_size"] != vocab_size:
        raise ValueError(f"token ranking {path} is for a vocabulary of {data['vocab_size']} tokens; "
                         f"the model has {vocab_size}")
    return data["ranking"]


def special_token_ids(tokenizer) -> set[int]:
    """The tokenizer's special and added tokens (chat markers, stop tokens); none without one."""
    if tokenizer is None:
        return set()
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
