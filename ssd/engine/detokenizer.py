"""Incremental detokenization: the text each new batch of tokens adds, never half a character.

Decoding a short window that starts a few tokens back (not just the new tokens) keeps what
tokenizers do at word starts (leading spaces, byte fallback) as in decoding the whole output."""
from __future__ import annotations

INCOMPLETE = "\ufffd"  # what a decode of a partial UTF-8 sequence ends with


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the window decoded for context starts here ...
        self.read_offset = 0    # ... and the text up to here has been emitted
        self.emitted = ""

    def add(self, token_ids: list[int]) -> str:
        """The new text these tokens complete (may be empty until a character is whole)."""
        self.token_ids.extend(token_ids)
        prefix = self.decode(self.prefix_offset, self.read_offset)
        text = self.decode(self.prefix_offset, len(self.token_ids))
        if len(text) <= len(prefix) or text.endswith(INCOMPLETE):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.emitted += text[len(prefix):]
        return text[len(prefix):]

    def decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)
