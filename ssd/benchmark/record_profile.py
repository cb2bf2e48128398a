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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ssd.benchmark.datasets import apply_chat_template, iter_sharegpt_prompts
from ssd.benchmark.prompts import CODE_PROMPTS, DEFAULT_PROMPTS
from ssd.engine.llm import LLM
from ssd.engine.model_runner import ModelRunner
from ssd.sampling_params import SamplingParams
from ssd.spec.acceptance_profile import MAX_RANK, AcceptanceProfile

log = logging.getLogger(__name__)

DEFAULT_TARGET, DEFAULT_DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


def prompt_set(name: str, count: int, tokenizer, max_prompt_tokens: int) -> list[str]:
    """code: the embedded code prompts; chat: ShareGPT's first human turns; default: every embedded
    prompt. Prompts longer than max_prompt_tokens are skipped."""
    if name == "code":
        source = iter(CODE_PROMPTS)
    elif name == "chat":
        source = iter_sharegpt_prompts()
    elif name == "default":
        source = iter(DEFAULT_PROMPTS)
    else:
        raise ValueError(f"unknown prompt set {name!r}: use code, chat or default")
    chosen = [p for p in source if p.strip() and len(tokenizer.encode(p)) <= max_prompt_tokens]
    if len(chosen) < count and name != "chat":
        log.info("prompt set %s has %d prompts (asked for %d)", name, len(chosen), count)
    return chosen[:count]


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
    with LLM(target, draft=draft, num_speculative_tokens=1, draft_colocated=True, device="cpu",
             max_num_seqs=batch, max_model_len=longest + max_tokens + 16) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), mode="ar")
        traces = [tuple(draft_ranks(llm.draft.runner, o.prompt_token_ids, o.token_ids))
                  for o in tqdm(outputs, desc="draft ranks", unit="req") if len(o.token_ids) >= 2]
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
    from ssd.loading.offline_models import fetch_offline_model
    return str(fetch_offline_model(offline_name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ssd.benchmark.record_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="code", help="code | chat (ShareGPT) | default")
    parser.add_argument("--name", default=None, help="profile name (default: the prompt set's)")
    parser.add_argument("--out", required=True, help="profile file to write (JSON)")
    parser.add_argument("--target", default=None, help=f"target checkpoint (default: offline {DEFAULT_TARGET})")
    parser.add_argument("--draft", default=None, help=f"draft checkpoint (default: offline {DEFAULT_DRAFT})")
    parser.add_argument("--numseqs", type=int, default=16)
    parser.add_argument("--output_len", type=int, default=256)
    parser.add_argument("--b", type=int, default=8, help="batch size of the target's generation")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts raw")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target, draft = resolve_model(args.target, DEFAULT_TARGET), resolve_model(args.draft, DEFAULT_DRAFT)
    from transformers import AutoTokenizer
    prompts = prompt_set(args.prompts, args.numseqs, AutoTokenizer.from_pretrained(target), args.max_prompt_tokens)
    profile = record(target, draft, prompts, args.output_len, args.b, not args.no_chat_template,
                     args.name or args.prompts)
    profile.save(args.out)
    log.info("wrote %s: %s", args.out, profile.summary())


if __name__ == "__main__":
    main()
