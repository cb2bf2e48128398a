"""The draft's answer to an outcome (settle the round into the token history, find the cached
branch, the n-gram backup for misses, profile replay) against a per-row reference; the one-kernel
Triton version (run here under Triton's CPU interpreter) against the PyTorch one."""
import os
import subprocess
import sys

import pytest
import torch

from ssd.draft_worker.answer_buffer import answer_size
from ssd.draft_worker.outcome_lookup import answer_outcome, answer_outcome_buffer
from ssd.draft_worker.protocol import (DraftOp, command_message, command_payload, command_size, outcome_payload,
                                       pack_reply, reply_size, unpack_reply)
from ssd.spec.ngram import ngram_propose

K, N, L = 3, 5, 12
FORK, RANK = torch.tensor([0, 0, 1, 2, 3]), torch.tensor([0, 1, 0, 0, 0])


def reference(history, window, window_lengths, accepted, recovered, lengths, valid, guess, tokens):
    history = history.clone()
    hits, branches, continuations = [], [], []
    for b in range(window.shape[0]):
        for i in range(K):
            history[b, min(int(window_lengths[b]) + i, L - 1)] = window[b, 1 + i]
        history[b, min(int(window_lengths[b] + accepted[b]), L - 1)] = recovered[b]
        match = [n for n in range(N) if valid[b, n] and FORK[n] == accepted[b] and guess[b, n] == recovered[b]]
        hits.append(bool(match))
        branches.append(match[0] if match else 0)
        continuations.append(tokens[b, branches[-1]])
    return history, torch.tensor(hits), torch.tensor(branches), torch.stack(continuations)


def outcome_case(batch: int, seed: int, distinct_guesses: bool = False):
    """Tensors as answer_outcome takes them (fork, rank: FORK, RANK). Windows stay inside the history
    (where clamped, several writes to its last position have no defined order)."""
    g = torch.Generator().manual_seed(seed)
    guess = torch.randint(0, 4, (batch, N), generator=g)   # few ids: repeated guesses, several matches
    if distinct_guesses:   # as fork_guesses makes them at one position; a stand-in token may still equal one
        guess = torch.stack([torch.randperm(6, generator=g)[:N] for _ in range(batch)])
    window_lengths = torch.randint(2, L - K, (batch,), generator=g)
    return dict(history=torch.randint(100, 200, (batch + 2, L), generator=g),
                window=torch.randint(0, 9, (batch, K + 1), generator=g), window_lengths=window_lengths,
                accepted=torch.randint(0, K + 1, (batch,), generator=g), recovered=torch.randint(0, 4, (batch,), generator=g),
                lengths=window_lengths + 1, valid=torch.rand((batch, N), generator=g) < 0.8, fork=FORK, rank=RANK,
                guess=guess, tokens=torch.randint(0, 99, (batch, N, K), generator=g))


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_answer_matches_a_per_row_reference(batch):
    hits = 0
    for seed in range(20):
        case = outcome_case(batch, seed)
        history, hit, branch, continuation = reference(*(case[name] for name in (
            "history", "window", "window_lengths", "accepted", "recovered", "lengths", "valid", "guess", "tokens")))
        got_hit, got_branch, recovered, proposal, window = answer_outcome(**case)   # updates case["history"]
        assert torch.equal(case["history"], history)
        assert torch.equal(got_hit, hit) and torch.equal(got_branch, branch) and torch.equal(proposal, continuation)
        assert torch.equal(recovered, case["recovered"])
        assert torch.equal(window, torch.cat([recovered[:, None], proposal], 1))
        hits += int(hit.sum())
    assert 0 < hits < 20 * batch   # hits and misses both exercised


def test_fast_backup_fills_the_misses_from_the_settled_history():
    case = outcome_case(8, 3)
    hit, _, _, plain, _ = answer_outcome(**{**case, "history": case["history"].clone()})
    hit, _, _, proposal, _ = answer_outcome(**case, ngram=True)
    assert 0 < int(hit.sum()) < 8
    ngram = ngram_propose(case["history"][:8], case["lengths"], K)   # the history after settling
    assert torch.equal(proposal, torch.where(hit[:, None], plain, ngram))


