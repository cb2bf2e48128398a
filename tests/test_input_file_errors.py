"""A bad input file (dataset, checkpoint config, profile, token ranking) is refused in one line that
names the file (and line), in the exception types bench.py reports without a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssd import LLM, SamplingParams
from ssd.benchmark import datasets
from ssd.benchmark.cli import parse_args
from ssd.benchmark.datasets import DatasetError, apply_chat_template, load_prompts
from ssd.benchmark.runner import BenchmarkSetupError, build_llm, check_prompts_fit, prepare_prompts
from ssd.loading.generation_info import eos_token_ids
from ssd.models.model_config import ModelArch
from ssd.spec.acceptance_profile import load_profile
from ssd.spec.draft_vocabulary import load_ranking
from tiny_models import add_word_tokenizer, make_checkpoint

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
BAD_JSON = "{oops"


def dataset_file(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def config_for(dataset: Path, numseqs: int = 4):
    return parse_args(["--device", "cpu", "--dataset", str(dataset), "--numseqs", str(numseqs)])


def dataset_refusal(path: Path) -> str:
    with pytest.raises(DatasetError) as refused:
        load_prompts(config_for(path))
    message = str(refused.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- datasets

@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_dataset_file_is_named(tmp_path, content):
    path = dataset_file(tmp_path, content)
    with pytest.raises(DatasetError, match=f"{path} has no prompts"):
        prepare_prompts(config_for(path), target="unused")


def test_another_empty_source_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(datasets, "iter_sharegpt_prompts", lambda: iter(()))
    with pytest.raises(DatasetError, match="dataset sharegpt has no prompts"):
        load_prompts(parse_args(["--device", "cpu", "--sharegpt"]))


def test_a_malformed_line_is_named_with_its_number(tmp_path):
    path = dataset_file(tmp_path, '{"text": "fine"}\n\n{"text": oops}\n')
    assert dataset_refusal(path).startswith(f"{path}:3: not valid JSON (")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "an array"), ('"x"', "a string"), ("3", "a number"),
                                        ("null", "null"), ("true", "a boolean")])
def test_a_line_that_is_not_an_object_is_named(tmp_path, line, kind):
    path = dataset_file(tmp_path, f'{{"text": "fine"}}\n{line}\n')
    assert dataset_refusal(path) == f'{path}:2: expected a JSON object with a "text" field, got {kind}'


def test_a_file_that_is_not_utf8_is_named_with_the_line(tmp_path):
    path = dataset_file(tmp_path, '{"text": "fine"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    message = dataset_refusal(path)
    assert message.startswith(f"{path}:2: not UTF-8 text (byte 0xe9") and "save the file as UTF-8" in message


def test_a_file_that_cannot_be_opened_is_named(tmp_path):
    """(A directory here: tests may run as root, whom permissions do not stop.)"""
    with pytest.raises(DatasetError, match=f"cannot read {tmp_path}: Is a directory"):
        list(datasets.iter_jsonl_prompts(tmp_path))


def test_an_empty_text_field_is_named_with_its_line(tmp_path):
    path = dataset_file(tmp_path, '{"text": "fine"}\n{"text": "  "}\n')
    assert dataset_refusal(path) == f"{path}:2: the 'text' field is empty"


def test_a_good_file_still_loads(tmp_path):
    path = dataset_file(tmp_path, '{"text": "a"}\n\n{"prompt": "b"}\n')
    assert load_prompts(config_for(path, numseqs=2)) == ["a", "b"]


# ---------------------------------------------------------------- chat template

def test_chat_template_without_one_in_the_tokenizer_is_refused(tmp_path):
    add_word_tokenizer(tmp_path)
    with pytest.raises(DatasetError) as refused:
        apply_chat_template(["w3 w4"], str(tmp_path))
    assert str(refused.value) == f"the target tokenizer ({tmp_path}) has no chat template: drop --chat_template"


def test_chat_template_without_a_tokenizer_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path} has none: drop --chat_template"):
        apply_chat_template(["w3 w4"], str(tmp_path))


def test_chat_template_of_the_tokenizer_is_applied(tmp_path):
    add_word_tokenizer(tmp_path, chat_template="{{ messages[0]['content'] }} w5")
    assert apply_chat_template(["w3 w4"], str(tmp_path)) == ["w3 w4 w5"]


# ---------------------------------------------------------------- prompts that do not fit

@pytest.fixture(scope="module")
def small_llm(tmp_path_factory):
    with LLM(str(make_checkpoint("llama", tmp_path_factory.mktemp("fit") / "llama")), max_model_len=64) as llm:
        yield llm


def fit_refusal(llm, prompt: list[int], random_prompts: bool = True) -> str:
    with pytest.raises(BenchmarkSetupError) as refused:
        check_prompts_fit(llm, [prompt], [SamplingParams(max_tokens=10)], random_prompts)
    return str(refused.value)


def test_an_empty_prompt_gets_no_length_hint(small_llm):
    assert fit_refusal(small_llm, []) == "prompt 0 is empty"


def test_a_too_long_prompt_gets_the_length_hint(small_llm):
    message = fit_refusal(small_llm, [5] * 60)
    assert "max_model_len is 64" in message and "(shorten --input_len / --output_len" in message


def test_a_too_long_dataset_prompt_is_not_told_to_shorten_input_len(small_llm):
    """--input_len only sizes --random prompts: a text dataset's too-long prompt gets the hints that apply."""
    message = fit_refusal(small_llm, [5] * 60, random_prompts=False)
    assert "--input_len" not in message and "(shorten --output_len, pick shorter prompts" in message


