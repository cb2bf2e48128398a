"""Alternatives for the draft round's hot kernels, each timed on the GPU at the exact shapes of the
llama-3.2-1b draft (K = 6, F = 3: 7 window tokens and 21 tree branches per sequence), to choose
what the engine uses. Written to JSON; random inputs (kernel times do not depend on values).

    PYTHONUNBUFFERED=1 python bench/draft_kernel_sweep.py --out $OUT/draft_kernel_sweep.json

Every candidate is captured `--calls` times back to back in one CUDA graph and the graph replayed,
as the engine runs them (so launch gaps count as they do there, and host launch cost does not).
Parts: attention tilings and key splits; GEMMs per weight (F.linear, padded rows, a transposed
weight copy, optionally Inductor's autotuned Triton GEMM; `lt`: each of cuBLASLt's listed
algorithms; `tma`: the TMA kernel's tilings, split-K included; `fusion`: the products with a layer's norms, residual
adds and SiLU inside, against the chains they replace; `fp8_fusion`: those products and the LM head
with fp8 weights against bf16); greedy argmax over the vocabulary; the torch.compile'd elementwise kernels with
all-dynamic, automatic-dynamic and static shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention_kernel_bench import context_for  # noqa: E402  (this directory is on sys.path)
from ssd.cli_types import writable_file  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.engine.gpu_timing import graph_time_us  # noqa: E402
from ssd.json_files import write_json  # noqa: E402
from ssd.layers import kernels as layer_kernels  # noqa: E402
from ssd.layers.triton_attention import Tiling, choose_splits, fused_attention  # noqa: E402
from ssd.layers.triton_linear import (CANDIDATES, MAX_ROWS, SkinnyTiling, TmaTiling, skinny_linear,  # noqa: E402
                                     tma_linear)
from ssd.models.presets import preset_arch  # noqa: E402

log = logging.getLogger("draft_kernel_sweep")

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 2048, 8192, 128256, 32, 8, 64
WEIGHTS = {"qkv": (3072, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN),
           "down": (HIDDEN, FFN), "lm_head": (VOCAB, HIDDEN)}
# rows per forward: window B=1, tree B=1, window B=16, tree B=16
ROWS = {"window_b1": 7, "tree_b1": 21, "window_b16": 112, "tree_b16": 336}


def graph_us(fn: Callable[[], object], calls: int) -> float:
    return round(graph_time_us(fn, calls, replays=20), 2)


def guarded(name: str, fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:  # a failing candidate is a result, not the end of the sweep
        log.warning("%s failed: %s", name, exc)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def broad_tilings(default: Tiling) -> list[Tiling]:
    """Every (rows, keys) block and warp count, at the default pipeline depth, plus the default."""
    return [Tiling(m, n, warps) for m, n, warps in itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8))
            if warps == 4 or m >= 64] + [default]


def deep_tilings(default: Tiling) -> list[Tiling]:
    """The few block shapes that came out best in the broad sweep, at pipeline depths 2 to 5."""
    shapes = {(default.block_m, default.block_n, default.num_warps), (64, 64, 4), (64, 32, 4), (32, 64, 4),
              (128, 64, 8), (128, 32, 8)}
    return [Tiling(m, n, warps, stages) for (m, n, warps), stages in itertools.product(sorted(shapes), (2, 3, 4, 5))]


def attention_sweep(calls: int, context: int, attend_len: int, tilings_for=broad_tilings,
                    all_splits: bool = True, heads: tuple[int, int, int] = (HEADS, KV_HEADS, HEAD_DIM)) -> list[dict]:
    """tilings_for(default tiling) -> the tilings to time; all_splits: 1..16 key splits besides the
    automatic choice (else 1 and the automatic one); heads: (query heads, KV heads, head dim)."""
    rows = []
    device, dtype = torch.device("cuda"), torch.bfloat16
    num_heads, kv_heads, head_dim = heads
    for case, batch, queries, depth in (("window", 1, 7, 0), ("tree", 1, 21, 6), ("window", 16, 7, 0),
                                        ("tree", 16, 21, 6)):
        capacity = attend_len + queries * depth
        k_cache, v_cache = (torch.randn(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype) for _ in range(2))
        q = torch.randn(batch, queries, num_heads, head_dim, device=device, dtype=dtype)
        positions, tree = context_for(batch, queries, depth, context, attend_len, device)
        keys_end = positions.amax(1) + 1
        scratch = (attend_len, tree.branch_len, tree.depth) if tree else ()
        group_rows = queries * num_heads // kv_heads
        scale = head_dim ** -0.5
        reference = fused_attention(q, k_cache, v_cache, positions, keys_end, 0, attend_len, scale, *scratch, splits=1)
        default = Tiling.default(group_rows, head_dim)
        for tiling in tilings_for(default):
            block_m, block_n, warps, stages = tiling.block_m, tiling.block_n, tiling.num_warps, tiling.num_stages
            tiles = -(-group_rows // block_m)
            auto = choose_splits(batch * kv_heads * tiles, attend_len, block_n, device, bool(tree))
            for splits in sorted({1, 2, 4, 8, 16, auto} if all_splits else {1, auto}):
                run = lambda: fused_attention(q, k_cache, v_cache, positions, keys_end, 0, attend_len, scale,  # noqa: E731
                                              *scratch, splits=splits, tiling=tiling)

                def measure():
                    diff = (run().float() - reference.float()).abs().max().item()
                    return {"us": graph_us(run, calls), "max_abs_diff": diff}
                row = {"case": case, "batch": batch, "block_m": block_m, "block_n": block_n, "warps": warps,
                       "stages": stages, "splits": splits, "auto_splits": splits == auto,
                       "default_tiling": tiling == default, **guarded(f"attention {case} B={batch}", measure)}
                rows.append(row)
        best = min((r for r in rows if r["case"] == case and r["batch"] == batch and "us" in r),
                   key=lambda r: r["us"], default=None)
        log.info("attention %s B=%d best %s", case, batch, best)
    return rows


def gemm_sweep(calls: int, autotune: bool) -> list[dict]:
    """autotune: F.linear against Inductor's max-autotune GEMM (its Triton templates, persistent TMA
    ones included) at the B = 16 rows only (slow to compile: its own part)."""
    rows = []
    device, dtype = torch.device("cuda"), torch.bfloat16
    if autotune:
        torch._inductor.config.triton.enable_persistent_tma_matmul = True
    tuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False) if autotune else None
    for (name, shape), (where, m) in itertools.product(WEIGHTS.items(), ROWS.items()):
        if autotune and not where.endswith("b16"):   # compute-bound rows: where a Triton GEMM could win
            continue
        weight = torch.randn(shape, device=device, dtype=dtype) * 0.02
        x = torch.randn(m, shape[1], device=device, dtype=dtype)
        if autotune:
            candidates = {"linear": lambda: F.linear(x, weight), "inductor_autotuned": lambda: tuned(x, weight)}
        else:
            weight_t = weight.t().contiguous()
            padded = torch.randn(-(-m // 16) * 16, shape[1], device=device, dtype=dtype)
            candidates = {"linear": lambda: F.linear(x, weight), "linear_rows_padded_16": lambda: F.linear(padded, weight),
                          "mm_transposed_weight": lambda: torch.mm(x, weight_t)}
            if m <= MAX_ROWS:
                candidates.update({f"triton_skinny_{t.block_n}x{t.block_k}_w{t.num_warps}_s{t.num_stages}":
                                   (lambda t=t: skinny_linear(x, weight, t)) for t in CANDIDATES})
        for variant, fn in candidates.items():
            result = guarded(f"gemm {name} {variant} m={m}", lambda: {"us": graph_us(fn, calls)})
            if "us" in result:
                result["weight_tb_s"] = round(weight.numel() * 2 / result["us"] / 1e6, 2)
            rows.append({"weight": name, "shape": list(shape), "where": where, "rows": m, "variant": variant, **result})
        log.info("gemm %s m=%d %s", name, m, [(r["variant"], r.get("us"), r.get("weight_tb_s"))
                                               for r in rows[-len(candidates):]])
    return rows


def chunked_argmax(logits: torch.Tensor, chunks: int) -> torch.Tensor:
    """argmax over the last dim in two reductions: the largest of each chunk, then of the chunks."""
    rows, vocab = logits.shape
    best, index = logits.view(rows, chunks, vocab // chunks).max(-1)
    chunk = best.argmax(-1, keepdim=True)
    return (chunk * (vocab // chunks) + index.gather(1, chunk)).squeeze(1)


def argmax_sweep(calls: int) -> list[dict]:
    rows = []
    compiled = torch.compile(lambda x: x.argmax(-1), dynamic=False)
    for where, m in ROWS.items():
        logits = torch.randn(m, VOCAB, device="cuda", dtype=torch.bfloat16)
        expected = logits.argmax(-1)
        for variant, fn in {"eager": lambda: logits.argmax(-1), "compiled": lambda: compiled(logits),
                            "chunked_256": lambda: chunked_argmax(logits, 256),
                            "chunked_501": lambda: chunked_argmax(logits, 501)}.items():
            result = guarded(f"argmax {variant}", lambda: {"us": graph_us(fn, calls),
                                                           "equal": bool(torch.equal(fn(), expected))})
            rows.append({"where": where, "rows": m, "variant": variant, **result})
        log.info("argmax m=%d %s", m, [(r["variant"], r.get("us")) for r in rows[-4:]])
    return rows


def sampling_sweep(calls: int) -> list[dict]:
    """The chunked token-choice kernels (ssd.engine.triton_sampling / triton_temperature_sampling) per
    column-chunk count: argmax, the race, temperature sampling; each checked against one chunk."""
    from ssd.engine import triton_sampling, triton_temperature_sampling
    from ssd.engine.random import uniform_from_counters
    rows = []
    for where, m in ROWS.items():
        logits = torch.randn(m, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
        weights = logits.float().softmax(-1)
        seed, counter = torch.arange(m, device="cuda"), torch.full((m,), 7, device="cuda")
        temperature = torch.full((m,), 0.8, device="cuda")
        out = torch.empty(m, VOCAB, device="cuda")
        kernels = {"argmax": lambda c: triton_sampling.chunked_argmax(logits, c),
                   "race": lambda c: triton_sampling.exponential_race(weights, seed, counter, 3, c),
                   "temperature": lambda c: triton_temperature_sampling.temperature_sample(
                       logits, temperature, seed, counter, 3, out, c)[0]}
        blocks = -(-VOCAB // triton_sampling.BLOCK_V)
        default = triton_sampling.race_chunks(m, blocks, logits.device)
        torch_race = lambda w: (w / -torch.log(uniform_from_counters(seed, counter, 3, VOCAB))).argmax(-1)  # noqa: E731
        checks = {"argmax": lambda: bool(torch.equal(kernels["argmax"](None), logits.argmax(-1))),
                  "race": lambda: bool(torch.equal(kernels["race"](None), torch_race(weights))),
                  "temperature": lambda: bool(torch.equal(kernels["temperature"](None), torch_race(out)))}
        for name, fn in kernels.items():
            rows.append({"kernel": name, "where": where, "rows": m, "equal_to_pytorch": guarded(name, checks[name])})
            reference = fn(1).clone()
            for chunks in sorted({1, 2, 4, 8, 16, 32, 63, default}):
                result = guarded(f"{name} chunks={chunks}", lambda: {
                    "us": graph_us(lambda: fn(chunks), calls), "equal_to_one_chunk": bool(torch.equal(fn(chunks), reference))})
                rows.append({"kernel": name, "where": where, "rows": m, "chunks": chunks, "default": chunks == default,
                             **result})
            log.info("%s m=%d %s", name, m, [(r.get("chunks"), r.get("us", r.get("equal_to_pytorch")))
                                             for r in rows if r["kernel"] == name and r["rows"] == m])
    return rows


def elementwise_inputs(m: int, attend_len: int) -> dict[str, tuple]:
    device, dtype = torch.device("cuda"), torch.bfloat16
    batch = 16 if m > 21 else 1
    per_row = m // batch
    weight = torch.ones(HIDDEN, device=device, dtype=dtype)
    qkv = torch.randn(batch, per_row, 3072, device=device, dtype=dtype)
    q, k, v = qkv.split([2048, 512, 512], dim=-1)
    cos, sin = (torch.randn(batch, per_row, 1, HEAD_DIM // 2, device=device) for _ in range(2))
    caches = [torch.zeros(batch, KV_HEADS, attend_len, HEAD_DIM, device=device, dtype=dtype) for _ in range(2)]
    slots = torch.arange(batch, device=device)[:, None]
    positions = torch.arange(per_row, device=device).expand(batch, per_row).contiguous()
    hidden = torch.randn(batch, per_row, HIDDEN, device=device, dtype=dtype)
    return {"rms_norm": (layer_kernels.rms_norm, (hidden, weight, 1e-5)),
            "add_rms_norm": (layer_kernels.add_rms_norm, (hidden, hidden.clone(), weight, 1e-5)),
            "silu_and_mul": (layer_kernels.silu_and_mul, (torch.randn(batch, per_row, 2 * FFN, device=device, dtype=dtype),)),
            "rope_and_cache": (layer_kernels.rope_and_cache,
                               (q.view(batch, per_row, HEADS, HEAD_DIM), k.view(batch, per_row, KV_HEADS, HEAD_DIM),
                                v.view(batch, per_row, KV_HEADS, HEAD_DIM), cos, sin, *caches, slots, positions))}


def elementwise_sweep(calls: int, attend_len: int) -> list[dict]:
    rows = []
    for name in ("rms_norm", "add_rms_norm", "silu_and_mul", "rope_and_cache"):
        fn = elementwise_inputs(1, attend_len)[name][0]
        modes = {"dynamic": torch.compile(fn, dynamic=True), "automatic": torch.compile(fn),
                 "static": torch.compile(fn, dynamic=False)}
        for variant, compiled in modes.items():
            for where, m in ROWS.items():
                args = elementwise_inputs(m, attend_len)[name][1]
                result = guarded(f"{name} {variant}", lambda: {"us": graph_us(lambda: compiled(*args), calls)})
                rows.append({"kernel": name, "variant": variant, "where": where, "rows": m, **result})
        log.info("%s %s", name, [(r["variant"], r["where"], r.get("us")) for r in rows[-12:]])
    return rows


FP8_TILINGS = tuple(SkinnyTiling(*t) for t in (
    (16, 256, 4, 4), (32, 256, 4, 4), (64, 256, 4, 3), (64, 128, 4, 4), (128, 256, 8, 3), (32, 512, 4, 3),
    (64, 512, 4, 3), (64, 256, 4, 3, 2), (64, 256, 4, 3, 4), (128, 256, 8, 3, 4), (32, 256, 4, 4, 4)))


def rotating(make: Callable[[], torch.Tensor], nbytes: int) -> Callable[[], torch.Tensor]:
    """Copies of a weight cycled through call by call, > 200 MB in all, so that back-to-back calls in
    one graph stream from memory as a model's different layers do (a single small weight would be
    read from L2 after the first call)."""
    copies = [make() for _ in range(max(1, min(16, -(-200_000_000 // nbytes))))]
    state = {"i": 0}

    def next_copy() -> torch.Tensor:
        state["i"] += 1
        return copies[state["i"] % len(copies)]
    return next_copy


def fp8_gemm_sweep(calls: int) -> list[dict]:
    """fp8 weights (ssd.layers.fp8) against bf16 at the 1B draft's shapes, weights rotated (see
    rotating): the few-row kernel widening fp8 on load per tiling (and split-K), torch._scaled_mm
    with per-row scales (the GEMM alone and with the activations' quantization), F.linear in bf16."""
    from ssd.layers.fp8 import quantize_weight, scaled_mm_linear
    rows, device = [], torch.device("cuda")
    quantized_mm = torch.compile(scaled_mm_linear)
    for (name, shape), (where, m) in itertools.product(WEIGHTS.items(), ROWS.items()):
        x = torch.randn(m, shape[1], device=device, dtype=torch.bfloat16)
        bf16 = rotating(lambda: torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02, 2 * shape[0] * shape[1])
        fp8 = rotating(lambda: quantize_weight(torch.randn(shape, device=device) * 0.02), shape[0] * shape[1])
        x_fp8, x_scale = x.to(torch.float8_e4m3fn), torch.ones(m, 1, device=device)
        candidates = {"bf16_linear": (lambda: F.linear(x, bf16()), 2),
                      "fp8_scaled_mm_gemm_only": (lambda: torch._scaled_mm(
                          x_fp8, (w := fp8())[0].t(), scale_a=x_scale, scale_b=w[1][None, :], out_dtype=torch.bfloat16), 1),
                      "fp8_scaled_mm_with_quant": (lambda: quantized_mm(x, *fp8()), 1)}
        if m <= MAX_ROWS:
            candidates["bf16_skinny_16x256"] = (lambda: skinny_linear(x, bf16(), CANDIDATES[0]), 2)
            candidates.update({f"fp8_skinny_{t.block_n}x{t.block_k}_w{t.num_warps}_s{t.num_stages}_k{t.split_k}":
                               (lambda t=t: skinny_linear(x, (w := fp8())[0], t, w[1]), 1)
                               for t in FP8_TILINGS if t.fits(shape[1])})
        for variant, (fn, bytes_per) in candidates.items():
            result = guarded(f"fp8 gemm {name} {variant} m={m}", lambda: {"us": graph_us(fn, calls)})
            if "us" in result:
                result["weight_tb_s"] = round(bytes_per * shape[0] * shape[1] / result["us"] / 1e6, 2)
            rows.append({"weight": name, "shape": list(shape), "where": where, "rows": m, "variant": variant, **result})
        best = min((r for r in rows[-len(candidates):] if "us" in r), key=lambda r: r["us"], default={})
        log.info("fp8 gemm %s m=%d best %s %s us; bf16 %s", name, m, best.get("variant"), best.get("us"),
                 next((r.get("us") for r in rows[-len(candidates):] if r["variant"] == "bf16_linear"), None))
    return rows


def lt_gemm_sweep(calls: int, count: int = 16) -> list[dict]:
    """F.linear against each of cuBLASLt's listed algorithms (ssd.layers.cublaslt) at the 1B draft's
    shapes, weights rotated (see rotating); every algorithm's product checked against F.linear's."""
    from ssd.layers.cublaslt import CublasLt
    rows, device, dtype = [], torch.device("cuda"), torch.bfloat16
    lt = CublasLt(device)
    for (name, shape), (where, m) in itertools.product(WEIGHTS.items(), ROWS.items()):
        x = torch.randn(m, shape[1], device=device, dtype=dtype)
        weight = rotating(lambda: torch.randn(shape, device=device, dtype=dtype) * 0.02, 2 * shape[0] * shape[1])
        reference = F.linear(x, weight()).float()
        candidates = {"linear": lambda: F.linear(x, weight())}
        for algorithm in lt.algorithms(x, weight(), count):
            w = weight()
            error = (lt.linear(x, w, algorithm).float() - F.linear(x, w).float()).abs().max().item()
            if error > 2e-2 * reference.abs().max().item() + 1e-3:
                rows.append({"weight": name, "rows": m, "variant": str(algorithm), "error": "disagrees",
                             "max_abs": error})
                continue
            candidates[str(algorithm)] = lambda a=algorithm: lt.linear(x, weight(), a)
        for variant, fn in candidates.items():
            result = guarded(f"lt gemm {name} {variant} m={m}", lambda: {"us": graph_us(fn, calls)})
            if "us" in result:
                result["weight_tb_s"] = round(2 * shape[0] * shape[1] / result["us"] / 1e6, 2)
                result["tflop_s"] = round(2 * m * shape[0] * shape[1] / result["us"] / 1e6, 1)
            rows.append({"weight": name, "shape": list(shape), "where": where, "rows": m, "variant": variant, **result})
        timed = [r for r in rows[-len(candidates):] if "us" in r]
        best = min(timed, key=lambda r: r["us"], default={})
        log.info("lt gemm %s m=%d: F.linear %s us, best %s %s us (%d algorithms)", name, m,
                 next((r["us"] for r in timed if r["variant"] == "linear"), None), best.get("variant"), best.get("us"),
                 len(candidates) - 1)
    return rows


TMA_TILINGS = tuple(TmaTiling(n, k, stages, split, warps) for n, k, stages, warps in (
    (64, 128, 4, 4), (64, 128, 6, 4), (64, 256, 3, 4), (128, 128, 4, 4), (128, 64, 6, 4), (64, 64, 8, 4))
    for split in (1, 2, 4))


def tma_gemm_sweep(calls: int) -> list[dict]:
    """The TMA kernel (ssd.layers.triton_linear.tma_linear) against F.linear and the few-row kernel
    at the 1B draft's few-row shapes, weights rotated (see rotating); each product checked first."""
    rows, device, dtype = [], torch.device("cuda"), torch.bfloat16
    for (name, shape), (where, m) in itertools.product(WEIGHTS.items(), ROWS.items()):
        if m > MAX_ROWS:
            continue
        x = torch.randn(m, shape[1], device=device, dtype=dtype)
        weight = rotating(lambda: torch.randn(shape, device=device, dtype=dtype) * 0.02, 2 * shape[0] * shape[1])
        w0 = weight()
        reference = F.linear(x, w0).float()
        candidates = {"linear": lambda: F.linear(x, weight())}
        candidates.update({f"skinny_{t.block_n}x{t.block_k}_s{t.num_stages}": (lambda t=t: skinny_linear(x, weight(), t))
                           for t in CANDIDATES})
        for t in TMA_TILINGS:
            if not t.fits(*shape):
                continue
            error = guarded(f"tma {t}", lambda t=t: {"max_abs": (tma_linear(x, w0, t).float() - reference).abs().max().item()})
            if "error" in error or error["max_abs"] > 2e-2 * reference.abs().max().item() + 1e-3:
                rows.append({"weight": name, "rows": m, "variant": str(t), "error": error.get("error", "disagrees")})
                continue
            candidates[f"tma_{t.block_n}x{t.block_k}_s{t.stages}_k{t.split_k}_w{t.num_warps}"] = \
                lambda t=t: tma_linear(x, weight(), t)
        for variant, fn in candidates.items():
            result = guarded(f"tma gemm {name} {variant} m={m}", lambda: {"us": graph_us(fn, calls)})
            if "us" in result:
                result["weight_tb_s"] = round(2 * shape[0] * shape[1] / result["us"] / 1e6, 2)
            rows.append({"weight": name, "shape": list(shape), "where": where, "rows": m, "variant": variant, **result})
        timed = [r for r in rows[-len(candidates):] if "us" in r]
        best = min(timed, key=lambda r: r["us"], default={})
        log.info("tma gemm %s m=%d: F.linear %s us, best %s %s us", name, m,
                 next((r["us"] for r in timed if r["variant"] == "linear"), None), best.get("variant"), best.get("us"))
    return rows


BEST_TMA = {"qkv": TmaTiling(64, 128, 6), "o": TmaTiling(64, 128, 6), "gate_up": TmaTiling(128, 128, 4),
            "down": TmaTiling(64, 256, 3, 4)}   # the unfused products: the best of results/tma_gemm_sweep_h200.json


def fusion_sweep(calls: int) -> list[dict]:
    """A layer's products with its norms, residual adds and SiLU inside (ssd.layers.norm_fusion)
    against the chains they replace: add + RMSNorm (compiled) then qkv / gate-up (+ SiLU-mul), and o /
    down alone (their residual add is in the next add + RMSNorm). Weights rotated (see rotating)."""
    from ssd.layers.norm_fusion import NORM_TMA_CANDIDATES, tma_norm_linear
    rows, device, dtype, eps = [], torch.device("cuda"), torch.bfloat16, 1e-5
    add_norm, silu = torch.compile(layer_kernels.add_rms_norm), torch.compile(layer_kernels.silu_and_mul)
    gain = torch.rand(HIDDEN, device=device, dtype=dtype) + 0.5
    for m in (ROWS["window_b1"], ROWS["tree_b1"]):
        h, residual = (torch.randn(m, HIDDEN, device=device, dtype=dtype) for _ in range(2))
        for name in BEST_TMA:
            shape = WEIGHTS[name]
            weight = rotating(lambda: torch.randn(shape, device=device, dtype=dtype) * 0.02, 2 * shape[0] * shape[1])
            x = torch.randn(m, shape[1], device=device, dtype=dtype)
            gated = name == "gate_up"
            if name in ("qkv", "gate_up"):
                chain = lambda: tma_linear(add_norm(h, residual, gain, eps)[0], weight(), BEST_TMA[name])  # noqa: E731
                fused = {t: (lambda t=t: tma_norm_linear(h, eps, weight(), t, gated=gated))
                         for t in NORM_TMA_CANDIDATES}
            else:
                chain = lambda: tma_linear(x, weight(), BEST_TMA[name])  # noqa: E731
                fused = {t: (lambda t=t: tma_linear(x, weight(), t, residual)) for t in TMA_TILINGS if t.fits(*shape)}
            candidates = {"chain": (lambda: silu(chain())) if gated else chain, **fused}
            for variant, fn in candidates.items():
                result = guarded(f"fusion {name} {variant} m={m}", lambda: {"us": graph_us(fn, calls)})
                rows.append({"op": name, "rows": m, "variant": str(variant), **result})
            timed = [r for r in rows[-len(candidates):] if "us" in r]
            best = min((r for r in timed if r["variant"] != "chain"), key=lambda r: r["us"], default={})
            log.info("fusion %s m=%d: chain %s us, best fused %s %s us", name, m,
                     next((r["us"] for r in timed if r["variant"] == "chain"), None), best.get("variant"), best.get("us"))
    return rows


def every_operand_mode(tilings) -> list:
    """The engine's fp8 tilings in each of weight_dot's ways to meet the activations (OPERAND_MODES)."""
    from ssd.layers.triton_linear import OPERAND_MODES
    return [dataclasses.replace(t, operands=mode) for mode in OPERAND_MODES for t in tilings]


def fp8_fusion_sweep(calls: int) -> list[dict]:
    """Every product of a 1B draft layer and its LM head with an fp8 weight inside the TMA kernels
    (widened to bf16, both operands as f16, or against fp8 activations: TmaTiling.operands; the fused
    norm / residual kernels for the layer, the plain one for the head) against the
    bf16 weight in the same kernels, and the head's other fp8 products (few-row kernel,
    torch._scaled_mm); weights rotated (see rotating), each fp8 product checked against its
    dequantized weight. Says which weights are worth storing in fp8 (ssd.layers.fp8.FP8_LAYERS)."""
    from ssd.layers.fp8 import quantize_weight, scaled_mm_linear
    from ssd.layers.norm_fusion import FP8_NORM_TMA_CANDIDATES, NORM_TMA_CANDIDATES, tma_norm_linear
    from ssd.layers.triton_linear import FP8_CANDIDATES, FP8_TMA_CANDIDATES, TMA_CANDIDATES
    rows, device, dtype, eps = [], torch.device("cuda"), torch.bfloat16, 1e-5
    quantized_mm = torch.compile(scaled_mm_linear)
    for m, name in itertools.product((ROWS["window_b1"], ROWS["tree_b1"]), WEIGHTS):
        shape, gated = WEIGHTS[name], name == "gate_up"
        x, residual = torch.randn(m, shape[1], device=device, dtype=dtype), torch.randn(m, shape[0], device=device, dtype=dtype)
        bf16 = rotating(lambda: torch.randn(shape, device=device, dtype=dtype) * 0.02, 2 * shape[0] * shape[1])
        fp8 = rotating(lambda: quantize_weight(torch.randn(shape, device=device) * 0.02), shape[0] * shape[1])
        q0, s0 = fp8()
        if name in ("qkv", "gate_up"):
            product = lambda w, t, s=None: tma_norm_linear(x, eps, w, t, gated=gated, scale=s)  # noqa: E731
            tilings = {"bf16": NORM_TMA_CANDIDATES, "fp8": every_operand_mode(FP8_NORM_TMA_CANDIDATES)}
        else:
            res = None if name == "lm_head" else residual
            product = lambda w, t, s=None, res=res: tma_linear(x, w, t, res, s)  # noqa: E731
            tilings = {"bf16": TMA_CANDIDATES, "fp8": every_operand_mode(FP8_TMA_CANDIDATES)}
        reference = product(q0.to(dtype) * s0[:, None].to(dtype), tilings["bf16"][0]).float()
        candidates = {f"bf16_tma_{t.label}": (lambda t=t: product(bf16(), t), 2)
                      for t in tilings["bf16"] if t.fits(shape[0] // (2 if gated else 1), shape[1])}
        for t in tilings["fp8"]:
            if not t.fits(shape[0] // (2 if gated else 1), shape[1]):
                continue
            check = guarded(f"fp8 {name} {t}", lambda t=t: {
                "max_abs": (product(q0, t, s0).float() - reference).abs().max().item()})
            if "error" in check or check["max_abs"] > t.tolerance * reference.abs().max().item() + 1e-3:
                rows.append({"op": name, "rows": m, "variant": f"fp8_tma_{t.label}", "error": check.get("error", "disagrees"),
                             **({"max_abs": check["max_abs"]} if "max_abs" in check else {})})
                continue
            candidates[f"fp8_tma_{t.label}"] = \
                (lambda t=t: (lambda q, s: product(q, t, s))(*fp8()), 1)
        if name == "lm_head":
            candidates["bf16_linear"] = (lambda: F.linear(x, bf16()), 2)
            candidates["fp8_scaled_mm_with_quant"] = (lambda: quantized_mm(x, *fp8()), 1)
            candidates.update({f"fp8_skinny_{t.block_n}x{t.block_k}_s{t.num_stages}_k{t.split_k}":
                               (lambda t=t: (lambda q, s: skinny_linear(x, q, t, s))(*fp8()), 1)
                               for t in FP8_CANDIDATES})
        for variant, (fn, bytes_per) in candidates.items():
            result = guarded(f"fp8 fusion {name} {variant} m={m}", lambda: {"us": graph_us(fn, calls)})
            if "us" in result:
                result["weight_tb_s"] = round(bytes_per * shape[0] * shape[1] / result["us"] / 1e6, 2)
            rows.append({"op": name, "rows": m, "variant": variant, **result})
        timed = [r for r in rows[-len(candidates):] if "us" in r]
        kinds = {"bf16": lambda v: v.startswith("bf16"), "fp8": lambda v: v.startswith("fp8"),
                 "fp8_f16": lambda v: v.endswith("_f16"), "fp8_fp8": lambda v: v.endswith("_fp8")}
        best = {kind: min((r for r in timed if test(r["variant"])), key=lambda r: r["us"], default={})
                for kind, test in kinds.items()}
        log.info("fp8 fusion %s m=%d: best %s", name, m,
                 ", ".join(f"{kind} {r.get('variant')} {r.get('us')} us" for kind, r in best.items()))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["attention", "argmax", "elementwise", "gemm"],
                        choices=("attention", "attention_stages", "gemm", "argmax", "elementwise", "autotune",
                                 "sampling", "fp8", "lt", "tma", "fusion", "fp8_fusion"),
                        help="autotune: Inductor's max-autotune Triton GEMMs (minutes of compiling); "
                             "attention_stages: the best block shapes at pipeline depths 2-5")
    parser.add_argument("--calls", type=int, default=16, help="calls per captured graph")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--attend-len", type=int, default=1024)
    parser.add_argument("--attention-preset", default="llama-3.2-1b",
                        help="the preset whose heads (query, KV, head dim) the attention parts use")
    parser.add_argument("--out", type=writable_file, default=None)
    args = parser.parse_args(argv)
    arch = preset_arch(args.attention_preset)
    heads = (arch.num_heads, arch.num_kv_heads, arch.head_dim)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch._dynamo.config.cache_size_limit = 256
    parts = {"attention": lambda: attention_sweep(args.calls, args.context, args.attend_len, heads=heads),
             "attention_stages": lambda: attention_sweep(args.calls, args.context, args.attend_len, deep_tilings, False,
                                                         heads),
             "gemm": lambda: gemm_sweep(args.calls, False), "autotune": lambda: gemm_sweep(args.calls, True), "argmax": lambda: argmax_sweep(args.calls),
             "elementwise": lambda: elementwise_sweep(args.calls, args.attend_len),
             "sampling": lambda: sampling_sweep(args.calls), "fp8": lambda: fp8_gemm_sweep(args.calls),
             "lt": lambda: lt_gemm_sweep(args.calls), "tma": lambda: tma_gemm_sweep(args.calls),
             "fusion": lambda: fusion_sweep(args.calls), "fp8_fusion": lambda: fp8_fusion_sweep(args.calls)}
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "preset_shapes": "llama-3.2-1b",
              "attention_heads": {"preset": args.attention_preset, "heads_kv_heads_head_dim": heads},
              "timing": f"CUDA graph of {args.calls} back-to-back calls, replayed", "env": collect_env()}
    with torch.inference_mode():
        for part in args.parts:
            result[part] = guarded(part, parts[part])
            if args.out:  # partial results survive a time-out
                write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
