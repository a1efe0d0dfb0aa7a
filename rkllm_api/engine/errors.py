"""What the engine refuses with. Nothing here knows HTTP: the app's one error table
(rkllm_api/errors.py) maps each to a status for every surface."""
from __future__ import annotations


class EngineError(Exception):
    pass


class ModelNotFound(EngineError):
    def __init__(self, model: str):
        super().__init__(f"model {model!r} not found")
        self.model = model


class QueueFull(EngineError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(EngineError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(QueueFull):
    """The engine no longer accepts work. A QueueFull, so the API answers 503."""

    def __init__(self):
        super().__init__("server is shutting down", retry_after=5)


class ModelLoadFailed(EngineError):
    def __init__(self, model: str, message: str):
        super().__init__(f"model {model!r} failed to load: {message}")
        self.model = model
        self.message = message


class CacheNotFound(EngineError):
    def __init__(self, model: str, name: str):
        super().__init__(f"prompt cache {name!r} of model {model!r} not found")
        self.model = model
        self.name = name
