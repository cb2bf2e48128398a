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


def _as_tuple(value: object, kind: type) -> tuple | None:
    """None -> (), one value -> (value,), a list or tuple -> a tuple; anything else -> None."""
    if value is None:
        return ()
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,)
    return tuple(value) if isinstance(value, (list, tuple)) else None


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 (or < GREEDY_TEMPERATURE_EPS) means greedy decoding.
    top_k: keep the k most likely tokens; -1 or 0 disables it.
    top_p: keep the smallest set of most likely tokens whose mass >= top_p; 1 disables it.
    max_tokens: maximum number of generated tokens.
    seed: per-request seed; the same seed gives the same tokens whatever the batch in ar and sync
        modes (async: a request's speculation may depend on the batch and on timing — a join's
        n-gram proposal, backup="auto"'s choice —, which changes sampled tokens, never their
        distribution). Without one, each generate call draws new samples.
    ignore_eos: keep generating after the end-of-sequence token.
    stop: strings that end the request where its text first contains one (a string or a list); the
        output text ends before it, the token ids with the token that completed it.
    stop_token_ids: token ids that end the request (besides the model's EOS ids, also with
        ignore_eos); the token stays in token_ids, its text is left out of the output text.
    include_stop_str_in_output: keep the stop string / stop token's text in the output text.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._validate_temperature()
        self._validate_top_k()
        self._validate_top_p()
        self._validate_max_tokens()
        self._validate_seed()
        self._validate_stops()
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

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

    def _validate_stops(self) -> None:
        """stop / stop_token_ids as tuples (None, one string or id, or a list of them)."""
        stop = _as_tuple(self.stop, str)
        if stop is None or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        ids = _as_tuple(self.stop_token_ids, int)
        if ids is None or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a non-negative int or a list of them, "
                             f"got {self.stop_token_ids!r}")
        self.stop, self.stop_token_ids = stop, ids

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS
