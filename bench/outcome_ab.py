"""The draft's answer to an outcome, now and as an earlier checkout answered it, side by side in one
process (one loaded draft, alternating every iteration: host noise between runs was ~2x). Each
side is timed from the outcome in hand to its reply ready to send (the earlier checkout also packed
the reply then: protocol.pack_reply), after a fresh cache build. GPU, random weights.

    git archive e7c3158 ssd | tar -x -C /tmp/baseline    # the checkout to compare with
    python bench/outcome_ab.py --baseline /tmp/baseline --batches 1 16 --json outcome_ab.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, no install

import torch  # noqa: E402

from draft_round_bench import build_draft, prefill  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.draft_worker.protocol import outcome_payload, pack_reply  # noqa: E402

log = logging.getLogger("outcome_ab")


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Baseline:
    """The baseline checkout's AsyncDraft (its module loaded under another name, on this package's
    other modules) with its own answer kernel in place while it answers."""

    def __init__(self, checkout: Path, draft):
        package = checkout / "ssd" / "draft_worker"
        self.kernel_module = load_module(package / "triton_outcome.py", "baseline_triton_outcome")
        async_draft = load_module(package / "async_draft.py", "baseline_async_draft")
        self.draft = async_draft.AsyncDraft(draft.proposer, draft.tree, draft.backup)

    @contextmanager
    def own_kernel(self):
        name = "ssd.draft_worker.triton_outcome"
        current, sys.modules[name] = sys.modules.get(name), self.kernel_module
        try:
            yield
        finally:
            if current is None:
                del sys.modules[name]
            else:
                sys.modules[name] = current

    def reply(self, accepted, recovered, lengths):
        with self.own_kernel():
            reply = self.draft.outcome(accepted, recovered, recovered, lengths, int(lengths.max()), False)
        return reply, pack_reply(reply.proposal.tokens, reply.hit, reply.recovered, reply.timings)


def current_reply(draft, outcome, lengths):
    reply = draft.outcome(outcome, int(lengths.max()), False)
    return reply, reply.packed


def timed_answers(current, baseline: Baseline, batch: int, lengths: torch.Tensor, hit: bool, iters: int) -> dict:
    """Alternating current / baseline answers (ms from the outcome in hand to the reply ready to send)."""
    times = {"current": [], "baseline": []}
    for i in range(iters):
        for side, draft in (("current", current), ("baseline", baseline.draft)):
            draft.build_cache(int(lengths.max()))
            accepted = torch.zeros(batch, dtype=torch.int64, device=lengths.device)
            recovered = (draft.cache.guess[:, 0] if hit else draft.window[:, 1]).clone()
            outcome = outcome_payload(accepted, recovered, recovered, lengths)   # as received
            torch.cuda.synchronize()
            start = time.perf_counter()
            reply, packed = current_reply(draft, outcome, lengths) if side == "current" else \
                baseline.reply(accepted, recovered, lengths)
            elapsed = time.perf_counter() - start
            torch.cuda.synchronize()
            if bool(reply.hit.all()) != hit or packed.dtype != torch.int64:
                raise RuntimeError(f"{side}: the cache did not answer as built")
            if i >= 2:
                times[side].append(elapsed * 1e3)
    return {side: {"median_ms": statistics.median(t), "p10_ms": statistics.quantiles(t, n=10)[0],
                   "p90_ms": statistics.quantiles(t, n=10)[-1]} for side, t in times.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout (its ssd/ folder) to compare with")
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    current = build_draft(args.preset, 6, 3, max(args.batches), args.context + 256, False, "cuda")
    baseline = Baseline(args.baseline, current)
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            for draft in (current, baseline.draft):
                lengths = prefill(draft, batch, args.context, 32000).cuda()
                draft.speculate(lengths * 0 + 5, lengths * 0 + 6, lengths, int(lengths.max()), False)
            for case, backup, hit in (("hit", "jit", True), ("hit", "fast", True), ("miss", "fast", False)):
                current.backup = baseline.draft.backup = backup
                result = timed_answers(current, baseline, batch, lengths, hit, args.iters)
                rows.append({"batch": batch, "case": case, "backup": backup, **result})
                print(f"B={batch} {case} ({backup}): current {result['current']['median_ms']:.3f} ms, "
                      f"baseline {result['baseline']['median_ms']:.3f} ms (medians of {args.iters - 2})")
    if args.json:
        args.json.write_text(json.dumps({"schema": "ssd-outcome-ab/1", "preset": args.preset,
                                         "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "env": collect_env(),
                                         "baseline": str(args.baseline), "weights": "random (timing only)",
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
