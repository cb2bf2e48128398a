"""Where the draft's answer to an outcome spends its time (the critical path of an asynchronous
round): torch.profiler tables of AsyncDraft.outcome for an all-hit outcome and an all-miss one
answered by the `fast` (n-gram) backup, with the median host wall time of each. GPU, random weights.

    python bench/outcome_profile.py --preset llama-3.2-1b --batches 1 16 > outcome_profile.txt
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, no install

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from draft_round_bench import build_draft, prefill  # noqa: E402

log = logging.getLogger("outcome_profile")


def answer(draft, batch: int, lengths: torch.Tensor, hit: bool, around=None):
    """One outcome after a fresh cache build: 0 accepted, then the first branch's guess (a hit) or
    the drafted token itself (which no fork guesses: a miss); `around`: a context (the profiler)
    for the outcome alone."""
    draft.build_cache(int(lengths.max()))
    accepted = torch.zeros(batch, dtype=torch.int64, device=lengths.device)
    recovered = (draft.cache.guess[:, 0] if hit else draft.window[:, 1]).clone()
    max_length = int(lengths.max())
    torch.cuda.synchronize()
    with around or contextlib.nullcontext():
        start = time.perf_counter()
        reply = draft.outcome(accepted, recovered, recovered, lengths, max_length, False)
        torch.cuda.synchronize()
    if bool(reply.hit.all()) != hit:
        raise RuntimeError("the cache did not answer as built")
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=15)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    draft = build_draft(args.preset, 6, 3, max(args.batches), args.context + 256, False, "cuda")
    for batch in args.batches:
        lengths = prefill(draft, batch, args.context, 32000).cuda()
        draft.speculate(lengths * 0 + 5, lengths * 0 + 6, lengths, int(lengths.max()), False)
        for name, backup, hit in (("hit", "jit", True), ("miss_fast", "fast", False)):
            draft.backup = backup
            times = [answer(draft, batch, lengths, hit) for _ in range(args.iters)]
            trace = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            answer(draft, batch, lengths, hit, trace)
            print(f"== B={batch} {name}: median {statistics.median(times[2:]):.3f} ms (host wall, synchronised)")
            print(trace.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
