"""GPU micro/macro benchmark of the engine core, written to one JSON file.

    PYTHONUNBUFFERED=1 python bench/engine_bench.py --presets llama-3.1-8b qwen3-32b --out $OUT/engine.json

Per preset (random bf16 weights at the real shapes) and per variant (compile / nocompile / eager):
forward timing with CUDA events (decode T=1 and window T=8 at batch 1..16, context ~512), end-to-end
greedy `generate` at B=1 and B=16, plus reference points: device copy bandwidth, a CUDA graph of the
preset's plain linears (the cuBLAS GEMV streaming bound) and one layer's attention (the engine's
grouped-matmul path, eager and compiled, against SDPA's backends). Every case is recorded
(ok / error / skipped) and the JSON is rewritten after each one, so a run cut short still leaves its
results. Cases are skipped once --budget-s is spent.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, no install

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ssd.benchmark.bandwidth import nominal_bandwidth  # noqa: E402
from ssd.cli_types import writable_file  # noqa: E402

log = logging.getLogger("engine_bench")

SCHEMA = "ssd-engine-bench/1"
# Nominal HBM bandwidth (bytes/s) by device-name substring; first match wins (most specific first).
SDPA_BACKENDS = ("default", "MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION")
ATTENTION_CELLS = ((1, 1), (16, 1), (1, 8), (16, 8))  # (batch, width)
MULTICAST_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")

Timer = Callable[[Callable[[], Any], int, int], list]  # (fn, warmup, iters) -> per-iteration ms


@dataclass(frozen=True)
class Variant:
    name: str
    llm_kwargs: tuple[tuple[str, Any], ...]
    full_grid: bool   # all (batch, width) forward cells, else B=1 decode only
    generate: bool


VARIANTS = (Variant("compile", (("compile", True),), True, True),
            Variant("nocompile", (("compile", False),), True, True),
            Variant("eager", (("enforce_eager", True), ("compile", False)), False, False))


@dataclass(frozen=True)
class BenchConfig:
    presets: tuple[str, ...]
    variants: tuple[str, ...]
    out: Path
    device: str = "cuda"
    budget_s: float = 420.0
    min_build_s: float = 30.0
    iters: int = 50
    warmup: int = 10
    synced_iters: int = 20
    context: int = 512
    max_model_len: int = 1024
    max_num_seqs: int = 16
    window: int = 8
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    gen_batches: tuple[int, ...] = (1, 16)
    gen_prompt_len: int = 128
    gen_new_tokens: int = 256
    linear_batches: tuple[int, ...] = (1, 8, 16)
    copy_gib: float = 4.0
    nominal_bw: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Refs:
    """Bandwidths (bytes/s) the measurements are compared against; None where unknown."""
    nominal_Bps: float | None = None
    copy_Bps: float | None = None


@dataclass(frozen=True)
class Timers:
    device: Timer   # back-to-back iterations, device time per iteration
    synced: Timer   # host wall time per iteration, synchronising after each


# ---------------------------------------------------------------- pure helpers (unit-tested on CPU)
def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_ms(times_ms: list[float]) -> dict:
    return {"median_ms": percentile(times_ms, 50), "p10_ms": percentile(times_ms, 10),
            "p90_ms": percentile(times_ms, 90), "mean_ms": sum(times_ms) / len(times_ms),
            "min_ms": min(times_ms), "n": len(times_ms)}


def bandwidth_fields(bytes_moved: float, seconds: float, refs: Refs) -> dict:
    """Achieved bandwidth and the fraction of each reference (= roofline time / measured time)."""
    achieved = bytes_moved / seconds
    frac = lambda ref: achieved / ref if ref else None  # noqa: E731
    return {"achieved_GBps": achieved / 1e9, "frac_of_nominal": frac(refs.nominal_Bps),
            "frac_of_copy": frac(refs.copy_Bps)}


def roofline_times(bytes_per_step: float, refs: Refs) -> dict:
    ms = lambda ref: 1e3 * bytes_per_step / ref if ref else None  # noqa: E731
    return {"nominal_step_ms": ms(refs.nominal_Bps), "copy_step_ms": ms(refs.copy_Bps)}


def attend_bucket(needed: int, max_len: int) -> int:
    """Mirror of ModelRunner.attend_bucket: a power of two >= needed, at least 256, at most max_len."""
    return min(max_len, max(256, 1 << (needed - 1).bit_length()))


def linear_shapes(arch) -> list[tuple[int, int]]:
    """(out, in) of every weight a decode step streams through a GEMV, in forward order."""
    h, f = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)]
    return per_layer * arch.num_layers + [(arch.vocab_size, h)]


def streamed_bytes(arch, bytes_per_param: int = 2) -> int:
    """Bytes a decode step reads: all linears + lm_head (the embedding table is only gathered)."""
    return sum(o * i for o, i in linear_shapes(arch)) * bytes_per_param


def forward_record(batch: int, width: int, device_ms: dict, synced_ms: dict | None,
                   weight_bytes: int, stream_bytes: int, refs: Refs) -> dict:
    seconds = device_ms["median_ms"] / 1e3
    return {"batch": batch, "width": width, "device": device_ms, "synced": synced_ms,
            "tok_s": batch * width / seconds,  # decode (width 1): tokens generated per second
            **bandwidth_fields(weight_bytes, seconds, refs),
            "streamed_GBps": stream_bytes / seconds / 1e9}


def generate_record(batch: int, stats: dict, wall_s: float, weight_bytes: int, refs: Refs) -> dict:
    rounds = max(stats["num_rounds"], 1)
    step_s = stats["decode_time_s"] / rounds
    roofline_tok_s = batch * refs.nominal_Bps / weight_bytes if refs.nominal_Bps else None
    return {"batch": batch, **stats, "wall_s": wall_s, "step_ms": 1e3 * step_s,
            "roofline_tok_s": roofline_tok_s, **bandwidth_fields(weight_bytes, step_s, refs)}


def window_ratios(forward_results: list[dict], window: int) -> dict[str, float]:
    """Window (T=window) forward time over decode (T=1) time, per batch."""
    by_cell = {(r["batch"], r["width"]): r["device"]["median_ms"] for r in forward_results}
    return {str(b): by_cell[b, window] / by_cell[b, 1]
            for (b, w) in sorted(by_cell) if w == 1 and (b, window) in by_cell}


def summarize_cases(cases: list[dict], window: int) -> dict:
    """Compact view: per preset and variant, decode ms / tok/s, window ratios, generate tok/s."""
    out: dict = {}
    for c in cases:
        if c["status"] != "ok" or "variant" not in c:
            continue
        row = out.setdefault(c["preset"], {}).setdefault(c["variant"], {"forward": [], "generate": []})
        if c["case"] == "forward":
            row["forward"].append(c["result"])
        elif c["case"] == "generate":
            row["generate"].append(c["result"])
    for variants in out.values():
        for name, row in variants.items():
            fwd, gen = row.pop("forward"), row.pop("generate")
            row["forward_ms"] = {f"B{r['batch']}xT{r['width']}": round(r["device"]["median_ms"], 4) for r in fwd}
            row["decode_frac_of_nominal"] = {f"B{r['batch']}": r["frac_of_nominal"] for r in fwd if r["width"] == 1}
            row["window_over_decode"] = window_ratios(fwd, window)
            row["generate_decode_tok_s"] = {f"B{r['batch']}": r["decode_tok_s"] for r in gen}
            row["generate_frac_of_nominal"] = {f"B{r['batch']}": r["frac_of_nominal"] for r in gen}
    return out


# ---------------------------------------------------------------- budget and case recording
@dataclass
class Budget:
    total_s: float
    clock: Callable[[], float] = time.monotonic
    start: float | None = None

    def __post_init__(self):
        if self.start is None:
            self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def allows(self, need_s: float = 0.0) -> bool:
        return self.remaining() > need_s


@dataclass
class Recorder:
    """Runs cases, records each (ok / error / skipped) and rewrites the JSON file after each."""
    budget: Budget
    out: Path | None
    result: dict = field(default_factory=lambda: {"schema": SCHEMA, "cases": []})

    def run(self, case: str, fn: Callable[[], Any], need_s: float = 0.0, **labels) -> Any:
        if not self.budget.allows(need_s):
            self.skip(case, f"time budget: {self.budget.remaining():.0f}s left, case needs > {need_s:.0f}s",
                      **labels)
            return None
        log.info("case %s %s ...", case, _fmt_labels(labels))
        record = {"case": case, **labels}
        start = time.perf_counter()
        value = None
        try:
            value = fn()
            record.update(status="ok", result=value)
        except Exception as exc:  # one failing case must not end the run
            record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                          traceback=traceback.format_exc()[-4000:])
            log.error("case %s %s failed: %s: %s", case, _fmt_labels(labels), type(exc).__name__, exc)
        record["elapsed_s"] = round(time.perf_counter() - start, 3)
        record["budget_elapsed_s"] = round(self.budget.elapsed(), 1)
        log.info("case %s %s -> %s in %.1fs", case, _fmt_labels(labels), record["status"], record["elapsed_s"])
        self._append(record)
        return value

    def skip(self, case: str, reason: str, **labels) -> None:
        log.warning("case %s %s skipped: %s", case, _fmt_labels(labels), reason)
        self._append({"case": case, **labels, "status": "skipped", "reason": reason})

    def _append(self, record: dict) -> None:
        self.result["cases"].append(record)
        self.write()

    def write(self) -> None:
        if self.out is None:
            return
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=_json_default))
        tmp.replace(self.out)


def _fmt_labels(labels: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in labels.items())


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    return repr(obj)


# ---------------------------------------------------------------- timing
def cuda_event_times(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def wall_times(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def make_timers(device: str) -> Timers:
    if device == "cuda":
        return Timers(cuda_event_times, lambda fn, w, n: wall_times(fn, w, n, torch.cuda.synchronize))
    wall = lambda fn, w, n: wall_times(fn, w, n, lambda: None)  # noqa: E731
    return Timers(wall, wall)


def free_device_memory() -> None:
    """Best effort: after a sticky CUDA error even synchronize raises, and the run must go on."""
    gc.collect()
    if not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:
        log.warning("freeing device memory failed: %s: %s", type(exc).__name__, exc)


def memory_snapshot() -> dict:
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"allocated_GB": torch.cuda.memory_allocated() / 1e9, "reserved_GB": torch.cuda.memory_reserved() / 1e9,
            "free_GB": free / 1e9, "total_GB": total / 1e9}


# ---------------------------------------------------------------- reference points
def copy_bandwidth(gib: float, device: str, timer: Timer) -> dict:
    n = int(gib * 2**30)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = summarize_ms(timer(lambda: dst.copy_(src), 3, 10))
    rw_bps = 2 * n / (timing["median_ms"] / 1e3)
    return {"bytes": n, "copy_rw_Bps": rw_bps, "copy_rw_GBps": rw_bps / 1e9, "timing": timing,
            "convention": "bytes read + bytes written per second (2 x size / time)"}


def linears_step(weights: list[torch.Tensor], batch: int, device: str) -> Callable[[], Any]:
    """One pass of plain F.linear over every weight at batch `batch`: a CUDA graph replay on GPU."""
    xs = {i: torch.randn(batch, i, dtype=weights[0].dtype, device=device) for i in {w.shape[1] for w in weights}}

    def run():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    if device != "cuda":
        return run
    run()
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    def replay(inputs=xs):  # holds the captured input buffers alive as long as the step
        graph.replay()
    return replay


@torch.inference_mode()
def linears_only(arch, batches: tuple[int, ...], device: str, dtype: torch.dtype, timer: Timer,
                 refs: Refs) -> dict:
    shapes = linear_shapes(arch)
    weights = [torch.empty(o, i, dtype=dtype, device=device).normal_(0.0, i ** -0.5) for o, i in shapes]
    total = sum(w.numel() * w.element_size() for w in weights)
    per_batch = {}
    for batch in batches:
        timing = summarize_ms(timer(linears_step(weights, batch, device), 3, 20))
        per_batch[str(batch)] = {"timing": timing, **bandwidth_fields(total, timing["median_ms"] / 1e3, refs),
                                 "tok_s_bound": batch / (timing["median_ms"] / 1e3)}
    return {"num_linears": len(shapes), "bytes": total, "per_batch": per_batch}


def attention_inputs(arch, batch: int, width: int, attend_len: int, max_len: int, device: str,
                     dtype: torch.dtype) -> dict:
    """One layer's attention inputs with the engine's layouts: q [B,T,Hq,D]; keys/values sliced from a
    slot cache [B,Hkv,max_len,D] to attend_len; causal mask [B,1,T,L] for positions near attend_len/2."""
    from ssd.layers.attention import causal_mask
    hq, hkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    k_cache = torch.randn(batch, hkv, max_len, d, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    positions = (attend_len // 2 + torch.arange(width, device=device)).expand(batch, width)
    return {"q": torch.randn(batch, width, hq, d, dtype=dtype, device=device),
            "keys": k_cache[:, :, :attend_len], "values": v_cache[:, :, :attend_len],
            "mask": causal_mask(positions, attend_len), "scale": d ** -0.5}


def attention_calls(inputs: dict, compiled_grouped) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (call, context): the engine's grouped-matmul path (eager and compiled) and SDPA with
    enable_gqa + bool mask under each backend (the engine's prefill path)."""
    from ssd.layers.attention import grouped_attention
    q, keys, values, mask, scale = (inputs[k] for k in ("q", "keys", "values", "mask", "scale"))
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,  # noqa: E731
                                                  scale=scale, enable_gqa=True)
    calls = {"grouped_eager": (lambda: grouped_attention(q, keys, values, mask, scale), contextlib.nullcontext),
             "grouped_compiled": (lambda: compiled_grouped(q, keys, values, mask, scale), contextlib.nullcontext)}
    for name in SDPA_BACKENDS:
        calls[f"sdpa_{name}"] = (sdpa, lambda name=name: sdpa_backend_context(name))
    return calls


