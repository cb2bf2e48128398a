"""The fused MLP block (ssd.layers.triton_mlp) against the engine's four-kernel chain — compiled
residual add + RMSNorm, the measured linear (cuBLAS / cuBLASLt / Triton, fastest per shape), compiled
SiLU * up, the measured linear — at a draft's shapes and the row counts of its rounds (7: the window
at B = 1; 21 / 42: the tree at B = 1 / 2). Random inputs (times do not depend on values).

    PYTHONUNBUFFERED=1 python bench/mlp_block_bench.py --out $OUT/mlp_block.json

Each arm is captured --calls times back to back in one CUDA graph over one weight set per layer
(as many as the preset has: the stream comes from memory, not L2) and the graph replayed. Before
timing, every fused tiling is checked against the chain (relative error of the block's output),
also after the graph replays (the grid barrier's counters must come back to zero).
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

from ssd.engine.gpu_timing import graph_time_us  # noqa: E402
from ssd.layers.kernels import Kernels  # noqa: E402
from ssd.layers.triton_mlp import FusedMlp, MlpTiling  # noqa: E402
from ssd.models.presets import preset_arch  # noqa: E402

log = logging.getLogger("mlp_block_bench")

TILINGS = (MlpTiling(), MlpTiling(64, 128, 16, 512), MlpTiling(64, 256, 16, 256, 4, 2), MlpTiling(64, 128, 16, 256, 8, 3),
           MlpTiling(32, 128, 16, 256, 4, 4), MlpTiling(32, 256, 16, 256, 4, 3), MlpTiling(64, 64, 16, 256, 4, 4),
           MlpTiling(64, 128, 32, 256, 4, 3))


def layer_weights(hidden: int, intermediate: int, layers: int) -> list[tuple[torch.Tensor, ...]]:
    return [(1 + 0.1 * torch.randn(hidden), torch.randn(2 * intermediate, hidden) / hidden ** 0.5,
             torch.randn(hidden, intermediate) / intermediate ** 0.5) for _ in range(layers)]


def chain(kernels: Kernels, eps: float):
    def block(x, residual, norm, gate_up, down):
        normed, residual = kernels.add_rms_norm(x, residual, norm, eps)
        return kernels.linear(kernels.silu_and_mul(kernels.linear(normed, gate_up)), down), residual
    return block


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def over_layers(block, x, residual, weights):
    """Every layer's block once (the graph's unit): the weights stream from memory."""
    def run():
        for norm, gate_up, down in weights:
            block(x, residual, norm, gate_up, down)
    return run


def measure(preset: str, rows: int, calls: int, eps: float = 1e-5) -> list[dict]:
    arch = preset_arch(preset)
    weights = layer_weights(arch.hidden_size, arch.intermediate_size, arch.num_layers)
    x, residual = torch.randn(rows, arch.hidden_size), torch.randn(rows, arch.hidden_size)
    reference = chain(Kernels.compiled(measured_linear=True), eps)
    want = reference(x, residual, *weights[0])
    layers = len(weights)
    results = [{"preset": preset, "rows": rows, "arm": "chain",
                "us_per_layer": graph_time_us(over_layers(reference, x, residual, weights), calls) / layers}]
    for tiling in TILINGS:
        fused = FusedMlp(tiling)
        row = {"preset": preset, "rows": rows, "arm": "fused", "tiling": str(tiling)}
        if not fused.applies(x, weights[0][1], weights[0][2]):
            continue
        try:
            got = fused(x, residual, weights[0][0], eps, weights[0][1], weights[0][2])
            row["error"] = relative_error(got[0], want[0])
            row["residual_equal"] = bool(torch.equal(got[1], want[1]))
            block = lambda x, r, n, gu, d, f=fused: f(x, r, n, eps, gu, d)  # noqa: E731
            row["us_per_layer"] = graph_time_us(over_layers(block, x, residual, weights), calls) / layers
            again = fused(x, residual, weights[0][0], eps, weights[0][1], weights[0][2])
            row["error_after_replays"] = relative_error(again[0], want[0])
            row["sync_counters"] = fused.sync(x.device).tolist()
        except Exception as exc:   # a tiling that does not fit (shared memory): recorded, not fatal
            row["failed"] = repr(exc)[:300]
        results.append(row)
        log.info("%s", row)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["llama-3.2-1b", "qwen3-0.6b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[7, 21, 42])
    parser.add_argument("--calls", type=int, default=2, help="passes over every layer per captured graph")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_default_device("cuda")
    torch.set_default_dtype(torch.bfloat16)
    rows = []
    for preset in args.presets:
        for count in args.rows:
            rows.extend(measure(preset, count, args.calls))
            best = min((r for r in rows if r["preset"] == preset and r["rows"] == count and "us_per_layer" in r),
                       key=lambda r: r["us_per_layer"])
            log.info("%s rows=%d: chain %.2f us/layer, best %s %.2f", preset, count,
                     next(r["us_per_layer"] for r in rows if r["preset"] == preset and r["rows"] == count
                          and r["arm"] == "chain"), best.get("tiling", "chain"), best["us_per_layer"])
            if args.out:
                Path(args.out).write_text(json.dumps(
                    {"schema": "ssd-mlp-block-bench/1", "device": torch.cuda.get_device_name(0),
                     "torch": torch.__version__, "weights": "random (timing only)", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