def test_replay_takes_the_guess_of_the_replayed_rank_where_the_fan_out_holds_it():
    case = outcome_case(16, 5, distinct_guesses=True)
    ranks = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(0))
    hit, branch, recovered, _, _ = answer_outcome(**case, replayed_rank=ranks)
    for b in range(16):
        ordinal = ranks[b] - 1 if case["accepted"][b] < K else ranks[b]
        held = [n for n in range(N) if case["valid"][b, n] and FORK[n] == case["accepted"][b] and RANK[n] == ordinal]
        assert bool(hit[b]) == bool(held)
        assert int(recovered[b]) == (int(case["guess"][b, held[0]]) if held else int(case["recovered"][b]))
        assert int(branch[b]) == (held[0] if held else 0)
    assert 0 < int(hit.sum()) < 16


def buffer_args(case: dict) -> tuple:
    """answer_outcome's case as the buffer answers take it: the outcome rows as the target sends them."""
    outcome = outcome_payload(case["accepted"], case["recovered"], case["recovered"] * 0 + 7, case["lengths"],
                              case.get("replayed_rank"))
    return (case["history"], case["window"], case["window_lengths"], outcome, case["valid"], case["fork"],
            case["rank"], case["guess"], case["tokens"], "replayed_rank" in case)


@pytest.mark.parametrize("batch, ngram, replay", [(1, False, False), (3, True, False), (16, True, False),
                                                  (16, False, True), (5, True, True)])
def test_one_kernel_answers_as_the_pytorch_ops(batch, ngram, replay):
    pytest.importorskip("triton")
    from ssd.draft_worker.triton_outcome import answer_outcome_kernel
    for seed in range(6):
        case = outcome_case(batch, seed, distinct_guesses=replay)
        if replay:
            case["replayed_rank"] = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(seed))
        kernel_case = {name: t.clone() for name, t in case.items()}
        timings = (0.0123456789, 3.5 + seed, 2)
        expected = answer_outcome_buffer(*buffer_args(case), ngram=ngram, timings=timings)
        got = answer_outcome_kernel(*buffer_args(kernel_case), ngram=ngram, timings=timings)
        assert torch.equal(kernel_case["history"], case["history"])
        assert torch.equal(got.data, expected.data), (got.data, expected.data)   # every part, timings bit for bit


def test_the_answer_buffer_holds_the_answer_and_its_prefix_is_the_reply():
    for seed, ngram in ((0, False), (1, True)):
        case = outcome_case(6, seed)
        history = case["history"].clone()
        hit, branch, recovered, proposal, window = answer_outcome(**{**case, "history": history}, ngram=ngram)
        answer = answer_outcome_buffer(*buffer_args(case), ngram=ngram, timings=(0.25, 1.5, 1))
        assert torch.equal(case["history"], history) and answer.data.numel() == answer_size(6, K)
        assert torch.equal(answer.hit, hit.long()) and torch.equal(answer.branch, branch)
        assert torch.equal(answer.tokens, proposal) and torch.equal(answer.window, window)
        assert torch.equal(answer.lengths, case["lengths"]) and torch.equal(answer.accepted, case["accepted"])
        tokens, got_hit, got_recovered, timings = unpack_reply(answer.message.clone(), 6, K)
        assert torch.equal(tokens, proposal) and torch.equal(got_hit, hit) and torch.equal(got_recovered, recovered)
        assert timings.tolist() == [0.25, 0.0, 1.5, 1.0]


