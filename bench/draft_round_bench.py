r"""GPU benchmark of the asynchronous draft's round (one GPU, the draft alone), written to JSON.

    PYTHONUNBUFFERED=1 python bench/draft_round_bench.py --preset llama-3.2-1b --k 6 --f 3 \
        --batches 1 16 --out $OUT/draft_round.json

Per batch size: the speculation-cache build (window forward over K+1 tokens, fork selection, K
batched tree steps over B x sum(F) branches) split into its parts with CUDA events, the whole
build as the draft worker times it (host wall clock, synchronised), and the outcome path: a cache
lookup answered from the cache (hit) and a `jit` backup (miss). Random weights at the preset's
shapes; the times do not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout, no install

import torch  # noqa: E402

from ssd.benchmark.kernel_profile import profile_kernels  # noqa: E402
from ssd.cli_types import at_least, preset_or_checkpoint, writable_file  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.distributed.tp_group import TPGroup  # noqa: E402
from ssd.draft_worker.async_draft import AsyncDraft  # noqa: E402
from ssd.draft_worker.compact_probs import CompactProbs  # noqa: E402
from ssd.draft_worker.proposer import DRAFT_FILTER_CANDIDATES, DraftProposer  # noqa: E402
from ssd.draft_worker.protocol import outcome_payload  # noqa: E402
from ssd.draft_worker.tree import TreeBuilder, fork_guesses  # noqa: E402
from ssd.engine.model_runner import ModelRunner, arch_of  # noqa: E402
from ssd.engine.runner_config import RunnerConfig  # noqa: E402
from ssd.benchmark.linear_arms import add_linear_argument, linear_options  # noqa: E402
from ssd.json_files import write_json  # noqa: E402
from ssd.layers.cublaslt import LISTED_ALGORITHMS  # noqa: E402
from ssd.engine.random import RandomStream  # noqa: E402
from ssd.engine.sampler import (SamplingTensors, compact_probs_from_logits, probs_from_logits, sample_among,  # noqa: E402
                                sample_from_weights)
from ssd.sampling_params import SamplingParams  # noqa: E402
from ssd.models.presets import PRESETS  # noqa: E402
from ssd.spec.draft_vocabulary import kept_token_ids  # noqa: E402
from ssd.spec.spec_config import AsyncSpecConfig, SpecConfig  # noqa: E402

log = logging.getLogger("draft_round_bench")


def build_draft(preset: str, k: int, fan_out: int, num_slots: int, max_len: int, eager: bool,
                device: str, fused_attention: bool = True, measured_linear: bool = True,
                quant: str | None = None, vocab: int | None = None, tree_kv_in_attention: bool = True,
                linear_algorithms: int = LISTED_ALGORITHMS, linear_tma: bool = True,
                norm_fusion: bool = True, fp8_layers: tuple[str, ...] | None = None,
                fp8_produced_rows: bool = True) -> AsyncDraft:
    spec = AsyncSpecConfig.create(k, fan_out=fan_out)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target_cfg = RunnerConfig(model=preset, random_weights=True, device_type=device, dtype=dtype,
                              num_slots=num_slots, max_len=max_len, enforce_eager=eager,
                              fused_attention=fused_attention, measured_linear=measured_linear,
                              tree_kv_in_attention=tree_kv_in_attention, linear_algorithms=linear_algorithms,
                              linear_tma=linear_tma, norm_fusion=norm_fusion)
    head = kept_token_ids(vocab, arch_of(preset).vocab_size) if vocab else None
    cfg = SpecConfig(preset, k, quantization=quant).runner_config(target_cfg, None, spec, head)
    cfg.first_gpu = 0
    if fp8_layers:
        cfg.fp8_layers = fp8_layers
    cfg.fp8_produced_rows = fp8_produced_rows
    runner = ModelRunner(cfg, TPGroup())
    proposer = DraftProposer(runner, k, spec.saguaro_c, spec.shape.fanout_miss)
    return AsyncDraft(proposer, TreeBuilder(runner, spec.shape, spec.saguaro_c), "jit")


def event_ms(fn, warmup: int, iters: int) -> list[float]:
    """Per-call GPU time (CUDA events); host wall time on CPU."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        return [wall_ms(fn) for _ in range(iters)]
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def prefill(draft: AsyncDraft, batch: int, context: int, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (batch, context))
    draft.prefill(ids, torch.arange(context).expand(batch, context).contiguous(), 0)
    return torch.full((batch,), context, dtype=torch.int64)