# ---------------------------------------------------------------- JSON files of models and options

def bad_json_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(BAD_JSON)
    return path


def test_a_malformed_config_json_is_a_one_line_setup_error(tmp_path):
    """ValueError is what build_llm turns into the BenchmarkSetupError bench.py reports in one line."""
    path = bad_json_file(tmp_path, "config.json")
    config = parse_args(["--device", "cpu", "--target", str(tmp_path), "--random"])
    with pytest.raises(BenchmarkSetupError, match=f"{path}: not valid JSON"):
        build_llm(config, config.arms[0], str(tmp_path), None)


def read_weight_index(directory: Path):
    from ssd.loading.checkpoint import checkpoint_files
    return checkpoint_files(directory)


def read_generation_config(directory: Path):
    return eos_token_ids(ModelArch.from_checkpoint(make_checkpoint("llama", directory / "model")), directory)


@pytest.mark.parametrize("name, read", [
    ("config.json", ModelArch.from_checkpoint),
    ("model.safetensors.index.json", read_weight_index),
    ("generation_config.json", read_generation_config),
    ("profile.json", lambda directory: load_profile(directory / "profile.json")),
    ("ranking.json", lambda directory: load_ranking(directory / "ranking.json", vocab_size=97)),
], ids=["config", "weight_index", "generation_config", "profile", "ranking"])
def test_a_malformed_json_file_is_named(tmp_path, name, read):
    path = bad_json_file(tmp_path, name)
    with pytest.raises(ValueError, match=f"{path}: not valid JSON \\("):
        read(tmp_path)


def test_a_profile_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path} is not an ssd-acceptance-profile file"):
        load_profile(path)


# ---------------------------------------------------------------- end to end

def test_bench_reports_a_bad_dataset_line_in_one_line(tmp_path):
    target = make_checkpoint("llama", tmp_path / "target")
    path = dataset_file(tmp_path, '{"text": "fine"}\n[1, 2]\n')
    done = subprocess.run(["timeout", "300", sys.executable, str(BENCH), "--target", str(target), "--device", "cpu",
                           "--dataset", str(path), "--numseqs", "2"], capture_output=True, text=True, timeout=320)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f'{path}:2: expected a JSON object with a "text" field' in output and "Traceback" not in output, output
