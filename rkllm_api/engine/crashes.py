"""What the engine remembers of runtime processes that died: counts for /health and
the metrics, and the pause before a model that keeps crashing is loaded again."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

FIRST_BACKOFF_SECONDS = 1.0   # the pause after the second crash in a row
MAX_BACKOFF_SECONDS = 30.0    # doubling stops here
CALM_SECONDS = 60.0           # a model that ran this long since its last crash starts over


@dataclass
class ModelCrashes:
    crashes: int = 0
    restarts: int = 0
    in_a_row: int = 0                 # crashes without a completed run in between
    last_how: str = ""                # "killed by SIGSEGV", "exited with status 3"
    last_during: str = ""             # "init", "a run", "hidden_states" ...
    last_at: float = 0.0              # time.time() of the last crash
    last_monotonic: float = 0.0
    restarted_after: float = 0.0      # last_monotonic of the crash a restart answered
    by_how: dict = field(default_factory=dict)


class CrashLog:
    """Per model: crashes, restarts after a crash, and the backoff. Thread-safe."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict = {}

    def crashed(self, model_id: str, how: str, during: str) -> None:
        with self._lock:
            entry = self._models.setdefault(model_id, ModelCrashes())
            now = self._clock()
            if entry.in_a_row and now - entry.last_monotonic > CALM_SECONDS:
                entry.in_a_row = 0
            entry.crashes += 1
            entry.in_a_row += 1
            entry.last_how, entry.last_during = how, during
            entry.last_at, entry.last_monotonic = time.time(), now
            entry.by_how[how] = entry.by_how.get(how, 0) + 1

    def ran(self, model_id: str) -> None:
        """A run completed: the model is healthy again, the next crash pauses nothing."""
        with self._lock:
            entry = self._models.get(model_id)
            if entry is not None:
                entry.in_a_row = 0

    def restarting(self, model_id: str) -> bool:
        """Called before a load: True (and counted) when it follows a crash."""
        with self._lock:
            entry = self._models.get(model_id)
            if entry is None or not entry.crashes or entry.last_monotonic == 0.0:
                return False
            if entry.restarted_after == entry.last_monotonic:
                return False
            entry.restarted_after = entry.last_monotonic
            entry.restarts += 1
            return True

    def backoff(self, model_id: str) -> float:
        """Seconds to wait before loading the model again: none after one crash (the
        queued requests go on at once), then 1, 2, 4 ... up to 30 s after each crash
        in a row, counted from that crash."""
        with self._lock:
            entry = self._models.get(model_id)
            if entry is None or entry.in_a_row < 2:
                return 0.0
            if self._clock() - entry.last_monotonic > CALM_SECONDS:
                return 0.0
            pause = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (entry.in_a_row - 2))
            return max(0.0, entry.last_monotonic + pause - self._clock())

    def describe(self) -> dict:
        """{"crashes": n, "restarts": n, "models": {id: {...}}} for /health."""
        with self._lock:
            models = {model_id: {"crashes": e.crashes, "restarts": e.restarts,
                                 "crashes_in_a_row": e.in_a_row,
                                 "by_cause": dict(e.by_how),
                                 "last_crash": {"how": e.last_how, "during": e.last_during,
                                                "at": round(e.last_at, 3)}}
                      for model_id, e in self._models.items()}
        return {"crashes": sum(m["crashes"] for m in models.values()),
                "restarts": sum(m["restarts"] for m in models.values()),
                "models": models}