def sdpa_backend_context(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, name)])


@torch.inference_mode()
def attention_probe(arch, cfg: BenchConfig, dtype: torch.dtype, timer: Timer) -> dict:
    """Per (batch, width) cell and implementation: one layer's attention ms and x num_layers (per step)."""
    from ssd.layers.attention import grouped_attention
    compiled_grouped = torch.compile(grouped_attention, dynamic=True)
    out = {}
    for batch, width in ATTENTION_CELLS:
        attend_len = attend_bucket(cfg.context + width, cfg.max_model_len)
        inputs = attention_inputs(arch, batch, width, attend_len, cfg.max_model_len, cfg.device, dtype)
        cell = {"attend_len": attend_len}
        for name, (call, context) in attention_calls(inputs, compiled_grouped).items():
            try:
                with context():
                    ms = summarize_ms(timer(call, 3, 20))["median_ms"]
                cell[name] = {"ms": ms, "per_step_ms": ms * arch.num_layers}
            except Exception as exc:  # a backend that rejects these inputs is a result, not a failure
                cell[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        out[f"B{batch}xT{width}"] = cell
    return out


def arch_info(arch) -> dict:
    fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "tie_word_embeddings", "qk_norm")
    return {f: getattr(arch, f) for f in fields} | {"weight_bytes": arch.weight_bytes(),
                                                    "streamed_bytes": streamed_bytes(arch)}


