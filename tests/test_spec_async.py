"""Asynchronous speculative speculative decoding is lossless (CPU, multi-process, tiny models)."""
import pytest
import torch
from scipy.stats import chisquare

from ssd import LLM, SamplingParams
from test_spec_sync import exact_second_token_marginal
from tiny_models import make_checkpoint, perturbed_copy

PROMPTS = [[5, 6, 7], [9] * 11, list(range(3, 30)), [40, 41], [3], [60, 61, 62, 63, 64, 65]]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target = make_checkpoint("qwen2", root / "target")
    return {"target": target, "near": perturbed_copy(target, root / "near", noise=0.08),
            "draft": make_checkpoint("qwen2", root / "draft", seed=5, num_hidden_layers=1)}


def prompts_for(batch: int) -> list[list[int]]:
    return [PROMPTS[i % len(PROMPTS)] + [i % 90] for i in range(batch)]


def ar_outputs(pair, prompts, params=GREEDY):
    with LLM(str(pair["target"]), max_model_len=256, max_num_seqs=16) as llm:
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def async_generate(pair, draft, k, prompts, params=GREEDY, tp=1, max_num_seqs=16, max_model_len=256, **options):
    with LLM(str(pair["target"]), max_model_len=max_model_len, draft=str(pair[draft]), num_speculative_tokens=k,
             async_spec=True, tensor_parallel_size=tp, max_num_seqs=max_num_seqs, **options) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.token_ids for o in outs], llm.last_run_stats


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("k", [1, 6])
def test_greedy_async_matches_autoregressive(pair, batch, k):
    prompts = prompts_for(batch)
    outs, stats = async_generate(pair, "near", k, prompts, fan_out=3)
    assert outs == ar_outputs(pair, prompts)
    assert 0 < stats.cache_hits < stats.cache_lookups  # hits and misses both happened


@pytest.mark.parametrize("options", [
    dict(fan_out_list=[2, 0, 1, 0, 3, 1, 4]),                       # zeros: no guesses there
    dict(fan_out_list=[3, 3, 0, 0, 0, 0, 0], fan_out_list_miss=[1, 0, 0, 0, 0, 0, 6]),
    dict(fan_out=3, fan_out_shape="geometric"),
    dict(fan_out=2, backup="fast"),
    dict(fan_out=2, backup="auto"),
    dict(fan_out=3, draft_quantization="fp8"),                      # the draft's weights in fp8
    dict(fan_out=3, draft_vocabulary=60),                           # the draft's head over 60 of 97 tokens
])
def test_greedy_async_matches_autoregressive_for_fanouts_and_backups(pair, options):
    prompts = prompts_for(5)
    outs, stats = async_generate(pair, "near", 6, prompts, max_num_seqs=3, **options)
    assert outs == ar_outputs(pair, prompts)
    assert stats.cache_lookups > 0
    backup = options.get("backup", "jit")   # the rounds that missed, counted by the backup that answered
    assert stats.jit_backups + stats.fast_backups > 0
    assert backup == "auto" or (stats.fast_backups if backup == "jit" else stats.jit_backups) == 0


def test_async_with_tp2_target_and_agreeing_draft_hits_every_round(pair):
    prompts = prompts_for(3)
    outs, stats = async_generate(pair, "target", 4, prompts, tp=2, fan_out=1)
    assert outs == ar_outputs(pair, prompts)
    assert stats.cache_hits == stats.cache_lookups > 0  # draft == target: the bonus is its top guess
    assert stats.acceptance_length == pytest.approx(5.0)


def test_paper_layout_tp4_target_plus_draft_process_matches_autoregressive(tmp_path):
    """The 70B layout in miniature (issue: 4 target ranks + the draft on a fifth): a target at TP=4
    (8 query / 4 KV heads: one KV head per rank) and a draft process, greedy async equal to AR at TP=1."""
    heads = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    pair = {"target": make_checkpoint("qwen3", tmp_path / "target", **heads)}
    pair["draft"] = perturbed_copy(pair["target"], tmp_path / "draft", noise=0.08)
    prompts = prompts_for(3)
    outs, stats = async_generate(pair, "draft", 4, prompts, tp=4, max_num_seqs=4, fan_out=2)
    assert outs == ar_outputs(pair, prompts)
    assert 0 < stats.cache_hits < stats.cache_lookups


