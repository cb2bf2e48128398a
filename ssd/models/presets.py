"""Random-weight presets at the real shapes of public checkpoints (for GPU benchmarks)."""
from __future__ import annotations

from transformers import LlamaConfig, Qwen3Config

from ssd.models.model_config import ModelArch

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    "llama-3.1-70b": dict(family="llama", num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256,
                          tie_word_embeddings=False),
    "llama-3.1-8b": dict(family="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False),
    "llama-3.2-1b": dict(family="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True),
    "qwen3-32b": dict(family="qwen3", num_hidden_layers=64, hidden_size=5120, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, intermediate_size=25600, vocab_size=151936,
                      tie_word_embeddings=False),
    "qwen3-0.6b": dict(family="qwen3", num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       tie_word_embeddings=True),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_arch(name: str) -> ModelArch:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    family = spec.pop("family")
    if family == "llama":
        cfg = LlamaConfig(**spec, rms_norm_eps=1e-5, max_position_embeddings=131072,
                          rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE), bos_token_id=128000,
                          eos_token_id=[128001, 128008, 128009])
    else:
        cfg = Qwen3Config(**spec, rms_norm_eps=1e-6, max_position_embeddings=40960,
                          rope_theta=1000000.0, bos_token_id=151643, eos_token_id=[151645, 151643])
    return ModelArch.from_hf_config(cfg)
