"""Speculative-decoding settings shared by the sync and async paths."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ssd.engine.runner_config import RunnerConfig


@dataclass(frozen=True)
class SpecConfig:
    draft: str
    k: int
    draft_temperature: float | None = None
    colocated: bool = False   # draft on target rank 0's device, in its process (the usual SD layout)

    @classmethod
    def create(cls, draft: str | None, k: int, draft_temperature: float | None,
               colocated: bool) -> "SpecConfig | None":
        if draft is None:
            if k:
                raise ValueError("num_speculative_tokens needs a draft model")
            return None
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1 with a draft model, got {k}")
        if draft_temperature is not None and draft_temperature < 0:
            raise ValueError(f"draft temperature must be >= 0, got {draft_temperature}")
        return cls(draft, k, draft_temperature, colocated)

    def runner_config(self, target: RunnerConfig, checkpoint: Path | None) -> RunnerConfig:
        """The draft runs at TP=1: on the GPU after the target group's, or on the target's first."""
        first_gpu = target.first_gpu + (0 if self.colocated else target.tp_size)
        return dataclasses.replace(target, model=str(checkpoint or self.draft), tp_size=1, first_gpu=first_gpu,
                                   window_sizes=(2,), seed=target.seed + 1)