def load_model_arch(model: str):
    from ssd.engine.model_runner import load_arch
    from ssd.engine.runner_config import RunnerConfig
    return load_arch(RunnerConfig(model=model))


def engine_dtype(device: str) -> torch.dtype:
    from ssd.engine.llm import resolve_dtype
    return resolve_dtype(None, device)


# ---------------------------------------------------------------- the engine
def build_llm(model: str, variant: Variant, cfg: BenchConfig):
    from ssd.engine.llm import LLM
    return LLM(model, device=cfg.device, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
               window_sizes=(cfg.window,), seed=cfg.seed, **dict(variant.llm_kwargs))


def dynamo_cache_entries() -> dict:
    """Compiled variants held per fused kernel of ssd.layers.kernels.Kernels (informative)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        from ssd.layers.kernels import Kernels
        return {f.name: len(_debug_get_cache_entry_list(f.default.__code__))
                for f in dataclasses.fields(Kernels) if hasattr(f.default, "__code__")}
    except Exception as exc:  # private API
        return {"error": repr(exc)}


def build_case(box: dict, model: str, variant: Variant, cfg: BenchConfig) -> dict:
    before = memory_snapshot()
    start = time.perf_counter()
    llm = build_llm(model, variant, cfg)
    box["llm"] = llm
    graphs = llm.runner.graphs
    return {"build_s": time.perf_counter() - start, "max_len": llm.runner.max_len,
            "num_graphs": len(graphs.graphs) if graphs else 0,
            "graph_attend_lens": list(graphs.attend_lens) if graphs else [],
            "memory_before": before, "memory_after": memory_snapshot(),
            "dynamo_cache_entries": dynamo_cache_entries()}


def forward_step(runner, batch: int, width: int, context: int, inference: bool = True) -> Callable[[], Any]:
    """One runner.forward at positions context..context+width-1 (inputs already on the device)."""
    ids = torch.randint(0, runner.arch.vocab_size, (batch, width), device=runner.device)
    positions = (context + torch.arange(width, device=runner.device)).expand(batch, width).contiguous()
    max_position = context + width - 1
    mode = torch.inference_mode if inference else contextlib.nullcontext

    def step():
        with mode():
            return runner.forward(ids, positions, max_position)
    return step


def uses_graph(runner, batch: int, width: int, max_position: int) -> bool:
    graphs = runner.graphs
    return graphs is not None and graphs.has(batch, width, runner.attend_bucket(max_position + 1))


def forward_case(runner, batch: int, width: int, cfg: BenchConfig, timers: Timers, refs: Refs) -> dict:
    step = forward_step(runner, batch, width, cfg.context)
    device_ms = summarize_ms(timers.device(step, cfg.warmup, cfg.iters))
    synced_ms = summarize_ms(timers.synced(step, 2, cfg.synced_iters)) if cfg.synced_iters else None
    record = forward_record(batch, width, device_ms, synced_ms, runner.arch.weight_bytes(),
                            streamed_bytes(runner.arch), refs)
    max_position = cfg.context + width - 1
    return record | {"graph_replay": uses_graph(runner, batch, width, max_position),
                     "attend_len": runner.attend_bucket(max_position + 1), "context": cfg.context}


def plain_forward_check(runner, cfg: BenchConfig) -> dict:
    """runner.forward called as the engine's decoders call it: outside torch.inference_mode."""
    logits = forward_step(runner, 1, 1, cfg.context, inference=False)()
    return {"logits_shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all())}


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).tolist()


