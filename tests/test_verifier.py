import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import ssd.spec.verifier as verifier_module
from ssd.engine.random import RandomStream
from ssd.engine.sampler import SamplingTensors, probs_from_logits, sample_from_weights
from ssd.sampling_params import SamplingParams
from ssd.spec.verifier import PAD_TOKEN, one_hot_probs, validate_verify_inputs, verify

P_VALUE_FLOOR = 1e-3
TV_NOISE_FACTOR = 3.0  # the TV bound is this many times the TV expected from sampling noise alone
# With a bound this small a 1% bias (TV 0.01) cannot pass: the empirical TV of a
# biased sampler is about 0.01 - bound / TV_NOISE_FACTOR > bound.
MAX_TV_BOUND = 0.006


def sampling_tensors(batch: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed_base: int = 0):
    return SamplingTensors(
        temperature=torch.full((batch,), temperature),
        top_k=torch.full((batch,), top_k, dtype=torch.int64),
        top_p=torch.full((batch,), top_p),
        seed=torch.arange(batch, dtype=torch.int64) + seed_base,
    )


def logits_with_argmax(argmax: list[list[int]], vocab: int) -> torch.Tensor:
    """[B, T, V] logits whose argmax at [b, t] is argmax[b][t]."""
    noise = torch.rand(len(argmax), len(argmax[0]), vocab, generator=torch.Generator().manual_seed(0))
    return noise + 5 * F.one_hot(torch.tensor(argmax), vocab)


# ----------------------------------------------------------------- statistics


def tv_bound(probs: torch.Tensor, n: int) -> float:
    """TV_NOISE_FACTOR x E[TV(empirical, probs)] for n draws (normal approximation per count)."""
    expected = 0.5 * torch.sqrt(2 * probs * (1 - probs) / (math.pi * n)).sum()
    return TV_NOISE_FACTOR * float(expected)


def fit_statistics(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, float]:
    """(chi-square p-value, total variation, TV bound) of samples against probs.

    Cells expected to hold fewer than 5 samples are pooled so the chi-square
    approximation holds; an impossible token sampled makes the p-value 0.
    """
    probs = probs.double() / probs.double().sum()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    n = int(counts.sum())
    if counts[probs == 0].sum() > 0:
        return 0.0, 1.0, tv_bound(probs, n)
    expected = probs * n
    large = expected >= 5
    observed_cells = torch.cat([counts[large], counts[~large].sum()[None]])
    expected_cells = torch.cat([expected[large], expected[~large].sum()[None]])
    keep = expected_cells > 0
    pvalue = stats.chisquare(observed_cells[keep].numpy(), expected_cells[keep].numpy()).pvalue
    total_variation = 0.5 * float((counts / n - probs).abs().sum())
    return float(pvalue), total_variation, tv_bound(probs, n)


def assert_follows(samples: torch.Tensor, probs: torch.Tensor, label: str, require_power: bool = False) -> None:
    pvalue, total_variation, bound = fit_statistics(samples, probs)
    assert pvalue > P_VALUE_FLOOR, f"{label}: chi-square p={pvalue:.2e} (n={samples.numel()})"
    assert total_variation < bound, f"{label}: TV={total_variation:.4f} >= {bound:.4f} (n={samples.numel()})"
    if require_power:
        assert bound <= MAX_TV_BOUND, f"{label}: only {samples.numel()} samples, TV bound {bound:.4f} is too loose"


def assert_deviates(samples: torch.Tensor, probs: torch.Tensor) -> None:
    pvalue, total_variation, bound = fit_statistics(samples, probs)
    assert pvalue < 1e-12 and total_variation > bound, (pvalue, total_variation, bound)


# ----------------------------------------------------------------- greedy by hand


def test_greedy_all_accepted_emits_bonus() -> None:
    target = logits_with_argmax([[1, 2, 3, 4]], vocab=6)
    result = verify(torch.tensor([[1, 2, 3]]), None, target, sampling_tensors(1, 0.0), torch.tensor([7]))
    assert result.output_tokens.tolist() == [[1, 2, 3, 4]]
    assert result.num_accepted.tolist() == [3] and result.num_emitted.tolist() == [4]


