"""What the coordinator keeps per request while it runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssd.coordinator.detokenizer import IncrementalDetokenizer
from ssd.coordinator.messages import OutputDelta, TokenDelta


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any]
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None

    def advance(self, delta: TokenDelta, now: float) -> OutputDelta:
        """Take one engine round's tokens; the output to stream to the client."""
        self.output_ids.extend(delta.token_ids)
        if self.first_token_time is None and delta.token_ids:
            self.first_token_time = now
        new_text = self.detokenizer.add(delta.token_ids) if self.detokenizer else ""
        if not delta.finished:
            return OutputDelta(self.request_id, delta.token_ids, new_text)
        return self.final(delta.token_ids, new_text, delta.finish_reason, now)

    def final(self, token_ids: list[int], new_text: str, reason: str, now: float) -> OutputDelta:
        text = None
        if self.detokenizer:
            rest, text = self.detokenizer.finish()
            new_text += rest
        return OutputDelta(self.request_id, token_ids, new_text, reason, self.prompt_token_ids, text,
                           [self.arrival_time, self.first_token_time, now])

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def tpot_s(self, finish_time: float) -> float | None:
        if self.first_token_time is None or len(self.output_ids) < 2:
            return None
        return (finish_time - self.first_token_time) / (len(self.output_ids) - 1)