@pytest.mark.parametrize("options", [
    dict(fan_out=4, sampler_x=1.0),
    dict(fan_out=4, sampler_x=0.3),
    dict(fan_out=4, backup="fast"),
    dict(fan_out=0, sampler_x=1.0),  # every lookup misses: the jit backup answers
    dict(fan_out=4, draft_quantization="fp8"),
    dict(fan_out=4, draft_vocabulary=50),   # q = 0 outside the kept tokens: the residual covers them
])
def test_sampled_async_output_follows_target_distribution(pair, options):
    n, prompt = 3000, [7, 8, 9]
    params = [SamplingParams(temperature=1.0, max_tokens=3, seed=i, ignore_eos=True) for i in range(n)]
    outs, stats = async_generate(pair, "draft", 2, [prompt] * n, params, max_num_seqs=64, **options)
    observed = torch.bincount(torch.tensor([o[1] for o in outs]), minlength=97).double()
    p = exact_second_token_marginal(pair["target"], prompt, 1.0)
    expected = p * n
    keep = expected > 5
    obs_cells = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp_cells = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    assert chisquare(obs_cells.numpy(), exp_cells.numpy()).pvalue > 1e-3
    assert 0.5 * (observed / n - p).abs().sum() < 0.1


def filtered(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """probs [..., V] through top-k, then top-p over the top-k distribution (as the sampler), renormalised."""
    sorted_probs, index = probs.sort(-1, descending=True)
    sorted_probs = torch.where(torch.arange(probs.shape[-1]) < top_k, sorted_probs, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    sorted_probs = torch.where(sorted_probs.cumsum(-1) - sorted_probs < top_p, sorted_probs, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, index, sorted_probs)
    return out / out.sum(-1, keepdim=True)


def exact_third_token_marginal(path, prompt: list[int], top_k: int, top_p: float) -> torch.Tensor:
    """P(token 3) under the target's filtered sampling (temperature 1), from the HF model."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    step = lambda contexts: filtered(torch.softmax(model(contexts).logits[:, -1].double(), -1), top_k, top_p)  # noqa: E731
    with torch.no_grad():
        p1 = step(torch.tensor([prompt]))[0]
        firsts = p1.nonzero()[:, 0]
        p2 = step(torch.cat([torch.tensor([prompt]).expand(len(firsts), -1), firsts[:, None]], 1))   # [T1, V]
        pairs = [(a, b) for i, a in enumerate(firsts.tolist()) for b in p2[i].nonzero()[:, 0].tolist()]
        weight = torch.tensor([float(p1[a] * p2[i, b]) for i, a in enumerate(firsts.tolist())
                               for b in p2[i].nonzero()[:, 0].tolist()], dtype=torch.float64)
        p3 = step(torch.tensor([prompt + [a, b] for a, b in pairs]))
    marginal = weight @ p3
    return marginal / marginal.sum()


def test_filtered_sampling_from_cache_hits_follows_target_distribution(pair):
    """top-k + top-p: the tree's filtered steps keep their distributions compact (the largest
    logits only) and the answering branch's is widened at lookup. Token 3 comes from the second
    round — from the cache on a hit — whenever the first round did not accept both drafts. All
    sequences run in one batch: a new one joining would re-speculate every row afresh."""
    n, prompt, top_k, top_p = 3000, [7, 8, 9], 12, 0.9
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, max_tokens=3, seed=i, ignore_eos=True)
              for i in range(n)]
    outs, stats = async_generate(pair, "near", 2, [prompt] * n, params, max_num_seqs=n, max_model_len=64,
                                  fan_out=4)
    assert stats.cache_hits > n // 10 and stats.cache_hits < stats.cache_lookups
    observed = torch.bincount(torch.tensor([o[2] for o in outs]), minlength=97).double()
    p = exact_third_token_marginal(pair["target"], prompt, top_k, top_p)
    expected = p * n
    keep = expected > 5
    assert observed[p == 0].sum() == 0   # nothing outside the target's filtered support
    obs_cells = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp_cells = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    assert chisquare(obs_cells.numpy(), exp_cells.numpy()).pvalue > 1e-3
    assert 0.5 * (observed / n - p).abs().sum() < 0.1


def test_online_geometric_fanout_refits_and_stays_exact(pair):
    """a and r are estimated from the run itself; the draft gets new lists of the same budget."""
    prompts = prompts_for(3)
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    outs, stats = async_generate(pair, "near", 4, prompts, params, fan_out=3, fan_out_shape="geometric")
    assert outs == ar_outputs(pair, prompts, params)
    assert stats.fanout_updates >= 1 and stats.cache_hits > 0


def test_finished_sequences_leave_the_others_speculation_in_place(pair):
    """Sequences stopping at different rounds: the survivors keep their speculation and cache
    (rows compacted with the KV slots), so only the first round speculates from scratch."""
    prompts = prompts_for(4)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 17, 26, 40)]
    outs, stats = async_generate(pair, "near", 4, prompts, params, fan_out=2)
    assert outs == ar_outputs(pair, prompts, params)
    assert stats.fresh_speculations == 1
    assert 0 < stats.cache_hits < stats.cache_lookups


def test_kept_rows_carry_their_draft_kv_through_slot_moves(pair):
    """Draft = target: every window is accepted in full and every lookup hits — also for rows whose
    slot moved when another sequence finished (their in-flight window's KV must move with them)."""
    pair = {**pair, "same": pair["target"]}
    prompts = prompts_for(4)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 17, 26, 40)]
    outs, stats = async_generate(pair, "same", 4, prompts, params, fan_out=1)
    assert outs == ar_outputs(pair, prompts, params)
    assert stats.num_accepted == 4 * stats.num_drafts
    assert stats.cache_hits == stats.cache_lookups > 0


