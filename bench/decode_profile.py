"""Where a decode step's time goes on the GPU: kernel table of one CUDA-graph decode step.

    PYTHONUNBUFFERED=1 python bench/decode_profile.py --preset llama-3.1-8b --batch 1 --out $OUT/decode_profile.json

Profiles `steps` graph replays of the B-row decode forward (random weights, context ~512) with
torch.profiler and reports, per kernel name, calls and GPU time per step, the sum of kernel time
against the step's wall time (the difference is launch gaps / idle SMs), and the bytes a step must
stream (weights) as a fraction of the nominal HBM bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from ssd import LLM  # noqa: E402
from ssd.benchmark.ab import greedy_prefix_match_rate  # noqa: E402
from ssd.benchmark.bandwidth import nominal_bandwidth  # noqa: E402
from ssd.benchmark.kernel_profile import profile_kernels  # noqa: E402
from ssd.cli_types import at_least, writable_file  # noqa: E402
from ssd.benchmark.linear_arms import add_linear_argument, linear_options  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.json_files import write_json  # noqa: E402

log = logging.getLogger("decode_profile")


def decode_step(llm: LLM, batch: int, context: int):
    runner = llm.runner
    ids = torch.randint(0, runner.arch.vocab_size, (batch, 1), device=runner.device)
    positions = torch.full((batch, 1), context, dtype=torch.int64, device=runner.device)
    return lambda: runner.forward(ids, positions, context)


def generate_throughput(llm: LLM, batch: int, context: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of greedy LLM.generate (host loop included; prefill excluded), and its tokens."""
    from ssd import SamplingParams
    g = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(0, 1000, (context,), generator=g)] for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm.last_run_stats.decode_tok_s, [o.token_ids for o in outputs]


def profile_mode(args, fused: bool, linear: str, bandwidth: float | None) -> tuple[dict, list[list[int]]]:
    with LLM(args.preset, random_weights=True, device="cuda", max_num_seqs=max(args.batch, 1),
             max_model_len=args.context + args.generate_tokens + 64, fused_attention=fused,
             **linear_options(linear)) as llm:
        step = profile_kernels(decode_step(llm, args.batch, args.context), repeats=args.steps, top=40)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
        tok_s, tokens = generate_throughput(llm, args.batch, args.context, args.generate_tokens)
    step_ms = step["wall_ms"]
    result = {"attention": "fused" if fused else "matmul", "linear": linear,
              "generate_decode_tok_s": round(tok_s, 2),
              "generate_roofline_fraction": round(tok_s * weight_bytes / args.batch / bandwidth, 4) if bandwidth else None,
              "step_ms": step_ms, "kernel_ms": step["kernel_ms"], "gap_ms": round(step_ms - step["kernel_ms"], 4),
              "weight_bytes": weight_bytes,
              "roofline_fraction": round(weight_bytes / bandwidth / (step_ms / 1e3), 4) if bandwidth else None,
              "kernels": step["kernels"]}
    log.info("[%s attention, %s linear] step %.3f ms, kernels %.3f ms, gaps %.3f ms, roofline %.1f%%; generate %.1f tok/s "
             "(%.1f%% of roofline)", result["attention"], result["linear"], step_ms, step["kernel_ms"], result["gap_ms"],
             100 * (result["roofline_fraction"] or 0), tok_s, 100 * (result["generate_roofline_fraction"] or 0))
    for row in step["kernels"][:25]:
        log.info("%8.1f us  %5.1f calls  %s", row["us_per_step"], row["calls_per_step"], row["kernel"])
    return result, tokens


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--batch", type=at_least(1), default=1)
    parser.add_argument("--context", type=at_least(1), default=512)
    parser.add_argument("--steps", type=at_least(1), default=20)
    parser.add_argument("--bandwidth", type=float, default=None, help="nominal HBM bytes/s (default by device name)")
    parser.add_argument("--generate-tokens", type=int, default=256, help="also time LLM.generate at this batch")
    parser.add_argument("--attention", nargs="+", choices=("fused", "matmul"), default=["fused"],
                        help="attention implementations to profile one after the other (same prompts)")
    add_linear_argument(parser, "profile one after the other (with each attention)")
    parser.add_argument("--out", type=writable_file, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        log.error("needs a CUDA device")
        return 1
    name = torch.cuda.get_device_name(0)
    bandwidth = args.bandwidth or nominal_bandwidth(name)
    modes, tokens = [], []
    for mode, linear in itertools.product(args.attention, args.linear):
        result, generated = profile_mode(args, mode == "fused", linear, bandwidth)
        modes.append(result)
        tokens.append(generated)
    result = {"preset": args.preset, "batch": args.batch, "context": args.context, "device": name, "env": collect_env(),
              "weights": "random (timing only)", "modes": modes}
    if len(tokens) > 1:
        result["greedy_prefix_agreement"] = round(greedy_prefix_match_rate(tokens[0], tokens[1]), 4)
        log.info("greedy tokens of the first two modes agree on %.1f%% of positions (bf16, up to the first "
                 "difference)", 100 * result["greedy_prefix_agreement"])
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
