import math
import random

import pytest
import torch
from scipy import stats

from ssd.engine.random import RandomStream, _mul_mod32, _row_hash, uniform_from_counters
from ssd.engine.sampler import (
    SamplingTensors,
    derive_seed,
    probs_from_logits,
    sample,
    sample_from_weights,
    sample_with_probs,
)
from ssd.sampling_params import SamplingParams

P_VALUE_FLOOR = 1e-3
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def sampling_tensors(batch: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingTensors:
    return SamplingTensors(
        temperature=torch.full((batch,), temperature),
        top_k=torch.full((batch,), top_k, dtype=torch.int64),
        top_p=torch.full((batch,), top_p),
        seed=torch.arange(batch, dtype=torch.int64) * 7919 + 13,
    )


def expected_total_variation(probs: torch.Tensor, n: int) -> float:
    """E[TV(empirical, probs)] for n draws, from the normal approximation of each count."""
    return float(0.5 * torch.sqrt(2 * probs * (1 - probs) / (math.pi * n)).sum())


def assert_samples_follow(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit plus a total-variation bound (3x its null expectation)."""
    probs = probs.double() / probs.double().sum()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    n = int(counts.sum())
    assert counts[probs == 0].sum() == 0, "sampled a zero-probability token"
    support = probs > 0
    result = stats.chisquare(counts[support].numpy(), (probs[support] * n).numpy())
    total_variation = 0.5 * float((counts / n - probs).abs().sum())
    assert result.pvalue > P_VALUE_FLOOR, f"chi-square p={result.pvalue:.2e}"
    assert total_variation < 3 * expected_total_variation(probs, n), f"TV={total_variation:.4f}"


# ----------------------------------------------------------------- random


def test_mul_mod32_matches_python_integers() -> None:
    rng = random.Random(0)
    xs = [0, 1, 2**32 - 1, 2**31] + [rng.randrange(2**32) for _ in range(2000)]
    for constant in (0x7FEB352D, 0x846CA68B, 0x9E3779B9, 2**32 - 1):
        got = _mul_mod32(torch.tensor(xs, dtype=torch.int64), constant)
        assert got.tolist() == [(x * constant) % 2**32 for x in xs]


def test_positions_of_one_stream_never_share_a_state() -> None:
    counter = torch.arange(2**20, dtype=torch.int64) + 2**31
    for seed in (0, -1, 2**40 + 3):
        states = _row_hash(torch.full_like(counter, seed), counter, RandomStream.ACCEPT)
        assert states.unique().numel() == counter.numel()
        assert states.min() >= 0 and states.max() < 2**32


def test_uniforms_are_float32_strictly_inside_unit_interval() -> None:
    seed = torch.tensor([0, 1, -1, INT64_MIN, INT64_MAX, 123456789], dtype=torch.int64)
    counter = torch.tensor([0, INT64_MAX, INT64_MIN, -1, 5, 2**40], dtype=torch.int64)
    values = uniform_from_counters(seed, counter, salt=3, n=50_000)
    assert values.shape == (6, 50_000) and values.dtype == torch.float32
    assert values.min() > 0 and values.max() < 1
    assert torch.log(values).isfinite().all() and torch.log1p(-values).isfinite().all()


def test_uniforms_are_uniform_and_pairwise_independent() -> None:
    seed = torch.arange(20_000, dtype=torch.int64)
    counter = torch.full_like(seed, 42)
    values = uniform_from_counters(seed, counter, RandomStream.SAMPLE, 10)  # [20000, 10]
    assert stats.kstest(values.flatten().numpy(), "uniform").pvalue > P_VALUE_FLOOR

    next_counter = uniform_from_counters(seed, counter + 1, RandomStream.SAMPLE, 1)[:, 0]
    other_salt = uniform_from_counters(seed, counter, RandomStream.ACCEPT, 1)[:, 0]
    pairs = {
        "neighbouring columns": (values[:, 0], values[:, 1]),
        "neighbouring seeds": (values[:-1, 0], values[1:, 0]),
        "neighbouring counters": (values[:, 0], next_counter),
        "different salts": (values[:, 0], other_salt),
    }
    for name, (a, b) in pairs.items():
        cells = (a * 10).long() * 10 + (b * 10).long()  # 10x10 grid
        counts = torch.bincount(cells, minlength=100).numpy()
        assert stats.chisquare(counts).pvalue > P_VALUE_FLOOR, name


def test_uniforms_depend_only_on_seed_counter_salt_and_column() -> None:
    seed = torch.tensor([5, -9, 2**62, 5, 77], dtype=torch.int64)
    counter = torch.tensor([0, 3, 3, 1, 2**33], dtype=torch.int64)
    full = uniform_from_counters(seed, counter, salt=2, n=16)

    permutation = torch.tensor([3, 0, 4, 2, 1])
    permuted = uniform_from_counters(seed[permutation], counter[permutation], salt=2, n=16)
    assert torch.equal(permuted, full[permutation])

    for row in range(5):
        alone = uniform_from_counters(seed[row : row + 1], counter[row : row + 1], salt=2, n=16)
        assert torch.equal(alone[0], full[row])
    # fewer columns are a prefix of more columns
    assert torch.equal(uniform_from_counters(seed, counter, salt=2, n=4), full[:, :4])
    # same seed, different counter -> different numbers; different salt -> different numbers
    assert not torch.equal(full[0], full[3])
    assert not torch.equal(uniform_from_counters(seed, counter, salt=1, n=16), full)


def test_uniforms_broadcast_seed_against_counter_matrix() -> None:
    seed = torch.tensor([3, 4], dtype=torch.int64)
    counters = torch.tensor([[10, 11, 12], [20, 21, 22]], dtype=torch.int64)
    grid = uniform_from_counters(seed[:, None], counters, salt=1, n=2)  # [2, 3, 2]
    assert grid.shape == (2, 3, 2)
    single = uniform_from_counters(torch.tensor([4]), torch.tensor([21]), salt=1, n=2)
    assert torch.equal(grid[1, 1], single[0])


# ----------------------------------------------------------------- SamplingTensors


def test_from_params_builds_per_row_tensors() -> None:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=-1, top_p=0.9, seed=1234),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1e-7, seed=-1),
    ]
    st = SamplingTensors.from_params(params, "cpu", default_seed=99, request_ids=[10, 11, 12, 13])
    assert st.temperature.dtype == torch.float32 and st.top_p.dtype == torch.float32
    assert st.top_k.dtype == torch.int64 and st.seed.dtype == torch.int64
    assert st.temperature.tolist() == pytest.approx([0.0, 0.7, 1.0, 0.0])
    assert st.top_k.tolist() == [0, 0, 5, 0]
    assert st.top_p.tolist() == pytest.approx([1.0, 0.9, 1.0, 1.0])
    assert st.seed.tolist() == [derive_seed(99, 10), 1234, derive_seed(99, 12), -1]
    assert st.is_greedy.tolist() == [True, False, False, True]
    assert st.apply_filters and st.batch_size == 4


def test_from_params_derived_seeds_are_deterministic_and_distinct() -> None:
    params = [SamplingParams() for _ in range(3)]
    a = SamplingTensors.from_params(params, "cpu", default_seed=0)
    b = SamplingTensors.from_params(params, "cpu", default_seed=0)
    c = SamplingTensors.from_params(params, "cpu", default_seed=1)
    assert torch.equal(a.seed, b.seed)
    assert len(set(a.seed.tolist())) == 3
    assert not torch.equal(a.seed, c.seed)
    assert not a.apply_filters
    huge = SamplingTensors.from_params([SamplingParams(seed=2**70 + 5)], "cpu", default_seed=0)
    assert huge.seed.tolist() == [5]  # wrapped to int64
    with pytest.raises(ValueError, match="request ids"):
        SamplingTensors.from_params(params, "cpu", default_seed=0, request_ids=[1])


# ----------------------------------------------------------------- probs_from_logits

# A fixed distribution over 6 tokens, listed in descending order.
SORTED_PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])


def shuffled_logits(permutation: list[int]) -> torch.Tensor:
    logits = torch.empty(6)
    logits[torch.tensor(permutation)] = SORTED_PROBS.log()
    return logits  # token permutation[r] has the r-th largest probability


def test_top_k_and_top_p_mask_per_row_in_one_batch() -> None:
    # (top_k, top_p, number of top tokens kept); top-p applies to the top-k-renormalised probs
    cases = [
        (0, 1.0, 6), (2, 1.0, 2), (0, 0.5, 2), (0, 0.75, 3), (3, 0.6, 2),
        (3, 0.45, 1), (10, 1.0, 6), (1, 1.0, 1), (0, 0.3, 1), (4, 0.95, 4),
    ]
    rng = random.Random(1)
    permutations = [rng.sample(range(6), 6) for _ in cases]
    logits = torch.stack([shuffled_logits(perm) for perm in permutations])
    st = SamplingTensors(
        temperature=torch.ones(len(cases)),
        top_k=torch.tensor([k for k, _, _ in cases]),
        top_p=torch.tensor([p for _, p, _ in cases]),
        seed=torch.zeros(len(cases), dtype=torch.int64),
    )
    probs = probs_from_logits(logits, st)
    for row, ((_, _, kept), perm) in enumerate(zip(cases, permutations)):
        expected = torch.zeros(6)
        expected[torch.tensor(perm[:kept])] = SORTED_PROBS[:kept] / SORTED_PROBS[:kept].sum()
        torch.testing.assert_close(probs[row], expected, msg=f"row {row}")


def test_temperature_is_applied_before_top_p() -> None:
    logits = SORTED_PROBS.log()[None].repeat(2, 1)
    st = SamplingTensors(
        temperature=torch.tensor([1.0, 3.0]),
        top_k=torch.zeros(2, dtype=torch.int64),
        top_p=torch.tensor([0.5, 0.5]),
        seed=torch.zeros(2, dtype=torch.int64),
    )
    probs = probs_from_logits(logits, st)
    flattened = (SORTED_PROBS.log() / 3).softmax(-1)  # [0.25, 0.21, 0.18, ...]: needs 3 tokens for 0.5
    assert (probs[0] > 0).sum() == 2
    assert (probs[1] > 0).sum() == 3
    torch.testing.assert_close(probs[1, :3], flattened[:3] / flattened[:3].sum())


def test_top_k_keeps_ties_with_the_kth_token() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    st = sampling_tensors(1, top_k=2)
    assert (probs_from_logits(logits, st)[0] > 0).tolist() == [True, False, True, True, False]


def test_greedy_rows_are_one_hot_argmax() -> None:
    logits = torch.randn(4, 3, 11, generator=torch.Generator().manual_seed(0))
    st = sampling_tensors(4, top_k=3, top_p=0.5)
    st.temperature[torch.tensor([0, 2])] = 0.0
    probs = probs_from_logits(logits, st)
    expected = torch.nn.functional.one_hot(logits.argmax(-1), 11).float()
    assert torch.equal(probs[[0, 2]], expected[[0, 2]])
    assert (probs[[1, 3]] > 0).sum(-1).ge(1).all()


def test_probs_of_3d_logits_match_each_position() -> None:
    logits = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(1))
    st = SamplingTensors(
        temperature=torch.tensor([0.7, 1.3, 0.0]),
        top_k=torch.tensor([5, 0, 3]),
        top_p=torch.tensor([0.9, 0.6, 1.0]),
        seed=torch.zeros(3, dtype=torch.int64),
    )
    probs = probs_from_logits(logits, st)  # [3, 4, 20]
    for t in range(4):
        torch.testing.assert_close(probs[:, t], probs_from_logits(logits[:, t], st))
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4))


def test_skipping_filters_matches_when_no_row_filters() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2)) * 3
    st = sampling_tensors(5, temperature=0.8)
    unfiltered = SamplingTensors(st.temperature, st.top_k, st.top_p, st.seed, apply_filters=False)
    torch.testing.assert_close(probs_from_logits(logits, st), probs_from_logits(logits, unfiltered))
    torch.testing.assert_close(probs_from_logits(logits, st), (logits / 0.8).softmax(-1))


def test_filters_among_candidates_match_the_full_sort_when_the_kept_set_fits() -> None:
    """The draft's cheaper filter (top-k / top-p among the W largest logits) is the exact filter
    whenever what it keeps lies among them — per row, with mixed parameters and unfiltered rows."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 2, 500, generator=g) * 4          # peaked: nuclei of a few tokens
    st = SamplingTensors(
        temperature=torch.tensor([1.0, 0.7, 1.0, 1.2, 0.0, 1.0]),
        top_k=torch.tensor([0, 20, 5, 0, 3, 0]),
        top_p=torch.tensor([0.8, 1.0, 0.9, 0.5, 0.9, 1.0]),   # the last row: no filter at all
        seed=torch.zeros(6, dtype=torch.int64),
    )
    exact = probs_from_logits(logits, st)
    assert (exact > 0).sum(-1)[:4].max() <= 40, "test premise: every kept set fits in 40 candidates"
    torch.testing.assert_close(probs_from_logits(logits, st, candidates=40), exact)
    assert (exact[5] > 0).all()  # the unfiltered row keeps its whole vocabulary


def test_filters_among_candidates_truncate_to_them_when_the_kept_set_does_not_fit() -> None:
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(4)) * 0.1  # flat: huge nucleus
    st = sampling_tensors(2, top_p=0.95)
    st.top_k[1] = 100
    probs = probs_from_logits(logits, st, candidates=32)
    top = logits.topk(32, dim=-1).indices
    assert torch.equal((probs > 0).sum(-1), torch.tensor([32, 32]))
    assert (probs.gather(-1, top) > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_half_precision_logits_give_float32_probs() -> None:
    logits = torch.randn(2, 16).to(torch.bfloat16)
    probs = probs_from_logits(logits, sampling_tensors(2, top_k=4))
    assert probs.dtype == torch.float32


# ----------------------------------------------------------------- sample


def test_greedy_sampling_is_argmax() -> None:
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(3))
    st = sampling_tensors(64, temperature=0.0)
    counter = torch.arange(64, dtype=torch.int64)
    assert torch.equal(sample(logits, st, counter), logits.argmax(-1))


def sample_many(logits_row: torch.Tensor, st: SamplingTensors, n: int) -> torch.Tensor:
    counter = torch.randint(0, 2**40, (n,), generator=torch.Generator().manual_seed(4))
    return sample(logits_row.expand(n, -1), st, counter)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 0.9)])
