"""Synchronous speculative decoding is lossless (CPU, fp32, tiny models)."""
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from ssd import LLM, SamplingParams
from tiny_models import make_checkpoint

PROMPTS = [[5, 6, 7], [9] * 11, list(range(3, 30)), [40, 41], [3], [60, 61, 62, 63, 64, 65]]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return {"target": make_checkpoint("qwen2", root / "target"),
            "draft": make_checkpoint("qwen2", root / "draft", seed=5, num_hidden_layers=1)}


@pytest.fixture(scope="module")
def ar_greedy(pair):
    with LLM(str(pair["target"]), max_model_len=256) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def hf_greedy(path, prompt, n):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def spec_generate(pair, draft: str, k: int, params=GREEDY, prompts=PROMPTS, **kwargs):
    with LLM(str(pair["target"]), max_model_len=256, draft=str(pair[draft]), num_speculative_tokens=k,
             **kwargs) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return outs, llm.last_run_stats


@pytest.mark.parametrize("k", [1, 4, 7])
@pytest.mark.parametrize("draft", ["draft", "target"])
def test_greedy_speculative_matches_autoregressive(pair, ar_greedy, k, draft):
    outs, stats = spec_generate(pair, draft, k, draft_colocated=True, max_num_seqs=4)
    assert [o.token_ids for o in outs] == ar_greedy
    if draft == "target":  # a draft equal to the target is always accepted
        assert stats.acceptance_length == pytest.approx(k + 1, rel=0.05)
    else:
        assert stats.acceptance_length < 1 + 0.5 * k


def test_greedy_speculative_matches_transformers(pair, ar_greedy):
    for prompt, ours in zip(PROMPTS[:3], ar_greedy[:3]):
        assert ours == hf_greedy(pair["target"], prompt, len(ours))


def test_multiprocess_tp2_target_with_draft_process(pair, ar_greedy):
    outs, stats = spec_generate(pair, "draft", 4, tensor_parallel_size=2, max_num_seqs=3)
    assert [o.token_ids for o in outs] == ar_greedy
    assert stats.num_rounds > 0 and len(stats.per_position_acceptance) == 4


def test_stops_at_eos_inside_accepted_tokens_and_max_tokens_mid_window(pair, ar_greedy):
    eos = ar_greedy[2][5]  # a token the target emits mid-run: make it the EOS id
    with LLM(str(pair["target"]), max_model_len=256, draft=str(pair["target"]), num_speculative_tokens=6,
             draft_colocated=True) as llm:
        llm.eos_ids = frozenset({eos})
        outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=n) for n in (7, 40, 40, 3, 11, 40)],
                            use_tqdm=False)
    for out, ref, n in zip(outs, ar_greedy, (7, 40, 40, 3, 11, 40)):
        expected = ref[:n]
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
        assert out.token_ids == expected
        assert out.finish_reason == ("stop" if expected[-1] == eos and eos in ref[:n] else "length")


def exact_second_token_marginal(path, prompt: list[int], temperature: float) -> torch.Tensor:
    """P(token 2) = sum over token 1 of P(token 1) P(token 2 | token 1), from the HF model."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        contexts = torch.cat([torch.tensor([prompt]).expand(p1.numel(), -1), torch.arange(p1.numel())[:, None]], 1)
        p2 = torch.softmax(model(contexts).logits[:, -1].double() / temperature, -1)
    marginal = p1 @ p2
    return marginal / marginal.sum()


@pytest.mark.parametrize("draft_temperature", [None, 0.5])
def test_sampled_speculative_output_follows_target_distribution(pair, draft_temperature):
    """Token 2 comes from the first speculative round (token 1 from prefill): its distribution must be
    the target's exactly, whatever the draft and its temperature."""
    n, temperature, prompt = 4000, 1.0, [7, 8, 9]
    params = [SamplingParams(temperature=temperature, max_tokens=2, seed=i, ignore_eos=True) for i in range(n)]
    outs, _ = spec_generate(pair, "draft", 3, params, [prompt] * n, draft_colocated=True, max_num_seqs=64,
                            draft_temperature=draft_temperature)
    observed = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=97).double()
    p = exact_second_token_marginal(pair["target"], prompt, temperature)
    expected = p * n
    keep = expected > 5  # pool the rare tokens into one cell
    obs_cells = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp_cells = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    assert chisquare(obs_cells.numpy(), exp_cells.numpy()).pvalue > 1e-3
    assert 0.5 * (observed / n - p).abs().sum() < 0.1
