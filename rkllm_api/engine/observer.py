"""What the engine tells an observer as it works (metrics, for one).

The engine calls these methods at a handful of moments (a request leaves the queue,
a model loads or unloads, a run produces its first token, a run ends), never per
token, and never lets an observer's exception reach a request. It knows nothing of
Prometheus: rkllm_api/metrics.py implements an observer; the default does nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationReport:
    """One finished run, as the engine saw it."""
    model: str
    device: str                  # npu | cpu
    finish: str                  # stop | length | aborted | error, or the engine's StopCause
                                 # (cancelled, first_token_timeout, repetition, shutdown...)
    kv_mode: str                 # reuse | resume | full | standalone | raw | "-"
    prompt_tokens: int           # the whole prompt, reused tokens included
    prefilled_tokens: int        # what the runtime prefilled for this run
    reused_tokens: int           # prompt tokens the KV cache already held
    generated_tokens: int
    prefill_seconds: float       # runtime perf
    decode_seconds: float
    time_to_first_token: Optional[float]   # since the engine received the job; None: no token
    token_gaps: tuple = ()       # seconds between consecutive tokens, as the runtime sent them


class EngineObserver:
    """Receives the engine's events; every method does nothing here."""

    def queue_waited(self, device: str, seconds: float) -> None:
        """A generation got its device after waiting `seconds` in its queue."""

    def model_loaded(self, model: str, device: str, seconds: float) -> None:
        """A model finished loading on a device."""

    def model_unloaded(self, model: str, device: str) -> None:
        """A model was closed (switch, idle, request, shutdown)."""

    def first_token(self, model: str, device: str, seconds: float) -> None:
        """A run produced its first token, `seconds` after the engine received the job."""

    def generation_finished(self, report: GenerationReport) -> None:
        """A run ended (whatever the reason)."""


def notify(observer: EngineObserver, method: str, *args) -> None:
    """Call an observer method; its failure is logged, never raised into the engine."""
    try:
        getattr(observer, method)(*args)
    except Exception:
        log.exception("engine observer %s.%s failed", type(observer).__name__, method)
