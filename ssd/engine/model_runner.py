"""Runs one model shard: builds it, owns its KV cache, executes forwards (eager or CUDA-graph replay).

In a tensor-parallel group, rank 0 calls the public methods; every call is first broadcast as a
small command so the other ranks (in `serve_commands`) execute the same forward in lockstep."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from ssd.distributed.tp_group import TPGroup
from ssd.engine.cuda_graphs import GraphPool
from ssd.engine.greedy import greedy_tokens
from ssd.engine.kv_cache import KVCache, fit_max_len
from ssd.engine.runner_config import RunnerConfig
from ssd.layers.attention import ForwardContext, TreeContext, TreeRound, keys_end_of
from ssd.layers.embed_head import ParallelLMHead
from ssd.layers.fp8 import (FP8_LAYERS, FP8_MIN_ELEMENTS, Fp8Linear, add_rms_norm_fp8, quantize_model_fp8,
                            quantize_rows, scaled_mm_linear, scaled_mm_rows, silu_and_mul_fp8)
from ssd.layers.kernels import EAGER, Kernels
from ssd.layers.linear import ColumnParallelLinear, RowParallelLinear
from ssd.loading.checkpoint import load_checkpoint
from ssd.loading.random_weights import init_random_weights
from ssd.models.decoder import CausalLM
from ssd.models.model_config import ModelArch
from ssd.models.presets import is_preset, preset_arch

log = logging.getLogger(__name__)

OP_FORWARD, OP_MOVE_SLOT, OP_STOP = 1, 2, 3
HEADER_LEN = 6


def load_arch(cfg: RunnerConfig) -> ModelArch:
    return arch_of(cfg.model)


def arch_of(model: str) -> ModelArch:
    """model: a random-weights preset name or a checkpoint directory."""
    return preset_arch(model) if is_preset(model) else ModelArch.from_checkpoint(model)


def build_model(cfg: RunnerConfig, arch: ModelArch, tp: TPGroup, device: torch.device) -> CausalLM:
    kernels = Kernels.compiled(cfg.fused_attention, cfg.measured_linear, cfg.tree_kv_in_attention,
                               cfg.linear_algorithms, cfg.linear_tma, cfg.norm_fusion) \
        if cfg.use_cuda_graphs and cfg.compile \
        else EAGER
    # tree branches run up to 2K positions past a window that itself fits in max_len
    max_positions = cfg.max_len + 2 * max(cfg.window_sizes, default=1)
    with torch.device(device), _default_dtype(cfg.dtype):
        model = CausalLM(arch, tp, max_positions=max_positions, kernels=kernels)
    if cfg.random_weights or is_preset(cfg.model):
        init_random_weights(model, cfg.seed)
    else:
        load_checkpoint(model, cfg.model, show_progress=tp.rank == 0)
    if cfg.head_vocabulary is not None:   # before fp8: the kept rows are what gets quantized
        model.lm_head.restrict_vocabulary(torch.tensor(cfg.head_vocabulary, dtype=torch.int64, device=device))
        log.info("LM head restricted to %d of %d tokens", len(cfg.head_vocabulary), arch.vocab_size)
    fusion = kernels.norm_fusion
    if fusion is not None and tp.size == 1 and fusion.runs_on(device):   # before fp8: the folded weights get quantized
        fusion.fold_gains(model)
    if cfg.weight_quant == "fp8":
        # the size threshold (the GPU kernels' fixed cost) sorts the default list; layers named
        # explicitly (fp8_layers) are all quantized, as on CPU (tests)
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(f"fp8 weights need fp8 tensor cores (compute capability >= 8.9: H100, H200, L40S); "
                             f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
        if device.type != "cuda":
            log.warning("fp8 weights on CPU are also kept widened to %s (fp8 numbers, no memory or speed "
                        "saved: for accuracy checks)", cfg.dtype)
        quantize_fp8(model, kernels, cfg.use_cuda_graphs and cfg.compile,
                     FP8_MIN_ELEMENTS if device.type == "cuda" and cfg.fp8_layers == FP8_LAYERS else 0,
                     cfg.fp8_layers, cfg.fp8_produced_rows)
    return model.eval()


def quantize_fp8(model: CausalLM, kernels: Kernels, compiled: bool, min_elements: int = FP8_MIN_ELEMENTS,
                 names: tuple[str, ...] = FP8_LAYERS, produced_rows: bool = True) -> None:
    fuse = torch.compile if compiled else (lambda fn: fn)
    few_rows = kernels.linear if hasattr(kernels.linear, "quantized") else None   # the measured Triton linear
    if few_rows is not None:
        few_rows.library_fp8 = fuse(scaled_mm_linear)
    add_rms_norm, silu_and_mul = fuse(add_rms_norm_fp8), fuse(silu_and_mul_fp8)
    rows_matmul = scaled_mm_rows
    if compiled:   # the GPU graph path: Inductor's producers or the one-pass Triton ones, the faster; the
        # same for torch._scaled_mm and the Triton fp8 matmul
        add_rms_norm, silu_and_mul, rows_matmul = load_measured_fp8_kernels(add_rms_norm, silu_and_mul)
    linear = Fp8Linear(few_rows, rows_matmul, fuse(quantize_rows), quantizing_add_rms_norm=add_rms_norm,
                       quantizing_silu_and_mul=silu_and_mul, produced_rows=produced_rows)
    count = quantize_model_fp8(model, linear, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead), names,
                               min_elements)
    log.info("fp8 weights: %d layers (%s of >= %d weights; per-row scales)", count, ", ".join(names), min_elements)


def load_measured_fp8_kernels(add_rms_norm: Callable, silu_and_mul: Callable) -> tuple[Callable, Callable, Callable]:
    """(producer of normed fp8 rows, producer of activated fp8 rows, fp8 rows matmul): each the faster per
    shape of the given / torch one and a Triton one, where Triton loads."""
    try:
        from ssd.layers.triton_fp8_matmul import MeasuredRowsMatmul
        from ssd.layers.triton_fp8_rows import measured_producers
    except ImportError:
        return add_rms_norm, silu_and_mul, scaled_mm_rows
    return *measured_producers(add_rms_norm, silu_and_mul), MeasuredRowsMatmul()


class _default_dtype:
    def __init__(self, dtype: torch.dtype):
        self.dtype, self.saved = dtype, None

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, tp: TPGroup):
        self.cfg, self.tp = cfg, tp
        self.device = cfg.device_for(tp.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.arch = load_arch(cfg)
        self.arch.check_tensor_parallel(tp.size)
        self.model = build_model(cfg, self.arch, tp, self.device)
        # every rank must hold the same positions: each fits its own GPU's free memory, the group takes the least
        self.max_len = tp.min_over_ranks(fit_max_len(self.arch, tp.size, cfg.num_slots, cfg.max_len, cfg.dtype,
                                                     self.device), self.device)
        self.kv = KVCache(self.arch, tp.size, cfg.num_slots, self.max_len, cfg.dtype, self.device,
                          cfg.scratch_len)
        self.header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
        self.graphs = GraphPool(self, cfg) if cfg.use_cuda_graphs else None

    def measuring_shapes(self) -> contextlib.ExitStack:
        """Around a CUDA graph's warm-up: the linear layers measure the shapes they see there, wide
        ones included (ssd.layers.triton_linear.MeasuredLinear.measuring_wide), and so do the fp8
        layers' measured kernels (Fp8Linear.measuring_shapes)."""
        stack = contextlib.ExitStack()
        stack.enter_context(getattr(self.model.kernels.linear, "measuring_wide", contextlib.nullcontext)())
        for fp8 in {id(m.fp8): m.fp8 for m in self.model.modules() if getattr(m, "fp8", None) is not None}.values():
            stack.enter_context(fp8.measuring_shapes())
        return stack

    def linear_summary(self) -> str:
        """What the measured linear layers and the norm fusion chose so far ('' where neither runs)."""
        kernels = self.model.kernels
        parts = [part.summary() for part in (kernels.linear, kernels.norm_fusion) if hasattr(part, "summary")]
        return "".join(f"; {part}" for part in parts)

    # ---- the forward itself (identical on every rank) ----
    @torch.inference_mode()
    def run_forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                    logits_index: torch.Tensor | None, first_slot: int, attend_len: int) -> torch.Tensor:
        """input_ids/positions [B, T] for slots first_slot..first_slot+B-1, attending to cache
        positions < attend_len; logits_index [B] picks one position per row (None: all).
        Returns logits [B, V] or [B, T, V] (float32); without logits_index and with cfg.kept_logits,
        [B, T, N] over a restricted head's kept tokens (kept_logit_ids)."""
        ctx = ForwardContext(positions, positions, attend_len, self.kv.k, self.kv.v, first_slot)
        hidden = self.model(input_ids, ctx)
        if logits_index is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_index]
        elif self.cfg.kept_logits:
            return self.model.lm_head.kept_logits(hidden).float()
        return self.model.compute_logits(hidden).float()

    @property
    def kept_logit_ids(self) -> torch.Tensor | None:
        """The token id of each column of forward's logits (no logits_index): a restricted head's kept
        ids [N] with cfg.kept_logits; None: column i is token i."""
        return self.model.lm_head.kept_ids if self.cfg.kept_logits else None

    def tree_round(self, prefix_limit: torch.Tensor, entry: torch.Tensor, k: int) -> TreeRound:
        """The inputs a tree round's K steps share (TreeRound): prefix_limit [B, N] (branch n's fork
        point: its step m sits at position prefix_limit + 1 + m), entry [N] its first scratch entry."""
        depths = torch.arange(k, device=prefix_limit.device)
        positions = prefix_limit[None] + 1 + depths[:, None, None]                          # [K, B, N]
        write_index = (entry[None, :] + depths[:, None])[:, None, :].expand(positions.shape)
        cos, sin = self.model.model.rotary(positions)
        return TreeRound(positions, write_index, cos, sin, keys_end_of(prefix_limit))

    @torch.inference_mode()
    def tree_forward(self, input_ids: torch.Tensor, steps: TreeRound, tree: TreeContext, prefix_limit: torch.Tensor,
                     max_position: int, greedy: bool = False, kept: bool = False) -> torch.Tensor:
        """Branch step tree.depth of the draft's speculation tree (single-rank draft only): input_ids /
        prefix_limit [B, N]; query n sees committed positions <= prefix_limit and its scratch entries.
        Returns logits [B, N, V] in the model's dtype (sampled ones convert when filtering — at B=16 a
        float32 copy of 336 x 128k logits would cost more per step than the step's attention), or with
        greedy the argmax token ids [B, N] (a restricted head: over its kept tokens' logits, which
        picks the same token as over the full -inf-filled row, ties included: the kept ids are sorted);
        kept: a restricted head's logits of its kept tokens only [B, N, kept]."""
        depth = tree.depth
        ctx = ForwardContext(steps.positions[depth], prefix_limit, self.attend_bucket(max_position + 1), self.kv.k,
                             self.kv.v, 0, tree, (steps.cos[depth], steps.sin[depth]), steps.keys_end)
        hidden = self.model(input_ids, ctx)
        head = self.model.lm_head
        if kept:
            return head.kept_logits(hidden)
        if not greedy:
            return self.model.compute_logits(hidden)
        if head.kept_ids is None:
            return greedy_tokens(self.model.compute_logits(hidden))
        return head.kept_ids[greedy_tokens(head.kept_logits(hidden))]

    def attend_bucket(self, needed: int) -> int:
        """Cache positions a forward attends to: a power of two >= needed (few graph shapes)."""
        return min(self.max_len, max(256, 1 << (needed - 1).bit_length()))

    def _forward_any(self, input_ids, positions, logits_index, first_slot, attend_len):
        if (self.graphs is not None and logits_index is None and first_slot == 0
                and self.graphs.has(*input_ids.shape, attend_len)):
            return self.graphs.replay(input_ids, positions, attend_len)
        return self.run_forward(input_ids, positions, logits_index, first_slot, attend_len)

    # ---- rank-0 API ----
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, max_position: int,
                logits_index: torch.Tensor | None = None, first_slot: int = 0) -> torch.Tensor:
        """max_position: the largest entry of positions (known on the host by the caller)."""
        # contiguous: collectives send the raw storage (an expanded view would send garbage)
        input_ids, positions = input_ids.to(self.device).contiguous(), positions.to(self.device).contiguous()
        if logits_index is not None:
            logits_index = logits_index.to(self.device).contiguous()
        attend_len = self.attend_bucket(max_position + 1)
        self._announce(OP_FORWARD, *input_ids.shape, int(logits_index is not None), first_slot, attend_len)
        self._share(input_ids, positions, logits_index)
        return self._forward_any(input_ids, positions, logits_index, first_slot, attend_len)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Right-padded prompts ids/positions [B, T] from position 0; last [B] each one's last prompt
        index -> logits there [B, V]. One forward, except a single prompt longer than
        cfg.max_prefill_tokens: then chunks of that many positions, each attending to those before,
        and the logits at the prompt's end (a single prompt has no padding)."""
        chunk, length = self.cfg.max_prefill_tokens, ids.shape[1]
        if ids.shape[0] > 1 or length <= chunk:
            return self.forward(ids, positions, int(positions.max()), logits_index=last, first_slot=first_slot)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            # one position's logits per forward (the chunk's last; only the final chunk's are used)
            logits = self.forward(ids[:, start:end], positions[:, start:end], end - 1,
                                  logits_index=torch.full((1,), end - start - 1), first_slot=first_slot)
        return logits

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        self._announce(OP_MOVE_SLOT, src, dst, length)
        self.kv.move_slot(src, dst, length)

    def stop_workers(self) -> None:
        self._announce(OP_STOP)

    # ---- command broadcast ----
    def _announce(self, op: int, *args: int) -> None:
        if self.tp.size == 1:
            return
        values = [op, *args] + [0] * (HEADER_LEN - 1 - len(args))
        self.header.copy_(torch.tensor(values, dtype=torch.int64))
        self.tp.broadcast_command(self.header)

    def _share(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is not None:
                self.tp.broadcast_from_first(t)

    @torch.inference_mode()
    def serve_commands(self) -> None:
        """Loop of ranks > 0: execute rank 0's commands until OP_STOP."""
        while True:
            op, a, b, c, d, e = self.tp.broadcast_command(self.header).tolist()
            if op == OP_STOP:
                return
            if op == OP_MOVE_SLOT:
                self.kv.move_slot(a, b, c)
                continue
            ids = torch.empty((a, b), dtype=torch.int64, device=self.device)
            pos = torch.empty_like(ids)
            index = torch.empty(a, dtype=torch.int64, device=self.device) if c else None
            self._share(ids, pos, index)
            self._forward_any(ids, pos, index, d, e)
