"""A draft LM head over part of the vocabulary (ssd.spec.draft_vocabulary): which tokens it keeps,
the restricted runner's logits, and speculation with such a draft staying exact (test_spec_async
adds async greedy and sampled cases)."""
import json

import pytest
import torch

from ssd import LLM, SamplingParams
from ssd.distributed.tp_group import TPGroup
from ssd.engine.model_runner import ModelRunner
from ssd.engine.runner_config import RunnerConfig
from ssd.layers.fp8 import FP8
from ssd.spec.draft_vocabulary import FORMAT, VERSION, frequency_ranking, kept_token_ids, load_ranking
from ssd.spec.rank_vocabulary import model_turns
from ssd.spec.spec_config import AsyncSpecConfig, SpecConfig

PROMPTS = [[5, 6, 7], [9] * 11, list(range(3, 30)), [40, 41]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_kept_ids_are_the_always_kept_then_the_ranking():
    assert kept_token_ids(5, 10) == (0, 1, 2, 3, 4)
    assert kept_token_ids(5, 10, always=[9, 7]) == (0, 1, 2, 7, 9)
    assert kept_token_ids(4, 10, always=[2, 42], ranking=[8, 2, 5, 1, 0]) == (1, 2, 5, 8)   # 42: not in the vocabulary
    assert kept_token_ids(10, 10) == tuple(range(10))
    assert kept_token_ids(4, 10, always=[9], ranking=[8]) == (0, 1, 8, 9)                   # then id order


@pytest.mark.parametrize("size,always,phrase", [(0, (), "must lie in"), (11, (), "must lie in"),
                                                (1, (3, 4), "smaller than the 2 stop/special")])
def test_bad_sizes_are_refused(size, always, phrase):
    with pytest.raises(ValueError, match=phrase):
        kept_token_ids(size, 10, always)


def test_frequency_ranking_counts_then_breaks_ties_by_id():
    assert frequency_ranking([[3, 3, 1], [1, 3, 4], [9, 5]], 6) == [3, 1, 4, 5]


def test_model_turns_are_the_assistant_side_of_conversations():
    conversations = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a1"},
                                        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
                     {"conversations": [{"from": "user", "value": "x"}, {"from": "assistant", "value": "b"}]},
                     {"id": "no turns"}]
    assert list(model_turns(iter(conversations))) == ["a1", "a2", "b"]


def test_ranking_files_load_and_are_checked_against_the_vocabulary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "vocab_size": 10, "ranking": [7, 2]}))
    assert load_ranking(path, 10) == [7, 2]
    with pytest.raises(ValueError, match="vocabulary of 10 tokens"):
        load_ranking(path, 12)
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped token ranking"):
        load_ranking(tmp_path / "missing.json", 10)


def test_shipped_qwen_ranking_starts_with_frequent_tokens_and_keeps_code_fences():
    ranking = load_ranking("qwen2.5", 151936)
    assert len(set(ranking)) == len(ranking) > 30000
    kept = set(kept_token_ids(32768, 151936, ranking=ranking))
    assert 73594 in kept    # "```": id order alone (merge order) drops it at 32768


@pytest.mark.parametrize("family", ["qwen2", "llama"])   # tied / untied LM head
def test_restricted_head_gives_the_same_logits_on_kept_tokens_and_minus_inf_elsewhere(tiny_checkpoints, family):
    path = str(tiny_checkpoints[family])
    kept = kept_token_ids(40, 97, always=[96])
    full = ModelRunner(RunnerConfig(model=path, max_len=64, num_slots=2), TPGroup())
    restricted = ModelRunner(RunnerConfig(model=path, max_len=64, num_slots=2, head_vocabulary=kept), TPGroup())
    assert restricted.model.lm_head.weight.shape[0] == 40
    torch.testing.assert_close(restricted.model.model.embed_tokens.weight, full.model.model.embed_tokens.weight)
    ids = torch.tensor([PROMPTS[2]])
    positions = torch.arange(ids.shape[1])[None]
    reference = full.forward(ids, positions, ids.shape[1])
    logits = restricted.forward(ids, positions, ids.shape[1])
    assert logits.shape == reference.shape
    index = torch.tensor(kept)
    torch.testing.assert_close(logits[..., index], reference[..., index])
    dropped = torch.ones(97, dtype=torch.bool)
    dropped[index] = False
    assert torch.isneginf(logits[..., dropped]).all()


