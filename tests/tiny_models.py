"""Tiny random Hugging Face models of each supported family, saved as real checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

FAMILIES = {
    "llama": (LlamaConfig, dict(head_dim=16, rope_theta=500000.0, tie_word_embeddings=False,
                                rope_scaling=LLAMA3_SCALING)),
    "qwen2": (Qwen2Config, dict(rope_theta=10000.0, tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, dict(head_dim=16, rope_theta=1000000.0, tie_word_embeddings=False)),
}


def make_checkpoint(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    config_class, family_kwargs = FAMILIES[family]
    cfg = config_class(**{**COMMON, **family_kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF zero-inits some biases/norms; randomise so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.5 * p.shape[-1] ** -0.5 * 4)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def perturbed_copy(source: Path, directory: Path, noise: float, seed: int = 1) -> Path:
    """The source checkpoint with Gaussian noise on every weight: a draft that agrees with its
    target often but not always (exercises both cache hits and misses)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * noise * p.std())
    model.save_pretrained(directory)
    return directory


def add_word_tokenizer(directory: Path, chat_template: str | None = None) -> Path:
    """Token i is the word "w<i>" (0-2: unk, bos, eos); text is the words joined by spaces."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, COMMON["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return directory