@torch.inference_mode()  # as in the draft worker's serve loop (the graphs' buffers are inference tensors)
def measure_batch(draft: AsyncDraft, batch: int, context: int, warmup: int, iters: int,
                  kernels: bool = False) -> dict:
    runner, tree, k = draft.proposer.runner, draft.tree, draft.proposer.k
    device = runner.device
    # the draft worker receives its inputs over NCCL, already on its device
    lengths = prefill(draft, batch, context, runner.arch.vocab_size).to(device)
    prev, last = torch.randint(0, runner.arch.vocab_size, (2, batch), device=device)
    draft.speculate(prev, last, lengths, int(lengths.max()), False)
    max_length = int(lengths.max())
    window = draft.window
    lengths_d = lengths
    positions = lengths_d[:, None] - 1 + torch.arange(k + 1, device=device)
    logits = runner.forward(window, positions, max_length - 1 + k)
    width = max(tree.shape.fanout_max) + 1
    guess = fork_guesses(logits, window[:, 1:], tree.fork, tree.rank, width, tree.kept_ids)
    fork_graph = check_fork_graph(tree, batch, logits, window, runner.attend_bucket(max_length + k))
    horizon = runner.attend_bucket(max_length + 2 * k + 1)
    sampled = sampling_for(batch, device, top_p=0.9)
    temperature_only = sampling_for(batch, device, top_p=1.0)

    def branches(sampling):
        if tree.graphs is not None:
            return tree.graphs.replay(guess, lengths_d, sampling, horizon)
        return tree.decode_branches(guess, lengths_d, sampling, max_length + 2 * k)
    calls = {
        "window_forward": lambda: runner.forward(window, positions, max_length - 1 + k),
        "fork": lambda: fork_guesses(logits, window[:, 1:], tree.fork, tree.rank, width, tree.kept_ids),
        "branch_decode": lambda: branches(None),
        "branch_decode_filtered": lambda: branches(sampled),
        "branch_decode_temperature_only": lambda: branches(temperature_only),
    }
    parts = {
        "window_forward_ms": event_ms(calls["window_forward"], warmup, iters),
        "fork_ms": event_ms(calls["fork"], warmup, iters),
        **({"fork_graph_ms": event_ms(lambda: tree.fork_graphs.replay(batch, runner.attend_bucket(max_length + k)),
                                      warmup, iters)} if fork_graph is not None else {}),
        "branch_decode_ms": event_ms(calls["branch_decode"], warmup, iters),
        "branch_decode_sampled_ms": event_ms(calls["branch_decode_filtered"], warmup, iters),
        "branch_decode_temperature_only_ms": event_ms(calls["branch_decode_temperature_only"], warmup, iters),
    }
    graph_check = check_graphs_match_eager(tree, guess, lengths_d, sampled, horizon) if tree.graphs else None
    if device.type == "cuda" and graph_check is not None:
        graph_check["top_candidates_vs_torch_topk"] = check_top_candidates(logits)
        graph_check["compact_vs_dense_filter"] = check_compact_filter(logits, sampled)
    kernel_tables = {name: profile_kernels(fn) for name, fn in calls.items()} if kernels else {}

    def build_wall():
        draft.build_cache(max_length)
        return draft.build_s * 1e3
    walls = [build_wall() for _ in range(warmup + iters)][warmup:]
    outcome = outcome_times(draft, batch, lengths, warmup, iters)
    return {"batch": batch, "branch_tokens_per_step": batch * tree.shape.num_branches,
            **{name: median(t) for name, t in parts.items()}, "build_wall_ms": median(walls), **outcome,
            "linear_choices": linear_choices(draft), "norm_fusion_choices": norm_fusion_choices(draft),
            "fp8_choices": fp8_choices(draft),
            "sampled_graph_check": graph_check, "fork_graph_matches_eager": fork_graph,
            "filtered_kept_vs_full_rows": kept_vs_full_rows(tree, guess, lengths_d, sampled, horizon)
            if tree.head_ids is not None else None,
            **({"kernel_profiles": kernel_tables} if kernels else {})}


