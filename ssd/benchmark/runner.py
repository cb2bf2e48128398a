"""Runs a benchmark: prompts -> one LLM per arm -> warmup -> timed batches -> metrics, summary, JSON.

What this expects from the engine (ssd.LLM):
- ``LLM(model, tensor_parallel_size=, device=, dtype=, random_weights=, max_num_seqs=,
  max_model_len=, enforce_eager=, seed=)`` and, for spec arms, additionally ``draft=,
  num_speculative_tokens=, async_spec=`` plus the keyword options of ``spec_options``;
- ``generate(prompts, sampling_params_list, use_tqdm=False)`` returning outputs in prompt
  order with ``.prompt_token_ids``, ``.token_ids``, ``.finish_reason`` and
  ``.metrics.ttft_s/.tpot_s/.e2e_s``; string prompts are tokenized by the engine (also for
  random-weight presets);
- ``make_sequences(prompts, sampling_params_list)`` raising ValueError for a prompt that does not fit;
- ``last_run_stats`` describing the latest generate() call; ``shutdown()``.

One LLM (target + draft when any arm speculates) serves every arm: `generate(..., mode=arm)`
switches between autoregressive, sync and async decoding on the same loaded models, so A/B
batches interleave without reloading and compare like with like.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any, Sequence

from tqdm import tqdm

from ssd.benchmark.ab import (compare_arms, first_output_mismatch, greedy_prefix_match_rate,
                              interleaved_schedule, per_batch_throughput)
from ssd.benchmark.cli import Arm, BenchConfig, ModelRef, layout_arm
from ssd.benchmark.datasets import Prompt, apply_chat_template, load_prompts
from ssd.benchmark.results import (ArmResult, BatchRun, build_result, compute_metrics,
                                   outputs_as_records, write_result_json)
from ssd.benchmark.summary import format_summary
from ssd.loading.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

# BenchConfig field -> keyword of LLM(**spec_options) for async arms; None values are left out.
ASYNC_OPTION_NAMES = {"f": "fan_out", "flh": "fan_out_list", "flm": "fan_out_list_miss",
                      "fanout": "fan_out_shape", "backup": "backup", "x": "sampler_x"}
# ... and for every spec arm (sync and async).
SPEC_OPTION_NAMES = {"dtemp": "draft_temperature", "profile": "acceptance_profile", "draft_quant": "draft_quantization",
                     "draft_vocab": "draft_vocabulary", "draft_vocab_ranking": "draft_vocabulary_ranking"}


def draft_variant(config) -> str:
    variants = [f"{config.draft_quant} weights" if config.draft_quant else "",
                f"head over {config.draft_vocab} tokens" if config.draft_vocab else "",
                f"ranked by {config.draft_vocab_ranking}" if config.draft_vocab_ranking else ""]
    return "".join(f" ({v})" for v in variants if v)


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Run every arm of the config over its prompts; returns (and optionally writes) the result."""
    target = resolve_model(config.target)
    prompts = prepare_prompts(config, target)
    batches = prompt_batches(len(prompts), config.batch_size)
    params = sampling_params_for(config, len(prompts))
    logger.info("target %s, draft %s%s, %d prompts in %d batches of <= %d, arms %s", target,
                config.draft.name if config.draft else None,
                draft_variant(config), len(prompts), len(batches),
                config.batch_size, ",".join(arm.name for arm in config.arms))
    if config.random_acceptance:
        logger.warning("random weights and no --profile: the draft agrees with the target only by chance, so "
                       "acceptance and speedups are not a real draft's; --profile code (or chat) replays "
                       "acceptance recorded with a real pair (results labelled simulated)")
    runs = _run_with_llms(config, target, prompts, params, batches)
    return _finish(config, runs)


def _run_with_llms(config: BenchConfig, target: str, prompts: list[Prompt], params: list,
                   batches: list[list[int]]) -> list[BatchRun]:
    draft = resolve_model(config.draft) if config.uses_spec else None
    layout = layout_arm(config.arms)
    llm = build_llm(config, layout, target, draft)
    prompts = engine_prompts(prompts, llm)
    try:
        check_prompts_fit(llm, prompts, params, "random" in config.datasets)
        arms = {arm.name: llm for arm in config.arms}
        warm_up(arms, prompts, params, batches[0], config.warmup)
        return run_schedule(arms, prompts, params, batches)
    finally:
        llm.shutdown()


