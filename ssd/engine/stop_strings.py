"""Stop strings and the text of a stopped request (vLLM's semantics).

A request with stop strings ends at the first token whose text completes one of them. The check runs
after each round's tokens (several per round under speculation) on an incremental decode of a short
window, not the whole output; only when a string shows up are growing prefixes decoded whole to find
the token that completed it (once per request). The token ids then end with that token, and the text
before the string (with it, include_stop_str_in_output)."""
from __future__ import annotations

from ssd.engine.detokenizer import IncrementalDetokenizer
from ssd.sampling_params import SamplingParams


def first_stop(text: str, strings: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence at or after start of any of the strings: (position, string)."""
    found = [(position, s) for s in strings if (position := text.find(s, start)) >= 0]
    return min(found, key=lambda hit: (hit[0], -len(hit[1]))) if found else None


class StopStringWatch:
    """One request's output, watched for its stop strings."""

    def __init__(self, tokenizer, strings: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.strings = strings
        self.longest = max(len(s) for s in strings)
        self.detokenizer = IncrementalDetokenizer(tokenizer)

    def check(self, output_ids: list[int], new: int) -> tuple[int, str] | None:
        """After the last `new` of output_ids were appended: (how many tokens to keep, the string) when
        they completed a stop string, else None."""
        # a string completed now ends in the new text, so it starts at most longest - 1 characters before
        start = max(0, len(self.detokenizer.emitted) - self.longest + 1)
        self.detokenizer.add(output_ids[len(output_ids) - new:])
        hit = first_stop(self.detokenizer.emitted, self.strings, start)
        if hit is None:
            return None
        for end in range(len(output_ids) - new + 1, len(output_ids)):
            at_end = first_stop(self.tokenizer.decode(output_ids[:end], skip_special_tokens=True), self.strings, start)
            if at_end is not None:
                return end, at_end[1]
        return len(output_ids), hit[1]


def output_text(tokenizer, token_ids: list[int], params: SamplingParams, stop_reason: str | int | None) -> str:
    """A request's text: its tokens decoded at once, without the stop string or the stop token's text
    that ended it (stop_reason) unless include_stop_str_in_output."""
    keep = params.include_stop_str_in_output
    if isinstance(stop_reason, int) and not keep:
        token_ids = token_ids[:-1]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if isinstance(stop_reason, str) and (position := text.find(stop_reason)) >= 0:
        text = text[:position + len(stop_reason) * keep]
    return text