def run_generate(llm, prompts: list[list[int]], new_tokens: int, inference: bool) -> tuple[dict, float, int]:
    from ssd.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    mode = torch.inference_mode() if inference else contextlib.nullcontext()
    start = time.perf_counter()
    with mode:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    s = llm.last_run_stats
    stats = {"decode_tok_s": s.decode_tok_s, "decode_time_s": s.decode_time_s, "decode_tokens": s.decode_tokens,
             "num_rounds": s.num_rounds, "prefill_time_s": s.prefill_time_s, "prefill_tokens": s.prefill_tokens}
    return stats, wall, sum(len(o.token_ids) for o in outputs)


def generate_warmup(llm, cfg: BenchConfig, box: dict) -> dict:
    """Short generates at every batch; falls back to torch.inference_mode if the plain call fails
    (records why), so the timed runs still measure decode."""
    vocab = llm.runner.arch.vocab_size
    prompts = [random_prompts(b, cfg.gen_prompt_len, vocab, cfg.seed + 1) for b in cfg.gen_batches]
    try:
        for p in prompts:
            run_generate(llm, p, 4, inference=False)
        box["inference"] = False
        return {"mode": "plain"}
    except Exception as exc:
        plain_error = f"{type(exc).__name__}: {exc}"[:1000]
        log.warning("plain generate failed (%s); retrying inside torch.inference_mode", plain_error)
    for p in prompts:
        run_generate(llm, p, 4, inference=True)
    box["inference"] = True
    return {"mode": "inference_mode (workaround)", "plain_error": plain_error}


