"""Everything a model-runner process needs to build its shard (picklable, sent whole to every rank)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ssd.layers.cublaslt import LISTED_ALGORITHMS
from ssd.layers.fp8 import FP8_LAYERS


@dataclass(slots=True)
class RunnerConfig:
    model: str                        # checkpoint directory or random-weights preset name
    random_weights: bool = False
    device_type: str = "cpu"          # "cpu" | "cuda"
    first_gpu: int = 0                # rank r uses cuda:(first_gpu + r)
    tp_size: int = 1
    dtype: torch.dtype = torch.float32
    num_slots: int = 16               # max sequences resident at once
    max_len: int = 2048               # per-sequence KV capacity (prompt + output + speculation slack)
    max_prefill_tokens: int = 16384   # padded prompt positions per prefill forward (ssd.engine.prefill_groups)
    window_sizes: tuple[int, ...] = ()  # multi-token forward widths to capture (1+K for verification)
    scratch_len: int = 0              # per-slot KV entries for speculation-tree branches (draft only)
    enforce_eager: bool = False
    compile: bool = True
    fused_attention: bool = True      # GPU graphs: one Triton kernel per attention (else matmuls + softmax)
    tree_kv_in_attention: bool = True  # ... which also writes a tree step's k/v (no RoPE + KV-write kernel)
    measured_linear: bool = True      # GPU graphs: few-row linears take cuBLAS or a Triton kernel, measured per shape
    linear_algorithms: int = LISTED_ALGORITHMS   # ... and cuBLASLt's algorithms (this many per shape; 0: none)
    linear_tma: bool = True           # ... and the TMA Triton kernel's tilings (Hopper and later)
    norm_fusion: bool = True          # GPU graphs, Hopper, TP 1: few-row layers with norms / adds / SiLU inside
    #                                            the products
    weight_quant: str | None = None   # "fp8": the largest weights (MLP, LM head) in fp8 (ssd.layers.fp8; drafts)
    fp8_layers: tuple[str, ...] = FP8_LAYERS   # ... the layers (names' last parts) weight_quant="fp8" stores in fp8
    fp8_produced_rows: bool = True    # ... many-row fp8 x fp8 products take their rows quantized by the norm / SiLU
    #                                            (the default list: on GPU only its weights of >= FP8_MIN_ELEMENTS)
    head_vocabulary: tuple[int, ...] | None = None   # LM head only over these token ids (-inf elsewhere; drafts)
    # ... and its forwards without a logits_index return the kept tokens' logits only, [B, T, N] (a draft's
    # proposer, window and tree read them: no full-vocabulary rows spread and scanned; ModelRunner.kept_logit_ids)
    kept_logits: bool = False
    seed: int = 0
    timeout_s: float = 300.0          # collective timeout: a dead peer fails loudly instead of hanging
    graph_batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16))

    def __post_init__(self):
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device_type!r}")
        if self.tp_size < 1:
            raise ValueError("tensor parallel size must be >= 1")
        if self.num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.weight_quant not in (None, "fp8"):
            raise ValueError(f"weight quantization must be None or 'fp8', got {self.weight_quant!r}")
        if self.head_vocabulary is not None and self.tp_size != 1:
            raise ValueError("a restricted LM head vocabulary needs tp_size 1 (drafts run on one GPU)")
        if self.kept_logits and self.head_vocabulary is None:
            raise ValueError("kept_logits needs a restricted LM head (head_vocabulary)")

    def device_for(self, rank: int) -> torch.device:
        """Under srun/torchrun across nodes, LOCAL_RANK (this node's index) picks the GPU."""
        if self.device_type != "cuda":
            return torch.device("cpu")
        from ssd.distributed.launch import launched_externally
        local = os.environ.get("LOCAL_RANK") if launched_externally() else None
        return torch.device("cuda", int(local) if local is not None else self.first_gpu + rank)

    @property
    def use_cuda_graphs(self) -> bool:
        return self.device_type == "cuda" and not self.enforce_eager