def _finish(config: BenchConfig, runs: list[BatchRun]) -> dict[str, Any]:
    arms, ab = summarize_runs(config, runs)
    result = build_result(config, arms, ab)
    logger.info("\n%s", format_summary({arm.name: arm.metrics for arm in arms},
                                       simulated=config.simulated_acceptance,
                                       random_acceptance=config.random_acceptance,
                                       comparisons=ab["comparisons"] if ab else None,
                                       greedy_identical=ab["greedy_identical"] if ab else None,
                                       match_rates=ab["greedy_prefix_match_rate"] if ab else None))
    if config.json_path:
        logger.info("wrote %s", write_result_json(result, config.json_path))
    return result


# ---------------------------------------------------------------- inputs

def resolve_model(ref: ModelRef | None) -> str | None:
    """What LLM() gets: a path or preset name as is; an offline model fetched to its local path."""
    if ref is None or ref.kind != "offline":
        return ref.name if ref else None
    from ssd.loading.offline_models import fetch_offline_model  # heavy and optional: lazy
    return str(fetch_offline_model(ref.name))


def prepare_prompts(config: BenchConfig, target: str) -> list[Prompt]:
    prompts = load_prompts(config)
    if not prompts:
        raise BenchmarkSetupError("no prompts to run")
    if config.chat_template and isinstance(prompts[0], str):
        prompts = apply_chat_template(prompts, target)
    return prompts


def engine_prompts(prompts: list[Prompt], llm: Any) -> list[Prompt]:
    """Token-id prompts folded into the model's vocabulary; text for a tokenizer-less random-weights
    preset becomes UTF-8 byte ids (realistic lengths; the content is irrelevant to random weights)."""
    vocab = llm.runner.arch.vocab_size
    if getattr(llm, "tokenizer", None) is None and prompts and isinstance(prompts[0], str):
        logger.info("no tokenizer (random-weights preset): prompts encoded as UTF-8 bytes")
        prompts = [list(p.encode("utf-8")) for p in prompts]
    return [[t % vocab for t in p] if not isinstance(p, str) else p for p in prompts]


def check_prompts_fit(llm: Any, prompts: list[Prompt], params: list, random_prompts: bool = True) -> None:
    """Before anything is timed: each prompt plus its output must fit the engine's max_model_len.
    random_prompts: --input_len made them (a text dataset's prompts have their own lengths)."""
    try:
        llm.make_sequences(prompts, params)
    except ValueError as problem:
        # Only a prompt too long for max_model_len is cured by these flags (the engine names max_model_len then).
        shorten = "--input_len / --output_len" if random_prompts else "--output_len, pick shorter prompts"
        hint = (f" (shorten {shorten}, or raise --max_model_len within the models' context)"
                if "max_model_len" in str(problem) else "")
        raise BenchmarkSetupError(f"{problem}{hint}") from problem


def prompt_batches(num_prompts: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, num_prompts)))
            for start in range(0, num_prompts, batch_size)]


def sampling_params_for(config: BenchConfig, num_prompts: int) -> list:
    """One SamplingParams per prompt; per-prompt seeds keep sampled runs comparable across arms."""
    from ssd import SamplingParams
    return [SamplingParams(temperature=config.temp, max_tokens=config.output_len,
                           seed=config.seed + index, ignore_eos=True)
            for index in range(num_prompts)]


# ---------------------------------------------------------------- engine

def llm_kwargs(config: BenchConfig, arm: Arm, draft: str | None) -> dict[str, Any]:
    kwargs = dict(tensor_parallel_size=arm.tp_size, device=config.device, dtype=config.dtype,
                  random_weights=config.random_weights, max_num_seqs=config.batch_size,
                  max_model_len=config.max_model_len, max_prefill_tokens=config.max_prefill_tokens,
                  enforce_eager=config.eager, seed=config.seed,
                  fused_attention=config.attention == "fused", measured_linear=config.linear == "measured")
    if arm.spec:
        kwargs.update(draft=draft, num_speculative_tokens=config.k, async_spec=arm.async_spec,
                      draft_colocated=arm.colocated, **spec_options(config, arm))
    return kwargs


def spec_options(config: BenchConfig, arm: Arm) -> dict[str, Any]:
    names = {**SPEC_OPTION_NAMES, **(ASYNC_OPTION_NAMES if arm.async_spec else {})}
    options = {keyword: getattr(config, field) for field, keyword in names.items()}
    return {keyword: list(value) if isinstance(value, tuple) else value
            for keyword, value in options.items() if value is not None}


