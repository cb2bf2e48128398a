"""The draft's outcome answer (settle the round into the token history, find the cached branch)
against a per-row reference, eager and through torch.compile (dynamic batch, in-place history)."""
import pytest
import torch

from ssd.draft_worker.outcome_lookup import settle_and_look_up
from ssd.draft_worker.protocol import pack_reply, reply_size, unpack_reply

K, N, L = 3, 5, 12


def reference(history, window, lengths, accepted, recovered, valid, fork, guess, tokens):
    history = history.clone()
    hits, branches, continuations = [], [], []
    for b in range(window.shape[0]):
        for i in range(K):
            history[b, min(int(lengths[b]) + i, L - 1)] = window[b, 1 + i]
        history[b, min(int(lengths[b] + accepted[b]), L - 1)] = recovered[b]
        match = [n for n in range(N) if valid[b, n] and fork[n] == accepted[b] and guess[b, n] == recovered[b]]
        hits.append(bool(match))
        branches.append(match[0] if match else 0)
        continuations.append(tokens[b, branches[-1]])
    return history, torch.tensor(hits), torch.tensor(branches), torch.stack(continuations)


def outcome_case(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    fork = torch.tensor([0, 0, 1, 2, 3])
    guess = torch.randint(0, 4, (batch, N), generator=g)   # few ids: repeated guesses, several matches
    valid = torch.rand((batch, N), generator=g) < 0.8
    accepted = torch.randint(0, K + 1, (batch,), generator=g)
    recovered = torch.randint(0, 4, (batch,), generator=g)
    lengths = torch.randint(2, L, (batch,), generator=g)   # some windows run past the history's end
    return (torch.randint(100, 200, (batch + 2, L), generator=g), torch.randint(0, 99, (batch, K + 1), generator=g),
            lengths, accepted, recovered, valid, fork, guess, torch.randint(0, 99, (batch, N, K), generator=g))


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_settle_and_look_up_matches_a_per_row_reference(batch):
    hits = 0
    for seed in range(20):
        case = outcome_case(batch, seed)
        history, hit, branch, continuation = reference(*case)
        got_hit, got_branch, got_continuation = settle_and_look_up(*case)   # updates case[0] in place
        assert torch.equal(case[0][:batch], history[:batch]) and torch.equal(case[0][batch:], history[batch:])
        assert torch.equal(got_hit, hit) and torch.equal(got_branch, branch)
        assert torch.equal(got_continuation, continuation)
        hits += int(hit.sum())
    assert 0 < hits < 20 * batch   # hits and misses both exercised


def test_compiled_look_up_equals_eager_across_batch_sizes():
    compiled = torch.compile(settle_and_look_up, dynamic=True, backend="aot_eager")
    for batch in (1, 2, 5, 16):
        case = outcome_case(batch, batch)
        twin = [t.clone() for t in case]
        expected = settle_and_look_up(*case)
        got = compiled(*twin)
        assert torch.equal(twin[0], case[0])
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_packed_reply_unpacks_to_what_was_sent():
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    timings = torch.tensor([0.0123456789, 1e-7, 3.5], dtype=torch.float64)
    packed = pack_reply(tokens, torch.tensor([True, False]), torch.tensor([41, 42]), timings)
    assert packed.dtype == torch.int64 and packed.numel() == reply_size(2, 3)
    got_tokens, hit, recovered, got_timings = unpack_reply(packed, 2, 3)
    assert torch.equal(got_tokens, tokens) and hit.tolist() == [True, False] and recovered.tolist() == [41, 42]
    assert torch.equal(got_timings, timings)   # bit for bit