def generate_case(llm, batch: int, cfg: BenchConfig, refs: Refs, inference: bool) -> dict:
    prompts = random_prompts(batch, cfg.gen_prompt_len, llm.runner.arch.vocab_size, cfg.seed)
    stats, wall, out_tokens = run_generate(llm, prompts, cfg.gen_new_tokens, inference)
    record = generate_record(batch, stats, wall, llm.runner.arch.weight_bytes(), refs)
    return record | {"output_tokens": out_tokens, "expected_output_tokens": batch * cfg.gen_new_tokens,
                     "prompt_len": cfg.gen_prompt_len, "inference_mode_workaround": inference}


def forward_cells(variant: Variant, cfg: BenchConfig) -> list[tuple[int, int]]:
    if not variant.full_grid:
        return [(1, 1)]
    return [(b, w) for w in (1, cfg.window) for b in cfg.batches if b <= cfg.max_num_seqs]


def model_cases(rec: Recorder, llm, variant: Variant, cfg: BenchConfig, timers: Timers, refs: Refs,
                labels: dict) -> None:
    runner = llm.runner
    rec.run("api_forward_outside_inference_mode", lambda: plain_forward_check(runner, cfg), **labels)
    for batch, width in forward_cells(variant, cfg):
        rec.run("forward", lambda: forward_case(runner, batch, width, cfg, timers, refs),
                batch=batch, width=width, **labels)
    if not variant.generate:
        return
    box: dict = {}
    rec.run("generate_warmup", lambda: generate_warmup(llm, cfg, box), **labels)
    for batch in cfg.gen_batches:
        rec.run("generate", lambda: generate_case(llm, batch, cfg, refs, box.get("inference", True)),
                batch=batch, **labels)


