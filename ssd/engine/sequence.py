"""Per-request state while it is being generated, and what a finished request returns."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ssd.engine.stop_strings import StopStringWatch
from ssd.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generated: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot_s(self) -> float | None:
        if self.finish_time is None or self.first_token_time is None or self.num_generated < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated - 1)


@dataclass(slots=True)
class RequestOutput:
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (an EOS id, a stop token id or string) | "length" (max_tokens)
    metrics: RequestMetrics
    stop_reason: str | int | None = None   # the stop string or stop token id that ended it (None: EOS)


@dataclass(slots=True)
class Sequence:
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    stop_strings: StopStringWatch | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_token_ids[-1]

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_ids[position - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def replace_last(self, token: int) -> None:
        """Acceptance-profile replay: the last generated token, chosen by the draft after the commit."""
        if self.output_ids[-1] == token:
            return
        self.output_ids[-1] = token
        self.finish_on(token)
        if self.finished:
            self.metrics.finish_time = time.perf_counter()

    def append(self, tokens: list[int]) -> int:
        """Append generated tokens, stopping at EOS / a stop token or string / max_tokens. Returns how
        many were kept."""
        kept = 0
        for token in tokens:
            if self.finished:
                break
            self.output_ids.append(token)
            kept += 1
            self.finish_on(token)
        if kept and self.stop_strings is not None:
            kept -= self.cut_at_stop_string(kept)
        now = time.perf_counter()
        if self.metrics.first_token_time is None and kept:
            self.metrics.first_token_time = now
        self.metrics.num_generated = len(self.output_ids)
        if self.finished:
            self.metrics.finish_time = now
        return kept

    def finish_on(self, token: int) -> None:
        """The last output token is `token`: finish if it ends the request."""
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
        elif token in self.params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def cut_at_stop_string(self, new: int) -> int:
        """If the last `new` tokens completed a stop string: finish with the token that did, dropping
        those after it (a speculative round may accept several). Returns how many were dropped."""
        hit = self.stop_strings.check(self.output_ids, new)
        if hit is None:
            return 0
        end, string = hit
        dropped = len(self.output_ids) - end
        del self.output_ids[end:]
        self.finish_reason, self.stop_reason = "stop", string
        return dropped
