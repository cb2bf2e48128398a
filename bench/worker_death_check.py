"""How long generate() takes to fail after a worker is killed mid-run: python bench/worker_death_check.py --help.

Kills the draft worker (or target rank 1) of a running engine and times the WorkerDiedError. Over
gloo a closed connection shows it; over NCCL rank 0's watch must abort the communicators, or the
collective waiting for the dead rank spins until the process group's timeout. Logs the outcome
as one JSON line; exit code 1 when generate did not fail in time. Random weights: this checks
failure handling, not speed or output."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from ssd import LLM, SamplingParams  # noqa: E402
from ssd.engine.llm import WorkerDiedError  # noqa: E402

log = logging.getLogger("worker_death_check")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="llama-3.1-8b", help="Preset or checkpoint of the target.")
    parser.add_argument("--draft", default="llama-3.2-1b", help="Preset or checkpoint of the draft.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--tp", type=int, default=1, help="Target ranks (the draft gets the next GPU).")
    parser.add_argument("--victim", choices=("draft", "tp1"), default="draft", help="Which worker to kill.")
    parser.add_argument("--after-s", type=float, default=3.0, help="Seconds into generate before the kill.")
    parser.add_argument("--limit-s", type=float, default=60.0, help="Report a failure past this wait.")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="The process group's timeout.")
    parser.add_argument("--idle-first-s", type=float, default=0.0,
                        help="Before the trial: one short generate, then this long idle (past --timeout-s, the "
                             "workers must still be there).")
    return parser.parse_args(argv)


def idle_past_timeout(llm: LLM, idle_s: float, timeout_s: float) -> None:
    """A short generate on each side of an idle spell: the workers must still answer after it."""
    short = SamplingParams(temperature=0, max_tokens=8)
    llm.generate([[11, 12, 13]], short, use_tqdm=False)
    log.info("idling %.0f s (the process group's timeout is %.0f s)", idle_s, timeout_s)
    time.sleep(idle_s)
    llm.generate([[11, 12, 13]], short, use_tqdm=False)
    log.info("the engine still serves after idling")


def run_trial(args: argparse.Namespace) -> dict:
    llm = LLM(args.target, draft=args.draft, num_speculative_tokens=6, async_spec=True, device=args.device,
              tensor_parallel_size=args.tp, max_num_seqs=4, timeout_s=args.timeout_s)
    if args.idle_first_s:
        idle_past_timeout(llm, args.idle_first_s, args.timeout_s)
    victim = next(p for p in llm.group.processes if p.name.endswith(args.victim))
    killed_at: list[float] = []
    timer = threading.Timer(args.after_s, lambda: (killed_at.append(time.monotonic()), victim.kill()))
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    timer.start()
    outcome = "generate returned (the kill came too late: raise --after-s or the output length)"
    try:
        for _ in range(1000):
            llm.generate([[11, 12, 13]] * 4, params, use_tqdm=False)
    except WorkerDiedError as error:
        outcome = f"WorkerDiedError: {error}"
    finally:
        timer.cancel()
        llm.shutdown()
    waited = time.monotonic() - killed_at[0] if killed_at else None
    return {"device": args.device, "victim": args.victim, "tp": args.tp, "idle_first_s": args.idle_first_s,
            "outcome": outcome,
            "seconds_from_kill_to_error": waited, "ok": outcome.startswith("WorkerDiedError")
            and waited is not None and waited < args.limit_s}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    result = run_trial(args)
    log.info("%s", json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    sys.exit(main(sys.argv[1:]))
