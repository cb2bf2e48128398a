"""Where the draft's answer to an outcome spends its time (the critical path of an asynchronous
round): torch.profiler tables of AsyncDraft.outcome for an all-hit outcome (under the `jit` backup,
which reads the hits back before replying, and under `fast`, which does not) and an all-miss one
answered by the `fast` (n-gram) backup, with the median host wall time of each; first a check that
the answer kernel writes what the PyTorch ops compute. GPU, random weights.

    python bench/outcome_profile.py --preset llama-3.2-1b --batches 1 16 > outcome_profile.txt
    (--quant fp8 --vocab 32768: the draft as the async runs use it, whose kernel choices a run may have stored)
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
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
from ssd.draft_worker.protocol import outcome_payload  # noqa: E402

log = logging.getLogger("outcome_profile")


def answer(draft, batch: int, lengths: torch.Tensor, hit: bool, around=None):
    """One outcome after a fresh cache build: 0 accepted, then the first branch's guess (a hit) or
    the drafted token itself (which no fork guesses: a miss); `around`: a context (the profiler)
    for the outcome alone."""
    draft.build_cache(int(lengths.max()))
    accepted = torch.zeros(batch, dtype=torch.int64, device=lengths.device)
    recovered = (draft.cache.guess[:, 0] if hit else draft.window[:, 1]).clone()
    max_length = int(lengths.max())
    outcome = outcome_payload(accepted, recovered, recovered, lengths)   # as received: no work of the draft's
    torch.cuda.synchronize()
    with around or contextlib.nullcontext():
        start = time.perf_counter()
        reply = draft.outcome(outcome, max_length, False)
        torch.cuda.synchronize()
    if bool(reply.hit.all()) != hit:
        raise RuntimeError("the cache did not answer as built")
    return (time.perf_counter() - start) * 1e3


def host_us(call, repeats: int = 200) -> float:
    """Host microseconds per call, calls issued back to back (the GPU is not waited for)."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / repeats * 1e6


def launch_costs(draft, batch: int, lengths: torch.Tensor, hit: bool) -> str:
    """The answer's host-side pieces, each timed alone (us per call)."""
    draft.build_cache(int(lengths.max()))
    accepted = torch.zeros(batch, dtype=torch.int64, device=lengths.device)
    recovered = (draft.cache.guess[:, 0] if hit else draft.window[:, 1]).clone()
    history = draft.history.tokens.clone()
    cache = draft.cache
    args = (history, draft.window, draft.lengths, outcome_payload(accepted, recovered, recovered, lengths),
            cache.valid, cache.fork, cache.rank, cache.guess, cache.tokens, False, not hit)
    from ssd.draft_worker.triton_outcome import answer_outcome_kernel
    small = torch.zeros(batch, dtype=torch.int64, device=lengths.device)
    host = torch.zeros(4, dtype=torch.float64)
    costs = {
        "answer_outcome_kernel (its buffer allocated + Triton launch)": host_us(lambda: answer_outcome_kernel(*args)),
        "torch.empty (one [B] int64)": host_us(lambda: torch.empty(batch, dtype=torch.int64, device=lengths.device)),
        "a small PyTorch op (add_)": host_us(lambda: small.add_(1)),
        "[B] tensor .cpu() (with its sync)": host_us(lambda: small.cpu()),
        "4 float64 host -> device (.to)": host_us(lambda: host.to(lengths.device)),
        "chooser.choose": host_us(lambda: draft.chooser.choose(batch)),
    }
    return "\n".join(f"  host us {name}: {us:.1f}" for name, us in costs.items())


def kernel_matches_pytorch(draft, batch: int, lengths: torch.Tensor) -> bool:
    """The answer kernel's AnswerBuffer and token history equal the PyTorch ops' bit for bit, for a
    hit, a miss under each backup and a profile replay, on this cache."""
    from ssd.draft_worker.outcome_lookup import answer_outcome_buffer
    from ssd.draft_worker.triton_outcome import answer_outcome_kernel
    draft.build_cache(int(lengths.max()))
    cache, same = draft.cache, True
    accepted = torch.arange(batch, device=lengths.device) % (draft.proposer.k + 1)
    cases = {"hit": (cache.guess[:, 0], None), "miss": (draft.window[:, 1], None),
             "replay": (draft.window[:, 1], torch.arange(batch, device=lengths.device) % 4)}
    for name, (recovered, ranks) in cases.items():
        outcome = outcome_payload(accepted * (name != "hit"), recovered.clone(), recovered.clone(), lengths, ranks)
        for ngram in (False, True):
            histories = [draft.history.tokens.clone() for _ in range(2)]
            answers = [answer(history, draft.window, draft.lengths, outcome, cache.valid, cache.fork, cache.rank,
                              cache.guess, cache.tokens, ranks is not None, ngram, (0.5, 0.25, 2))
                       for answer, history in zip((answer_outcome_kernel, answer_outcome_buffer), histories)]
            same &= torch.equal(answers[0].data, answers[1].data) and torch.equal(*histories)
    return bool(same)


def python_profile(one_answer, repeats: int) -> str:
    """cProfile's table over `repeats` answers (the outcome alone, each after its cache build)."""
    profiler = cProfile.Profile()
    for _ in range(repeats):
        one_answer(profiler)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    return text.getvalue()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--quant", choices=("fp8",), default=None, help="the draft's weights in fp8 (default bf16)")
    parser.add_argument("--vocab", type=int, default=None, metavar="N",
                        help="the draft's LM head over only N tokens (default: all)")
    parser.add_argument("--launch-costs", action="store_true",
                        help="also time the answer's host-side pieces one by one (launches unsynchronised)")
    parser.add_argument("--python-profile", type=int, default=0, metavar="N",
                        help="also print cProfile's table (host functions) over N more answers of each kind")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    draft = build_draft(args.preset, 6, 3, max(args.batches), args.context + 256, False, "cuda",
                        quant=args.quant, vocab=args.vocab)
    for batch in args.batches:
        lengths = prefill(draft, batch, args.context, 32000).cuda()
        draft.speculate(lengths * 0 + 5, lengths * 0 + 6, lengths, int(lengths.max()), False)
        print(f"== B={batch} answer kernel == PyTorch ops (hit, miss, replay; with and without the n-gram): "
              f"{kernel_matches_pytorch(draft, batch, lengths)}")
        for name, backup, hit in (("hit", "jit", True), ("hit_fast", "fast", True), ("miss_fast", "fast", False)):
            draft.backup = backup
            times = [answer(draft, batch, lengths, hit) for _ in range(args.iters)]
            trace = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            answer(draft, batch, lengths, hit, trace)
            print(f"== B={batch} {name}: median {statistics.median(times[2:]):.3f} ms (host wall, synchronised)")
            print(trace.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
            if args.launch_costs:
                print(launch_costs(draft, batch, lengths, hit))
            if args.python_profile:
                print(python_profile(lambda around: answer(draft, batch, lengths, hit, around), args.python_profile))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
