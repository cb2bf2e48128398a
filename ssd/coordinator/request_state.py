"""What the coordinator keeps per request while it runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from ssd.coordinator.messages import OutputDelta, TokenDelta
from ssd.engine.detokenizer import IncrementalDetokenizer
from ssd.engine.stop_strings import output_text
from ssd.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    streamed: int = 0   # characters of the detokenizer's text sent to the client

    def advance(self, delta: TokenDelta, now: float) -> OutputDelta:
        """Take one engine round's tokens; the output to stream to the client."""
        self.output_ids.extend(delta.token_ids)
        if self.first_token_time is None and delta.token_ids:
            self.first_token_time = now
        if self.detokenizer:
            self.detokenizer.add(delta.token_ids)
        if not delta.finished:
            return OutputDelta(self.request_id, delta.token_ids, self.stream())
        return self.final(delta, now)

    def stream(self) -> str:
        """New text for the client: what is decoded so far but the last characters, where a stop
        string may have begun (the engine ends the request when one completes; it is not shown)."""
        if self.detokenizer is None:
            return ""
        text = self.detokenizer.emitted
        holdback = max(map(len, self.params.stop), default=1) - 1
        end = max(self.streamed, len(text) - holdback)
        new, self.streamed = text[self.streamed:end], end
        return new

    def final(self, delta: TokenDelta, now: float) -> OutputDelta:
        """The last delta: the rest of the text and the whole text, decoded at once exactly as
        LLM.generate decodes it (without the stop string or stop token's text)."""
        text, new_text = None, ""
        if self.detokenizer:
            text = output_text(self.detokenizer.tokenizer, self.output_ids, self.params, delta.stop_reason)
            sent = self.detokenizer.emitted[:self.streamed]
            new_text = text[len(sent):] if text.startswith(sent) else ""
        return OutputDelta(self.request_id, delta.token_ids, new_text, delta.finish_reason, self.prompt_token_ids,
                           text, [self.arrival_time, self.first_token_time, now], delta.stop_reason)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def tpot_s(self, finish_time: float) -> float | None:
        if self.first_token_time is None or len(self.output_ids) < 2:
            return None
        return (finish_time - self.first_token_time) / (len(self.output_ids) - 1)
