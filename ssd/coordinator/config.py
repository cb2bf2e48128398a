"""What the coordinator process is started with (sent whole to it, plain data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class CoordinatorConfig:
    engine_kwargs: dict[str, Any]     # LLM(**engine_kwargs), built in the engine process
    client_endpoint: str              # the client binds it, the coordinator connects
    parent_pid: int                   # the client's process: the coordinator leaves when it is gone
    workdir: str                      # the client's temporary directory (removed by the client, whatever happens)
    mode: str | None = None           # decoding mode of the engine ("ar" | "sync" | "async")
    start_timeout_s: float = 600.0    # the engine loads the model within this
    stop_timeout_s: float = 30.0      # a stopping engine exits within this, or is killed
    log_level: int = 20               # logging.INFO
    refill_wait: bool = True          # the engine briefly waits for requests joining freed slots

    def __post_init__(self):
        if "model" not in self.engine_kwargs:
            raise ValueError("engine_kwargs needs 'model'")
        if self.start_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