def test_restricted_head_composes_with_fp8(tiny_checkpoints):
    path = str(tiny_checkpoints["llama"])
    kept = kept_token_ids(40, 97)
    runner = ModelRunner(RunnerConfig(model=path, max_len=64, num_slots=2, head_vocabulary=kept,
                                      weight_quant="fp8"), TPGroup())
    head = runner.model.lm_head
    assert head.weight.dtype == FP8 and head.weight.shape[0] == 40 and head.weight_scale.shape == (40,)
    logits = runner.forward(torch.tensor([PROMPTS[0]]), torch.arange(3)[None], 3)
    assert torch.isfinite(logits[..., :40]).all() and torch.isneginf(logits[..., 40:]).all()


def test_restricted_head_needs_one_rank():
    with pytest.raises(ValueError, match="tp_size 1"):
        RunnerConfig(model="x", tp_size=2, head_vocabulary=(0, 1))


def test_draft_vocabulary_needs_a_draft():
    with pytest.raises(ValueError, match="draft vocabulary: speculative decoding needs a draft model"):
        LLM("llama-3.2-1b", draft_vocabulary=1000)


def test_sync_speculation_with_a_restricted_draft_of_the_target_is_exact(tiny_checkpoints):
    """The draft is the target with a head over 50 of 97 tokens: it proposes the target's token
    whenever that is kept and never otherwise — both verifier paths run, the output is the target's."""
    path = str(tiny_checkpoints["qwen2"])
    with LLM(path, max_model_len=256) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    with LLM(path, max_model_len=256, draft=path, num_speculative_tokens=4, draft_vocabulary=50) as llm:
        outs = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        stats = llm.last_run_stats
    assert outs == expected
    assert 1.0 < stats.acceptance_length < 5.0


@pytest.mark.parametrize("k, async_spec, vocabulary", [(6, True, True), (1, True, True), (6, False, True),
                                                      (6, True, False)])
def test_a_restricted_draft_returns_kept_logits(k, async_spec, vocabulary):
    """Every forward of a restricted draft (proposer, window) returns its kept logits only."""
    spec = AsyncSpecConfig.create(k, fan_out=2) if async_spec else None
    cfg = SpecConfig("draft", k).runner_config(RunnerConfig(model="target"), None, spec,
                                               (0, 1, 2) if vocabulary else None)
    assert cfg.kept_logits == vocabulary
    with pytest.raises(ValueError, match="kept_logits needs a restricted"):
        RunnerConfig(model="x", kept_logits=True)


SAMPLINGS = {"greedy": dict(temperature=0), "temperature": dict(temperature=0.8),
             "top-k/top-p": dict(temperature=1.0, top_k=5, top_p=0.8)}


@pytest.mark.parametrize("saguaro_c", [1.0, 0.3])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_proposals_over_kept_logits_equal_those_over_the_spread_rows(tiny_checkpoints, sampling, saguaro_c):
    """A restricted draft's proposer (sync rounds, the `jit` backup) reads its kept logits only: the
    same tokens and q as over the -inf-filled full rows (kept ids sorted: the same ties; torch.topk on
    CPU both ways), the q at the kept tokens' columns only."""
    from ssd.draft_worker.proposer import DraftProposer
    from ssd.engine.sampler import SamplingTensors
    path, k = str(tiny_checkpoints["llama"]), 3
    kept = tuple(sorted(torch.randperm(97, generator=torch.Generator().manual_seed(2))[:40].tolist()))
    prompts = torch.tensor([[5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25], [3, 3, 3, 3, 3, 3]])
    params = [SamplingParams(**SAMPLINGS[sampling], seed=i) for i in range(3)]
    proposals = []
    for kept_logits in (True, False):
        runner = ModelRunner(RunnerConfig(model=path, max_len=64, num_slots=3, head_vocabulary=kept,
                                          kept_logits=kept_logits), TPGroup())
        proposer = DraftProposer(runner, k, saguaro_c, (2, 1, 2, 1))
        proposer.prefill(prompts[:, :4], torch.arange(4).expand(3, 4).contiguous(), 0)
        proposer.set_sampling(SamplingTensors.from_params(params, "cpu", 0))
        proposals.append(proposer.propose(prompts[:, 4], prompts[:, 5], torch.full((3,), 6), 6,
                                          want_probs=sampling != "greedy"))
    kept_columns, full_rows = proposals
    assert torch.equal(kept_columns.tokens, full_rows.tokens)
    assert set(kept_columns.tokens.flatten().tolist()) <= set(kept)
    if sampling != "greedy":
        torch.testing.assert_close(kept_columns.probs, full_rows.probs)
        dropped = torch.ones(97, dtype=torch.bool)
        dropped[list(kept)] = False
        assert (kept_columns.probs[..., dropped] == 0).all()