def bench_variant(rec: Recorder, model: str, variant: Variant, cfg: BenchConfig, timers: Timers,
                  refs: Refs) -> None:
    labels = {"preset": model, "variant": variant.name}
    box: dict = {}
    rec.run("build", lambda: build_case(box, model, variant, cfg), need_s=cfg.min_build_s, **labels)
    llm = box.pop("llm", None)
    try:
        if llm is not None:
            model_cases(rec, llm, variant, cfg, timers, refs, labels)
    finally:
        with contextlib.suppress(Exception):
            if llm is not None:
                llm.shutdown()
        del llm
        release_model_state()
        rec.run("teardown", memory_snapshot, **labels)


def release_model_state() -> None:
    """Free the model's memory and drop torch.compile caches: the fused kernels are code objects shared
    by every model, so without this the next model reuses (and adds to) the previous one's variants."""
    free_device_memory()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def preset_reference(rec: Recorder, model: str, cfg: BenchConfig, timers: Timers, refs: Refs) -> None:
    arch = rec.run("arch", lambda: arch_info(load_model_arch(model)), preset=model)
    if arch is None:
        return
    model_arch = load_model_arch(model)
    dtype = engine_dtype(cfg.device)
    rec.run("roofline", lambda: roofline_times(arch["weight_bytes"], refs), preset=model)
    rec.run("linears_only", lambda: linears_only(model_arch, cfg.linear_batches, cfg.device, dtype,
                                                 timers.device, refs), preset=model)
    free_device_memory()
    rec.run("attention_probe", lambda: attention_probe(model_arch, cfg, dtype, timers.device), preset=model)
    release_model_state()


# ---------------------------------------------------------------- environment
def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except Exception:
        return None


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def nvidia_smi() -> str | None:
    query = "name,driver_version,memory.total,clocks.max.memory,clocks.max.sm,power.limit"
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                              text=True, timeout=20, check=True).stdout.strip()
    except Exception:
        return None


def env_info(device: str) -> dict:
    status = git("status", "--porcelain")
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": package_version("transformers"), "triton": package_version("triton"),
            "hostname": platform.node(), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status), "weights": "random (real shapes)",
            "env": {k: os.environ.get(k) for k in MULTICAST_ENV}}
    if device == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        info["devices"] = [device_info(i) for i in range(torch.cuda.device_count())]
        info["nvidia_smi"] = nvidia_smi()
    return info


