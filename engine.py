"""The model manager and generation scheduler.

Devices: the NPU and the CPU each have one slot. A slot holds at most one loaded
model (a runtime) and runs one generation at a time; a CPU model answers while the
NPU is busy. Requests for a busy device wait in that device's FIFO queue, bounded in
length (QUEUE_MAX_LENGTH -> QueueFull) and time (QUEUE_TIMEOUT -> QueueTimeout).

Models load on demand; asking for another model on the same device closes the
loaded one first (the board has no memory for two), and a model idle for
IDLE_UNLOAD_TIMEOUT seconds is closed by the monitor thread that start() launches.

A generation runs runtime.run() in its own worker thread; the runtime's callback
feeds a per-request queue that Generation.events() reads, applying the first-token,
silence and total limits, the repetition guard and heartbeats. The worker releases
the slot when run() has returned, so the next request never overlaps a run.

Nothing here knows HTTP: the API maps QueueFull/QueueTimeout (and ShuttingDown, a
QueueFull) to 503 + Retry-After, ModelNotFound to 404, ModelLoadFailed to 500.
"""
from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Union

import runtime as runtime_module
from repetition import RepetitionGuard
from runtime import EventKind, FinishReason, PerfStats, RunRequest, RunResult, TokenEvent

log = logging.getLogger(__name__)

DEVICES = ("npu", "cpu")
CANCEL_WAIT_SECONDS = 0.2   # cancel() returns after this even if the run has not ended
STOP_WAIT_SECONDS = 3.0     # a limit or the guard waits this long for the run to end
ABORT_REPEAT_SECONDS = 0.05  # abort() again this often: a run starting just after the
                             # first abort (runtimes reset the flag in run()) still stops
DEFAULT_HOLD_SECONDS = 10.0  # assumed length of a generation before any was measured


# ---- errors --------------------------------------------------------------------
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


# ---- public data ---------------------------------------------------------------
@dataclass
class GenerationJob:
    model: str                     # id or alias as the client sent it ("" = default model)
    run: RunRequest                # prompt, thinking, max_new_tokens, sampling ...
    request_id: str
    conversation: object = None    # issue 4: the KV plan (see prompts.BuiltPrompt)


@dataclass(frozen=True)
class Heartbeat:
    """Yielded by Generation.events() after heartbeat_seconds without tokens."""
    elapsed: float                 # seconds since the generation started
    waiting_for_first_token: bool  # True during prefill


class _WorkerDone:
    """Queue marker: the worker has returned (after FINISH/ERROR, or after a crash)."""

    def __init__(self, failure: Optional[str]):
        self.failure = failure


# ---- KV session tracking (issue 4 extends this part) ---------------------------
class KvSession:
    """What the KV cache of one loaded runtime holds.

    For now only two facts are tracked: whether the content is known at all, and
    which conversation (GenerationJob.conversation) the last keep_history run left
    in it. Any abort, error or limit makes it unknown; a keep_history run on an
    unknown cache clears it first. Issue 4 will match job.conversation against
    `conversation` here to send only the new turn.
    """

    def __init__(self):
        self.known = True
        self.conversation = None
        self.lock = threading.Lock()

    def reset(self) -> None:           # a freshly loaded runtime, or after clear_kv_cache
        with self.lock:
            self.known, self.conversation = True, None

    def before_run(self, runtime, job: GenerationJob) -> None:
        with self.lock:
            must_clear = job.run.keep_history and not self.known
        if must_clear:
            runtime.clear_kv_cache()
            self.reset()

    def after_run(self, job: GenerationJob, result: Optional[RunResult]) -> None:
        completed = result is not None and result.finish_reason in (
            FinishReason.STOP, FinishReason.LENGTH)
        with self.lock:
            if not completed:
                self.known, self.conversation = False, None
            elif job.run.keep_history:
                self.conversation = job.conversation
            # keep_history=False leaves the cache as it was (runtime contract).

    def describe(self) -> dict:
        with self.lock:
            return {"known": self.known, "holds_conversation": self.conversation is not None}


