"""What serving through the coordinator process costs: the same model and prompts through
LLM.generate directly and through a Coordinator, in interleaved repeats.

    python bench/coordinator_bench.py --tiny --threads 1 --json /tmp/coordinator.json        # CPU
    python bench/coordinator_bench.py --model llama-3.1-8b --random-weights --device cuda \\
        --num-prompts 64 --max-num-seqs 16 --max-tokens 256 --json $OUT/coordinator.json

Greedy decoding with ignore_eos, so both paths generate the same number of tokens (and the same
tokens: checked). Reported: tokens/s of each path and their ratio, and per engine round the time
the coordinator saw (interval between two rounds' deltas arriving) minus the engine's own round
time = the time the coordinator path adds per round (mean, p50, p90); of which "engine between" is
spent in the engine process between rounds (taking messages, sending deltas, waiting for requests
to refill freed slots) and the rest is delivery and scheduling jitter. "coordinator busy" is the
coordinator's own work per round (overlapped with the engine's next round)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, no install
sys.path.insert(0, str(REPO_ROOT / "tests"))  # tiny_models, for --tiny

from ssd.cli_types import at_least, writable_file  # noqa: E402

log = logging.getLogger("coordinator_bench")

SCHEMA = "ssd-coordinator-bench/1"


@dataclass
class Run:
    path: str          # "direct" | "coordinator"
    wall_s: float
    tokens: int
    rounds: int
    token_ids: list[list[int]] = field(repr=False)
    overhead_s: list[float] = field(default_factory=list)       # per round: coordinator view - engine time
    engine_round_s: list[float] = field(default_factory=list)
    engine_between_s: list[float] = field(default_factory=list)  # engine: messaging, refill waits
    handling_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="checkpoint directory or random-weights preset")
    model.add_argument("--tiny", action="store_true", help="a tiny random checkpoint made in a temp dir")
    p.add_argument("--tiny-hidden", type=int, default=64, help="--tiny: hidden size (head_dim 16)")
    p.add_argument("--tiny-layers", type=int, default=2, help="--tiny: number of layers")
    p.add_argument("--random-weights", action="store_true", help="random weights for a preset")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--tp", type=int, default=1, help="target tensor-parallel size")
    p.add_argument("--draft", default=None, help="draft checkpoint/preset (with --k); 'self' = the target")
    p.add_argument("--k", type=int, default=0, help="speculative tokens per round")
    p.add_argument("--async", dest="async_spec", action="store_true", help="asynchronous speculation")
    p.add_argument("--mode", choices=("ar", "sync", "async"), default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-num-seqs", type=at_least(1), default=4)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-prompts", type=at_least(1), default=12)
    p.add_argument("--prompt-len", type=at_least(1), default=32)
    p.add_argument("--max-tokens", type=at_least(1), default=64)
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads in both paths")
    p.add_argument("--no-refill-wait", action="store_true",
                   help="the engine does not wait for requests joining slots freed in a round")
    p.add_argument("--json", type=writable_file, default=None, help="write the result here")
    args = p.parse_args(argv)
    check_arguments(p, args)
    return args


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    speculative = [flag for flag, given in (("--async", args.async_spec), ("--k", args.k != 0),
                                            (f"--mode {args.mode}", args.mode in ("sync", "async"))) if given]
    if speculative and not args.draft:
        parser.error(f"{', '.join(speculative)}: speculative decoding needs a draft; give --draft "
                     "(a checkpoint, preset or 'self')")
    if args.draft and args.k < 1:
        parser.error(f"--draft needs --k >= 1 speculative tokens, got {args.k}")


# ---------------------------------------------------------------- set-up
def set_threads(threads: int | None) -> None:
    """Before torch starts: the engine process inherits OMP_NUM_THREADS, this process is set directly."""
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


def model_path(args, workdir: str) -> str:
    if not args.tiny:
        return args.model
    from tiny_models import make_checkpoint
    return str(make_checkpoint("qwen3", Path(workdir) / "tiny", hidden_size=args.tiny_hidden,
                               intermediate_size=args.tiny_hidden * 3 // 2, num_hidden_layers=args.tiny_layers,
                               num_attention_heads=args.tiny_hidden // 16, num_key_value_heads=args.tiny_hidden // 32))


def engine_kwargs(args, model: str) -> dict:
    kwargs = dict(device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                  tensor_parallel_size=args.tp, max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
                  max_model_len=args.max_model_len or args.prompt_len + args.max_tokens + max(args.k, 1) + 8,
                  seed=args.seed)
    if args.draft:
        kwargs.update(draft=model if args.draft == "self" else args.draft, num_speculative_tokens=args.k,
                      async_spec=args.async_spec)
    return kwargs


def make_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    import torch
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (count, length), generator=generator).tolist()


# ---------------------------------------------------------------- one run of each path
def run_direct(llm, prompts, params, mode) -> Run:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, mode=mode)
    wall = time.perf_counter() - start
    return Run("direct", wall, sum(len(o.token_ids) for o in outputs), llm.last_run_stats.num_rounds,
               [o.token_ids for o in outputs])


def run_coordinator(coordinator, prompts, params) -> Run:
    coordinator.round_timings(reset=True)
    start = time.perf_counter()
    outputs = coordinator.generate(prompts, params)
    wall = time.perf_counter() - start
    t = coordinator.round_timings(reset=True)
    overhead = [seen - own for seen, own in zip(t.coordinator_round_s, t.engine_round_s)]
    return Run("coordinator", wall, sum(len(o.token_ids) for o in outputs), len(t.handling_s),
               [o.token_ids for o in outputs], overhead, t.engine_round_s, t.engine_between_s, t.handling_s,
               t.ttft_s, t.tpot_s)


def interleaved(llm, coordinator, prompts, params, mode, repeats: int) -> list[Run]:
    """Alternate which path goes first, so drift (clocks, caches, neighbours) hits both alike."""
    runs = []
    for repeat in range(repeats):
        pair = [lambda: run_direct(llm, prompts, params, mode), lambda: run_coordinator(coordinator, prompts, params)]
        for run in (pair if repeat % 2 == 0 else pair[::-1]):
            runs.append(run())
            log.info("repeat %d %-11s %8.1f tok/s  %6.3f s  %d rounds", repeat, runs[-1].path, runs[-1].tok_s,
                     runs[-1].wall_s, runs[-1].rounds)
    return runs


# ---------------------------------------------------------------- summary
def stats_ms(values_s: list[float]) -> dict:
    import numpy as np
    if not values_s:
        return {"n": 0}
    ms = np.asarray(values_s) * 1e3
    return {"n": len(ms), "mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90))}


def summarize(runs: list[Run]) -> dict:
    import numpy as np
    direct = [r for r in runs if r.path == "direct"]
    coord = [r for r in runs if r.path == "coordinator"]
    tok_s = {name: float(np.median([r.tok_s for r in rs])) for name, rs in (("direct", direct), ("coordinator", coord))}
    every = lambda name: [x for r in coord for x in getattr(r, name)]  # noqa: E731
    return {
        "direct_tok_s": tok_s["direct"], "coordinator_tok_s": tok_s["coordinator"],
        "ratio": tok_s["coordinator"] / tok_s["direct"],
        "direct_round_ms": 1e3 * float(np.median([r.wall_s / r.rounds for r in direct])),
        "coordinator_added_per_round": stats_ms(every("overhead_s")),
        "engine_round": stats_ms(every("engine_round_s")),
        "engine_between_rounds": stats_ms(every("engine_between_s")),
        "coordinator_handling_per_round": stats_ms(every("handling_s")),
        "ttft": stats_ms(every("ttft_s")), "tpot": stats_ms(every("tpot_s")),
        "outputs_match": all(c.token_ids == direct[0].token_ids for c in coord),
    }


def log_table(summary: dict) -> None:
    added, engine = summary["coordinator_added_per_round"], summary["engine_round"]
    handling = summary["coordinator_handling_per_round"]
    rows = [("path", "tok/s (median)"), ("direct", f"{summary['direct_tok_s']:.1f}"),
            ("coordinator", f"{summary['coordinator_tok_s']:.1f}"), ("ratio", f"{summary['ratio']:.3f}")]
    for name, value in rows:
        log.info("%-12s %s", name, value)
    log.info("per round (ms)        mean     p50     p90      n")
    for name, s in (("coordinator-added", added), ("engine round", engine),
                    ("engine between", summary["engine_between_rounds"]), ("coordinator busy", handling),
                    ("TTFT", summary["ttft"]), ("TPOT", summary["tpot"])):
        if s["n"]:
            log.info("%-18s %7.3f %7.3f %7.3f %6d", name, s["mean_ms"], s["p50_ms"], s["p90_ms"], s["n"])
    log.info("direct round (wall / rounds): %.3f ms; outputs identical: %s", summary["direct_round_ms"],
             summary["outputs_match"])


def write_json(path: Path, args, summary: dict, runs: list[Run]) -> None:
    from ssd.benchmark.results import collect_env
    result = {"schema": SCHEMA, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "env": collect_env(), "threads": _threads(), "summary": summary,
              "runs": [{k: v for k, v in asdict(r).items() if k != "token_ids"} for r in runs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    log.info("wrote %s", path)


def _threads() -> int:
    import torch
    return torch.get_num_threads()


# ---------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    from ssd import LLM, SamplingParams
    from ssd.coordinator import Coordinator
    with tempfile.TemporaryDirectory(prefix="coordinator-bench-") as workdir:
        model = model_path(args, workdir)
        kwargs = engine_kwargs(args, model)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        with LLM(model, **kwargs) as llm, Coordinator(model, mode=args.mode, refill_wait=not args.no_refill_wait,
                                                       log_level=logging.WARNING, **kwargs) as coordinator:
            prompts = make_prompts(llm.runner.arch.vocab_size, args.num_prompts, args.prompt_len, args.seed)
            interleaved(llm, coordinator, prompts, params, args.mode, args.warmup)
            runs = interleaved(llm, coordinator, prompts, params, args.mode, args.repeats)
    summary = summarize(runs)
    log_table(summary)
    if args.json:
        write_json(args.json, args, summary, runs)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    sys.exit(main(sys.argv[1:]))
