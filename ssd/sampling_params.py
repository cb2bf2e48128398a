"""Per-request sampling parameters (vLLM-style)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Temperatures below this are treated as greedy: dividing logits by them is
# numerically meaningless and the result equals argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 (or < GREEDY_TEMPERATURE_EPS) means greedy decoding.
    top_k: keep the k most likely tokens; -1 or 0 disables it.
    top_p: keep the smallest set of most likely tokens whose mass >= top_p; 1 disables it.
    max_tokens: maximum number of generated tokens.
    seed: per-request seed; the same seed gives the same tokens whatever the batch.
    ignore_eos: keep generating after the end-of-sequence token.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self._validate_temperature()
        self._validate_top_k()
        self._validate_top_p()
        self._validate_max_tokens()
        self._validate_seed()
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    def _validate_temperature(self) -> None:
        if not _is_real(self.temperature) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")

    def _validate_top_k(self) -> None:
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")

    def _validate_top_p(self) -> None:
        if not _is_real(self.top_p) or not math.isfinite(self.top_p):
            raise ValueError(f"top_p must be a finite number, got {self.top_p!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def _validate_max_tokens(self) -> None:
        if not _is_int(self.max_tokens):
            raise ValueError(f"max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def _validate_seed(self) -> None:
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS
