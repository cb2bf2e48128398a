"""Prefill: a fresh batch attends causally without a mask, and long batches run in bounded groups."""
import pytest
import torch

from ssd import LLM, SamplingParams
from ssd.draft_worker.proposer import DraftProposer
from ssd.engine.prefill_groups import prefill_groups
from ssd.engine.sequence import Sequence
from ssd.layers.attention import ForwardContext, cached_attention, grouped_attention
from tiny_models import make_checkpoint, perturbed_copy

# right-padded batches wider than the grouped path's 16 queries: prefill goes to SDPA
PROMPTS = [list(range(3, 30)), [5, 6, 7], [9] * 41, list(range(50, 70)), [3], list(range(10, 45))]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def sequences(lengths: list[int]) -> list[Sequence]:
    return [Sequence(i, [1] * n, SamplingParams(max_tokens=1), frozenset()) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("lengths, budget, expected", [
    ([10, 10, 10, 10], 40, [[0, 1, 2, 3]]),
    ([10, 10, 10, 10], 39, [[0, 1, 2], [3]]),
    ([5, 30, 5, 5], 60, [[0, 1], [2, 3]]),      # the wide prompt pads its group: 2 x 30
    ([100, 3, 3], 50, [[0], [1, 2]]),            # longer than the budget: alone
    ([3, 100, 3], 50, [[0], [1], [2]]),
    ([7], 1, [[0]]),
])
def test_groups_are_consecutive_runs_within_the_budget(lengths, budget, expected):
    seqs = sequences(lengths)
    groups = list(prefill_groups(seqs, budget))
    assert [[s.index for s in group] for _, group in groups] == expected
    assert [offset for offset, _ in groups] == [group[0] for group in expected]


def context(positions: torch.Tensor, capacity: int = 64, seed: int = 0, key_limit=None):
    g = torch.Generator().manual_seed(seed)
    slots = positions.shape[0] + 1
    caches = [torch.randn(slots, 2, capacity, 8, generator=g) for _ in range(2)]
    return ForwardContext(positions, positions if key_limit is None else key_limit, capacity, [caches[0]],
                          [caches[1]], first_slot=1)


def test_rows_of_one_contiguous_run_are_recognised():
    batch, seq = 3, 20
    start = torch.arange(seq).expand(batch, seq).contiguous()
    assert context(start).contiguous_from == 0                   # a fresh prefill
    assert context(start + 7).contiguous_from == 7               # a later chunk of one long prompt
    later_row = start.clone()
    later_row[1] += 5
    assert context(later_row).contiguous_from is None            # rows at different places
    assert context(start, key_limit=start + 1).contiguous_from is None   # queries seeing past themselves


@pytest.mark.parametrize("start", [0, 9])
def test_causal_attention_of_a_contiguous_run_equals_the_masked_one(start):
    """Causal attention aligned at the bottom right over cache positions < start+T, with no mask,
    gives what the masked attention over the whole attended length gives (grouped heads: 4 query
    heads per key head)."""
    batch, seq = 3, 20
    positions = (start + torch.arange(seq)).expand(batch, seq).contiguous()
    ctx = context(positions)
    q = torch.randn(batch, seq, 8, 8, generator=torch.Generator().manual_seed(1))
    masked = grouped_attention(q, ctx.k_caches[0][1:4], ctx.v_caches[0][1:4], ctx.attn_mask, 0.3)
    causal = cached_attention(q, 0, ctx, 0.3)
    assert ctx.contiguous_from == start
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefill")
    target = make_checkpoint("llama", root / "target")
    return {"target": str(target), "draft": str(perturbed_copy(target, root / "draft", noise=0.08))}


def generate(model: str, max_prefill_tokens: int, params=GREEDY, max_num_seqs: int = 6, prompts=PROMPTS,
             **options) -> tuple[list[list[int]], int]:
    """Greedy tokens, and the prefill forwards of the target (and of an in-process draft: the same)."""
    with LLM(model, max_model_len=256, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
             **options) as llm:
        runners = [llm.runner] + ([llm.draft.runner] if isinstance(llm.draft, DraftProposer) else [])
        prefills = [count_prefills(runner) for runner in runners]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(counted) == len(prefills[0]) for counted in prefills)
        return [o.token_ids for o in outs], len(prefills[0])


def count_prefills(runner) -> list[None]:
    forward, counted = runner.forward, []

    def counting(*args, **kwargs):
        if kwargs.get("logits_index") is not None:
            counted.append(None)
        return forward(*args, **kwargs)
    runner.forward = counting
    return counted


@pytest.mark.parametrize("spec", [{}, {"num_speculative_tokens": 4, "draft_colocated": True}])
def test_grouped_prefill_gives_the_same_tokens(pair, spec):
    options = {**spec, "draft": pair["draft"]} if spec else {}
    whole, forwards = generate(pair["target"], 16384, **options)
    grouped, group_forwards = generate(pair["target"], 64, **options)
    assert forwards == 1 and group_forwards == 4      # 27+3 | 41 | 20+1 | 35 (each <= 64 padded, or alone)
    assert grouped == whole


def test_grouped_prefill_with_an_async_draft(pair):
    whole, _ = generate(pair["target"], 16384)
    grouped, _ = generate(pair["target"], 64, draft=pair["draft"], num_speculative_tokens=4, async_spec=True,
                          fan_out=2)
    assert grouped == whole


def test_a_non_positive_budget_is_refused(pair):
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        LLM(pair["target"], max_prefill_tokens=0)


LONG = [[(7 * i) % 90 + 3 for i in range(150)], list(range(3, 30))]


@pytest.mark.parametrize("spec", [{}, {"num_speculative_tokens": 4, "draft_colocated": True},
                                  {"num_speculative_tokens": 4, "async_spec": True, "fan_out": 2},
                                  {"tensor_parallel_size": 2}])
def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks(pair, spec):
    """A 150-token prompt with a budget of 64: three chunks (64, 64, 22) in the target (its TP ranks
    too), and in the draft (in-process or its own process); the same greedy tokens as one forward."""
    options = {**spec, "draft": pair["draft"]} if "num_speculative_tokens" in spec else spec
    whole, forwards = generate(pair["target"], 16384, prompts=LONG, **options)
    chunked, chunk_forwards = generate(pair["target"], 64, prompts=LONG, **options)
    assert (forwards, chunk_forwards) == (1, 4)     # then 150 | 27
    assert chunked == whole


@pytest.mark.parametrize("spec", [{}, {"num_speculative_tokens": 4, "async_spec": True, "fan_out": 2}])
def test_prompts_joining_a_running_batch_are_grouped_too(pair, spec):
    """Four slots: the second and fourth requests end first, together; the last two prompts (1 and 35
    tokens: 70 padded positions) then join the two still running, prefilled as two groups (slots 2, 3)."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (24, 8, 24, 8, 24, 24)]
    options = {**spec, "draft": pair["draft"]} if spec else {}
    whole, forwards = generate(pair["target"], 16384, params, max_num_seqs=4, **options)
    grouped, group_forwards = generate(pair["target"], 64, params, max_num_seqs=4, **options)
    if not spec:   # AR: 27+3 | 41 | 20 then 1 | 35 (async rounds may end the two at different rounds)
        assert (forwards, group_forwards) == (2, 5)
    assert group_forwards > forwards
    assert grouped == whole and [len(row) for row in whole] == [p.max_tokens for p in params]
