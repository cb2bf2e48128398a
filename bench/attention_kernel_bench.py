"""The fused Triton attention against the matmul path on the GPU: same outputs (bf16), and each
one's time per call, at the shapes ssd runs (written to JSON).

    PYTHONUNBUFFERED=1 python bench/attention_kernel_bench.py --out $OUT/attention_kernels.json

Cases: the target's decode / verification window (llama-3.1-8b heads, context ~512) and the draft's
tree step (llama-3.2-1b and qwen3-0.6b heads, 21 branches per sequence with 6-deep scratch, at its
last depth: every branch entry read), at B = 1 and 16; for the tree also the step's own k/v written
by the RoPE + KV-write kernel or by the attention kernel (tree_kv_*). The tree step is timed with its scratch on a split of its own
and on the last key split, as a CUDA graph of back-to-back calls (no launch overhead, as the engine
runs it: fused_scratch_split_graph_us / fused_scratch_last_graph_us; fused_us is the default,
SCRATCH_SPLIT, timed eagerly like the rest); they differ only where the keys are split.
"""
from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from ssd.cli_types import writable_file  # noqa: E402
from ssd.benchmark.kernel_profile import cuda_time_ms  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.engine.gpu_timing import graph_time_us  # noqa: E402
from ssd.json_files import write_json  # noqa: E402
from ssd.layers.attention import ForwardContext, TreeContext, cached_attention  # noqa: E402
from ssd.layers.kernels import Kernels  # noqa: E402
from ssd.layers.triton_attention import SCRATCH_SPLIT, fused_attention  # noqa: E402

log = logging.getLogger("attention_kernel_bench")

# name: (query tokens per row, q heads, kv heads, head dim, tree branches x depth or 0)
CASES = {"decode_llama8b": (1, 32, 8, 128, 0), "window8_llama8b": (8, 32, 8, 128, 0),
         "tree_llama1b_k6f3": (21, 32, 8, 64, 6), "tree_qwen06b_k6f3": (21, 16, 8, 128, 6)}


def context_for(batch: int, queries: int, branch_len: int, context: int, capacity: int, device,
                depth: int | None = None) -> tuple[torch.Tensor, TreeContext | None]:
    """Positions [B, T] and, with branch_len K, the tree step at `depth` (default: the last, K - 1)."""
    positions = context + torch.arange(queries, device=device).expand(batch, queries).contiguous()
    tree = None
    if branch_len:
        depth = branch_len - 1 if depth is None else depth
        entries = torch.arange(queries * branch_len, device=device)
        mask = ((entries // branch_len)[None, :] == torch.arange(queries, device=device)[:, None]) & \
            ((entries % branch_len)[None, :] <= depth)
        tree = TreeContext(torch.zeros(batch, queries, dtype=torch.int64, device=device), capacity, mask,
                           branch_len, depth)
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
    if tree is not None:
        row.update(scratch_placements(q, ctx, dim ** -0.5, compiled, matmul()), default_scratch_split=SCRATCH_SPLIT)
        row.update(tree_kv_writes(ctx, heads, kv_heads, dim))
    log.info("%s", row)
    return row


def scratch_placements(q, ctx: ForwardContext, scale: float, grouped, expected: torch.Tensor) -> dict:
    """The tree step with its scratch on a split of its own and on the last key split (graph-timed)."""
    row = {}
    for key, own in (("scratch_split", True), ("scratch_last", False)):
        fused = partial(fused_attention, scratch_split=own)
        run = lambda: cached_attention(q, 0, ctx, scale, grouped, fused)  # noqa: E731
        row[f"fused_{key}_graph_us"] = round(graph_time_us(run, calls=20, replays=20), 2)
        row[f"max_abs_diff_{key}"] = (run().float() - expected.float()).abs().max().item()
    return row


def tree_kv_writes(ctx: ForwardContext, heads: int, kv_heads: int, dim: int) -> dict:
    """A tree step's own k/v written by the RoPE + KV-write kernel before the attention kernel, or by
    the attention kernel itself (new_kv): same output and caches? Both graph-timed. k/v are views of
    one qkv projection output, as in the model."""
    tree, (batch, queries), device = ctx.tree, ctx.positions.shape, ctx.positions.device
    qkv = torch.randn(batch, queries, (heads + 2 * kv_heads) * dim, device=device, dtype=ctx.k_caches[0].dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (x.view(batch, queries, -1, dim) for x in (q, k, v))
    rope = tuple(torch.randn(batch, queries, 1, dim // 2, device=device) for _ in range(2))
    write_index = (tree.scratch_start + torch.arange(queries, device=device) * tree.branch_len + tree.depth)
    write_index = write_index.expand(batch, queries).contiguous()
    rope_and_cache = Kernels.compiled().rope_and_cache
    args = (ctx.key_limit, ctx.keys_end, 0, ctx.attended_len, dim ** -0.5, tree.scratch_start, tree.branch_len,
            tree.depth)
    caches = {name: [c.clone() for c in (ctx.k_caches[0], ctx.v_caches[0])] for name in ("apart", "in_kernel")}

    def apart():
        rope_and_cache(None, k, v, *rope, *caches["apart"], ctx.slot_rows, write_index)
        return fused_attention(q, *caches["apart"], *args, rope=rope)

    def in_kernel():
        return fused_attention(q, *caches["in_kernel"], *args, rope=rope, new_kv=(k, v))
    out_diff = (apart().float() - in_kernel().float()).abs().max().item()
    cache_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*caches.values()))
    return {"tree_kv_apart_graph_us": round(graph_time_us(apart, calls=20, replays=20), 2),
            "tree_kv_in_kernel_graph_us": round(graph_time_us(in_kernel, calls=20, replays=20), 2),
            "tree_kv_max_abs_diff_out": out_diff, "tree_kv_max_abs_diff_cache": cache_diff}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--attend-len", type=int, default=1024, help="the graph bucket the cache is sliced to")
    parser.add_argument("--out", type=writable_file, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = [run_case(name, batch, args.context, args.attend_len) for name in CASES for batch in (1, 16)]
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "env": collect_env(), "rows": rows,
              "note": "matmul = torch.compile'd grouped_attention (the previous path); *_us timings are "
                      "back-to-back eager calls (launch overhead included in both), *_graph_us ones a "
                      "CUDA graph of back-to-back calls"}
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