def test_sequences_joining_a_batch_in_flight_leave_the_others_speculation(pair):
    """More prompts than slots: each admission speculates only for the new rows (JOIN); the rows in
    flight keep their cache hits. Greedy output still equals AR; only the first batch is fresh."""
    prompts = prompts_for(10)
    params = [SamplingParams(temperature=0, max_tokens=8 + 5 * (i % 4), ignore_eos=True) for i in range(10)]
    outs, stats = async_generate(pair, "near", 3, prompts, params, max_num_seqs=4, fan_out=3)
    assert outs == ar_outputs(pair, prompts, params)
    assert stats.fresh_speculations == 1 and stats.joined_rows == 6
    assert 0 < stats.cache_hits < stats.cache_lookups


def test_greedy_rows_joining_rows_drafted_for_a_finished_sampled_row(pair):
    """The batch's speculation carries probabilities (one of its rows sampled); that row finishes and a
    greedy row joins, drafted without them: the joined reply mixes the two (it crashed), greedy stays AR."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=1, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    outs, stats = async_generate(pair, "draft", 3, prompts, params, max_num_seqs=2, fan_out=2)
    assert stats.joined_rows == 1
    assert [outs[0], outs[2]] == ar_outputs(pair, [prompts[0], prompts[2]], [params[0], params[2]])


def test_sampled_rows_joining_greedy_rows_in_flight_stay_exact(pair):
    """A batch of greedy rows in flight (drafted without probabilities) joined by sampled rows: the
    rows in flight get one-hot draft probabilities; the sampled outputs follow the target."""
    n, prompt = 400, [7, 8, 9]
    params = [SamplingParams(temperature=0, max_tokens=12 + 4 * i, ignore_eos=True) for i in range(4)] + \
        [SamplingParams(temperature=1.0, max_tokens=3, seed=i, ignore_eos=True) for i in range(n)]
    outs, stats = async_generate(pair, "draft", 2, [prompt] * (n + 4), params, max_num_seqs=4, fan_out=4)
    assert stats.joined_rows > n // 2   # (a batch whose rows all finished together starts afresh)
    assert outs[:4] == ar_outputs(pair, [prompt] * 4, params[:4])
    observed = torch.bincount(torch.tensor([o[1] for o in outs[4:]]), minlength=97).double()
    p = exact_second_token_marginal(pair["target"], prompt, 1.0)
    keep = p * n > 5
    obs_cells = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp_cells = torch.cat([(p * n)[keep], (p * n)[~keep].sum(0, keepdim=True)])
    assert chisquare(obs_cells.numpy(), exp_cells.numpy()).pvalue > 1e-3
