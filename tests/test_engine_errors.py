"""Bad input fails early with a message that says what is wrong."""
import gc
import json
import logging

import pytest
import torch

from ssd import LLM, SamplingParams
from ssd.models.model_config import UnsupportedModelError
from ssd.models.presets import preset_arch
from tiny_models import add_word_tokenizer, make_checkpoint


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a random-weights preset"):
        LLM(str(tmp_path / "nowhere"))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        preset_arch("llama-9000")


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LLM(str(tmp_path))


def test_directory_without_weights_is_refused(tiny_checkpoints, tmp_path):
    (tmp_path / "config.json").write_text((tiny_checkpoints["llama"] / "config.json").read_text())
    with pytest.raises(RuntimeError, match="safetensors"):
        LLM(str(tmp_path), max_model_len=64)


def test_prompt_longer_than_the_context_is_refused(tiny_checkpoints):
    with LLM(str(tiny_checkpoints["llama"]), max_model_len=64) as llm:
        with pytest.raises(ValueError, match="max_model_len is 64"):
            llm.generate([[5] * 60], SamplingParams(max_tokens=10), use_tqdm=False)
        with pytest.raises(ValueError, match="token ids must lie in"):
            llm.generate([[5, 1000]], SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate(["text prompt"], SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(TypeError, match=r"one token-id prompt is \[\[5, 6, 7\]\]"):
            llm.generate([5, 6, 7], SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(TypeError, match="a prompt is a string or a list of token ids, got None"):
            llm.generate([[5, 6], None], SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
            llm.generate([[5, 6]], {"max_tokens": 2}, use_tqdm=False)
        assert llm.generate([torch.tensor([5, 6])], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids


def test_ar_prompt_and_output_may_fill_max_model_len_exactly(tiny_checkpoints):
    """prompt + max_tokens = max_model_len fits (as in vLLM); one more position does not."""
    prompt = [(7 * i) % 90 + 3 for i in range(60)]
    with LLM(str(tiny_checkpoints["llama"]), max_model_len=64, enforce_eager=True) as llm:
        full = llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        with pytest.raises(ValueError, match="needs 65 positions but max_model_len is 64"):
            llm.generate([prompt + [5]], SamplingParams(max_tokens=4), use_tqdm=False)
    with LLM(str(tiny_checkpoints["llama"]), max_model_len=256, enforce_eager=True) as llm:
        roomy = llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(full.token_ids) == 4 and full.token_ids == roomy.token_ids
    path = str(tiny_checkpoints["llama"])   # a speculative engine: only its AR mode has that room
    with LLM(path, max_model_len=64, enforce_eager=True, draft=path, num_speculative_tokens=2) as llm:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        assert llm.generate([prompt], params, use_tqdm=False, mode="ar")[0].token_ids == full.token_ids
        with pytest.raises(ValueError, match="needs 67 positions but max_model_len is 64"):
            llm.generate([prompt], params, use_tqdm=False)


def test_max_model_len_stays_within_the_models_context(tiny_checkpoints, tmp_path):
    """The tiny models were trained for 512 positions: no default or request may go past that."""
    target = tiny_checkpoints["llama"]
    with pytest.raises(ValueError, match="exceeds the models' context of 512"):
        LLM(str(target), max_model_len=513)
    with pytest.raises(ValueError, match="positive"):
        LLM(str(target), max_model_len=0)
    with LLM(str(target)) as llm:  # the default (2048) shrinks to the context
        assert llm.max_model_len == 512
        with pytest.raises(ValueError, match="max_model_len is 512"):
            llm.generate([[5] * 500], SamplingParams(max_tokens=20), use_tqdm=False)
    short_draft = make_checkpoint("llama", tmp_path / "short", max_position_embeddings=128)
    with pytest.raises(ValueError, match="context of 128"):  # the draft's context counts too
        LLM(str(target), max_model_len=256, draft=str(short_draft), num_speculative_tokens=2,
            draft_colocated=True)


def test_a_draft_with_another_tokenizer_is_flagged(tmp_path, caplog):
    target = add_word_tokenizer(make_checkpoint("llama", tmp_path / "target"))
    twin = add_word_tokenizer(make_checkpoint("llama", tmp_path / "twin", seed=1))
    other = add_word_tokenizer(make_checkpoint("llama", tmp_path / "other", seed=1))
    tokenizer_file = other / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    vocab = spec["model"]["vocab"]
    vocab["w3"], vocab["w4"] = vocab["w4"], vocab["w3"]  # same size, two tokens swapped
    tokenizer_file.write_text(json.dumps(spec))
    for draft, warned in ((twin, False), (other, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ssd.engine.llm"):
            LLM(str(target), draft=str(draft), num_speculative_tokens=2, draft_colocated=True,
                max_model_len=64).shutdown()
        assert ("maps 2 of the target's 97 tokens differently" in caplog.text) == warned, caplog.text


def test_a_layout_with_more_gpus_than_visible_is_refused(tiny_checkpoints, monkeypatch):
    """Checked before any process starts (a worker on a missing GPU would die with a CUDA error)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    path = str(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match="needs 3 GPUs .* but 2 are visible"):
        LLM(path, device="cuda", tensor_parallel_size=2, draft=path, num_speculative_tokens=2, async_spec=True)
    with pytest.raises(ValueError, match="needs 3 GPUs"):
        LLM(path, device="cuda", tensor_parallel_size=2, first_gpu=1)


def test_invalid_sampling_parameters_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_speculation_and_parallel_settings_are_checked(tiny_checkpoints, tmp_path):
    path = str(tiny_checkpoints["qwen2"])
    with pytest.raises(ValueError, match="needs a draft"):
        LLM(path, num_speculative_tokens=3)
    with pytest.raises(ValueError, match="cannot be co-located"):
        LLM(path, draft=path, num_speculative_tokens=3, draft_colocated=True, async_spec=True)
    other_vocab = make_checkpoint("qwen2", tmp_path / "other", vocab_size=50)
    with pytest.raises(ValueError, match="draft vocabulary"):
        LLM(path, draft=str(other_vocab), num_speculative_tokens=2)
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide"):
        LLM(path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="must lie in"):
        LLM(path, draft=path, num_speculative_tokens=2, async_spec=True, sampler_x=1.5)
    vocab = json.loads((tiny_checkpoints["qwen2"] / "config.json").read_text())["vocab_size"]
    with pytest.raises(ValueError, match=f"fan-out of {vocab} guesses"):
        LLM(path, draft=path, num_speculative_tokens=2, async_spec=True, fan_out=vocab)


def test_misspelled_keywords_are_named():
    """Checked before anything loads: no checkpoint is needed to be told."""
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['max_num_seq'\]"):
        LLM("llama-3.2-1b", max_num_seq=4)
    with pytest.raises(TypeError, match=r"\['fanout'\]"):
        LLM("llama-3.2-1b", draft="llama-3.2-1b", num_speculative_tokens=2, async_spec=True, fanout=3)


def _use_and_drop(path: str) -> list[int]:
    llm = LLM(path, max_model_len=64, tensor_parallel_size=2)
    return llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].token_ids


def test_an_engine_dropped_without_shutdown_is_collected(tiny_checkpoints):
    """Nothing (the worker watch's thread included) keeps a dropped LLM alive: its __del__ ends its
    workers, so the next engine with workers may start in this process."""
    path = str(tiny_checkpoints["qwen2"])
    first = _use_and_drop(path)
    gc.collect()
    assert _use_and_drop(path) == first


@pytest.mark.parametrize("tasks", [1, 3])
def test_srun_task_count_that_does_not_fit_the_layout_is_refused(tiny_checkpoints, monkeypatch, tasks):
    """Under srun the launcher decides the process count: a target + remote draft needs exactly 2."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", str(tasks))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    checkpoint = str(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match=rf"rank 0 of {tasks} processes, but this configuration runs 2 "
                                         r"\(1 target rank\(s\) \+ 1 draft rank\)"):
        LLM(checkpoint, draft=checkpoint, num_speculative_tokens=2, async_spec=True, max_model_len=64)


def test_two_engines_in_one_process(tiny_checkpoints):
    """A second engine with worker processes is refused while the first runs; one without workers
    runs beside it and, shut down, leaves the first's process group alone."""
    path, greedy = str(tiny_checkpoints["qwen2"]), SamplingParams(temperature=0, max_tokens=4)
    with LLM(path, max_model_len=64, tensor_parallel_size=2) as first:
        before = first.generate([[5, 6]], greedy, use_tqdm=False)[0].token_ids
        with pytest.raises(RuntimeError, match="already initialised in this process"):
            LLM(path, max_model_len=64, tensor_parallel_size=2)
        with LLM(path, max_model_len=64) as bare:
            assert bare.generate([[5, 6]], greedy, use_tqdm=False)[0].token_ids == before
        assert first.generate([[5, 6]], greedy, use_tqdm=False)[0].token_ids == before