def device_info(index: int) -> dict:
    p = torch.cuda.get_device_properties(index)
    return {"index": index, "name": p.name, "total_GB": p.total_memory / 1e9,
            "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}


def device_refs(rec: Recorder, cfg: BenchConfig, timers: Timers) -> Refs:
    name = torch.cuda.get_device_name(0) if cfg.device == "cuda" else platform.processor() or "cpu"
    nominal = cfg.nominal_bw or nominal_bandwidth(name)
    copy = rec.run("copy_bandwidth", lambda: copy_bandwidth(cfg.copy_gib, cfg.device, timers.device))
    free_device_memory()
    refs = Refs(nominal, copy["copy_rw_Bps"] if copy else None)
    rec.result["refs"] = {"device_name": name, "nominal_Bps": refs.nominal_Bps, "copy_rw_Bps": refs.copy_Bps,
                          "nominal_source": "--nominal-bw" if cfg.nominal_bw else "device name table"}
    return refs


def run_benchmark(cfg: BenchConfig, rec: Recorder) -> dict:
    timers = make_timers(cfg.device)
    rec.result.update(started=now_iso(), config=dataclasses.asdict(cfg), env=env_info(cfg.device))
    rec.write()
    try:
        refs = device_refs(rec, cfg, timers)
        for model in cfg.presets:
            preset_reference(rec, model, cfg, timers, refs)
        variants = {v.name: v for v in VARIANTS}
        for name in cfg.variants:  # variant-major: the default variant of every preset comes first
            for model in cfg.presets:
                bench_variant(rec, model, variants[name], cfg, timers, refs)
    finally:  # whatever happened, leave a summary of what was measured
        rec.result.update(summary=summarize_cases(rec.result["cases"], cfg.window), finished=now_iso(),
                          total_s=round(rec.budget.elapsed(), 1))
        rec.write()
    return rec.result


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- CLI
def parse_args(argv: list[str]) -> BenchConfig:
    d = BenchConfig(presets=(), variants=(), out=Path())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["llama-3.1-8b", "qwen3-32b"],
                   help="random-weight presets (or checkpoint directories)")
    p.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], choices=[v.name for v in VARIANTS])
    p.add_argument("--out", type=writable_file, default=Path("engine_bench.json"))
    p.add_argument("--device", default=d.device, choices=["cuda", "cpu"])
    p.add_argument("--budget-s", type=float, default=d.budget_s, help="skip remaining cases past this")
    p.add_argument("--min-build-s", type=float, default=d.min_build_s,
                   help="do not start building a model with less budget left than this")
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--synced-iters", type=int, default=d.synced_iters, help="0 skips the host-synced timing")
    p.add_argument("--context", type=int, default=d.context, help="positions of the timed forwards")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--batches", type=int, nargs="+", default=list(d.batches))
    p.add_argument("--gen-batches", type=int, nargs="+", default=list(d.gen_batches))
    p.add_argument("--gen-prompt-len", type=int, default=d.gen_prompt_len)
    p.add_argument("--gen-new-tokens", type=int, default=d.gen_new_tokens)
    p.add_argument("--linear-batches", type=int, nargs="+", default=list(d.linear_batches))
    p.add_argument("--copy-gib", type=float, default=d.copy_gib)
    p.add_argument("--nominal-bw", type=float, default=None, help="bytes/s; default from the device name")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    tuples = {k: tuple(v) for k, v in vars(a).items() if isinstance(v, list)}
    return BenchConfig(**(vars(a) | tuples))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    cfg = parse_args(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device; use --device cpu for a dry run")
        return 2
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    rec = Recorder(Budget(cfg.budget_s), cfg.out)
    result = run_benchmark(cfg, rec)
    counts = {s: sum(c["status"] == s for c in result["cases"]) for s in ("ok", "error", "skipped")}
    log.info("done in %.0fs: %s; results in %s", result["total_s"], counts, cfg.out)
    log.info("summary: %s", json.dumps(result["summary"], default=_json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