def linear_choices(draft: AsyncDraft) -> dict[str, str] | None:
    """What MeasuredLinear picked per (rows, N, K): F.linear (cuBLAS), a skinny tiling or a cuBLASLt
    algorithm (its rank in the heuristic's list)."""
    linear = next((m.kernels.linear for m in draft.proposer.runner.model.modules() if hasattr(m, "kernels")), None)
    choices = getattr(linear, "choices", None)
    if choices is None:
        return None
    return {"x".join(str(d) for d in key[:3]) + (f" {key[3]}" if len(key) > 4 else ""): str(tiling or "F.linear")
            for key, tiling in sorted(choices.items(), key=lambda item: item[0][:3])}


def norm_fusion_choices(draft: AsyncDraft) -> dict[str, str] | None:
    """What NormFusion picked per (op, rows, N, K): a TMA tiling, or the unfused chain."""
    fusion = draft.proposer.runner.model.kernels.norm_fusion
    if fusion is None:
        return None
    return {" ".join(str(d) for d in key[:4]): str(tiling or "unfused") for key, tiling in sorted(
        fusion.choices.items(), key=lambda item: item[0][:4])}


def fp8_choices(draft: AsyncDraft) -> dict[str, str] | None:
    """What the fp8 layers' measured kernels picked per shape: torch._scaled_mm or a Triton tiling
    (ssd.layers.triton_fp8_matmul), Inductor's or the one-pass fp8-row producers (first / second)."""
    fp8 = next((m.fp8 for m in draft.proposer.runner.model.modules() if getattr(m, "fp8", None) is not None), None)
    if fp8 is None:
        return None
    picked = {}
    for part in (fp8.rows_matmul, fp8.quantizing_add_rms_norm, fp8.quantizing_silu_and_mul):
        name = getattr(part, "name", "fp8 rows matmul")
        for key, choice in getattr(part, "choices", {}).items():
            label = getattr(choice, "label", None) or ("first" if choice is getattr(part, "first", None) else
                                                       "second" if choice is not None else "torch._scaled_mm")
            picked[f"{name} {' '.join(str(d) for d in key[:3])}"] = label
    return picked


def check_fork_graph(tree, batch: int, logits, window, attend_len: int) -> bool | None:
    """The captured fork (reading the window graph just replayed) gives the eager guesses (same
    top-k width, so ties order alike); None where no fork graph applies."""
    if tree.fork_graphs is None or not tree.fork_graphs.has(batch, attend_len):
        return None
    eager = fork_guesses(logits, window[:, 1:], tree.fork, tree.rank, tree.fork_graphs.width, tree.kept_ids)
    return bool(torch.equal(tree.fork_graphs.replay(batch, attend_len), eager))


def check_top_candidates(logits: torch.Tensor, k: int = DRAFT_FILTER_CANDIDATES) -> dict:
    """The filters' top-k kernel (ssd.engine.triton_topk) on real-shaped logits against torch.topk."""
    from ssd.engine.triton_topk import top_candidates
    rows = logits.reshape(-1, logits.shape[-1]).float()
    values, index = top_candidates(rows, k)
    expected = rows.topk(k)
    return {"values_equal": bool(torch.equal(values, expected.values)),
            "indices_hold_values": bool(torch.equal(rows.gather(1, index), values)),
            "index_agreement": float((index == expected.indices).float().mean())}


def check_compact_filter(logits: torch.Tensor, sampling: SamplingTensors) -> dict:
    """The filtered tree step's compact distribution and draw (as the tree runs them) against the
    dense ones (probs_from_logits + sample_from_weights), on the window forward's logits."""
    rows = logits.reshape(-1, logits.shape[-1])
    st = sampling.select_rows(torch.arange(logits.shape[0], device=logits.device).repeat_interleave(logits.shape[1]))
    counter = torch.arange(rows.shape[0], device=rows.device)
    ids, probs = compact_probs_from_logits(rows, st, DRAFT_FILTER_CANDIDATES)
    dense = probs_from_logits(rows, st, DRAFT_FILTER_CANDIDATES)
    compact_tokens = sample_among(ids, probs, st.seed, counter, RandomStream.DRAFT)
    dense_tokens = sample_from_weights(dense, st.seed, counter, RandomStream.DRAFT)
    return {"max_abs_prob_diff": float((CompactProbs(ids, probs, rows.shape[-1]).dense() - dense).abs().max()),
            "token_agreement": float((compact_tokens == dense_tokens).float().mean())}


