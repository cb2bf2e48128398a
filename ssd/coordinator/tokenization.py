"""Prompts to token ids in the coordinator: text through the target tokenizer, chat through its
chat template, token ids as given (the engine checks their range)."""
from __future__ import annotations


def prompt_token_ids(tokenizer, prompt, chat: bool) -> list[int]:
    if chat:
        return chat_token_ids(tokenizer, prompt)
    if isinstance(prompt, str):
        return require(tokenizer).encode(prompt)
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("a prompt is a string or a list of token ids")
    return prompt


def chat_token_ids(tokenizer, conversation) -> list[int]:
    """conversation: one user message (a string) or a list of {"role", "content"} messages."""
    messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    if not isinstance(messages, list) or not messages or not all(map(is_message, messages)):
        raise ValueError("a chat prompt is a string or a non-empty list of {'role': str, 'content': str} "
                         f"messages, got {conversation!r:.80}")
    tokenizer = require(tokenizer)
    if not tokenizer.chat_template:
        raise ValueError("the target tokenizer has no chat template: send plain prompts (chat=False)")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def is_message(message) -> bool:
    return (isinstance(message, dict) and isinstance(message.get("role"), str) and bool(message["role"])
            and isinstance(message.get("content"), str))


def require(tokenizer):
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (random-weights preset or bare checkpoint): "
                         "pass token-id prompts")
    return tokenizer
