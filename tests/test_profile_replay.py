"""Acceptance profiles: the file format, the predicted statistics, and replay in the engine (sync
and async, CPU, tiny models) reproducing exactly the rounds the profile predicts."""
import json
import random

import pytest
import torch

from ssd import LLM, SamplingParams
from ssd.spec.acceptance_profile import AcceptanceProfile, covered, load_profile, predict
from ssd.spec.profile_replay import trace_for
from tiny_models import make_checkpoint

K = 4
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    return {"target": make_checkpoint("qwen2", root / "target"),
            "draft": make_checkpoint("qwen2", root / "draft", seed=5, num_hidden_layers=1)}


def synthetic_profile(num_traces=3, length=97, p_top1=0.7, seed=0) -> AcceptanceProfile:
    rng = random.Random(seed)
    traces = tuple(tuple(0 if rng.random() < p_top1 else rng.choice([1, 1, 2, 3, 4, 7, 40, 255])
                         for _ in range(length)) for _ in range(num_traces))
    return AcceptanceProfile("synthetic", traces, {"made_by": "test"})


# prompts chosen so that their traces (a hash of the prompt) differ: rows replay different traces
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def traces_of(profile, prompts):
    return [trace_for(profile, p) for p in prompts]


def replayed_run(pair, profile, prompts, async_spec: bool, **options):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(pair["target"]), max_model_len=256, draft=str(pair["draft"]), num_speculative_tokens=K,
             async_spec=async_spec, acceptance_profile=profile, random_weights=True, max_num_seqs=len(prompts), **options) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return outputs, llm.last_run_stats


def test_covered_follows_the_fork_rules():
    fanout = (2, 0, 1, 3)  # K = 3
    assert covered(1, 0, fanout) and covered(2, 0, fanout) and not covered(3, 0, fanout)
    assert not covered(1, 1, fanout)                      # no guesses at position 1
    assert covered(0, 3, fanout) and covered(2, 3, fanout) and not covered(3, 3, fanout)


def test_predict_walks_rounds_by_hand():
    # ranks after the prefill token: [0 0 2 | 0 5 | 0 0 0 (bonus rank 1)]  with K = 3, fan-out 2
    profile = AcceptanceProfile("hand", ((9, 0, 0, 2, 0, 5, 0, 0, 0, 1, 0, 0),))
    stats = predict(profile, 3, (2, 2, 2, 2), max_tokens=10, traces=[0])
    assert stats["accepted_histogram"] == [0, 1, 1, 1]
    assert stats["cache_lookups"] == 2 and stats["cache_hits"] == 1  # rank 2 at j=2 held; rank 5 missed


def test_profile_file_round_trip_and_errors(tmp_path):
    profile = synthetic_profile()
    path = tmp_path / "p.json"
    profile.save(path)
    assert load_profile(path) == profile
    assert json.loads(path.read_text())["summary"]["num_traces"] == 3
    with pytest.raises(FileNotFoundError, match="shipped acceptance profile"):
        load_profile("no-such-profile")
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an ssd-acceptance-profile"):
        load_profile(path)
    with pytest.raises(ValueError, match="ranks outside"):
        AcceptanceProfile("bad", ((0, 300),))


@pytest.mark.parametrize("name", ["code", "chat"])
def test_shipped_profiles_load_and_describe_real_pairs(name):
    profile = load_profile(name)
    assert profile.num_tokens >= 1000
    assert "qwen2.5-coder" in profile.source["target"].lower()
    assert 0.3 < profile.summary()["draft_top1_rate"] < 1.0


@pytest.mark.parametrize("batch", [1, 3])
def test_sync_replay_reproduces_the_predicted_rounds_exactly(pair, batch):
    profile = synthetic_profile()
    prompts = PROMPTS[:batch]
    outputs, stats = replayed_run(pair, profile, prompts, async_spec=False)
    expected = predict(profile, K, (0,) * (K + 1), max_tokens=MAX_TOKENS, traces=traces_of(profile, prompts))
    assert stats.accepted_histogram == expected["accepted_histogram"]
    assert all(len(o.token_ids) == MAX_TOKENS for o in outputs)


