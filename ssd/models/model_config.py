"""Architecture facts of a decoder-only model, read from a Hugging Face config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ssd.json_files import read_json_object

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    hf_config: PretrainedConfig

    @classmethod
    def from_hf_config(cls, cfg: PretrainedConfig) -> "ModelArch":
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture {cfg.model_type!r}; ssd supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=cfg.model_type == "qwen3",
            max_position_embeddings=cfg.max_position_embeddings,
            hf_config=cfg,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ModelArch":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {path!s}")
        model_type = read_json_object(config_file).get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{path!s}: unsupported architecture {model_type!r}; ssd supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        return cls.from_hf_config(AutoConfig.from_pretrained(path))

    def weight_bytes(self, bytes_per_param: int = 2) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_heads * self.head_dim * h + 3 * h * f + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * per_layer + embed + h) * bytes_per_param

    def check_tensor_parallel(self, tp_size: int) -> None:
        for name, n in (("attention heads", self.num_heads), ("kv heads", self.num_kv_heads),
                        ("intermediate size", self.intermediate_size)):
            if n % tp_size:
                raise ValueError(f"tensor parallel size {tp_size} does not divide the model's {name} ({n})")

