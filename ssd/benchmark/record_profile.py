"""Record an acceptance profile with a real draft/target pair (default: the offline Qwen2.5-Coder
1.5B target + 0.5B draft, on CPU):

    python -m ssd.benchmark.record_profile --prompts code --out ssd/profiles/code.json

The target generates greedily; the draft then reads each prompt + generation in one forward pass,
and the rank of every generated token in the draft's next-token distribution is stored
(see ssd.spec.acceptance_profile for how a replay uses it)."""
from __future__ import annotations

import argparse
import datetime
import logging
import subprocess
import sys
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ssd.benchmark.datasets import DatasetError, apply_chat_template, iter_sharegpt_prompts
from ssd.benchmark.prompts import CODE_PROMPTS, DEFAULT_PROMPTS
from ssd.cli_types import at_least, writable_file
from ssd.engine.llm import LLM
from ssd.engine.model_runner import ModelRunner
from ssd.loading.generation_info import load_tokenizer
from ssd.loading.offline_models import OfflineModelError, fetch_offline_model
from ssd.sampling_params import SamplingParams
from ssd.spec.acceptance_profile import MAX_RANK, SUMMARY_K, AcceptanceProfile

log = logging.getLogger(__name__)

DEFAULT_TARGET, DEFAULT_DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
PROMPT_SETS = ("code", "chat", "default")
MIN_TRACE_TOKENS = 2   # what an AcceptanceProfile's traces need
# A saved profile holds its summary, whose prediction (at SUMMARY_K) needs a trace longer than K + 1.
MIN_OUTPUT_LEN = max(MIN_TRACE_TOKENS, SUMMARY_K + 2)


class RecordingError(RuntimeError):
    """The recording produced nothing a profile can hold."""


def prompt_set(name: str, count: int, tokenizer, max_prompt_tokens: int) -> list[str]:
    """code: the embedded code prompts; chat: ShareGPT's first human turns; default: every embedded
    prompt. Prompts longer than max_prompt_tokens (or encoding to no token) are skipped."""
    if name == "code":
        source = iter(CODE_PROMPTS)
    elif name == "chat":
        source = iter_sharegpt_prompts()
    elif name == "default":
        source = iter(DEFAULT_PROMPTS)
    else:
        raise ValueError(f"unknown prompt set {name!r}: use code, chat or default")
    fitting = (p for p in source if p.strip() and 0 < len(tokenizer.encode(p)) <= max_prompt_tokens)
    chosen = list(islice(fitting, count))   # ShareGPT is large: stop reading at `count`
    if len(chosen) < count and name != "chat":
        log.info("prompt set %s has %d prompts (asked for %d)", name, len(chosen), count)
    return chosen


@torch.inference_mode()
def draft_ranks(runner: ModelRunner, prompt_ids: list[int], output_ids: list[int]) -> list[int]:
    """Rank of each output token in the draft's distribution given the true prefix (0 = argmax)."""
    ids = torch.tensor([prompt_ids + output_ids[:-1]])
    positions = torch.arange(ids.shape[1])[None]
    logits = runner.forward(ids, positions, ids.shape[1] - 1)[0, len(prompt_ids) - 1:]   # [n_out, V]
    chosen = torch.tensor(output_ids, device=logits.device)
    chosen_logit = logits.gather(1, chosen[:, None])
    return (logits > chosen_logit).sum(1).clamp(max=MAX_RANK).tolist()


