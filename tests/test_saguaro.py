import logging

import pytest
import torch
from test_verifier import assert_deviates, assert_follows, sampling_tensors

from ssd.engine.random import RandomStream
from ssd.engine.sampler import probs_from_logits, sample_from_weights
from ssd.spec.saguaro import saguaro_probs, top_f_mask
from ssd.spec.verifier import PAD_TOKEN, one_hot_probs, verify

VOCAB, NUM_DRAFT, TRIALS, TOP_F = 8, 2, 200_000, 2


def random_probs(*shape: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 1.5).softmax(-1)


# ----------------------------------------------------------------- the formula


@pytest.mark.parametrize("c", [1.0, 0.5, 0.3, 0.01])
@pytest.mark.parametrize("top_f", [1, 3, 8])
def test_top_f_mass_is_scaled_by_the_formula(c: float, top_f: int) -> None:
    q = random_probs(5, 3, VOCAB)
    q_prime = saguaro_probs(q, top_f, c)
    assert q_prime.shape == q.shape
    torch.testing.assert_close(q_prime.sum(-1), torch.ones(5, 3))
    in_top = top_f_mask(q, top_f)
    assert (in_top.sum(-1) == top_f).all()
    smallest_in_top = torch.where(in_top, q, 2.0).amin(-1, keepdim=True)
    assert (torch.where(in_top, 0.0, q) <= smallest_in_top).all()  # the mask really is the top F
    mass = (q * in_top).sum(-1, keepdim=True)
    normaliser = c * mass + (q * ~in_top).sum(-1, keepdim=True)  # Z = C m + (1 - m), without cancellation
    expected = torch.where(in_top, c * q, q) / normaliser
    torch.testing.assert_close(q_prime, expected)
    torch.testing.assert_close((q_prime * in_top).sum(-1, keepdim=True), c * mass / normaliser)


def test_c_one_and_f_zero_are_the_identity() -> None:
    q = random_probs(4, VOCAB)
    assert saguaro_probs(q, 3, 1.0) is q
    assert saguaro_probs(q, 0, 0.3) is q
    per_row_c = torch.tensor([1.0, 0.3, 1.0, 0.3])
    per_row_f = torch.tensor([2, 2, 0, 0])
    q_prime = saguaro_probs(q, per_row_f, per_row_c, max_f=4)
    assert torch.equal(q_prime[[0, 2, 3]], q[[0, 2, 3]])  # bit for bit
    torch.testing.assert_close(q_prime[1], saguaro_probs(q[1:2], 2, 0.3)[0])


def test_per_row_top_f_matches_scalar_calls() -> None:
    q = random_probs(3, 2, VOCAB, seed=1)
    top_f = torch.tensor([[0, 1], [3, 8], [5, 2]])
    c = torch.tensor([[0.2, 0.5], [0.9, 0.4], [0.3, 1.0]])
    for max_f in (None, 8):
        q_prime = saguaro_probs(q, top_f, c, max_f=max_f)
        for b in range(3):
            for t in range(2):
                row = saguaro_probs(q[b, t][None], int(top_f[b, t]), float(c[b, t]))[0]
                torch.testing.assert_close(q_prime[b, t], row)


def test_one_hot_rows_stay_one_hot_and_c_is_validated() -> None:
    one_hot = one_hot_probs(torch.tensor([3, 0]), VOCAB)
    assert torch.equal(saguaro_probs(one_hot, 2, 0.3), one_hot)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            saguaro_probs(one_hot, 2, bad)


# ----------------------------------------------------------------- verification stays exact
#
# Each row is an independent trial of one round with fixed, context-free
# distributions: draft tokens sampled from q′ = saguaro_probs(q), verified with
# draft_probs = q′. The emitted token at index 0 must follow p_0 and, when d_0
# was accepted, the token at index 1 must follow p_1.


def fixed_distributions(temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logits [K+1, V], draft probs q [K, V]); q is close to p."""
    generator = torch.Generator().manual_seed(42)
    target = torch.randn(NUM_DRAFT + 1, VOCAB, generator=generator) * 1.5
    draft = target[:NUM_DRAFT] + 0.4 * torch.randn(NUM_DRAFT, VOCAB, generator=generator)
    return target, probs_from_logits(draft[None], sampling_tensors(1, temperature))[0]


def run_round(c: float, verify_with_unscaled_q: bool = False):
    """(VerifyResult, target probs [K+1, V], draft tokens [N, K], q [K, V]) for TRIALS rows."""
    target_logits, q = fixed_distributions()
    st = sampling_tensors(TRIALS, seed_base=7 * TRIALS)
    counter = torch.randint(0, 2**31, (TRIALS,), generator=torch.Generator().manual_seed(3))
    q_prime = saguaro_probs(q, TOP_F, c).expand(TRIALS, -1, -1)  # [N, K, V]
    positions = counter[:, None] + torch.arange(NUM_DRAFT)  # [N, K]
    draft_tokens = sample_from_weights(q_prime, st.seed[:, None], positions, RandomStream.DRAFT)
    draft_probs = q.expand(TRIALS, -1, -1) if verify_with_unscaled_q else q_prime
    result = verify(draft_tokens, draft_probs, target_logits.expand(TRIALS, -1, -1), st, counter)
    target_probs = probs_from_logits(target_logits[None], sampling_tensors(1))[0]
    return result, target_probs, draft_tokens, q


@pytest.fixture(scope="module")
def rounds() -> dict:
    """run_round(C) for C in (1.0, 0.3), shared by the tests below."""
    return {c: run_round(c) for c in (1.0, 0.3)}


@pytest.mark.parametrize("c", [1.0, 0.3])
def test_verification_with_saguaro_q_prime_is_exact(rounds: dict, c: float) -> None:
    result, target_probs, _, _ = rounds[c]
    tokens = result.output_tokens
    assert_follows(tokens[:, 0], target_probs[0], f"C={c} index 0", require_power=True)
    reached = result.num_accepted >= 1
    assert_follows(tokens[reached, 1], target_probs[1], f"C={c} index 1")
    assert (tokens[:, 0] != PAD_TOKEN).all()


def test_test_power_verifying_with_the_unscaled_q_is_detected() -> None:
    result, target_probs, _, _ = run_round(0.3, verify_with_unscaled_q=True)
    assert_deviates(result.output_tokens[:, 0], target_probs[0])


def test_lower_c_puts_recovered_tokens_into_the_forked_top_f(rounds: dict) -> None:
    """After a rejection at position 0 the recovered token is a cache hit when it is
    among the draft's top-F tokens (the branches the cache prepared)."""
    rates = {}
    for c in (1.0, 0.3):
        result, _, _, q = rounds[c]
        rejected = result.num_accepted == 0
        forked = top_f_mask(q[0], TOP_F)  # [V]
        recovered = result.output_tokens[rejected, 0]
        rates[c] = (float(forked[recovered].double().mean()), float(1 - rejected.double().mean()))
    (hit_c1, accept_c1), (hit_c03, accept_c03) = rates[1.0], rates[0.3]
    logging.getLogger(__name__).info("(top-F share of recoveries, acceptance) by C: %s", rates)
    assert hit_c03 > hit_c1 + 0.1, rates  # more recoveries land on prepared branches ...
    assert accept_c03 < accept_c1, rates  # ... at the price of acceptance
