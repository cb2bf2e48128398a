"""The fused Triton attention against the matmul path on the GPU: same outputs (bf16), and each
one's time per call, at the shapes ssd runs (written to JSON).

    PYTHONUNBUFFERED=1 python bench/attention_kernel_bench.py --out $OUT/attention_kernels.json

Cases: the target's decode / verification window (llama-3.1-8b heads, context ~512) and the draft's
tree step (llama-3.2-1b heads, 21 branches per sequence with 6-deep scratch), at B = 1 and 16.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from ssd.benchmark.kernel_profile import cuda_time_ms  # noqa: E402
from ssd.layers.attention import ForwardContext, TreeContext, cached_attention  # noqa: E402
from ssd.layers.kernels import Kernels  # noqa: E402
from ssd.layers.triton_attention import fused_attention  # noqa: E402

log = logging.getLogger("attention_kernel_bench")

# name: (query tokens per row, q heads, kv heads, head dim, tree branches x depth or 0)
CASES = {"decode_llama8b": (1, 32, 8, 128, 0), "window8_llama8b": (8, 32, 8, 128, 0),
         "tree_llama1b_k6f3": (21, 32, 8, 64, 6)}


def context_for(batch: int, queries: int, scratch_depth: int, context: int, capacity: int, device) -> ForwardContext:
    positions = context + torch.arange(queries, device=device).expand(batch, queries).contiguous()
    tree = None
    if scratch_depth:
        entries = torch.arange(queries * scratch_depth, device=device)
        mask = ((entries // scratch_depth)[None, :] == torch.arange(queries, device=device)[:, None]) & \
            ((entries % scratch_depth)[None, :] <= 2)
        tree = TreeContext(torch.zeros(batch, queries, dtype=torch.int64, device=device), capacity, mask)
        positions = torch.full((batch, queries), context, device=device)
    return positions, tree


def run_case(name: str, batch: int, context: int, attend_len: int) -> dict:
    queries, heads, kv_heads, dim, depth = CASES[name]
    device, dtype = torch.device("cuda"), torch.bfloat16
    capacity = attend_len + (queries * depth if depth else 0)
    k_cache, v_cache = (torch.randn(batch, kv_heads, capacity, dim, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(batch, queries, heads, dim, device=device, dtype=dtype)
    positions, tree = context_for(batch, queries, depth, context, attend_len, device)
    ctx = ForwardContext(positions, positions, attend_len, [k_cache], [v_cache], tree=tree)
    compiled = Kernels.compiled().grouped_attention
    matmul = lambda: cached_attention(q, 0, ctx, dim ** -0.5, compiled)  # noqa: E731
    fused = lambda: cached_attention(q, 0, ctx, dim ** -0.5, compiled, fused_attention)  # noqa: E731
    diff = (fused().float() - matmul().float()).abs().max().item()
    row = {"case": name, "batch": batch, "context": context, "attend_len": attend_len,
           "fused_us": round(1e3 * cuda_time_ms(fused, 200, 10), 2),
           "matmul_us": round(1e3 * cuda_time_ms(matmul, 200, 10), 2), "max_abs_diff": diff}
    log.info("%s", row)
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--attend-len", type=int, default=1024, help="the graph bucket the cache is sliced to")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = [run_case(name, batch, args.context, args.attend_len) for name in CASES for batch in (1, 16)]
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows,
              "note": "matmul = torch.compile'd grouped_attention (the previous path); timings are "
                      "back-to-back eager calls (launch overhead included in both)"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