def kept_vs_full_rows(tree, guess, lengths, sampling, horizon) -> dict:
    """Eager filtered branch decodes of a restricted head: over its kept tokens' logits (what runs)
    against over the -inf-filled full rows (before): agreement of the tokens, largest q difference.
    Equal on CPU (torch.topk both ways); on a GPU the full rows' 512-id chunks hold the kept ids
    crowded (all 32k in the lowest 64 chunks when kept in id order) and lose some of the 256 largest,
    so a few % of the tokens differ (H100: 93-98 %; later steps inherit an earlier step's change) —
    the kept columns' 128-id chunks are the exact ones (top_candidates_vs_torch_topk)."""
    kept_tokens, kept_probs = tree.decode_branches(guess, lengths, sampling, horizon - 1)
    saved, tree.head_ids = tree.head_ids, None
    try:
        full_tokens, full_probs = tree.decode_branches(guess, lengths, sampling, horizon - 1)
    finally:
        tree.head_ids = saved
    return {"token_agreement": float((kept_tokens == full_tokens).float().mean()),
            "max_abs_prob_diff": float((widened(kept_probs) - widened(full_probs)).abs().max())}


def sampling_for(batch: int, device, top_p: float) -> SamplingTensors:
    params = [SamplingParams(temperature=0.8, top_p=top_p, seed=i) for i in range(batch)]
    return SamplingTensors.from_params(params, device, 0)


def widened(probs):
    """[B, N, K, V] distributions from a cache's (filtered ones are kept compact)."""
    return probs.dense() if isinstance(probs, CompactProbs) else probs


def check_graphs_match_eager(tree, guess, lengths, sampling, horizon) -> dict:
    """The captured sampled/greedy branch decodes reproduce the eager ones (same tokens, same q)."""
    result = {}
    for name, st in (("greedy", None), ("filtered", sampling), ("sampled", sampling_for(guess.shape[0], guess.device, 1.0))):
        eager_tokens, eager_probs = tree.decode_branches(guess, lengths, st, horizon - 1)
        graph_tokens, graph_probs = tree.graphs.replay(guess, lengths, st, horizon)
        result[name] = {"tokens_equal": bool(torch.equal(eager_tokens, graph_tokens)),
                        "max_abs_prob_diff": None if eager_probs is None else
                        float((widened(eager_probs) - widened(graph_probs)).abs().max())}
    if tree.temperature_sample is not None:   # the Triton temperature path against the compiled PyTorch one
        kernel_tokens, kernel_probs = tree.graphs.replay(guess, lengths, temperature_only := sampling_for(
            guess.shape[0], guess.device, 1.0), horizon)
        kernel_tokens, kernel_probs = kernel_tokens.clone(), kernel_probs.clone()
        saved, tree.temperature_sample = tree.temperature_sample, None
        try:
            torch_tokens, torch_probs = tree.decode_branches(guess, lengths, temperature_only, horizon - 1)
        finally:
            tree.temperature_sample = saved
        result["temperature_kernel_vs_pytorch"] = {
            "token_agreement": float((kernel_tokens == torch_tokens).float().mean()),
            "max_abs_prob_diff": float((kernel_probs - torch_probs).abs().max())}
    return result


