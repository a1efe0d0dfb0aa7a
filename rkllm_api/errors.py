"""Refusals in one wire-independent form, and the one table that turns what the
engine, the prompt builder and the cache files refuse with into them.

A surface renders an ApiError in its own format (OpenAI: {"error": {...}}; Ollama:
{"error": "..."}); api.py registers a single handler that looks the exception up
here, so no route catches engine errors itself.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

from rkllm_api.engine.errors import (AdapterNotFound, CacheConflict, CacheDamaged, CacheNotFound,
                                     CacheTooLarge, ClientGone, EngineError, InvalidWork,
                                     ModelLoadFailed, ModelNotFound, ModelUnavailable,
                                     QueueFull, QueueTimeout)
from rkllm_api.engine.kvcache import CacheNameError
from rkllm_api.engine.residency import NotEnoughMemory
from rkllm_api.text.prompts import PromptTooLong

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses: HTTP status plus the fields OpenAI's error
    object has (type, param, code); other surfaces use what they need."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 type: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.headers = headers or {}


def model_not_found(model: str, known: tuple = ()) -> RequestError:
    message = f"The model '{model}' does not exist"
    if known:
        message += f"; available: {', '.join(known)}"
    return RequestError(message, status=404, param="model", code="model_not_found")


def model_unavailable(model: str, reason: str) -> RequestError:
    """A listed model whose file cannot be served: the client can pick another one."""
    return RequestError(f"The model '{model}' cannot be served: {reason}", status=400,
                        param="model", code="model_unavailable")


def server_busy(message: str, retry_after: int) -> RequestError:
    return RequestError(message or "the server is busy, try again later", status=503,
                        code="server_busy",
                        headers={"Retry-After": str(max(1, int(retry_after)))})


# Server paths and the names of the native libraries never reach a client: the
# sources already word their messages without them, this is the net beneath.
_PATH = re.compile(r"(?<![\w.:/])(?:~|\.{1,2})?/[^\s'\"(),;:]+")
_LIBRARY = re.compile(r"\b(?:lib[\w.+-]*\.so(?:\.\d+)*|llama[_.]cpp\w*|rkllm_\w+|rknn_\w+|"
                      r"ctypes|ggml\w*)\b", re.IGNORECASE)


def public_text(message: str) -> str:
    """The message without absolute or relative paths and native library names."""
    return _LIBRARY.sub("the runtime", _PATH.sub("[path]", message))


def runtime_failure(message: str) -> RequestError:
    return RequestError(public_text(message), status=500, code="runtime_error")


def _engine_failure(exc) -> RequestError:
    log.error("engine error: %s", exc)
    return runtime_failure(str(exc))


def cache_not_found(message: str) -> RequestError:
    return RequestError(message, status=404, param="use_cache", code="cache_not_found")


def _busy(exc) -> RequestError:
    return server_busy(str(exc), getattr(exc, "retry_after", 5))


# Most specific first: the first class the exception is an instance of wins.
ERROR_TABLE = (
    (ModelNotFound, lambda exc: model_not_found(exc.model, exc.known)),
    (ModelUnavailable, lambda exc: model_unavailable(exc.model, exc.reason)),
    (CacheNotFound, lambda exc: cache_not_found(str(exc))),
    (CacheDamaged, lambda exc: RequestError(str(exc), status=409, code="cache_damaged")),
    (CacheConflict, lambda exc: RequestError(str(exc), status=409, param="name",
                                             code="cache_conflict")),
    (CacheTooLarge, lambda exc: RequestError(str(exc), status=413, code="cache_too_large")),
    ((QueueFull, QueueTimeout), _busy),
    # The runtime's message names files and libraries: the log has it, the client not.
    (ModelLoadFailed, lambda exc: runtime_failure(f"the model '{exc.model}' could not be "
                                                  f"loaded; the server log has the details")),
    # Nobody reads this answer; the status (nginx's "client closed request") is for the log.
    (ClientGone, lambda exc: RequestError(str(exc), status=499, code="client_closed_request")),
    (InvalidWork, lambda exc: RequestError(exc.message, param=exc.param, code=exc.code)),
    (AdapterNotFound, lambda exc: RequestError(str(exc), status=404, param="lora",
                                               code="adapter_not_found")),
    # A second model that would not fit beside the resident ones (engine/residency.py).
    (NotEnoughMemory, lambda exc: RequestError(str(exc), status=503, param="model",
                                               code="insufficient_memory")),
    (EngineError, _engine_failure),
    (PromptTooLong, lambda exc: RequestError(str(exc), param=exc.param,
                                             code="context_length_exceeded")),
    (CacheNameError, lambda exc: RequestError(str(exc), param="name")),
)
MAPPED_ERRORS = tuple(kind for kinds, _ in ERROR_TABLE
                      for kind in (kinds if isinstance(kinds, tuple) else (kinds,)))


def as_request_error(exc: Exception) -> RequestError:
    """The refusal an exception stands for (a RequestError is its own)."""
    if isinstance(exc, RequestError):
        return exc
    for kinds, make in ERROR_TABLE:
        if isinstance(exc, kinds):
            return make(exc)
    raise TypeError(f"no entry in the error table for {type(exc).__name__}")