def test_sampled_tokens_follow_filtered_probs(temperature: float, top_k: int, top_p: float) -> None:
    n = 200_000
    logits = torch.randn(8, generator=torch.Generator().manual_seed(5)) * 1.5
    st = sampling_tensors(n, temperature, top_k, top_p)
    probs = probs_from_logits(logits[None], sampling_tensors(1, temperature, top_k, top_p))[0]
    assert_samples_follow(sample_many(logits, st, n), probs)


def test_sample_from_weights_accepts_unnormalised_weights() -> None:
    n = 200_000
    weights = torch.tensor([0.0, 3.0, 1.0, 0.0, 6.0])
    seed = torch.arange(n, dtype=torch.int64)
    samples = sample_from_weights(weights.expand(n, -1), seed, torch.zeros(n, dtype=torch.int64), salt=9)
    assert_samples_follow(samples, weights / weights.sum())


def test_sampling_is_reproducible_and_independent_of_batch() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 50, generator=generator)
    params = [SamplingParams(temperature=0.9, seed=s, top_k=k) for s, k in zip(range(6), [0, 10, 0, 3, 0, 0])]
    counter = torch.tensor([0, 5, 9, 2, 2, 7], dtype=torch.int64)
    st = SamplingTensors.from_params(params, "cpu", default_seed=0)
    tokens = sample(logits, st, counter)
    assert torch.equal(tokens, sample(logits, st, counter))

    order = [4, 1, 5, 0]
    subset = SamplingTensors.from_params([params[i] for i in order], "cpu", default_seed=0)
    assert torch.equal(sample(logits[order], subset, counter[order]), tokens[order])
    assert torch.equal(sample(logits[order], st.select_rows(torch.tensor(order)), counter[order]), tokens[order])

    other_salt = torch.stack([sample(logits, st, counter + c, salt=RandomStream.DRAFT) for c in range(20)])
    assert (other_salt != tokens).any()  # the stream changes with counter and salt


def test_sample_with_probs_returns_the_probs_it_sampled_from() -> None:
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(7))
    st = sampling_tensors(3, temperature=0.5, top_k=4)
    tokens, probs = sample_with_probs(logits, st, torch.zeros(3, dtype=torch.int64))
    torch.testing.assert_close(probs, probs_from_logits(logits, st))
    assert (probs.gather(1, tokens[:, None]) > 0).all()


def test_unseeded_requests_draw_new_samples_in_every_call_and_seeded_ones_repeat(tiny_checkpoints):
    """As in vLLM: calling generate again without a seed gives other samples; with one, the same."""
    from ssd import LLM
    prompts = [[5, 6, 7]] * 4
    with LLM(str(tiny_checkpoints["llama"]), max_model_len=64) as llm:
        def sample(seed):
            params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=seed)
            return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert sample(None) != sample(None)
        assert sample(7) == sample(7)