# ---- device slot ----------------------------------------------------------------
class DeviceSlot:
    """One device: its loaded runtime, who holds it, and who waits, in order.

    Fairness: each waiter appends a ticket; the slot goes to the ticket at the head
    of the queue, so requests are served in arrival order whatever the thread
    scheduler does. `cond` guards every field; the runtime itself is only used by
    the holder.
    """

    def __init__(self, device: str):
        self.device = device
        self.cond = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.holder: Optional[str] = None        # label of whoever holds the slot
        self.held_since = 0.0
        self.runtime = None
        self.model = None                        # registry.ModelInfo of the runtime
        self.kv = KvSession()
        self.generation: Optional["Generation"] = None
        self.last_used = time.monotonic()
        self.average_hold = DEFAULT_HOLD_SECONDS

    def acquire(self, label: str, timeout: float, max_waiting: int, stopping) -> None:
        with self.cond:
            if stopping():
                raise ShuttingDown()
            if self.holder is None and not self.waiting:
                self._take(label)
                return
            if len(self.waiting) >= max_waiting:
                raise QueueFull(f"{self.device} queue is full ({len(self.waiting)} waiting)",
                                self.retry_after())
            ticket = object()
            self.waiting.append(ticket)
            deadline = time.monotonic() + timeout
            try:
                while True:
                    if stopping():
                        raise ShuttingDown()
                    if self.holder is None and self.waiting[0] is ticket:
                        self.waiting.popleft()
                        self._take(label)
                        return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueTimeout(f"waited {timeout:g} s for the {self.device}",
                                           self.retry_after())
                    self.cond.wait(remaining)
            except BaseException:
                if ticket in self.waiting:
                    self.waiting.remove(ticket)
                    self.cond.notify_all()  # the next ticket may now be at the head
                raise

    def try_acquire_if_idle(self, label: str) -> bool:
        with self.cond:
            if self.holder is not None or self.waiting:
                return False
            self._take(label)
            return True

    def release(self, measured: bool = False) -> None:
        """Free the slot; `measured` (a generation ended) feeds the retry estimate."""
        with self.cond:
            if measured:
                held = time.monotonic() - self.held_since
                self.average_hold = 0.7 * self.average_hold + 0.3 * held
            self.holder = None
            self.generation = None
            self.last_used = time.monotonic()
            self.cond.notify_all()

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying: the queue ahead of it times
        the recent average hold, kept between 1 s and 2 min."""
        estimate = self.average_hold * (len(self.waiting) + 1)
        return int(min(120, max(1, math.ceil(estimate))))

    def _take(self, label: str) -> None:
        self.holder = label
        self.held_since = time.monotonic()


# ---- one generation ---------------------------------------------------------------
class Generation:
    """One request's run on a device. Iterate events() once; call cancel() when the
    client goes away (closing the events() generator early does the same). A
    Generation whose events() is never read keeps its slot until the run ends, so
    callers that give up before reading must cancel()."""

    def __init__(self, engine: "Engine", slot: DeviceSlot, model, runtime, job: GenerationJob):
        self.model = model
        self.job = job
        self.request_id = job.request_id
        # Why the engine ended the run early: None, "cancelled", "first_token_timeout",
        # "silence_timeout", "total_timeout", "repetition" or "shutdown".
        self.stop_cause: Optional[str] = None
        self._engine = engine
        self._settings = engine.settings
        self._slot = slot
        self._runtime = runtime
        self._queue: queue.Queue = queue.Queue()
        self._raw_result: Optional[RunResult] = None
        self._override: dict = {}
        self._lock = threading.Lock()
        self._abort_requested = threading.Event()
        self._running = threading.Event()
        self._iterated = False
        self.started_at = time.monotonic()
        self._worker = threading.Thread(target=self._work, daemon=True,
                                        name=f"generation-{job.request_id}")

    @property
    def result(self) -> Optional[RunResult]:
        """The run's result once it is over, with the engine's own ending applied
        (repetition: finish_reason stop; a limit: finish_reason error + message)."""
        with self._lock:
            raw, override = self._raw_result, dict(self._override)
        return replace(raw, **override) if raw is not None and override else raw

    @property
    def done(self) -> bool:
        return not self._worker.is_alive() and self._raw_result is not None

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the worker to finish; True when it has."""
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def cancel(self) -> None:
        """The client is gone: abort the run; returns within about 200 ms.
        The slot is released as soon as the worker has finished. Idempotent."""
        with self._lock:
            if self.stop_cause is None:
                self.stop_cause = "cancelled"
        self._abort_and_wait(CANCEL_WAIT_SECONDS)

    # ---- the event stream ----
    def events(self) -> Iterator[Union[TokenEvent, Heartbeat]]:
        if self._iterated:
            raise RuntimeError("Generation.events() can be iterated only once")
        self._iterated = True
        finished = False
        try:
            for item in self._stream():
                if isinstance(item, TokenEvent) and item.kind is not EventKind.TEXT:
                    finished = True
                yield item
        finally:
            if not finished:
                self.cancel()

    def _stream(self):
        settings = self._settings
        guard = RepetitionGuard(settings.repetition_window, settings.repetition_threshold)
        heartbeat = settings.heartbeat_seconds
        last_token: Optional[float] = None
        last_signal = self.started_at
        while True:
            limit, limit_at = self._next_limit(last_token)
            wait = limit_at - time.monotonic()
            if heartbeat > 0:
                wait = min(wait, last_signal + heartbeat - time.monotonic())
            try:
                item = self._queue.get(timeout=None if wait == math.inf else max(0.0, wait))
            except queue.Empty:
                now = time.monotonic()
                if now >= limit_at:
                    yield self._stop_for_limit(limit)
                    return
                if heartbeat > 0 and now >= last_signal + heartbeat:
                    last_signal = now
                    yield Heartbeat(now - self.started_at, last_token is None)
                continue
            if isinstance(item, _WorkerDone):  # run() raised before sending FINISH/ERROR
                yield TokenEvent(EventKind.ERROR, error=item.failure or "the run failed",
                                 finish_reason=FinishReason.ERROR)
                return
            if item.kind is EventKind.TEXT:
                last_token = last_signal = time.monotonic()
                if guard.feed(item.text):
                    yield self._stop_for_repetition()
                    return
                yield item
                continue
            self._worker.join(STOP_WAIT_SECONDS)  # so result is set and the slot free
            yield self._final_event(item)
            return

    def _next_limit(self, last_token: Optional[float]) -> tuple:
        """The limit that strikes next: (setting name, monotonic deadline)."""
        settings = self._settings
        candidates = [("total_timeout", self.started_at, settings.total_timeout)]
        if last_token is None:
            candidates.append(("first_token_timeout", self.started_at,
                               settings.first_token_timeout))
        else:
            candidates.append(("silence_timeout", last_token, settings.silence_timeout))
        best = ("", math.inf)
        for name, since, seconds in candidates:
            if seconds and seconds > 0 and since + seconds < best[1]:
                best = (name, since + seconds)
        return best

    def _stop_for_limit(self, limit: str) -> TokenEvent:
        seconds = getattr(self._settings, limit)
        what = {"first_token_timeout": "no first token within",
                "silence_timeout": "no new token within",
                "total_timeout": "generation exceeded"}[limit]
        message = f"{what} {seconds:g} s ({limit}); generation aborted"
        log.warning("request %s on %s: %s", self.request_id, self.model.id, message)
        self._end_early(limit, finish_reason=FinishReason.ERROR, error=message)
        return TokenEvent(EventKind.ERROR, error=message, finish_reason=FinishReason.ERROR)

    def _stop_for_repetition(self) -> TokenEvent:
        log.warning("request %s on %s: repetition loop detected, generation stopped",
                    self.request_id, self.model.id)
        self._end_early("repetition", finish_reason=FinishReason.STOP)
        result = self.result
        return TokenEvent(EventKind.FINISH, finish_reason=FinishReason.STOP,
                          perf=result.perf if result else PerfStats())

    def _end_early(self, cause: str, **override) -> None:
        with self._lock:
            if self.stop_cause is None:
                self.stop_cause = cause
            self._override = override
        self._abort_and_wait(STOP_WAIT_SECONDS)

    def _final_event(self, event: TokenEvent) -> TokenEvent:
        """The runtime's FINISH/ERROR, unless shutdown aborted the run: then an ERROR."""
        if self.stop_cause == "shutdown":
            return TokenEvent(EventKind.ERROR, error="server is shutting down",
                              finish_reason=FinishReason.ERROR, perf=event.perf)
        return event

    # ---- the worker ----
    def _start(self) -> None:
        self._worker.start()

    def _work(self) -> None:
        result, failure = None, None
        try:
            self._slot.kv.before_run(self._runtime, self.job)
            if self._abort_requested.is_set():  # cancelled before the run began
                result = RunResult("", FinishReason.ABORTED, PerfStats())
                self._queue.put(TokenEvent(EventKind.FINISH, perf=result.perf,
                                           finish_reason=FinishReason.ABORTED))
            else:
                self._running.set()
                try:
                    result = self._runtime.run(self.job.run, self._queue.put)
                finally:
                    self._running.clear()
        except Exception as exc:  # a runtime bug must not leave the slot taken
            failure = f"{type(exc).__name__}: {exc}"
            log.exception("request %s: run failed", self.request_id)
            result = RunResult("", FinishReason.ERROR, PerfStats(), error=failure)
        finally:
            with self._lock:
                self._raw_result = result
            self._slot.kv.after_run(self.job, result)
            self._queue.put(_WorkerDone(failure))
            self._log_result(result)
            self._engine._generation_finished(self._slot, self)

    def _abort_and_wait(self, budget: float) -> bool:
        """Abort the run (repeatedly, see ABORT_REPEAT_SECONDS) and wait up to
        `budget` seconds for the worker to end. True when it ended."""
        deadline = time.monotonic() + budget
        self._abort_requested.set()
        while self._worker.is_alive():
            if self._running.is_set():
                try:
                    self._runtime.abort()
                except Exception:
                    log.exception("request %s: abort failed", self.request_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("request %s: run still going %.1f s after abort",
                            self.request_id, budget)
                return False
            self._worker.join(min(ABORT_REPEAT_SECONDS, remaining))
        return True

    def _log_result(self, result: Optional[RunResult]) -> None:
        if result is None:
            return
        perf = result.perf
        log.info("request %s on %s/%s: %s%s, prefill %d tokens %.0f ms, generated %d tokens "
                 "%.0f ms, %.1f s in all", self.request_id, self._slot.device, self.model.id,
                 result.finish_reason.value, f" ({self.stop_cause})" if self.stop_cause else "",
                 perf.prefill_tokens, perf.prefill_ms, perf.generate_tokens, perf.generate_ms,
                 time.monotonic() - self.started_at)


# ---- the engine -------------------------------------------------------------------
class Engine:
    """Loads models on demand and runs generations, one per device at a time."""

    def __init__(self, settings, registry, runtime_factory=runtime_module.open_runtime):
        self.settings = settings
        self.registry = registry
        self._runtime_factory = runtime_factory
        self._slots = {device: DeviceSlot(device) for device in DEVICES}
        self._stopping = False
        self._stop_event = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self._active: set = set()          # running Generations
        self._active_lock = threading.Lock()

    # ---- lifecycle ----
    def start(self) -> None:
        """Start the idle-unload monitor (nothing to start when IDLE_UNLOAD_TIMEOUT is 0)."""
        if self._monitor is not None or self.settings.idle_unload_seconds <= 0:
            return
        self._monitor = threading.Thread(target=self._watch_idle, name="engine-idle-monitor",
                                         daemon=True)
        self._monitor.start()

    def shutdown(self, timeout: float = 8.0) -> None:
        """Refuse new work, abort running generations, wait for their workers, close
        every runtime. Returns within `timeout`; a runtime whose run would not end is
        left open (closing it under a running C call would crash the process)."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._stop_event.set()
        for slot in self._slots.values():
            with slot.cond:
                slot.cond.notify_all()   # waiters see _stopping and raise ShuttingDown
        with self._active_lock:
            running = list(self._active)
        for generation in running:
            with generation._lock:
                generation.stop_cause = generation.stop_cause or "shutdown"
            generation._abort_requested.set()
        for generation in running:
            generation._abort_and_wait(max(0.0, deadline - time.monotonic()))
        for slot in self._slots.values():
            self._close_at_shutdown(slot, deadline)
        if self._monitor is not None:
            self._monitor.join(max(0.0, deadline - time.monotonic()))
        log.info("engine stopped")

    def _close_at_shutdown(self, slot: DeviceSlot, deadline: float) -> None:
        with slot.cond:
            while slot.holder is not None and time.monotonic() < deadline:
                slot.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
            if slot.holder is not None:
                log.error("%s still busy (%s) at shutdown: runtime left open",
                          slot.device, slot.holder)
                return
            slot._take("shutdown")
        try:
            self._close_runtime(slot, "shutdown")
        finally:
            slot.release()

    # ---- generation ----
    def generate(self, job: GenerationJob) -> Generation:
        """Wait (FIFO, bounded) for the model's device, load the model if needed and
        start the run. Raises ModelNotFound, QueueFull, QueueTimeout, ShuttingDown
        or ModelLoadFailed; the slot is never left taken when it raises."""
        if self._stopping:
            raise ShuttingDown()
        model = self._resolve(job.model)
        if job.run.enable_thinking and "thinking" not in model.capabilities:
            job = replace(job, run=replace(job.run, enable_thinking=False))
        slot = self._acquire(model, job.request_id)
        try:
            runtime = self._ensure_loaded(slot, model)
            if self._stopping:  # shutdown began while the model loaded
                self._close_runtime(slot, "shutdown")
                raise ShuttingDown()
            generation = Generation(self, slot, model, runtime, job)
            with slot.cond:
                slot.generation = generation
            with self._active_lock:
                self._active.add(generation)
            generation._start()
        except BaseException:
            slot.release()
            raise
        log.info("request %s started on %s/%s", job.request_id, slot.device, model.id)
        return generation

    def _generation_finished(self, slot: DeviceSlot, generation: Generation) -> None:
        with self._active_lock:
            self._active.discard(generation)
        slot.release(measured=True)

    # ---- model management ----
    def load(self, model: str) -> "object":
        """Load a model now (warm-up); returns its ModelInfo."""
        info = self._resolve(model)
        slot = self._acquire(info, f"load:{info.id}")
        try:
            self._ensure_loaded(slot, info)
        finally:
            slot.release()
        return info

    def unload(self, model: Optional[str] = None) -> list:
        """Close one model (id or alias) or every loaded one (None); waits for a
        running generation on that device. Returns the ids unloaded."""
        target = None
        if model:
            info = self.registry.resolve(model)
            target = info.id if info else model.strip().lower()
            if info is None and target not in self.loaded_models():
                raise ModelNotFound(model)
        unloaded = []
        for slot in self._slots.values():
            with slot.cond:
                loaded = slot.model
            if loaded is None or (target and loaded.id != target):
                continue
            self._wait_for_slot(slot, f"unload:{loaded.id}")
            try:
                if slot.model is not None and (not target or slot.model.id == target):
                    unloaded.append(slot.model.id)
                    self._close_runtime(slot, "unload requested")
            finally:
                slot.release()
        return unloaded

    def loaded_models(self) -> list:
        result = []
        for slot in self._slots.values():
            with slot.cond:
                if slot.model is not None:
                    result.append(slot.model.id)
        return result

    def health(self) -> dict:
        devices = {}
        for device, slot in self._slots.items():
            with slot.cond:
                generation = slot.generation
                devices[device] = {
                    "model": slot.model.id if slot.model else None,
                    "busy": slot.holder is not None,
                    "holder": slot.holder,
                    "request_id": generation.request_id if generation else None,
                    "queue_length": len(slot.waiting),
                    "idle_seconds": (round(time.monotonic() - slot.last_used, 1)
                                     if slot.holder is None else 0.0),
                    "kv_cache": slot.kv.describe(),
                }
        return {
            "accepting": not self._stopping,
            "loaded_models": [d["model"] for d in devices.values() if d["model"]],
            "active_requests": [d["request_id"] for d in devices.values() if d["request_id"]],
            "queue_length": sum(d["queue_length"] for d in devices.values()),
            "devices": devices,
        }

    # ---- internals ----
    def _resolve(self, name: str):
        info = self.registry.resolve(name) if name else self.registry.default_model()
        if info is None:
            raise ModelNotFound(name or "(default)")
        return info

    def _acquire(self, model, label: str) -> DeviceSlot:
        slot = self._slots[model.device]
        self._wait_for_slot(slot, label)
        return slot

    def _wait_for_slot(self, slot: DeviceSlot, label: str) -> None:
        slot.acquire(label, self.settings.queue_timeout_seconds,
                     self.settings.queue_max_length, lambda: self._stopping)

    def _ensure_loaded(self, slot: DeviceSlot, model):
        """The slot's runtime for `model`, loading it (after closing another) if needed.
        Called by the slot's holder only."""
        if slot.runtime is not None and slot.model is not None and \
                (slot.model.path, slot.model.context_length) == (model.path, model.context_length):
            return slot.runtime
        if slot.runtime is not None:
            self._close_runtime(slot, f"switching to {model.id}")
        started = time.monotonic()
        log.info("loading %s on %s (context %d)", model.id, slot.device, model.context_length)
        try:
            runtime = self._runtime_factory(model.path, context_length=model.context_length,
                                            settings=self.settings)
        except Exception as exc:
            log.error("loading %s failed: %s", model.id, exc)
            raise ModelLoadFailed(model.id, str(exc) or type(exc).__name__) from exc
        with slot.cond:
            slot.runtime, slot.model = runtime, model
            slot.kv.reset()
        log.info("loaded %s on %s in %.1f s", model.id, slot.device, time.monotonic() - started)
        return runtime

    def _close_runtime(self, slot: DeviceSlot, reason: str) -> None:
        with slot.cond:
            runtime, model = slot.runtime, slot.model
            slot.runtime, slot.model = None, None
            slot.kv.reset()
        if runtime is None:
            return
        log.info("unloading %s from %s: %s", model.id if model else "?", slot.device, reason)
        try:
            runtime.close()
        except Exception:
            log.exception("closing %s failed", model.id if model else "?")

    def _watch_idle(self) -> None:
        idle = self.settings.idle_unload_seconds
        interval = min(1.0, max(0.05, idle / 4))
        while not self._stop_event.wait(interval):
            for slot in self._slots.values():
                self._unload_if_idle(slot, idle)

    def _unload_if_idle(self, slot: DeviceSlot, idle: float) -> None:
        with slot.cond:
            if slot.runtime is None or time.monotonic() - slot.last_used < idle:
                return
        if not slot.try_acquire_if_idle("idle-unload"):
            return
        try:
            if slot.runtime is not None and time.monotonic() - slot.last_used >= idle:
                self._close_runtime(slot, f"idle for {idle:g} s")
        finally:
            slot.release()
