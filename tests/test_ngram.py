import pytest
import torch
from test_verifier import assert_deviates, assert_follows, sampling_tensors

from ssd.engine.sampler import probs_from_logits
from ssd.spec.ngram import ngram_draft, ngram_propose
from ssd.spec.verifier import one_hot_probs, verify

PAD = 0


def propose_one(sequence: list[int], k: int, n: int = 3, padded_to: int | None = None) -> list[int]:
    width = padded_to or max(len(sequence), 1)
    history = torch.tensor([sequence + [PAD] * (width - len(sequence))])
    return ngram_propose(history, torch.tensor([len(sequence)]), k, n)[0].tolist()


def reference_propose(sequence: list[int], k: int, n: int) -> list[int]:
    """Plain-Python prompt lookup: longest suffix match first, latest occurrence, periodic copy."""
    if not sequence:
        return [PAD] * k
    length = len(sequence)
    for m in range(n, 0, -1):
        suffix = sequence[length - m :] if m <= length else None
        ends = [s + m for s in range(length - m) if sequence[s : s + m] == suffix]
        if suffix is not None and ends:
            end = max(ends)
            return [sequence[end + i % (length - end)] for i in range(k)]
    return [sequence[-1]] * k


# ----------------------------------------------------------------- by hand


def test_repeating_pattern_is_continued() -> None:
    assert propose_one([1, 2, 3, 1, 2, 3, 1, 2], k=4) == [3, 1, 2, 3]
    assert propose_one([4, 4, 4, 4], k=3) == [4, 4, 4]  # the match may overlap the suffix


def test_no_match_repeats_the_last_token() -> None:
    assert propose_one([5, 6, 7], k=4) == [7, 7, 7, 7]
    assert propose_one([5], k=2) == [5, 5]


def test_longest_match_wins_then_the_latest_occurrence() -> None:
    sequence = [7, 2, 9, 4, 1, 2, 9, 5, 7, 2, 9]
    assert propose_one(sequence, k=4, n=3) == [4, 1, 2, 9]  # "7 2 9" occurred at the start
    assert propose_one(sequence, k=4, n=2) == [5, 7, 2, 9]  # latest "2 9" is the middle one
    assert propose_one([1, 5, 1, 6, 1], k=4, n=1) == [6, 1, 6, 1]  # latest "1", copy wraps with period 2


def test_padding_and_per_row_lengths() -> None:
    rows = [[1, 2, 1, 2, 1, 2, 1, 2], [1, 2, 3, 1, 2, 3, 1, 2], [9, 8, 7, 6, 5, 4, 3, 2], [3, 3, 3, 3, 3, 3, 3, 3]]
    lengths = [3, 8, 1, 0]
    history = torch.tensor(rows)
    proposal = ngram_propose(history, torch.tensor(lengths), k=4)
    # Row 0 sees only [1, 2, 1]: what lies after length 3 must not create matches.
    assert proposal.tolist() == [[2, 1, 2, 1], [3, 1, 2, 3], [9, 9, 9, 9], [3, 3, 3, 3]]
    for row, length, expected in zip(rows[:3], lengths, proposal.tolist()):
        assert propose_one(row[:length], k=4, padded_to=8) == expected


def test_matches_plain_python_reference_on_random_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    batch, width, k = 64, 20, 5
    history = torch.randint(0, 4, (batch, width), generator=generator)
    lengths = torch.randint(0, width + 1, (batch,), generator=generator)
    for n in (1, 2, 3, 4):
        proposal = ngram_propose(history, lengths, k, n)
        for row, length, got in zip(history.tolist(), lengths.tolist(), proposal.tolist()):
            if length:
                assert got == reference_propose(row[:length], k, n), (row[:length], n)


def test_argument_checks_and_short_histories() -> None:
    with pytest.raises(ValueError, match="k must be"):
        ngram_propose(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([2]), k=0)
    with pytest.raises(ValueError, match="n must be"):
        ngram_propose(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([2]), k=2, n=0)
    assert propose_one([6, 6], k=3, n=5) == [6, 6, 6]  # L <= n: shorter n still match


def test_ngram_draft_returns_one_hot_probs() -> None:
    tokens, probs = ngram_draft(torch.tensor([[1, 2, 1, 2]]), torch.tensor([4]), k=3, vocab_size=5)
    assert torch.equal(probs, one_hot_probs(tokens, 5))


# ----------------------------------------------------------------- verification stays exact
#
# Rows have random histories (so the proposals vary) and fixed, context-free
# target distributions; each row is an independent trial of one round.

VOCAB, NUM_DRAFT, TRIALS, HISTORY = 8, 3, 200_000, 12


def run_round(draft_probs_kind: str = "one-hot"):
    generator = torch.Generator().manual_seed(11)
    # Skewed, so that the proposals are far from uniform.
    token_weights = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    history = torch.multinomial(token_weights, TRIALS * HISTORY, True, generator=generator).view(TRIALS, HISTORY)
    lengths = torch.randint(1, HISTORY + 1, (TRIALS,), generator=generator)
    draft_tokens, draft_probs = ngram_draft(history, lengths, NUM_DRAFT, VOCAB)
    if draft_probs_kind == "smoothed":  # wrong: not the distribution the tokens were drawn from
        draft_probs = 0.5 * draft_probs + 0.5 / VOCAB
    target_logits = torch.randn(NUM_DRAFT + 1, VOCAB, generator=generator) * 1.5
    st = sampling_tensors(TRIALS, temperature=0.9, seed_base=3 * TRIALS)
    counter = torch.randint(0, 2**31, (TRIALS,), generator=generator)
    result = verify(draft_tokens, draft_probs, target_logits.expand(TRIALS, -1, -1), st, counter)
    target_probs = probs_from_logits(target_logits[None], sampling_tensors(1, temperature=0.9))[0]
    return result, target_probs


def test_verifying_ngram_proposals_with_one_hot_q_is_exact() -> None:
    result, target_probs = run_round()
    tokens = result.output_tokens
    assert_follows(tokens[:, 0], target_probs[0], "index 0", require_power=True)
    reached = result.num_accepted >= 1
    assert reached.sum() >= 5_000
    assert_follows(tokens[reached, 1], target_probs[1], "index 1")


def test_test_power_verifying_with_a_wrong_q_is_detected() -> None:
    result, target_probs = run_round(draft_probs_kind="smoothed")
    assert_deviates(result.output_tokens[:, 0], target_probs[0])
