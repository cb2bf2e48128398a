"""What the coordinator client raises."""


class CoordinatorError(RuntimeError):
    """The coordinator or its engine stopped working; the Coordinator cannot be used any more."""


class EngineDiedError(CoordinatorError):
    """The engine process failed (an error in a round, a dead worker) or was killed."""


class CoordinatorDiedError(CoordinatorError):
    """The coordinator process exited unexpectedly."""


class StartupError(CoordinatorError):
    """The coordinator or the engine did not become ready."""


class RequestRejectedError(ValueError):
    """A request the engine cannot serve (e.g. prompt plus max_tokens longer than max_model_len);
    the engine and the other requests carry on. outputs: the call's other results, by prompt index."""

    def __init__(self, message: str, outputs: dict | None = None):
        super().__init__(message)
        self.outputs = outputs or {}