@pytest.mark.parametrize("mismatch", [0, 1, 2])
def test_greedy_mismatch_emits_target_argmax_then_padding(mismatch: int) -> None:
    target_argmax = [1, 2, 3, 4]
    draft = [1, 2, 3]
    draft[mismatch] = 5
    target = logits_with_argmax([target_argmax], vocab=6)
    result = verify(torch.tensor([draft]), None, target, sampling_tensors(1, 0.0), torch.tensor([0]))
    expected = target_argmax[: mismatch + 1] + [PAD_TOKEN] * (3 - mismatch)
    assert result.output_tokens.tolist() == [expected]
    assert result.num_accepted.tolist() == [mismatch] and result.num_emitted.tolist() == [mismatch + 1]


def test_greedy_single_draft_token_batch() -> None:
    target = logits_with_argmax([[4, 0], [4, 0], [2, 2]], vocab=5)
    draft = torch.tensor([[4], [3], [2]])
    result = verify(draft, None, target, sampling_tensors(3, 0.0), torch.zeros(3, dtype=torch.int64))
    assert result.output_tokens.tolist() == [[4, 0], [4, PAD_TOKEN], [2, 2]]
    assert result.num_accepted.tolist() == [1, 0, 1]
    assert result.num_emitted.tolist() == [2, 1, 2]


def test_greedy_rows_ignore_draft_probs() -> None:
    target = logits_with_argmax([[1, 2, 3, 4], [0, 0, 0, 0]], vocab=6)
    draft = torch.tensor([[1, 2, 5], [0, 1, 0]])
    st = sampling_tensors(2, 0.0)
    counter = torch.tensor([3, 9])
    without = verify(draft, None, target, st, counter)
    noisy_probs = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(1)).softmax(-1)
    for draft_probs in (one_hot_probs(draft, 6), noisy_probs):
        with_probs = verify(draft, draft_probs, target, st, counter)
        assert torch.equal(with_probs.output_tokens, without.output_tokens)
    assert without.output_tokens.tolist() == [[1, 2, 3, PAD_TOKEN], [0, 0, PAD_TOKEN, PAD_TOKEN]]


# ----------------------------------------------------------------- mixed batches


def mixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SamplingTensors, torch.Tensor]:
    vocab, k = 7, 3
    target = torch.randn(4, k + 1, vocab, generator=torch.Generator().manual_seed(2))
    target[0] = logits_with_argmax([[1, 2, 3, 4]], vocab)[0]
    target[1] = logits_with_argmax([[1, 2, 3, 4]], vocab)[0]
    st = SamplingTensors(
        temperature=torch.tensor([0.0, 0.0, 0.8, 1.0]),
        top_k=torch.tensor([0, 0, 0, 4]),
        top_p=torch.tensor([1.0, 1.0, 0.9, 1.0]),
        seed=torch.tensor([11, 12, 13, 14]),
    )
    target_probs = probs_from_logits(target[:, :k], st)  # [4, K, V]
    draft = torch.tensor([[1, 2, 3], [1, 6, 3], [0, 0, 0], [0, 0, 0]])
    draft[2] = target_probs[2].argmax(-1)  # row 2 proposes from q = p, so it must accept all
    draft[3, 0] = target_probs[3, 0].argmin()  # p = 0 after top-k, so row 3 must reject at 0
    draft_probs = one_hot_probs(draft, vocab)
    draft_probs[2] = target_probs[2]
    counter = torch.tensor([0, 10, 20, 30])
    return draft, draft_probs, target, st, counter


def test_mixed_batch_greedy_and_sampled_rows() -> None:
    draft, draft_probs, target, st, counter = mixed_batch()
    result = verify(draft, draft_probs, target, st, counter)
    assert result.output_tokens[0].tolist() == [1, 2, 3, 4]
    assert result.output_tokens[1].tolist() == [1, 2, PAD_TOKEN, PAD_TOKEN]
    assert result.num_accepted.tolist() == [3, 1, 3, 0]
    assert torch.equal(result.num_emitted, result.num_accepted + 1)
    target_probs = probs_from_logits(target, st)  # [4, K+1, V]
    assert target_probs[2, 3, result.output_tokens[2, 3]] > 0  # bonus drawn from p_K
    recovered = result.output_tokens[3, 0]
    assert recovered != draft[3, 0] and target_probs[3, 0, recovered] > 0
    assert result.output_tokens[3, 1:].tolist() == [PAD_TOKEN] * 3


