"""The user-facing engine: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import functools
import inspect
import logging
import numbers
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ssd.distributed.launch import (Role, SpawnedGroup, check_external_world_size, init_from_environment,
                                    launched_externally, spawn_group)
from ssd.distributed.tp_group import TPGroup
from ssd.distributed.worker_watch import WorkerDiedError, WorkerWatch, abort_collectives, describe
from ssd.draft_worker.proposer import DraftProposer
from ssd.draft_worker.remote import RemoteDraft
from ssd.draft_worker.serve import serve_draft
from ssd.engine.autoregressive import AutoregressiveDecoder
from ssd.engine.kv_cache import check_draft_fits
from ssd.engine.model_runner import ModelRunner, arch_of, load_arch
from ssd.engine.runner_config import RunnerConfig
from ssd.engine.sampler import derive_seed
from ssd.engine.sequence import RequestOutput, Sequence
from ssd.engine.stats import GenerationStats
from ssd.engine.stop_strings import StopStringWatch, output_text
from ssd.layers.cublaslt import LISTED_ALGORITHMS
from ssd.loading.generation_info import eos_token_ids, load_tokenizer, tokens_mapped_differently
from ssd.models.presets import is_preset
from ssd.sampling_params import SamplingParams
from ssd.spec.acceptance_profile import AcceptanceProfile, load_profile
from ssd.spec.profile_replay import ProfileReplay
from ssd.spec.async_decoder import AsyncSpeculativeDecoder, FanoutTuner
from ssd.spec.draft_vocabulary import kept_token_ids, load_ranking, special_token_ids
from ssd.spec.fanout import FanoutEstimator
from ssd.spec.spec_config import AsyncSpecConfig, SpecConfig
from ssd.spec.sync_decoder import SpeculativeDecoder
from ssd.target_worker.serve import serve_target_rank

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_visible_gpus(needed: int, visible: int) -> None:
    if needed > visible:
        raise ValueError(f"this layout needs {needed} GPUs (first_gpu, the target's tensor-parallel ranks, a "
                         f"draft on a GPU of its own) but {visible} are visible (CUDA_VISIBLE_DEVICES?)")


def resolve_max_len(requested: int | None, models: list[str], default: int = 2048) -> int:
    """KV positions per sequence: at most what every model was trained for (its
    max_position_embeddings; the draft's too, when speculating); `default` unless asked."""
    context = min(arch_of(m).max_position_embeddings for m in models)
    if requested is None:
        return min(default, context)
    if requested < 1:
        raise ValueError(f"max_model_len must be a positive number of positions, got {requested}")
    if requested > context:
        raise ValueError(f"max_model_len={requested} exceeds the models' context of {context} positions "
                         "(max_position_embeddings of the target, and of the draft when speculating)")
    return requested


def resolve_checkpoint(model: str) -> Path | None:
    """None for a random-weights preset; the checkpoint directory otherwise (checked to exist)."""
    if is_preset(model):
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is neither a checkpoint directory nor a random-weights preset "
            f"(presets: llama-3.1-70b, llama-3.1-8b, llama-3.2-1b, qwen3-32b, qwen3-0.6b)")
    return path


def on_worker_death(device_type: str, dead: list) -> None:
    """From the watch thread: make rank 0's collective waiting for the dead worker fail now."""
    abort_collectives(device_type)


