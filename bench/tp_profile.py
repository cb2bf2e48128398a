"""The target alone at several tensor-parallel sizes: greedy output against the first size's, decode
throughput against the memory-bandwidth roofline, and what the all-reduces cost per decode step.

    python bench/tp_profile.py --model llama-3.1-8b --tp 1 4 --batch 1 16 --out $OUT/tp_llama8b.json
    python bench/tp_profile.py --model llama-3.1-70b --tp 4 --batch 1 4 16 --out $OUT/tp_llama70b.json

Weights are random (a preset, or a checkpoint directory's architecture), and the same model at
every TP size (ssd.loading.random_weights), so outputs compare: in bf16 the ranks' partial sums
round differently from one GPU's, which flips near-tied argmaxes, so the number is the greedy prefix
match rate (on CPU in fp32 it must be 1.0). Per TP size and batch: decode tok/s of greedy
LLM.generate (random prompts, ignore_eos; a warm-up call first), the roofline (rank 0's weight
shard streamed once per step at the GPU's nominal bandwidth; the KV cache not counted) and, on
CUDA, rank 0's NCCL kernel time per decode step: a profiled generate of N tokens minus one of 1
token (the prefill), over the N - 1 decode steps; a kernel's time includes its wait for the slowest
rank.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from ssd import LLM, SamplingParams  # noqa: E402
from ssd.benchmark.ab import greedy_prefix_match_rate  # noqa: E402
from ssd.benchmark.bandwidth import nominal_bandwidth  # noqa: E402
from ssd.benchmark.kernel_profile import collective_kernel_ms  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.cli_types import at_least, preset_or_checkpoint, writable_file  # noqa: E402
from ssd.json_files import write_json  # noqa: E402

log = logging.getLogger("tp_profile")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b", type=preset_or_checkpoint,
                        help="a preset or a checkpoint directory (its architecture; the weights are random)")
    parser.add_argument("--tp", type=at_least(1), nargs="+", default=[1, 4],
                        help="tensor-parallel sizes, one after the other; outputs compare with the first's")
    parser.add_argument("--batch", type=at_least(1), nargs="+", default=[1, 16])
    parser.add_argument("--context", type=at_least(1), default=512, help="prompt tokens per sequence")
    parser.add_argument("--tokens", type=at_least(2), default=128, help="tokens generated per sequence")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--bandwidth", type=float, default=None, help="nominal HBM bytes/s (default by GPU name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=writable_file, default=None)
    return parser.parse_args(argv)


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(count)]


def greedy(llm: LLM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def collectives_per_step(llm: LLM, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """NCCL kernel time per decode step (see the module docstring)."""
    prefill = collective_kernel_ms(lambda: greedy(llm, prompts, 1))
    whole = collective_kernel_ms(lambda: greedy(llm, prompts, tokens))
    return {key: round((whole[key] - prefill[key]) / (tokens - 1), 4) for key in whole}


def measure_batch(llm: LLM, args: argparse.Namespace, batch: int, bandwidth: float | None) -> dict:
    prompts = random_prompts(batch, args.context, llm.runner.arch.vocab_size, args.seed + batch)
    greedy(llm, prompts, args.tokens)   # warm-up
    tokens = greedy(llm, prompts, args.tokens)
    tok_s = llm.last_run_stats.decode_tok_s
    shard_bytes = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
    step_ms = 1e3 * batch / tok_s
    result = {"batch": batch, "decode_tok_s": round(tok_s, 2), "step_ms": round(step_ms, 4),
              "rank0_weight_bytes": shard_bytes,
              "roofline_tok_s": round(batch * bandwidth / shard_bytes, 2) if bandwidth else None,
              "roofline_fraction": round(tok_s * shard_bytes / batch / bandwidth, 4) if bandwidth else None}
    if llm.runner.device.type == "cuda" and llm.cfg.tp_size > 1:
        collectives = collectives_per_step(llm, prompts, args.tokens)
        result.update(collectives, all_reduce_share_of_step=round(collectives["all_reduce_ms"] / step_ms, 4))
    log.info("TP=%d B=%d: %.1f tok/s, step %.2f ms%s%s", llm.cfg.tp_size, batch, tok_s, step_ms,
             f", {100 * result['roofline_fraction']:.1f}% of the roofline ({result['roofline_tok_s']} tok/s)"
             if bandwidth else "",
             f"; all-reduces {result['all_reduce_ms']:.3f} ms ({result['all_reduce_calls']:.0f} calls) per step"
             if "all_reduce_ms" in result else "")
    return {**result, "tokens": tokens}


def measure_tp_size(args: argparse.Namespace, tp_size: int, bandwidth: float | None) -> list[dict]:
    with LLM(args.model, tensor_parallel_size=tp_size, device=args.device, random_weights=True,
             max_num_seqs=max(args.batch), max_model_len=args.context + args.tokens + 64, seed=args.seed) as llm:
        return [measure_batch(llm, args, batch, bandwidth) for batch in args.batch]


def compare_outputs(runs: dict[int, list[dict]]) -> None:
    """Adds each run's greedy prefix match rate against the first TP size's run of the same batch."""
    first, *_ = runs.values()
    for results in runs.values():
        for result, reference in zip(results, first):
            result["greedy_prefix_match_rate"] = round(greedy_prefix_match_rate(reference["tokens"],
                                                                                result["tokens"]), 4)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and visible < max(args.tp):
        log.error("--tp %d needs %d GPUs; %d visible (CUDA_VISIBLE_DEVICES?)", max(args.tp), max(args.tp), visible)
        return 1
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    bandwidth = args.bandwidth or (nominal_bandwidth(device_name) if args.device == "cuda" else None)
    runs = {tp: measure_tp_size(args, tp, bandwidth) for tp in args.tp}
    compare_outputs(runs)
    for tp, results in runs.items():
        for result in results:
            log.info("TP=%d B=%d: greedy prefix match rate vs TP=%d: %.4f", tp, result["batch"], args.tp[0],
                     result["greedy_prefix_match_rate"])
    if args.out:
        write_json(args.out, {"model": args.model, "weights": "random (same model at every TP size)",
                              "device": device_name, "nominal_bandwidth": bandwidth, "context": args.context,
                              "tokens": args.tokens, "env": collect_env(),
                              "runs": {f"tp{tp}": results for tp, results in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