def test_verify_is_reproducible_and_independent_of_batch_order() -> None:
    draft, draft_probs, target, st, counter = mixed_batch()
    full = verify(draft, draft_probs, target, st, counter)
    order = torch.tensor([3, 1, 2])
    subset = verify(draft[order], draft_probs[order], target[order], st.select_rows(order), counter[order])
    assert torch.equal(subset.output_tokens, full.output_tokens[order])
    assert torch.equal(verify(draft, draft_probs, target, st, counter).output_tokens, full.output_tokens)


def test_validate_verify_inputs() -> None:
    draft = torch.zeros(2, 3, dtype=torch.int64)
    target = torch.zeros(2, 4, 5)
    probs = torch.zeros(2, 3, 5)
    greedy = [SamplingParams(temperature=0.0)] * 2
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)]
    validate_verify_inputs(draft, None, target, greedy)
    validate_verify_inputs(draft, probs, target, mixed)
    with pytest.raises(ValueError, match="only allowed when every row is greedy"):
        validate_verify_inputs(draft, None, target, mixed)
    with pytest.raises(ValueError, match="target_logits must be"):
        validate_verify_inputs(draft, probs, torch.zeros(2, 3, 5), mixed)
    with pytest.raises(ValueError, match="draft_probs must be"):
        validate_verify_inputs(draft, torch.zeros(2, 3, 6), target, mixed)
    with pytest.raises(ValueError, match="draft_tokens must be int64"):
        validate_verify_inputs(draft.int(), probs, target, mixed)
    with pytest.raises(ValueError, match="K >= 1"):
        validate_verify_inputs(torch.zeros(2, 0, dtype=torch.int64), None, torch.zeros(2, 1, 5), greedy)
    with pytest.raises(ValueError, match="sampling params"):
        validate_verify_inputs(draft, probs, target, mixed[:1])


# ----------------------------------------------------------------- distribution exactness
#
# Every row is an independent trial (its own seed) of one verification step with
# fixed, context-free target and draft distributions. Speculative sampling is
# exact iff, whatever q is, the token emitted at output index 0 follows p_0 and,
# given that d_0 was accepted, the token at index 1 follows p_1 (and so on).

VOCAB, NUM_DRAFT, TRIALS = 8, 3, 250_000
SAMPLING_CONFIGS = {  # (temperature, top_k, top_p)
    "t1.0": (1.0, 0, 1.0),
    "t0.7": (0.7, 0, 1.0),
    "t1.0-topk5": (1.0, 5, 1.0),
    "t0.7-topk6-topp0.85": (0.7, 6, 0.85),
}
# close: d_i accepted ~90% of the time; far: 0-40% (disjoint supports under top-k/top-p);
# one-hot: the close draft's argmax,
# a deterministic proposal (accepted with probability p(d) ~ 0.5..0.7).
DRAFT_KINDS = ("close", "far", "one-hot")


def fixed_logits(kind: str) -> torch.Tensor:
    """Target logits [K+1, V], or draft logits [K, V] of the given kind."""
    generator = torch.Generator().manual_seed(42)
    target = torch.randn(NUM_DRAFT + 1, VOCAB, generator=generator) * 1.5
    noise = torch.randn(NUM_DRAFT, VOCAB, generator=generator)
    if kind == "target":
        return target
    if kind == "far":
        return 0.5 * target[:NUM_DRAFT] + 1.5 * noise
    return target[:NUM_DRAFT] + 0.3 * noise  # "close" and "one-hot"