class LLM:
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, device: str | None = None,
                 dtype: str | torch.dtype | None = None, random_weights: bool = False,
                 max_num_seqs: int = 16, max_model_len: int | None = None, max_prefill_tokens: int = 16384,
                 enforce_eager: bool = False,
                 seed: int = 0, timeout_s: float = 300.0, first_gpu: int = 0,
                 window_sizes: tuple[int, ...] = (), compile: bool = True, fused_attention: bool = True,
                 measured_linear: bool = True, linear_algorithms: int = LISTED_ALGORITHMS, linear_tma: bool = True,
                 norm_fusion: bool = True, draft: str | None = None, num_speculative_tokens: int = 0,
                 draft_temperature: float | None = None, draft_colocated: bool = False,
                 draft_quantization: str | None = None, draft_vocabulary: int | None = None,
                 draft_vocabulary_ranking: str | None = None,
                 async_spec: bool = False, acceptance_profile: "str | AcceptanceProfile | None" = None,
                 **async_options):
        """max_prefill_tokens: prompts admitted together are prefilled in forwards of at most this many
        right-padded positions (a longer prompt in chunks of that many), bounding prefill's activation memory.
        measured_linear / linear_algorithms / linear_tma: on GPU graphs, each linear layer's shape
        runs the fastest of F.linear, the few-row Triton kernels (the TMA one with linear_tma, on
        Hopper) and up to linear_algorithms of cuBLASLt's algorithms, measured at start-up
        (ssd.layers.triton_linear); norm_fusion: on Hopper GPU graphs, layers of up to 64 rows (TP 1)
        run their RMSNorms, residual adds and SiLU inside the products (ssd.layers.norm_fusion).
        draft_vocabulary: the draft's LM head keeps only this many tokens (stop and special
        tokens, then the first of draft_vocabulary_ranking — a shipped name or a file of
        ssd.spec.rank_vocabulary —, then id order; ssd.spec.draft_vocabulary): faster drafts, same output.
        async_options (with async_spec): fan_out, fan_out_list, fan_out_list_miss, fan_out_shape,
        acceptance, miss_exponent, backup, sampler_x — see ssd.spec.spec_config.AsyncSpecConfig."""
        device_type = resolve_device(device)
        self.checkpoint = resolve_checkpoint(model)
        self.spec = SpecConfig.create(draft, num_speculative_tokens, draft_temperature, draft_colocated,
                                      draft_quantization, draft_vocabulary, draft_vocabulary_ranking)
        self.async_spec = self.make_async_config(async_spec, async_options)
        self.profile = self.load_profile(acceptance_profile, random_weights or self.checkpoint is None)
        window_sizes = tuple(window_sizes) + ((self.spec.k + 1,) if self.spec else ())
        models = [str(self.checkpoint or model)] + ([str(resolve_checkpoint(draft) or draft)] if self.spec else [])
        self.cfg = RunnerConfig(model=models[0], random_weights=random_weights,
                                device_type=device_type, first_gpu=first_gpu, tp_size=tensor_parallel_size,
                                dtype=resolve_dtype(dtype, device_type), num_slots=max_num_seqs,
                                max_len=resolve_max_len(max_model_len, models),
                                max_prefill_tokens=max_prefill_tokens, window_sizes=window_sizes,
                                enforce_eager=enforce_eager, compile=compile, fused_attention=fused_attention,
                                measured_linear=measured_linear, linear_algorithms=linear_algorithms,
                                linear_tma=linear_tma, norm_fusion=norm_fusion, seed=seed, timeout_s=timeout_s)
        self.tokenizer = load_tokenizer(self.checkpoint)
        self.draft_cfg = self.spec.runner_config(self.cfg, resolve_checkpoint(draft), self.async_spec,
                                                 self.draft_head_vocabulary()) if self.spec else None
        self.seed = seed
        self.generate_calls = 0   # unseeded requests of each call draw from a seed of their own
        self.last_run_stats = GenerationStats()
        self._closed = True
        self.check_models()
        self.start()
        self.eos_ids = eos_token_ids(self.runner.arch, self.checkpoint)
        self.fanout_tuner = self.async_spec and FanoutTuner(
            self.async_spec.shape.fanout_hit, FanoutEstimator() if self.async_spec.online_fanout else None)

    def start(self) -> None:
        """Spawn the workers, build rank 0's model and wait until every worker has built its own. On
        a failure, end what was started (WorkerDiedError when a worker's exit explains it)."""
        self.group = self._start_group()
        # the callback must not hold self: an LLM dropped without shutdown() is then collected (__del__)
        self.worker_watch = WorkerWatch(self.group.processes,
                                        functools.partial(on_worker_death, self.cfg.device_type))
        try:
            self.runner = ModelRunner(self.cfg, self.group.tp)
            self.draft = self._connect_draft()
            self.group.wait_until_ready(self.cfg.timeout_s)
        except WorkerDiedError:
            self._abort_group()
            raise
        except Exception as error:
            self.raise_if_workers_died(error, "start-up")
            self._abort_group()
            raise
        except BaseException:
            self._abort_group()
            raise
        self._closed = False

    def draft_head_vocabulary(self) -> tuple[int, ...] | None:
        if self.spec.vocabulary is None:
            return None
        target = load_arch(self.cfg)
        always = eos_token_ids(target, self.checkpoint) | special_token_ids(self.tokenizer)
        ranking = load_ranking(self.spec.vocabulary_ranking, target.vocab_size) \
            if self.spec.vocabulary_ranking else None
        return kept_token_ids(self.spec.vocabulary, target.vocab_size, always, ranking)

    def make_async_config(self, async_spec: bool, options: dict) -> AsyncSpecConfig | None:
        unknown = sorted(set(options) - set(inspect.signature(AsyncSpecConfig.create).parameters) - {"k"})
        if unknown:
            raise TypeError(f"LLM() got unknown keyword argument(s) {unknown}")
        if not async_spec:
            if options:
                raise ValueError(f"options {sorted(options)} need async_spec=True")
            return None
        if self.spec is None:
            raise ValueError("async speculation needs a draft model and num_speculative_tokens")
        if self.spec.colocated:
            raise ValueError("async speculation runs the draft in its own process (own GPU): "
                             "it cannot be co-located")
        return AsyncSpecConfig.create(self.spec.k, **options)

    def load_profile(self, profile: str | AcceptanceProfile | None, random_weights: bool) -> AcceptanceProfile | None:
        if profile is None:
            return None
        if self.spec is None:
            raise ValueError("an acceptance profile replays speculative acceptance: it needs a draft model")
        if not random_weights:  # replay overrides the target's own choices: real weights would lose their output
            raise ValueError("an acceptance profile replaces the target's choices by replayed ones, for random "
                             "weights only: pass random_weights=True (or a preset), or drop acceptance_profile")
        profile = profile if isinstance(profile, AcceptanceProfile) else load_profile(profile)
        log.warning("replaying acceptance profile %r: speculative acceptance is SIMULATED", profile.name)
        return profile

    def check_models(self) -> None:
        """Before any process starts: the GPUs exist, the TP size fits the target, the draft shares
        its vocabulary."""
        if self.cfg.device_type == "cuda" and not launched_externally():
            check_visible_gpus(self.gpus_needed(), torch.cuda.device_count())
        target = load_arch(self.cfg)
        target.check_tensor_parallel(self.cfg.tp_size)
        if self.draft_cfg is None:
            return
        target_vocab, draft_vocab = target.vocab_size, load_arch(self.draft_cfg).vocab_size
        if target_vocab != draft_vocab:
            raise ValueError(f"draft vocabulary ({draft_vocab}) differs from the target's ({target_vocab}); "
                             "speculative decoding needs a draft with the target's tokenizer")
        widest = max(self.async_spec.shape.fanout_max, default=0) if self.async_spec else 0
        if widest >= target_vocab:  # the fork takes the F_j + 1 largest logits (the drafted token left out)
            raise ValueError(f"a fan-out of {widest} guesses at one position needs a vocabulary of more than "
                             f"{widest} tokens; this one has {target_vocab}")
        self.warn_if_tokenizers_differ()

    def warn_if_tokenizers_differ(self) -> None:
        """Same vocabulary size, other tokens: the output stays exact, but the draft guesses in vain."""
        draft_tokenizer = load_tokenizer(resolve_checkpoint(self.draft_cfg.model))
        if self.tokenizer is None or draft_tokenizer is None:
            return
        differing = tokens_mapped_differently(self.tokenizer, draft_tokenizer)
        if differing:
            log.warning("the draft's tokenizer maps %d of the target's %d tokens differently (e.g. %s): the "
                        "output stays exact, but few of the draft's proposals will be accepted",
                        len(differing), len(self.tokenizer.get_vocab()), ", ".join(map(repr, differing[:3])))

    def gpus_needed(self) -> int:
        """GPUs 0 .. n-1 must exist: the target's from first_gpu on, then the draft's own, if any."""
        return self.cfg.first_gpu + self.cfg.tp_size + (1 if self.has_remote_draft else 0)

    @property
    def has_remote_draft(self) -> bool:
        return self.spec is not None and not self.spec.colocated

    def roles(self) -> list[Role]:
        roles = [Role(f"tp{r}", serve_target_rank, (self.cfg,)) for r in range(1, self.cfg.tp_size)]
        if self.has_remote_draft:
            roles.append(Role("draft", serve_draft, (self.draft_cfg, self.spec.k, self.async_spec)))
        return roles

    def _start_group(self) -> SpawnedGroup:
        if not launched_externally():
            return spawn_group(self.cfg.tp_size, self.cfg.device_type, self.cfg.timeout_s, self.roles())
        roles = self.roles()
        check_external_world_size(len(roles) + 1, self.cfg.tp_size, self.has_remote_draft)
        rank, tp = init_from_environment(self.cfg.device_type, self.cfg.timeout_s, self.cfg.tp_size)
        if rank > 0:  # torchrun/srun: other ranks serve rank 0 and leave when it stops
            role = roles[rank - 1]
            role.main(tp, *role.args)
            raise SystemExit(0)
        return SpawnedGroup(tp, owns_process_group=True)

    def _connect_draft(self):
        if self.spec is None:
            return None
        if self.spec.colocated:
            runner = ModelRunner(self.draft_cfg, TPGroup())  # after the target's cache: what memory is left
            check_draft_fits(runner.max_len, self.runner.max_len)
            return DraftProposer(runner, self.spec.k)
        return RemoteDraft(self.cfg.tp_size, self.runner.device, self.spec.k, self.runner.arch.vocab_size,
                           self.cfg.num_slots, self.group.tp.draft_link)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_len

    # ---- generation ----
    @torch.inference_mode()
    def generate(self, prompts: list[str] | list[list[int]] | str,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, mode: str | None = None) -> list[RequestOutput]:
        """mode: "ar" | "sync" (default with a draft) — one loaded engine serves both for A/B runs."""
        self.check_usable()
        decoder_mode = self.check_mode(mode)
        seqs = self.make_sequences(prompts, sampling_params, decoder_mode)
        if self.profile is not None and decoder_mode != "ar" and not all(s.params.greedy for s in seqs):
            raise ValueError("acceptance-profile replay is greedy only: use temperature 0")
        self.last_run_stats = GenerationStats()
        with tqdm(total=len(seqs), desc="generate", disable=not use_tqdm, unit="req") as bar:
            try:
                self.decoder(decoder_mode, on_finish=lambda s: bar.update(1), seed=self.next_call_seed()).run(seqs)
            except Exception as error:
                self.raise_if_workers_died(error)
                self.end_workers_after("generate failed")
                raise
            except KeyboardInterrupt:
                self.end_workers_after("interrupted")
                raise
        self.check_usable()  # over NCCL a worker's death aborts the collectives: the last round may be void
        return [self.to_output(s, p) for s, p in zip(seqs, self._as_list(prompts))]

    def check_mode(self, mode: str | None) -> str:
        mode = mode or ("async" if self.async_spec else "sync" if self.spec else "ar")
        if mode not in ("ar", "sync", "async"):
            raise ValueError(f"unknown decoding mode {mode!r}; use 'ar', 'sync' or 'async'")
        if mode != "ar" and self.spec is None:
            raise ValueError(f"mode {mode!r} needs a draft model (LLM(..., draft=...))")
        if mode == "async" and self.async_spec is None:
            raise ValueError("mode 'async' needs LLM(..., async_spec=True)")
        return mode

    def next_call_seed(self) -> int:
        """The engine seed for the first generate call, then one derived from it per call: unseeded
        requests (SamplingParams(seed=None)) draw new samples in every call, as in vLLM."""
        self.generate_calls += 1
        return self.seed if self.generate_calls == 1 else derive_seed(self.seed, -self.generate_calls)

    def decoder(self, mode: str, on_finish, seed: int | None = None) -> AutoregressiveDecoder:
        """seed: for requests without one (default: the engine's)."""
        seed = self.seed if seed is None else seed
        if mode == "ar":
            return AutoregressiveDecoder(self.runner, self.last_run_stats, seed, on_finish)
        args = (self.runner, self.last_run_stats, seed, self.draft, self.spec.k,
                self.spec.draft_temperature, on_finish, self.profile and ProfileReplay(self.profile))
        if mode == "async":
            return AsyncSpeculativeDecoder(*args, tuner=self.fanout_tuner)
        return SpeculativeDecoder(*args)

    def make_sequences(self, prompts, sampling_params, mode: str | None = None) -> list[Sequence]:
        """mode: the decoding mode they are for (default: the engine's), which sets the room they need."""
        prompts = self._as_list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them, one per prompt")
        return [self.make_sequence(i, p, sp, mode=mode) for i, (p, sp) in enumerate(zip(prompts, params))]

    def make_sequence(self, index: int, prompt, params: SamplingParams, request_id: int | str | None = None,
                      mode: str | None = None) -> Sequence:
        """request_id names the request in errors (default: its index)."""
        ids = self.encode(prompt)
        self.check_fits(index if request_id is None else request_id, ids, params, self.check_mode(mode))
        return Sequence(index, ids, params, self.eos_ids, self.stop_string_watch(params))

    def stop_string_watch(self, params: SamplingParams) -> StopStringWatch | None:
        """Also checks the stop token ids against the vocabulary."""
        if any(t >= self.runner.arch.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must lie in [0, {self.runner.arch.vocab_size}), "
                             f"got {list(params.stop_token_ids)}")
        if not params.stop:
            return None
        if self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this model has none (a random-weights "
                             "preset): use stop_token_ids")
        return StopStringWatch(self.tokenizer, params.stop)

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(p, numbers.Integral) for p in prompts):
            raise TypeError("generate() takes a list of prompts: one token-id prompt is [[5, 6, 7]], not [5, 6, 7]")
        return prompts

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (random-weights preset): pass token-id prompts")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, numbers.Integral) for t in prompt):
            raise TypeError(f"a prompt is a string or a list of token ids, got {prompt!r:.60}")
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < self.runner.arch.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.runner.arch.vocab_size})")
        return ids

    def check_fits(self, index: int | str, ids: list[int], params: SamplingParams, mode: str) -> bool:
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        needed = len(ids) + params.max_tokens + self.reserved_positions(mode)
        if needed > self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; with max_tokens={params.max_tokens} it "
                             f"needs {needed} positions but max_model_len is {self.max_model_len}")
        return True

    def reserved_positions(self, mode: str) -> int:
        """KV positions beyond max_tokens a sequence may touch: speculation windows write ahead; AR
        writes none (its last token is sampled, never written: prompt + max_tokens = max_model_len fits)."""
        return 0 if mode == "ar" else max(self.cfg.window_sizes, default=0)

    def to_output(self, seq: Sequence, prompt) -> RequestOutput:
        text = output_text(self.tokenizer, seq.output_ids, seq.params, seq.stop_reason) if self.tokenizer else None
        return RequestOutput(seq.index, prompt if isinstance(prompt, str) else None, seq.prompt_token_ids,
                             list(seq.output_ids), text, seq.finish_reason or "length", seq.metrics,
                             seq.stop_reason)

    def check_usable(self) -> None:
        if self.worker_watch.dead:
            self.abandon()
            raise WorkerDiedError(f"engine worker(s) died: {describe(self.worker_watch.dead)}")
        if self._closed:
            raise RuntimeError("this LLM has been shut down (or its workers ended after a failure or an "
                               "interrupt): create a new one")

    def raise_if_workers_died(self, error: Exception, stage: str = "generate", grace_s: float = 3.0) -> None:
        """A peer's death can reach rank 0 (as a broken connection) before the process is reaped."""
        deadline = time.monotonic() + grace_s
        dead = [p for p in self.group.processes if not p.is_alive()]
        while not dead and self.group.processes and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = [p for p in self.group.processes if not p.is_alive()]
        if dead:
            self._closed = True  # the group is broken: nothing left to stop cleanly
            self._abort_group()
            raise WorkerDiedError(f"engine worker(s) died during {stage}: {describe(dead)}") from error

    # ---- lifecycle ----
    def end_workers_after(self, what: str) -> None:
        """A run stopped part-way leaves the workers wherever rank 0 left them (maybe waiting in a
        collective for a step that never comes, or about to misread the next command): end them.
        An engine without workers stays usable (each generate starts from empty slots)."""
        if self.group.processes or self.has_remote_draft or self.group.tp.size > 1:
            log.warning("%s: ending the engine's worker processes", what)
            self.abandon()

    def abandon(self) -> None:
        """After a failed round the workers may sit in a collective and cannot be told to stop: end them."""
        self._closed = True
        self._abort_group()

    def _abort_group(self) -> None:
        """Rank 0 failed to build: the other ranks cannot be told to stop, so end them."""
        self.worker_watch.stop()
        self.group.abort()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.worker_watch.stop()
        if not self.group.dead_workers():  # also under srun/torchrun, where no process is ours
            try:
                if self.has_remote_draft:
                    self.draft.stop()
                self.runner.stop_workers()
            except RuntimeError as error:  # a worker died meanwhile: its connection broke
                log.warning("could not tell the workers to stop (%s); ending them", error)
                self._abort_group()
                return
        self.group.join(timeout_s=30)
        self.group.destroy_process_group()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self.shutdown()
            except Exception:  # interpreter teardown: best effort only
                pass
