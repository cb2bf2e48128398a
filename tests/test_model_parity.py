"""Our models against Hugging Face transformers (CPU, fp32)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from ssd import LLM, SamplingParams

FAMILIES = ["llama", "qwen2", "qwen3"]
PROMPTS = [[5, 6, 7], [9] * 11, list(range(3, 30)), [40, 41], [77] + list(range(50, 90, 3))]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def our_logits(llm: LLM, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return llm.runner.forward(ids, positions, ids.shape[1] - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_checkpoints, family):
    ids = torch.randint(0, 97, (3, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(tiny_checkpoints[family])(ids).logits
    with LLM(str(tiny_checkpoints[family]), max_model_len=256) as llm:
        ours = our_logits(llm, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_changes_logits(tiny_checkpoints, tmp_path):
    """The llama3 frequency scaling must really be applied (positions beyond the original context)."""
    from tiny_models import make_checkpoint
    plain = make_checkpoint("llama", tmp_path / "plain", rope_scaling=None)
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(2))
    with LLM(str(tiny_checkpoints["llama"]), max_model_len=256) as scaled, LLM(str(plain), max_model_len=256) as unscaled:
        assert not torch.allclose(our_logits(scaled, ids)[:, -1], our_logits(unscaled, ids)[:, -1], atol=1e-3)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_matches_transformers_generate(tiny_checkpoints, family):
    model = hf_model(tiny_checkpoints[family])
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    with LLM(str(tiny_checkpoints[family]), max_model_len=256) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(model, prompt, 64)
        assert out.finish_reason == "length"


def test_tensor_parallel_2_matches_single_rank(tiny_checkpoints):
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(str(tiny_checkpoints["qwen2"]), max_model_len=128) as one:
        ref_logits, ref_out = our_logits(one, ids), one.generate(PROMPTS, params, use_tqdm=False)
    with LLM(str(tiny_checkpoints["qwen2"]), max_model_len=128, tensor_parallel_size=2) as two:
        logits, out = our_logits(two, ids), two.generate(PROMPTS, params, use_tqdm=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref_out]


def test_continuous_batching_with_eos_and_mixed_max_tokens_matches_transformers(tiny_checkpoints):
    """More prompts than slots, sequences stopping at an EOS id or at different max_tokens: the
    decode loop runs one step ahead of the host, so every stop must flush and compact correctly."""
    model = hf_model(tiny_checkpoints["llama"])
    references = [hf_greedy(model, prompt, 40) for prompt in PROMPTS]
    eos = references[0][12]
    max_tokens = [40, 7, 25, 40, 3]

    def expected(reference, limit):
        out = reference[:limit]
        return out[: out.index(eos) + 1] if eos in out else out
    with LLM(str(tiny_checkpoints["llama"]), max_model_len=256, max_num_seqs=2) as llm:
        llm.eos_ids = frozenset({eos})
        outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens],
                            use_tqdm=False)
    for reference, limit, out in zip(references, max_tokens, outs):
        assert out.token_ids == expected(reference, limit)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == eos else "length")
    assert any(out.finish_reason == "stop" for out in outs)