def draw_drafts(draft_kind: str, st: SamplingTensors, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft tokens [N, K], the probs q [N, K, V] they were really drawn from)."""
    trials = counter.shape[0]
    draft_logits = fixed_logits(draft_kind).expand(trials, -1, -1)
    if draft_kind == "one-hot":
        tokens = draft_logits.argmax(-1)  # a deterministic proposal
        return tokens, one_hot_probs(tokens, VOCAB)
    q = probs_from_logits(draft_logits, st)
    positions = counter[:, None] + torch.arange(NUM_DRAFT)
    return sample_from_weights(q, st.seed[:, None], positions, RandomStream.DRAFT), q


def run_trials(config: str, draft_kind: str, draft_probs_override: torch.Tensor | None = None):
    """Returns (VerifyResult, target probs [K+1, V]) for TRIALS independent rows."""
    temperature, top_k, top_p = SAMPLING_CONFIGS[config]
    st = sampling_tensors(TRIALS, temperature, top_k, top_p, seed_base=1000 * TRIALS)
    counter = torch.randint(0, 2**31, (TRIALS,), generator=torch.Generator().manual_seed(3))
    draft_tokens, q = draw_drafts(draft_kind, st, counter)
    if draft_probs_override is not None:
        q = draft_probs_override.expand(TRIALS, -1, -1)
    target_logits = fixed_logits("target").expand(TRIALS, -1, -1)
    result = verify(draft_tokens, q, target_logits, st, counter)
    target_probs = probs_from_logits(fixed_logits("target")[None], sampling_tensors(1, temperature, top_k, top_p))[0]
    return result, target_probs


@pytest.mark.parametrize("draft_kind", DRAFT_KINDS)
@pytest.mark.parametrize("config", SAMPLING_CONFIGS)
def test_emitted_tokens_follow_target_distribution(config: str, draft_kind: str) -> None:
    result, target_probs = run_trials(config, draft_kind)
    tokens = result.output_tokens
    assert_follows(tokens[:, 0], target_probs[0], "index 0", require_power=True)
    for index in range(1, NUM_DRAFT + 1):
        reached = result.num_accepted >= index  # d_0 .. d_{index-1} accepted
        if reached.sum() >= 5_000:
            # Only the close draft reaches index 1 often enough for 1% power at this size.
            power = index == 1 and draft_kind == "close"
            assert_follows(tokens[reached, index], target_probs[index], f"index {index}", require_power=power)
    assert (tokens[:, 0] != PAD_TOKEN).all()
    assert ((tokens != PAD_TOKEN).sum(1) == result.num_emitted).all()


def test_test_power_one_percent_bias_is_detected() -> None:
    _, target_probs = run_trials("t1.0", "one-hot")
    biased = target_probs.clone()[0]
    biased[biased.argmax()] -= 0.01
    biased[biased.argmin()] += 0.01  # TV(biased, p_0) = 0.01
    seed = torch.arange(TRIALS, dtype=torch.int64)
    samples = sample_from_weights(biased.expand(TRIALS, -1), seed, torch.zeros_like(seed), salt=99)
    assert_deviates(samples, target_probs[0])


def test_test_power_wrong_draft_probs_in_acceptance_ratio_are_detected() -> None:
    """Tokens drawn from the far q but verified as if drawn from the close q."""
    temperature, top_k, top_p = SAMPLING_CONFIGS["t1.0"]
    wrong_q = probs_from_logits(fixed_logits("close")[None], sampling_tensors(1, temperature, top_k, top_p))
    result, target_probs = run_trials("t1.0", "far", draft_probs_override=wrong_q)
    assert_deviates(result.output_tokens[:, 0], target_probs[0])


def test_test_power_recovering_from_p_instead_of_residual_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier_module, "_recovery_weights", lambda target_probs, draft_probs: target_probs)
    result, target_probs = run_trials("t0.7", "far")
    assert_deviates(result.output_tokens[:, 0], target_probs[0])


# ----------------------------------------------------------------- multi-round end to end
#
# Target and draft are first-order Markov chains over a tiny vocabulary, so the
# target logits at each position really depend on the drafted prefix. Running
# whole rounds (draft K, verify, append, advance counter by num_emitted) must
# generate sequences whose joint law is the target chain's.

CHAIN_VOCAB, CHAIN_LENGTH, CHAIN_TRIALS = 5, 3, 200_000


def chain_logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    target = torch.randn(CHAIN_VOCAB, CHAIN_VOCAB, generator=generator) * 1.2
    draft = target + torch.randn(CHAIN_VOCAB, CHAIN_VOCAB, generator=generator)
    return target, draft  # row = previous token


def draft_round(draft_table: torch.Tensor, last: torch.Tensor, st: SamplingTensors, counter: torch.Tensor):
    tokens, probs = [], []
    previous = last
    for i in range(NUM_DRAFT):
        q = probs_from_logits(draft_table[previous], st)  # [N, V]
        previous = sample_from_weights(q, st.seed, counter + i, RandomStream.DRAFT)
        tokens.append(previous)
        probs.append(q)
    return torch.stack(tokens, 1), torch.stack(probs, 1)  # [N, K], [N, K, V]


def generate_with_speculation(st: SamplingTensors, start_token: int, reuse_numbers: bool = False) -> torch.Tensor:
    """[N, CHAIN_LENGTH] tokens generated after start_token.

    The counter is the sequence length (position of the next token). With
    reuse_numbers it wrongly advances by num_accepted, so each round reuses the
    random numbers that decided the previous round's last token.
    """
    target_table, draft_table = chain_logits()
    trials = st.batch_size
    sequence = torch.full((trials, 1 + CHAIN_LENGTH * (NUM_DRAFT + 1)), PAD_TOKEN)
    sequence[:, 0] = start_token
    length = torch.ones(trials, dtype=torch.int64)
    counter = length.clone()
    for _ in range(CHAIN_LENGTH):  # each round emits >= 1 token
        last = sequence.gather(1, (length - 1)[:, None]).squeeze(1)
        draft_tokens, draft_probs = draft_round(draft_table, last, st, counter)
        previous = torch.cat([last[:, None], draft_tokens], 1)  # [N, K+1]
        result = verify(draft_tokens, draft_probs, target_table[previous], st, counter)
        emitted = result.output_tokens != PAD_TOKEN
        columns = length[:, None] + torch.arange(NUM_DRAFT + 1)
        sequence.scatter_(1, columns, torch.where(emitted, result.output_tokens, sequence.gather(1, columns)))
        length = length + result.num_emitted
        counter = counter + (result.num_accepted if reuse_numbers else result.num_emitted)
    return sequence[:, 1 : 1 + CHAIN_LENGTH]


def chain_law(temperature: float, top_k: int, top_p: float, start_token: int) -> torch.Tensor:
    """[V**3] probability of each 3-token continuation under the target chain."""
    target_table, _ = chain_logits()
    transition = probs_from_logits(target_table, sampling_tensors(CHAIN_VOCAB, temperature, top_k, top_p)).double()
    joint = transition[start_token][:, None, None] * transition[:, :, None] * transition[None, :, :]  # [V, V, V]
    return joint.flatten()


def continuation_codes(generated: torch.Tensor) -> torch.Tensor:
    return (generated[:, 0] * CHAIN_VOCAB + generated[:, 1]) * CHAIN_VOCAB + generated[:, 2]


CHAIN_CONFIGS = {"t1.0": (1.0, 0, 1.0), "t0.7-topk4-topp0.9": (0.7, 4, 0.9)}


@pytest.mark.parametrize("config", CHAIN_CONFIGS)
def test_multi_round_generation_follows_target_chain(config: str) -> None:
    st = sampling_tensors(CHAIN_TRIALS, *CHAIN_CONFIGS[config], seed_base=5)
    generated = generate_with_speculation(st, start_token=2)  # [N, L]
    assert_follows(continuation_codes(generated), chain_law(*CHAIN_CONFIGS[config], start_token=2), "3-token law")


def test_test_power_reusing_random_numbers_across_rounds_is_detected() -> None:
    st = sampling_tensors(CHAIN_TRIALS, *CHAIN_CONFIGS["t1.0"], seed_base=5)
    generated = generate_with_speculation(st, start_token=2, reuse_numbers=True)
    assert_deviates(continuation_codes(generated), chain_law(*CHAIN_CONFIGS["t1.0"], start_token=2))