def outcome_times(draft: AsyncDraft, batch: int, lengths: torch.Tensor, warmup: int, iters: int) -> dict:
    """Reply latency for an all-hit outcome (the cache's first branch: 0 accepted, its guess) and an
    all-miss one (0 accepted, then the drafted token itself, which no fork guesses) answered by each
    backup (`jit`: K draft steps; `fast`: the n-gram proposal)."""
    results, configured = {}, draft.backup
    for name, backup in (("hit", configured), ("miss", "jit"), ("miss_fast", "fast")):
        hit, draft.backup = name == "hit", backup
        times = []
        for i in range(warmup + iters):
            draft.build_cache(int(lengths.max()))
            accepted = torch.zeros(batch, dtype=torch.int64, device=lengths.device)
            recovered = (draft.cache.guess[:, 0] if hit else draft.window[:, 1]).clone()
            outcome = outcome_payload(accepted, recovered, recovered, lengths)   # as received
            synchronize()
            start = time.perf_counter()
            reply = draft.outcome(outcome, int(lengths.max()), False)
            synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
            if bool(reply.hit.all()) != hit:
                raise RuntimeError(f"the {name} case did not {name}: lookup and cache disagree")
        results[f"outcome_{name}_ms"] = median(times)
    draft.backup = configured
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.2-1b", type=preset_or_checkpoint,
                        help=f"a random-weights preset ({', '.join(PRESETS)}) or checkpoint directory")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--f", type=int, default=3)
    parser.add_argument("--batches", type=at_least(1), nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--context", type=at_least(1), default=512, help="prompt tokens per sequence")
    parser.add_argument("--warmup", type=at_least(0), default=5)
    parser.add_argument("--iters", type=at_least(1), default=30)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="also write torch.profiler kernel tables per part")
    parser.add_argument("--attention", nargs="+", choices=("fused", "fused-separate-kv", "matmul"), default=["fused"],
                        help="attention implementations to measure one after the other (fused-separate-kv: the "
                             "fused kernel, with tree steps' k/v written by the RoPE + KV-write kernel first)")
    add_linear_argument(parser, "measure one after the other (with each attention)")
    parser.add_argument("--quant", nargs="+", type=quant_arm, default=["none"], metavar="none|fp8|fp8:LAYER,...",
                        help="the draft's weights: as built (bf16) and / or fp8 (ssd.layers.fp8; fp8:NAMES: those "
                             "layers, e.g. fp8:gate_up_proj,down_proj,lm_head), one after the other")
    parser.add_argument("--fp8-rows", nargs="+", choices=("produced", "separate"), default=["produced"],
                        help="fp8 weights, many-row products: activations quantized by the norm / SiLU-mul "
                             "writing them (produced) or by a kernel of their own (separate), one after the other")
    parser.add_argument("--vocab", nargs="+", default=["none"], metavar="none|N",
                        help="the draft's LM head over all tokens and / or only N (ssd.spec.draft_vocabulary), "
                             "one after the other")
    parser.add_argument("--blas", nargs="+", choices=("cublas", "cublaslt"), default=["cublas"],
                        help="torch's preferred BLAS library for F.linear, one after the other "
                             "(torch.backends.cuda.preferred_blas_library)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run only")
    parser.add_argument("--out", type=writable_file, default=None)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.kernels and args.device != "cuda":
        parser.error("--kernels profiles CUDA kernels: it needs --device cuda")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("needs a CUDA device (--device cpu: a smoke run only)")
        return 1
    rows = []
    for blas, mode, linear, quant, fp8_rows, vocab in itertools.product(args.blas, args.attention, args.linear,
                                                                        args.quant, args.fp8_rows, args.vocab):
        if quant == "none" and fp8_rows != args.fp8_rows[0]:
            continue   # bf16 weights: nothing to quantize
        if args.device == "cuda":
            torch.backends.cuda.preferred_blas_library(blas)
        draft = build_draft(args.preset, args.k, args.f, max(args.batches), args.context + 256, args.eager,
                            args.device, fused_attention=mode.startswith("fused"), tree_kv_in_attention=mode == "fused",
                            **linear_options(linear),
                            quant=None if quant == "none" else "fp8", vocab=None if vocab == "none" else int(vocab),
                            fp8_layers=tuple(quant.split(":", 1)[1].split(",")) if ":" in quant else None,
                            fp8_produced_rows=fp8_rows == "produced")
        for batch in args.batches:
            arm = {"blas": blas, "attention": mode, "linear": linear, "weights": quant, "head_vocab": vocab}
            if quant != "none":
                arm["fp8_rows"] = fp8_rows
            rows.append({**arm, **measure_batch(draft, batch, args.context, args.warmup, args.iters, args.kernels)})
            log.info("%s", {key: value for key, value in rows[-1].items() if key != "kernel_profiles"})
            if args.out:   # after every row: a run cut short by a time limit keeps what it measured
                write_json(args.out, result_file(args, rows))
        del draft
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


def quant_arm(value: str) -> str:
    """--quant's values: none, fp8 (ssd.layers.fp8.FP8_LAYERS) or fp8:NAME,NAME (those layers)."""
    if value in ("none", "fp8") or (value.startswith("fp8:") and all(value[4:].split(","))):
        return value
    raise argparse.ArgumentTypeError(f"expected none, fp8 or fp8:LAYER,LAYER..., got {value!r}")


def result_file(args: argparse.Namespace, rows: list[dict]) -> dict:
    return {"schema": "ssd-draft-round-bench/1", "preset": args.preset, "k": args.k, "f": args.f,
            "context": args.context, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "env": collect_env(), "weights": "random (timing only)", "rows": rows}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
