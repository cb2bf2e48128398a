"""Serving through a coordinator process: the engine (target rank 0) runs in its own process, the
coordinator does tokenization, admission, detokenization and streaming on an asyncio event loop."""
from ssd.coordinator.client import Coordinator, StreamDelta
from ssd.coordinator.errors import (CoordinatorDiedError, CoordinatorError, EngineDiedError,
                                    RequestRejectedError, StartupError)

__all__ = ["Coordinator", "StreamDelta", "CoordinatorError", "CoordinatorDiedError", "EngineDiedError",
           "RequestRejectedError", "StartupError"]
