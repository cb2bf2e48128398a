"""Tokenizer and stop tokens of a checkpoint (all EOS ids: config.json and generation_config.json)."""
from __future__ import annotations

from pathlib import Path

from ssd.json_files import read_json_object
from ssd.models.model_config import ModelArch


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def eos_token_ids(arch: ModelArch, checkpoint: Path | None) -> frozenset[int]:
    ids = _as_ids(getattr(arch.hf_config, "eos_token_id", None))
    if checkpoint is not None and (checkpoint / "generation_config.json").is_file():
        ids |= _as_ids(read_json_object(checkpoint / "generation_config.json").get("eos_token_id"))
    return frozenset(ids)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(checkpoint: Path | None):
    """The checkpoint's tokenizer, or None when it ships none (presets, bare test checkpoints)."""
    if checkpoint is None or not any((checkpoint / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint)


def tokens_mapped_differently(target_tokenizer, draft_tokenizer) -> list[str]:
    """The target's tokens that the draft's tokenizer maps to another id or not at all."""
    draft_vocab = draft_tokenizer.get_vocab()
    return [token for token, i in target_tokenizer.get_vocab().items() if draft_vocab.get(token) != i]