class BenchmarkSetupError(RuntimeError):
    """The engine refused the benchmark's configuration or prompts; the message says why."""


def build_llm(config: BenchConfig, arm: Arm, target: str, draft: str | None) -> Any:
    from ssd import LLM
    kwargs = llm_kwargs(config, arm, draft)
    logger.info("building LLM for arm %s: %s", arm.name, kwargs)
    try:
        return LLM(target, **kwargs)
    except (ValueError, FileNotFoundError, CheckpointError) as problem:  # bad settings or files, not a bug here
        raise BenchmarkSetupError(f"cannot start the engine for arm {arm.name} ({describe_layout(config, arm)}): "
                                  f"{problem}") from problem


def describe_layout(config: BenchConfig, arm: Arm) -> str:
    """E.g. "target on 3 ranks, draft on a GPU of its own" (--gpus N with --async: N-1 for the target)."""
    cuda = config.device == "cuda"
    draft = "" if not arm.spec else ", draft co-located" if arm.colocated \
        else ", draft on a GPU of its own" if cuda else ", draft in a process of its own"
    return f"target on {arm.tp_size} {'GPU(s)' if cuda else 'rank(s)'}{draft}"


def timed_generate(llm: Any, prompts: Sequence[Prompt], params: Sequence, mode: str) -> tuple[list, Any, float]:
    start = time.perf_counter()
    outputs = llm.generate(list(prompts), list(params), use_tqdm=False, mode=mode)
    wall_s = time.perf_counter() - start
    return outputs, copy.deepcopy(llm.last_run_stats), wall_s


def warm_up(llms: dict[str, Any], prompts: list[Prompt], params: list, batch: list[int], times: int) -> None:
    for name, llm in llms.items():
        for _ in range(times):
            logger.info("warmup: arm %s", name)
            llm.generate([prompts[i] for i in batch], [params[i] for i in batch], use_tqdm=False, mode=name)


def run_schedule(llms: dict[str, Any], prompts: list[Prompt], params: list,
                 batches: list[list[int]]) -> list[BatchRun]:
    """Every batch under every arm, ABBA-interleaved (a single arm just runs the batches in order)."""
    schedule = list(interleaved_schedule(list(llms), len(batches)))
    runs = []
    for batch_index, arm in tqdm(schedule, desc="benchmark", unit="batch"):
        batch = batches[batch_index]
        outputs, stats, wall_s = timed_generate(llms[arm], [prompts[i] for i in batch],
                                                [params[i] for i in batch], mode=arm)
        runs.append(BatchRun(arm, batch_index, batch, list(outputs), stats, wall_s))
    return runs


# ---------------------------------------------------------------- results

def summarize_runs(config: BenchConfig, runs: list[BatchRun]) -> tuple[list[ArmResult], dict | None]:
    by_arm: dict[str, list[BatchRun]] = defaultdict(list)
    for run in runs:
        by_arm[run.arm].append(run)
    ordered = {arm.name: by_arm[arm.name] for arm in config.arms}
    arms = [ArmResult(name, compute_metrics(rs), outputs_as_records(rs)) for name, rs in ordered.items()]
    return arms, (ab_report(config, ordered, arms) if config.ab else None)


def ab_report(config: BenchConfig, runs_by_arm: dict[str, list[BatchRun]],
              arms: list[ArmResult]) -> dict[str, Any]:
    """Paired ratios vs the first arm, per-batch throughputs, and (greedy only) output identity."""
    mismatch = first_output_mismatch({arm.name: [o["token_ids"] for o in arm.outputs] for arm in arms})
    checkable = config.temp == 0 and not config.simulated_acceptance
    return {
        "baseline": arms[0].name, "schedule": "ABBA-interleaved over prompt batches",
        "comparisons": compare_arms(runs_by_arm, seed=config.seed),
        "per_batch_decode_tok_s": per_batch_throughput(runs_by_arm, "decode"),
        "greedy_identical": (mismatch is None) if checkable else None,
        "greedy_prefix_match_rate": {arm.name: greedy_prefix_match_rate(
            [o["token_ids"] for o in arms[0].outputs], [o["token_ids"] for o in arm.outputs])
            for arm in arms[1:]} if checkable else None,
        "first_mismatch": asdict(mismatch) if checkable and mismatch else None,
    }
