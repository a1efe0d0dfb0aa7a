"""What the engine refuses with. Nothing here knows HTTP: the app's one error table
(rkllm_api/errors.py) maps each to a status for every surface."""
from __future__ import annotations


class EngineError(Exception):
    pass


class ModelNotFound(EngineError):
    def __init__(self, model: str, known: tuple = ()):
        super().__init__(f"model {model!r} not found")
        self.model = model
        self.known = tuple(known)     # the ids that do exist, for the answer


class ModelUnavailable(EngineError):
    """A listed model whose file cannot be served (corrupt, truncated, empty); the
    reason names no path, so it can be shown to clients."""

    def __init__(self, model: str, reason: str):
        super().__init__(f"model {model!r} cannot be served: {reason}")
        self.model = model
        self.reason = reason


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


class InvalidWork(EngineError):
    """Work the engine refuses because of what the request asked (a 400, not a
    failure): input it cannot embed, a width the model does not have, an adapter the
    model does not have. `param` names the request field; `code` a machine name."""

    def __init__(self, message: str, param: str = "", code: str = ""):
        super().__init__(message)
        self.message = message
        self.param = param or None
        self.code = code or None


class AdapterNotFound(EngineError):
    """A LoRA adapter the model's folder does not hold (-> 404)."""

    def __init__(self, model: str, adapter: str, known: tuple = ()):
        message = f"the model {model!r} has no LoRA adapter {adapter!r}"
        message += f"; its adapters: {', '.join(known)}" if known else "; it has none"
        super().__init__(message)
        self.model = model
        self.adapter = adapter


class ClientGone(EngineError):
    """The client disconnected while its request waited for the device: the run is
    not started (nobody would read it)."""

    def __init__(self):
        super().__init__("the client disconnected while waiting for the device")


class CacheConflict(EngineError):
    """A named cache that cannot be created as asked: the name is taken, or the model
    has as many named caches as NAMED_CACHE_MAX_COUNT allows (-> 409)."""


class CacheTooLarge(EngineError):
    """A new named cache would bring the model's named caches over NAMED_CACHE_MAX_MB
    (-> 413); it was not kept."""


class CacheDamaged(EngineError):
    """A named cache whose file no longer matches what was saved (cut short, changed):
    it has been removed, and the client is asked to create it again (-> 409)."""

    def __init__(self, model: str, name: str):
        super().__init__(f"the prompt cache {name!r} of model {model!r} was damaged and has "
                         f"been removed; recreate it")
        self.model = model
        self.name = name
