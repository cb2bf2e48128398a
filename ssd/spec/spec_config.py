"""Speculative-decoding settings shared by the sync and async paths."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ssd.engine.runner_config import RunnerConfig
from ssd.spec.fanout import geometric_fanout, parse_fanout_list, uniform_fanout

if TYPE_CHECKING:
    from ssd.draft_worker.tree import TreeShape


@dataclass(frozen=True)
class AsyncSpecConfig:
    """Asynchronous speculation (Saguaro): the draft's cache shape, Saguaro constant and backup."""
    shape: "TreeShape"
    saguaro_c: float = 1.0
    backup: str = "jit"
    online_fanout: bool = False  # geometric lists re-estimated from the engine's own a and r

    @classmethod
    def create(cls, k: int, fan_out: int = 3, fan_out_list=None, fan_out_list_miss=None,
               fan_out_shape: str = "uniform", acceptance: float = 0.8, miss_exponent: float = 1.0,
               backup: str = "jit", sampler_x: float = 1.0) -> "AsyncSpecConfig":
        from ssd.draft_worker.tree import TreeShape
        if not 0 < sampler_x <= 1:
            raise ValueError(f"Saguaro constant C (--x) must lie in (0, 1], got {sampler_x}")
        if backup not in ("jit", "fast", "auto"):
            raise ValueError(f"backup must be jit, fast or auto, got {backup!r}")
        hit = fanout_list(k, fan_out, fan_out_list, fan_out_shape, acceptance, miss_exponent)
        miss = parse_fanout_list(fan_out_list_miss, k) if fan_out_list_miss is not None else hit
        online = fan_out_shape == "geometric" and fan_out_list is None and fan_out_list_miss is None
        return cls(TreeShape(k, hit, miss), sampler_x, backup, online)


def fanout_list(k: int, fan_out: int, explicit, shape: str, acceptance: float, miss_exponent: float):
    if explicit is not None:
        return parse_fanout_list(explicit, k)
    if shape == "geometric":  # same budget as the uniform list, allocated by DESIGN.md §5
        return geometric_fanout(fan_out * (k + 1), k, acceptance, miss_exponent)
    if shape != "uniform":
        raise ValueError(f"fan-out shape must be uniform or geometric, got {shape!r}")
    return uniform_fanout(fan_out, k)


@dataclass(frozen=True)
class SpecConfig:
    draft: str
    k: int
    draft_temperature: float | None = None
    colocated: bool = False   # draft on target rank 0's device, in its process (the usual SD layout)
    quantization: str | None = None   # the draft's weights: "fp8" (ssd.layers.fp8) or as loaded
    vocabulary: int | None = None     # tokens the draft's LM head keeps (ssd.spec.draft_vocabulary); None: all
    vocabulary_ranking: str | None = None   # which first: a shipped ranking's name or a file (None: id order)

    @classmethod
    def create(cls, draft: str | None, k: int, draft_temperature: float | None,
               colocated: bool, quantization: str | None = None,
               vocabulary: int | None = None, vocabulary_ranking: str | None = None) -> "SpecConfig | None":
        if draft is None:
            given = [name for name, value in (("num_speculative_tokens", k), ("draft quantization", quantization),
                                              ("draft vocabulary", vocabulary)) if value]
            if given:
                raise ValueError(f"{' and '.join(given)}: speculative decoding needs a draft model")
            return None
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1 with a draft model, got {k}")
        if draft_temperature is not None and draft_temperature < 0:
            raise ValueError(f"draft temperature must be >= 0, got {draft_temperature}")
        if quantization not in (None, "fp8"):
            raise ValueError(f"draft quantization must be 'fp8' or None, got {quantization!r}")
        if vocabulary is not None and vocabulary < 1:
            raise ValueError(f"draft vocabulary size must be >= 1, got {vocabulary}")
        if vocabulary_ranking is not None and vocabulary is None:
            raise ValueError("a draft vocabulary ranking needs a draft vocabulary size")
        return cls(draft, k, draft_temperature, colocated, quantization, vocabulary, vocabulary_ranking)

    def runner_config(self, target: RunnerConfig, checkpoint: Path | None,
                      async_spec: AsyncSpecConfig | None = None,
                      head_vocabulary: tuple[int, ...] | None = None) -> RunnerConfig:
        """The draft runs at TP=1: on the GPU after the target group's, or on the target's first.
        Async: it also forwards the K+1 window and keeps scratch KV for the tree's branches.
        head_vocabulary: the token ids its LM head keeps (with `vocabulary`: kept_token_ids)."""
        first_gpu = target.first_gpu + (0 if self.colocated else target.tp_size)
        windows, scratch = ((2,), 0) if async_spec is None else ((2, self.k + 1), async_spec.shape.scratch_len)
        return dataclasses.replace(target, model=str(checkpoint or self.draft), tp_size=1, first_gpu=first_gpu,
                                   window_sizes=windows, scratch_len=scratch, seed=target.seed + 1,
                                   weight_quant=self.quantization, head_vocabulary=head_vocabulary,
                                   kept_logits=head_vocabulary is not None)
