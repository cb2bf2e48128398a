"""Does every tiling of the fused norm + product kernel (ssd.layers.norm_fusion.tma_norm_linear) agree
with the unfused chain, for every row count and several kinds of input, every time it runs? The engine
checks a tiling once, on the activations at hand, before it takes it (triton_linear.fastest_agreeing);
a tiling that is wrong only on some inputs, or only some of the time, would pass that check and later
compute garbage. GPU; random weights at a target's shapes (default qwen3-32b's qkv and gate/up).

    python bench/fused_norm_agreement.py --presets qwen3-32b llama-3.1-8b --out agreement.json
    python bench/fused_norm_agreement.py --presets llama-3.2-1b qwen3-0.6b --weights bf16 fp8 --out drafts.json

Each (input kind, rows, tiling) runs REPEATS times: the largest error relative to the reference's
largest value (the engine rejects above TmaTiling.tolerance, 2e-2) and whether the repeats were bitwise
equal. --time-rows adds each tiling's microseconds (weights cycled past L2).

Found with it (H100, Triton 3.6): while the kernel summed x's squares from the pipelined tile the MMA
reads, qwen3-32b's qkv at 56 / 64 rows with 64x128 tiles of 3 and 4 stages came out ~7 % off and
different every run; the kernel now sums them from a load of their own (every check agrees; the 1B
draft's fused products +0.0-0.2 us). results/fused_norm_agreement_h100_race.json, _variants.json.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.cli_types import writable_file  # noqa: E402
from ssd.json_files import write_json  # noqa: E402
from ssd.layers.fp8 import quantize_weight  # noqa: E402
from ssd.layers.norm_fusion import FP8_NORM_TMA_CANDIDATES, NORM_TMA_CANDIDATES, tma_norm_linear  # noqa: E402
from ssd.layers.triton_linear import MAX_ROWS  # noqa: E402
from ssd.models.presets import preset_arch  # noqa: E402

log = logging.getLogger("fused_norm_agreement")
EPS = 1e-6   # qwen3; the norm eps does not change which tilings agree
ROWS = (1, 2, 4, 7, 8, 14, 16, 28, 32, 56, 64)


def inputs(kind: str, rows: int, hidden: int, device, dtype) -> torch.Tensor:
    """Hidden states of a few shapes a random-weight model produces: unit normal, embedding-small,
    every row the same, the second half of the rows zero (a batch bucket's padding), a few channels 100x
    the rest (grown residuals)."""
    g = torch.Generator(device=device).manual_seed(rows)
    h = torch.randn(rows, hidden, device=device, generator=g)
    if kind == "small":
        h *= 0.02
    elif kind == "same_rows":
        h = h[:1].expand(rows, -1)
    elif kind == "padded":
        h[(rows + 1) // 2:] = 0
    elif kind == "outliers":
        h[:, :8] *= 100.0
    return h.to(dtype).contiguous()


def reference(h: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    """The unfused chain with gains of 1 (the engine folds them into the weight): norm in float32,
    rounded to bf16, then the product (+ SiLU * up)."""
    normed = F.rms_norm(h.float(), (h.shape[-1],), eps=EPS).to(h.dtype)
    y = F.linear(normed, weight)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y.float()


def as_stored(weight: torch.Tensor, kind: str):
    """(weight as the kernel takes it, its per-row scales or None, the tilings the engine tries, the weight
    the reference multiplies): bf16 as is; fp8 quantized per row (ssd.layers.fp8), dequantized for the
    reference."""
    if kind == "bf16":
        return weight, None, NORM_TMA_CANDIDATES, weight
    quantized, scale = quantize_weight(weight.float())
    return quantized, scale, FP8_NORM_TMA_CANDIDATES, (quantized.float() * scale[:, None]).to(weight.dtype)


def check(h: torch.Tensor, stored, gated: bool, repeats: int) -> list[dict]:
    weight, scale, tilings, dequantized = stored
    ref = reference(h, dequantized, gated)
    largest = ref.abs().max().item()
    results = []
    for tiling in tilings:
        try:
            outs = [tma_norm_linear(h, EPS, weight, tiling, gated=gated, scale=scale) for _ in range(repeats)]
        except Exception as exc:   # e.g. shared memory: not a candidate at this shape
            results.append({"tiling": tiling.label, "error": type(exc).__name__})
            continue
        worst = max((out.float() - ref).abs().max().item() for out in outs) / max(largest, 1e-30)
        results.append({"tiling": tiling.label, "max_rel_error": worst,
                        "repeats_equal": all(torch.equal(outs[0], out) for out in outs[1:]),
                        "rejected": worst * largest > tiling.tolerance * largest + 1e-3})
    return results


def timed(rows: int, n: int, hidden: int, gated: bool, weights: str, device) -> list[dict]:
    """Microseconds per product of each tiling, weights cycled past L2 as a model's layers are."""
    from draft_kernel_sweep import graph_us, rotating   # noqa: E402  (this directory is on sys.path)
    stored = rotating(lambda: as_stored(torch.randn(n, hidden, device=device, dtype=torch.bfloat16) * 0.02, weights),
                      n * hidden * (2 if weights == "bf16" else 1))
    h = inputs("normal", rows, hidden, device, torch.bfloat16)

    def product(tiling):
        weight, scale, _, _ = stored()   # the next copy
        return tma_norm_linear(h, EPS, weight, tiling, gated=gated, scale=scale)
    results = []
    for tiling in stored()[2]:
        try:
            us = graph_us(lambda t=tiling: product(t), 20)
        except Exception as exc:
            log.debug("%s failed: %s", tiling, exc)
            continue
        results.append({"tiling": tiling.label, "rows": rows, "us": us})
    return results


def fused_products(presets: list[str]):
    """(preset, name, N, K, gated) of each preset's products with a norm in front: qkv, gate/up."""
    for preset in presets:
        arch = preset_arch(preset)
        yield preset, "qkv", (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim, arch.hidden_size, False
        yield preset, "gate_up", 2 * arch.intermediate_size, arch.hidden_size, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["qwen3-32b"])
    parser.add_argument("--kinds", nargs="+", default=["normal", "small", "same_rows", "padded", "outliers"])
    parser.add_argument("--rows", nargs="+", type=int, default=[r for r in ROWS if r <= MAX_ROWS])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", nargs="+", choices=["bf16", "fp8"], default=["bf16"],
                        help="fp8: quantized per row, the engine's fp8 tilings (f16 operands; GPU only)")
    parser.add_argument("--time-rows", nargs="*", type=int, default=[], help="also time each tiling at these rows")
    parser.add_argument("--device", default="cuda",
                        help="cpu: a smoke run under TRITON_INTERPRET=1, in float32 (the interpreter's bf16 dot is not the GPU's)")
    parser.add_argument("--out", type=writable_file, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows_out, times = [], []
    for (preset, name, n, hidden, gated), weights in itertools.product(fused_products(args.presets), args.weights):
        stored = as_stored((torch.randn(n, hidden, device=device) * 0.02).to(dtype), weights)
        case = {"preset": preset, "weight": name, "shape": [n, hidden], "weights": weights}
        for kind, m in itertools.product(args.kinds, args.rows):
            for result in check(inputs(kind, m, hidden, device, dtype), stored, gated, args.repeats):
                rows_out.append({**case, "kind": kind, "rows": m, **result})
                if result.get("rejected") or result.get("repeats_equal") is False:
                    log.warning("%s %s %s rows=%d %s: %s", name, weights, kind, m, result["tiling"], result)
        for m in args.time_rows:
            for result in timed(m, n, hidden, gated, weights, device):
                times.append({**case, **result})
                log.info("%s %s %s %s", preset, name, weights, result)
        these = [r for r in rows_out if all(r[key] == value for key, value in case.items())]
        log.info("%s %s %s %s: %d checks, %d rejected, %d not repeatable", preset, name, weights, (n, hidden),
                 len(these), sum(bool(r.get("rejected")) for r in these),
                 sum(r.get("repeats_equal") is False for r in these))
    write_json(args.out, {"schema": "ssd-fused-norm-agreement/1", "presets": args.presets, "eps": EPS,
                          "repeats": args.repeats, "env": collect_env(), "rows": rows_out, "times": times})


if __name__ == "__main__":
    main()