def record(target: str, draft: str, prompts: list[str], max_tokens: int, batch: int, chat: bool,
           name: str) -> AcceptanceProfile:
    if chat:
        prompts = apply_chat_template(prompts, target)
    longest = max(len(p) for p in prompts)  # characters bound tokens from above
    try:
        llm = LLM(target, draft=draft, num_speculative_tokens=1, draft_colocated=True, device="cpu",
                  max_num_seqs=batch, max_model_len=longest + max_tokens + 16)
    except ValueError as problem:   # e.g. prompts + --output_len past the models' context
        raise RecordingError(f"{problem} (lower --output_len or --max-prompt-tokens)") from None
    with llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), mode="ar")
        traces = [tuple(draft_ranks(llm.draft.runner, o.prompt_token_ids, o.token_ids))
                  for o in tqdm(outputs, desc="draft ranks", unit="req") if len(o.token_ids) >= MIN_TRACE_TOKENS]
    if not traces:
        raise RecordingError(f"every generation ended before {MIN_TRACE_TOKENS} tokens: nothing to record")
    return AcceptanceProfile(name, tuple(traces), {
        "target": Path(target).name, "draft": Path(draft).name, "num_prompts": len(prompts),
        "max_tokens": max_tokens, "temperature": 0.0, "chat_template": chat,
        "command": " ".join(["python -m ssd.benchmark.record_profile", *sys.argv[1:]]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ssd_commit": git_commit()})


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_model(path: str | None, offline_name: str) -> str:
    if path is not None:
        return path
    return str(fetch_offline_model(offline_name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssd.benchmark.record_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="code", choices=PROMPT_SETS, help="code | chat (ShareGPT) | default")
    parser.add_argument("--name", default=None, help="profile name (default: the prompt set's)")
    parser.add_argument("--out", required=True, type=writable_file, help="profile file to write (JSON)")
    parser.add_argument("--target", default=None, help=f"target checkpoint (default: offline {DEFAULT_TARGET})")
    parser.add_argument("--draft", default=None, help=f"draft checkpoint (default: offline {DEFAULT_DRAFT})")
    parser.add_argument("--numseqs", type=at_least(1), default=16)
    parser.add_argument("--output_len", type=int, default=256)
    parser.add_argument("--b", type=at_least(1), default=8, help="batch size of the target's generation")
    parser.add_argument("--max-prompt-tokens", type=at_least(1), default=512)
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts raw")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything the arguments alone can tell, before a model loads."""
    if args.output_len < MIN_OUTPUT_LEN:
        parser.error(f"--output_len must be >= {MIN_OUTPUT_LEN}, got {args.output_len}: a profile needs traces of "
                     f"at least {MIN_TRACE_TOKENS} tokens, and its summary (K = {SUMMARY_K}) one longer than K + 1")
    for flag, path in (("--target", args.target), ("--draft", args.draft)):
        if path is not None and not Path(path).is_dir():
            parser.error(f"{flag} {path}: no such checkpoint directory")


def load_prompts(parser: argparse.ArgumentParser, args: argparse.Namespace, target: str) -> list[str]:
    """The prompt set, refused when the target's tokenizer cannot take it as asked."""
    tokenizer = load_tokenizer(Path(target))
    if tokenizer is None:
        parser.error(f"the target ({target}) has no tokenizer: a profile's prompts are text")
    if not args.no_chat_template and not tokenizer.chat_template:
        parser.error(f"the target tokenizer ({target}) has no chat template: pass --no-chat-template "
                     "to feed the prompts raw")
    prompts = prompt_set(args.prompts, args.numseqs, tokenizer, args.max_prompt_tokens)
    if not prompts:
        parser.error(f"no prompt of the {args.prompts} set fits in --max-prompt-tokens {args.max_prompt_tokens}")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        target, draft = resolve_model(args.target, DEFAULT_TARGET), resolve_model(args.draft, DEFAULT_DRAFT)
        prompts = load_prompts(parser, args, target)
        profile = record(target, draft, prompts, args.output_len, args.b, not args.no_chat_template,
                         args.name or args.prompts)
        summary = summarized(profile)
    except (OfflineModelError, DatasetError, RecordingError) as problem:
        log.error("%s", problem)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    log.info("wrote %s: %s", args.out, summary)
    return 0


def summarized(profile: AcceptanceProfile) -> dict:
    """The profile's summary (saved with it); generations that all stopped early leave none."""
    try:
        return profile.summary()
    except ValueError as problem:
        raise RecordingError(f"{problem}: every generation stopped early; nothing saved") from None


if __name__ == "__main__":
    raise SystemExit(main())
