r"""Prefill of a batch of long prompts on the GPU: which SDPA kernels take it, its time and peak memory.

    PYTHONUNBUFFERED=1 python bench/prefill_bench.py --preset llama-3.1-8b --batch 16 --prompt-len 2048 \
        --max-prefill-tokens 16384 65536 --out $OUT/prefill.json

1. Attention alone at the preset's head shapes: causal without a mask (what a prefill runs)
   and with the boolean mask (what any other long forward runs), each with SDPA's math kernel
   forbidden (does a fused kernel take it?) and with every kernel allowed (time, peak memory).
2. The engine (random weights, eager): `generate` of `batch` prompts of `prompt-len` tokens, one new
   token each, for each prefill budget: prefill seconds and the peak memory above the loaded engine.
   One prompt longer than a budget is prefilled in chunks: e.g. `--batch 1 --prompt-len 40000
   --chunk-offset 16384 --max-prefill-tokens 16384 65536` (attention of a 2nd chunk; chunked vs whole).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from ssd.cli_types import writable_file  # noqa: E402
from ssd import LLM, SamplingParams  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.json_files import write_json  # noqa: E402
from ssd.layers.attention import causal_mask, sdpa_attention  # noqa: E402
from ssd.models.presets import PRESETS, preset_arch  # noqa: E402

log = logging.getLogger("prefill_bench")
FUSED_ONLY = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def measured(fn) -> dict:
    """Milliseconds (median of 5 after a warm-up) and peak memory above the start, GB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        torch.cuda.empty_cache()
        return {"error": str(error).splitlines()[0][:300]}
    return {"ms": round(sorted(times)[2] * 1e3, 3),
            "peak_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)}


def attention_kernels(preset: str, batch: int, seq: int, offset: int) -> dict:
    """seq queries at positions offset..offset+seq-1 (a later chunk of a long prompt when offset > 0)."""
    arch = preset_arch(preset)
    heads, kv_heads, dim, length = arch.num_heads, arch.num_kv_heads, arch.head_dim, offset + seq
    q = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(batch, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    positions = offset + torch.arange(seq, device="cuda").expand(batch, seq)
    mask = causal_mask(positions, length)
    scale = dim ** -0.5
    result = {"offset": offset}
    causal = causal_lower_right(seq, length)
    for name, m in (("causal_no_mask", causal), ("bool_mask", mask)):
        with sdpa_kernel(FUSED_ONLY):
            result[f"{name}_fused_only"] = measured(lambda: sdpa_attention(q, keys, values, m, scale))
        result[name] = measured(lambda: sdpa_attention(q, keys, values, m, scale))
        log.info("attention %s: fused kernels only %s; any kernel %s", name, result[f"{name}_fused_only"],
                 result[name])
    out = sdpa_attention(q, keys, values, causal, scale).float()
    result["max_abs_difference"] = (out - sdpa_attention(q, keys, values, mask, scale).float()).abs().max().item()
    return result


def engine_prefill(preset: str, batch: int, seq: int, budget: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with LLM(preset, random_weights=True, device="cuda", max_num_seqs=batch, max_model_len=seq + 64,
             max_prefill_tokens=budget, enforce_eager=True) as llm:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, llm.runner.arch.vocab_size, (seq,), generator=g).tolist() for _ in range(batch)]
        llm.generate(prompts[:1], params, use_tqdm=False)     # warm-up
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            llm.generate(prompts, params, use_tqdm=False)
        except torch.OutOfMemoryError as error:
            return {"max_prefill_tokens": budget, "error": str(error).splitlines()[0][:300]}
        return {"max_prefill_tokens": budget, "prefill_s": round(llm.last_run_stats.prefill_time_s, 4),
                "peak_above_engine_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--max-prefill-tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--chunk-offset", type=int, default=0,
                        help="Attention part: the queries' first position (a later chunk's when > 0).")
    parser.add_argument("--out", type=writable_file)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        log.error("needs a CUDA device")
        return 1
    queries = min(args.prompt_len, min(args.max_prefill_tokens))   # one forward's (a chunk's) at most
    result = {"env": collect_env(), "preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len,
              "attention": attention_kernels(args.preset, args.batch, queries, args.chunk_offset), "engine": []}
    for budget in args.max_prefill_tokens:
        result["engine"].append(engine_prefill(args.preset, args.batch, args.prompt_len, budget))
        log.info("engine prefill %s", result["engine"][-1])
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