def test_a_command_is_one_message_with_its_payload_inline():
    payload = torch.arange(15).view(5, 3)
    message = command_message(DraftOp.OUTCOME, (3, 99, 1), payload, max_batch=4)
    assert message.shape == (command_size(4),) and message[:6].tolist() == [DraftOp.OUTCOME, 3, 99, 1, 0, 0]
    assert torch.equal(command_payload(message, 5, 3), payload)
    assert not message[6 + 15:].any()
    rows = command_message(DraftOp.OUTCOME, (3,), [payload[0], payload[1], payload[2], payload[3], None], max_batch=4)
    assert torch.equal(command_payload(rows, 5, 3), outcome_payload(*payload[:4]))   # None: the -1 ranks row
    assert command_message(DraftOp.STOP, (), max_batch=4).tolist() == [DraftOp.STOP] + [0] * 25
    with pytest.raises(ValueError, match="do not fit a command for 4 sequences"):
        command_message(DraftOp.OUTCOME, (5, 99, 1), torch.zeros((5, 5), dtype=torch.int64), max_batch=4)


def test_kernel_n_gram_scans_a_long_history_in_blocks():
    pytest.importorskip("triton")
    from ssd.draft_worker.triton_outcome import answer_outcome_kernel
    g = torch.Generator().manual_seed(7)
    history = torch.randint(0, 5, (4, 2500), generator=g)   # few ids: matches at every length, far back too
    history[1, 1500:] = 9                                   # row 1: its last 3 tokens occur only at 1500..
    history[1, 1500:1503] = torch.tensor([1, 2, 3])
    case = outcome_case(3, 1)
    case.update(history=history, valid=torch.zeros((3, N), dtype=torch.bool),  # every row misses
                window_lengths=torch.tensor([2400, 2100, 1030]), lengths=torch.tensor([2403, 2101, 1034]))
    case["window"][1] = torch.tensor([0, 1, 2, 3])   # row 1 settles ..., 1, 2, 3 at 2100..2102
    case["accepted"][1], case["recovered"][1] = 3, 4
    twin = {name: t.clone() for name, t in case.items()}
    expected = answer_outcome_buffer(*buffer_args(case), ngram=True)
    got = answer_outcome_kernel(*buffer_args(twin), ngram=True)
    assert torch.equal(twin["history"], case["history"])
    assert torch.equal(got.data, expected.data)


def test_a_packed_reply_unpacks_to_what_was_sent():
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    timings = torch.tensor([0.0123456789, 1e-7, 3.5, 2.0], dtype=torch.float64)
    packed = pack_reply(tokens, torch.tensor([True, False]), torch.tensor([41, 42]), timings)
    assert packed.dtype == torch.int64 and packed.numel() == reply_size(2, 3)
    got_tokens, hit, recovered, got_timings = unpack_reply(packed, 2, 3)
    assert torch.equal(got_tokens, tokens) and hit.tolist() == [True, False] and recovered.tolist() == [41, 42]
    assert torch.equal(got_timings, timings)   # bit for bit


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssd.draft_worker.triton_outcome import _answer_outcome_kernel
pointers = ["history_ptr", "window_ptr", "window_len_ptr", "outcome_ptr", "valid_ptr", "fork_ptr", "rank_ptr",
            "guess_ptr", "tokens_ptr", "out_ptr"]
signature = {p: "*i1" if p == "valid_ptr" else "*i64" for p in pointers}
signature.update(timings_ptr="*fp64", history_stride="i32", outcome_stride="i32", N="i32", B="i32", build_s="fp32",
                 idle_s="fp32", backup_code="fp32")
for replay, ngram in ((False, True), (True, False)):
    constants = {"K": 6, "L": 4352, "BLOCK_N": 32, "BLOCK_K": 8, "BLOCK_L": 1024, "REPLAY": replay, "NGRAM": ngram,
                 "NGRAM_N": 3, "TIMINGS": 4}
    source = ASTSource(fn=_answer_outcome_kernel, signature={**signature, **{c: "constexpr" for c in constants}},
                       constexprs=constants)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
print("compiled")
"""


def test_kernel_compiles_for_hopper():
    """The interpreter does not compile: build the kernel for sm_90 (the 1B draft's K = 6, F = 3 tree)
    with Triton's bundled ptxas, in a process of its own without the interpreter."""
    pytest.importorskip("triton")
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no CUDA backend")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