@pytest.mark.parametrize("backup", ["jit", "fast"])
def test_async_replay_reproduces_acceptance_and_cache_hits(pair, backup):
    profile = synthetic_profile()
    outputs, stats = replayed_run(pair, profile, PROMPTS[:1], async_spec=True, fan_out=2, backup=backup)
    expected = predict(profile, K, (2,) * (K + 1), max_tokens=MAX_TOKENS, traces=traces_of(profile, PROMPTS[:1]))
    assert stats.accepted_histogram == expected["accepted_histogram"]
    assert (stats.cache_hits, stats.cache_lookups) == (expected["cache_hits"], expected["cache_lookups"])
    assert 0 < stats.cache_hits < stats.cache_lookups


def test_async_replay_at_batch_three_follows_the_profile(pair):
    profile = synthetic_profile(num_traces=3)
    _, stats = replayed_run(pair, profile, PROMPTS, async_spec=True, fan_out=2)
    expected = predict(profile, K, (2,) * (K + 1), max_tokens=MAX_TOKENS, traces=traces_of(profile, PROMPTS))
    assert stats.accepted_histogram == expected["accepted_histogram"]
    # rounds right after a batch change speculate afresh (no lookup), so lookups are a subset
    assert stats.cache_lookups <= expected["cache_lookups"]
    assert stats.cache_hits / stats.cache_lookups == pytest.approx(expected["hit_rate"], abs=0.1)
    by_batch = stats.cache_hit_rate_by_batch
    assert 3 in by_batch and set(by_batch) <= {1, 2, 3}
    assert sum(stats.lookups_by_batch[b][1] for b in by_batch) == stats.cache_lookups


def test_replay_refuses_sampling_and_needs_a_draft(pair):
    profile = synthetic_profile()
    with pytest.raises(ValueError, match="needs a draft"):
        LLM(str(pair["target"]), max_model_len=256, acceptance_profile=profile, random_weights=True)
    with pytest.raises(ValueError, match="random weights only"):  # replay would overwrite real output
        LLM(str(pair["target"]), max_model_len=256, draft=str(pair["draft"]), num_speculative_tokens=K,
            draft_colocated=True, acceptance_profile=profile)
    with LLM(str(pair["target"]), max_model_len=256, draft=str(pair["draft"]), num_speculative_tokens=K,
             draft_colocated=True, acceptance_profile=profile, random_weights=True) as llm:
        with pytest.raises(ValueError, match="greedy only"):
            llm.generate([[5, 6]], SamplingParams(temperature=0.8, max_tokens=8), use_tqdm=False)


def test_a_prompt_replays_the_same_trace_in_every_call_and_mode(pair):
    """A/B arms and repeated calls see the same acceptance for the same prompt."""
    profile = synthetic_profile(num_traces=3)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(pair["target"]), max_model_len=256, draft=str(pair["draft"]), num_speculative_tokens=K,
             draft_colocated=True, acceptance_profile=profile, random_weights=True, max_num_seqs=1) as llm:
        histograms = []
        for prompt in (PROMPTS[0], PROMPTS[1], PROMPTS[0]):
            llm.generate([prompt], params, use_tqdm=False)
            histograms.append(llm.last_run_stats.accepted_histogram)
    assert histograms[0] == histograms[2] != histograms[1]


def test_record_stores_the_draft_rank_of_every_generated_token(pair):
    from ssd.benchmark.record_profile import record
    prompts = [[5, 6, 7], [9] * 11, list(range(3, 30))]
    target = str(pair["target"])
    same = record(target, target, prompts, max_tokens=24, batch=2, chat=False, name="same")
    assert same.traces and all(2 <= len(t) <= 24 for t in same.traces)  # an EOS may end one early
    assert all(r == 0 for t in same.traces for r in t)  # a draft identical to the target: always its argmax
    other = record(target, str(pair["draft"]), prompts, max_tokens=24, batch=2, chat=False, name="other")
    assert other.summary()["draft_top1_rate"] < 1.0 and other.source["draft"] == "draft"
    with LLM(target, max_model_len=128) as llm:
        reference = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    with LLM(str(pair["draft"]), max_model_len=128) as draft:
        ids = torch.tensor([prompts[0] + reference.token_ids[:4]])
        logits = draft.runner.forward(ids, torch.arange(ids.shape[1])[None], ids.shape[1] - 1)[0, -1]
    assert other.traces[0][4] == int((logits > logits[reference.token_ids[4]]).sum())
