"""A checkpoint saved in several files with an index (how large models ship) loads like one file."""
import logging

import pytest
from transformers import AutoModelForCausalLM

from ssd import LLM, SamplingParams
from ssd.loading.checkpoint import CheckpointError
from tiny_models import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15]]


def sharded_copy(source, directory):
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(directory, max_shard_size="50KB")
    return directory


@pytest.mark.parametrize("tp", [1, 2])
def test_a_checkpoint_in_several_files_loads_like_one(tmp_path, caplog, tp):
    single = make_checkpoint("llama", tmp_path / "single")
    sharded = sharded_copy(single, tmp_path / "sharded")
    files = sorted(sharded.glob("*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(files) > 2
    with LLM(str(single), max_model_len=64) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    with caplog.at_level(logging.INFO, logger="ssd.loading.checkpoint"):
        with LLM(str(sharded), max_model_len=64, tensor_parallel_size=tp) as llm:  # each rank: its slices
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    assert f"file {len(files)} of {len(files)} ({files[-1].name}" in caplog.text  # progress on long loads


def test_a_missing_file_of_a_sharded_checkpoint_is_named(tmp_path):
    sharded = sharded_copy(make_checkpoint("llama", tmp_path / "single"), tmp_path / "sharded")
    lost = sorted(sharded.glob("*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(CheckpointError, match=f"missing \\({lost.name}\\); incomplete download"):
        LLM(str(sharded), max_model_len=64)
