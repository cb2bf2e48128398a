"""Entry point of a target rank > 0: build this rank's shard, then follow rank 0's commands."""
from __future__ import annotations

import logging
from typing import Callable

from ssd.distributed.tp_group import TPGroup
from ssd.engine.model_runner import ModelRunner
from ssd.engine.runner_config import RunnerConfig

log = logging.getLogger(__name__)


def serve_target_rank(tp: TPGroup, cfg: RunnerConfig, on_ready: Callable[[], None] | None = None) -> None:
    runner = ModelRunner(cfg, tp)
    log.info("target rank %d ready", tp.rank)
    if on_ready:
        on_ready()
    runner.serve_commands()
    log.info("target rank %d stopping", tp.rank)
