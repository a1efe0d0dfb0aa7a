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
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Union

import runtime as runtime_module
import sampling
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
    conversation: object = None    # prompts.BuiltPrompt: the KV plan (None = send run as is)
    use_cache: str = ""            # a named prompt cache to load before the run


@dataclass(frozen=True)
class Heartbeat:
    """Yielded by Generation.events() after heartbeat_seconds without tokens."""
    elapsed: float                 # seconds since the generation started
    waiting_for_first_token: bool  # True during prefill


class _WorkerDone:
    """Queue marker: the worker has returned (after FINISH/ERROR, or after a crash)."""

    def __init__(self, failure: Optional[str]):
        self.failure = failure


# ---- KV session tracking ----------------------------------------------------------
OPAQUE = ("opaque",)             # key of a kept turn whose conversation is not known
UNCOMMITTED = ("uncommitted",)   # a kept turn whose answer the API has not reported yet


@dataclass
class KvTicket:
    """What one run did to the KV cache, so after_run/commit can record the result."""
    serial: int
    mode: str                    # reuse | resume | full | standalone | raw
    built: object = None         # prompts.BuiltPrompt (None for raw jobs)
    prefix: tuple = ()           # key entries of a named cache beneath the conversation
    snapshot_path: str = ""      # the NPU saves the prefilled state here during the run
    keep_history: bool = False


class KvSession:
    """What the KV cache of one loaded runtime holds, and how to reuse it.

    `key` is the conversation in the cache (BuiltPrompt keys: every message, the
    answers and the system text included): None = nothing beyond `base`, OPAQUE = a
    kept turn of a job without a conversation, UNCOMMITTED = a kept turn whose answer
    was never reported (Generation.commit_answer). `base` is a loaded prompt cache
    beneath it: ("system-cache", path) or ("named-cache", path), None = none.

    A request whose history equals `key` sends only its new tail (keep_history=1); a
    request whose history a snapshot resumes gets it restored; anything else resets
    the cache and sends the whole prompt. Standalone prompts (completions, RAG, tasks)
    run on an empty cache with keep_history=0, after the conversation they displace
    was snapshotted (where the runtime can), so it resumes afterwards.
    Any abort, error or limit makes the content unknown: the next run resets it.
    Methods other than describe() are called by the slot's holder only.
    """

    def __init__(self, services: "KvServices" = None):
        self.services = services or KvServices.disabled()
        self.known = True
        self.key: Optional[tuple] = None
        self.base: Optional[tuple] = None
        self.model = None               # registry.ModelInfo of the runtime
        self._serial = 0
        self._pending: Optional[KvTicket] = None
        self.lock = threading.Lock()

    def reset(self, model=None, base: Optional[tuple] = None) -> None:
        """A freshly loaded (or closed) runtime: empty cache, optionally a preloaded base."""
        with self.lock:
            self.known, self.key, self.base, self._pending = True, None, base, None
            self.model = model

    # -- before the run
    def prepare(self, runtime, job: GenerationJob) -> tuple:
        """(the RunRequest to send, KvTicket). May clear, load or save KV state."""
        with self.lock:
            self._serial += 1
            serial, self._pending = self._serial, None
        built = job.conversation
        if not _is_built_prompt(built):
            return self._prepare_raw(runtime, job, serial)
        if built.standalone or not job.run.keep_history:
            # A standalone prompt (completion, RAG turn, background task) must not see
            # another conversation: the runtimes keep earlier kept turns as context
            # under a keep_history=0 run. Snapshot the conversation (so it can resume)
            # and start from an empty cache.
            self._leave(runtime)
            self._reset_to(runtime, None)
            return replace(job.run, keep_history=False), KvTicket(serial, "standalone", built)
        return self._prepare_conversation(runtime, job, built, serial)

    def _prepare_raw(self, runtime, job: GenerationJob, serial: int) -> tuple:
        """A job without a BuiltPrompt: sent as it is; a kept turn on an unknown
        cache clears it first."""
        if not job.run.keep_history:
            self._leave(runtime)   # as for standalone prompts: no foreign context
            self._reset_to(runtime, None)
        elif not self.known:
            runtime.clear_kv_cache()
            with self.lock:
                self.known, self.key, self.base = True, None, None
        return job.run, KvTicket(serial, "raw", keep_history=job.run.keep_history)

    def _prepare_conversation(self, runtime, job: GenerationJob, built, serial: int) -> tuple:
        services = self.services
        prefix = services.named_prefix(self.model, job.use_cache)
        history = prefix + built.history_key
        run = replace(job.run, keep_history=True)
        ticket = KvTicket(serial, "full", built, prefix, keep_history=True)
        if services.settings.kv_reuse and built.tail_text:
            if self.known and self.key == history and self._has_room(runtime, built, run):
                ticket.mode = "reuse"
                run = replace(run, prompt=built.tail_text, role=built.tail_role)
            else:
                resumed = self._resume(runtime, history, built, run)
                if resumed is not None:
                    ticket.mode, run = "resume", resumed
        if ticket.mode == "full":
            self._leave(runtime)
            run = self._fresh_start(runtime, job, built, run)
        if services.snapshots_at_prefill(runtime):
            ticket.snapshot_path = services.snapshots.new_path(self.model.id)
            run = replace(run, prompt_cache_save_path=ticket.snapshot_path)
        return run, ticket

    def _has_room(self, runtime, built, run: RunRequest) -> bool:
        """The cache can take the tail and an answer ("nearly full" -> reset instead)."""
        kept = getattr(runtime, "kv_length", None)
        if kept is None:
            kept = built.prompt_tokens - built.tail_tokens
        answer_room = min(run.max_new_tokens or self.services.settings.default_max_tokens,
                          math.ceil(runtime.context_length / 4))
        return kept + built.tail_tokens + answer_room <= runtime.context_length

    def _resume(self, runtime, history: tuple, built, run: RunRequest) -> Optional[RunRequest]:
        """Restore the snapshot of this conversation; the run to send, or None."""
        store = self.services.snapshots
        if store is None:
            return None
        snapshot = store.take(self.model.id, history)
        if snapshot is None:
            return None
        if snapshot.missing_answer and built.tail_role != "user":
            store.discard(snapshot)
            return None
        self._leave(runtime)
        try:
            loaded = self.services.load_snapshot(runtime, snapshot.path)
        finally:
            store.discard(snapshot)
        if not loaded:
            with self.lock:
                self.known = False
            return None
        with self.lock:  # the snapshot may carry a prompt cache floor: reset releases it
            self.known, self.key, self.base = True, snapshot.holds, ("snapshot", snapshot.path)
        prompt = built.tail_text
        if snapshot.missing_answer:  # saved at prefill: the last answer is not in it
            prompt = f"Assistant: {snapshot.missing_answer}\n\nUser: {built.tail_text}"
        return replace(run, prompt=prompt, role=built.tail_role)

    def leave_for_other_work(self, runtime) -> None:
        """Another kind of work is about to replace the cache: snapshot the conversation."""
        self._leave(runtime)
        with self.lock:
            self.known = False

    def _leave(self, runtime) -> None:
        """Save the conversation in the cache before it is replaced (runtimes that can
        save their state at any time; the NPU saved it during its last run)."""
        with self.lock:
            key = self.key if self.known else None
        store = self.services.snapshots
        if store is None or key in (None, OPAQUE, UNCOMMITTED):
            return
        path = store.new_path(self.model.id)
        if self.services.save_snapshot(runtime, path):
            from kvcache import Snapshot
            store.put(Snapshot(self.model.id, path, holds=key, resumes=key))

    def _fresh_start(self, runtime, job: GenerationJob, built, run: RunRequest) -> RunRequest:
        """Reset the cache (to a named or system prompt cache when one applies) and
        return the run carrying the whole prompt."""
        services = self.services
        if job.use_cache:
            path = services.named_cache_path(self.model, job.use_cache)
            self._reset_to(runtime, ("named-cache", path))
            return replace(run, prompt=built.text, role="user")
        path = services.system_cache_file(self.model, built.system)
        if path is not None and not os.path.isfile(path):
            with self.lock:
                self.known = False   # the extra run below replaces the cache content
            if not services.prefill_to_file(runtime, built.system, path):
                path = None
        if path is not None:
            try:
                self._reset_to(runtime, ("system-cache", path))
                services.prompt_caches.remember_system(self.model.id, self.model.path,
                                                       built.system)
                return replace(run, prompt=built.conversation_text, role="user")
            except Exception as exc:  # a stale or corrupt file: prefill it all instead
                log.warning("system prompt cache %s not usable: %s", path, exc)
                with self.lock:
                    self.known = False
        self._reset_to(runtime, None)
        return replace(run, prompt=built.text, role="user")

    def _reset_to(self, runtime, base: Optional[tuple]) -> None:
        """Make the cache hold exactly `base` (a prompt cache) or nothing."""
        with self.lock:
            if self.known and self.key is None and self.base == base:
                return
            self.known = False  # until the calls below have succeeded
        if self.base is not None or base is not None:
            _release_prompt_cache(runtime)
        runtime.clear_kv_cache()
        if base is not None:
            runtime.load_prompt_cache(base[1])
        with self.lock:
            self.known, self.key, self.base = True, None, base

    # -- after the run
    def after_run(self, ticket: Optional[KvTicket], result: Optional[RunResult]) -> None:
        completed = result is not None and result.finish_reason in (
            FinishReason.STOP, FinishReason.LENGTH)
        with self.lock:
            if ticket is None or not completed:
                self.known, self.key = False, None
                return
            if not ticket.keep_history:
                return  # keep_history=0 left the cache as it was (runtime contract)
            if ticket.mode == "raw":
                self.key = OPAQUE
                return
            self.key, self._pending = UNCOMMITTED, ticket

    def commit(self, ticket: KvTicket, content: str, tool_calls) -> bool:
        """The API reports the answer of a completed kept run: the cache now holds
        key_after_answer. Ignored when another run touched the cache since."""
        with self.lock:
            if self._pending is None or self._pending.serial != ticket.serial:
                return False
            self._pending = None
            built = ticket.built
            self.key = ticket.prefix + built.key_after_answer(content, tool_calls)
            key = self.key
        if ticket.snapshot_path and self.services.snapshots is not None:
            from kvcache import Snapshot
            self.services.snapshots.put(Snapshot(
                self.model.id, ticket.snapshot_path, holds=ticket.prefix + built.full_key,
                resumes=key, missing_answer=_answer_text(content, tool_calls)))
        return True

    def describe(self) -> dict:
        with self.lock:
            return {"known": self.known,
                    "holds_conversation": self.known and self.key is not None,
                    "prompt_cache": self.base[0] if self.base else None}


def _is_built_prompt(value) -> bool:
    return value is not None and hasattr(value, "history_key") and hasattr(value, "tail_text")


def _release_prompt_cache(runtime) -> None:
    try:
        runtime.release_prompt_cache()
    except Exception:  # nothing loaded, or the library refuses: clear_kv_cache follows
        log.debug("release_prompt_cache failed", exc_info=True)


def _answer_text(content: str, tool_calls) -> str:
    import tools
    calls = tools.render_tool_calls_for_history(tool_calls or [])
    return "\n".join(part for part in ((content or "").strip(), calls) if part)


class KvServices:
    """Engine-wide helpers KvSession uses: settings, the snapshot store and the
    prompt-cache files, and the runtime calls that may be missing on a runtime."""

    def __init__(self, settings, snapshots=None, prompt_caches=None):
        self.settings = settings
        self.snapshots = snapshots            # kvcache.SnapshotStore or None (off)
        self.prompt_caches = prompt_caches    # kvcache.PromptCacheFiles or None

    @classmethod
    def disabled(cls) -> "KvServices":
        from config import Settings
        return cls(Settings(kv_snapshots=False, system_prompt_cache=False))

    @classmethod
    def from_settings(cls, settings) -> "KvServices":
        import kvcache
        directory = os.path.expanduser(settings.kv_cache_dir)
        snapshots = None
        if settings.kv_snapshots:
            snapshots = kvcache.SnapshotStore(
                os.path.join(directory, "snapshots", f"pid-{os.getpid()}"),
                settings.kv_snapshot_max_entries, settings.kv_snapshot_max_mb * 1024 * 1024)
        return cls(settings, snapshots, kvcache.PromptCacheFiles(directory))

    # -- snapshots
    def snapshots_at_prefill(self, runtime) -> bool:
        return self.snapshots is not None and bool(getattr(runtime, "snapshots_at_prefill", False))

    @staticmethod
    def save_snapshot(runtime, path: str) -> bool:
        save = getattr(runtime, "save_kv_snapshot", None)
        try:
            return bool(save(path)) if save else False
        except Exception:
            log.exception("saving a KV snapshot failed")
            return False

    @staticmethod
    def load_snapshot(runtime, path: str) -> bool:
        load = getattr(runtime, "load_kv_snapshot", None)
        try:
            return bool(load(path)) if load else False
        except Exception:
            log.exception("loading a KV snapshot failed")
            return False

    # -- prompt caches
    def named_prefix(self, model, name: str) -> tuple:
        if not name:
            return ()
        import kvcache
        return (("named-cache", name, kvcache.model_identity(model.path)),)

    def named_cache_path(self, model, name: str) -> str:
        cache = self.prompt_caches.named(model.id, model.path, name) if self.prompt_caches else None
        if cache is None:
            raise CacheNotFound(model.id, name)
        return cache.path

    def system_cache_file(self, model, system: str) -> Optional[str]:
        """Where the system prompt's cache lives; None when the feature is off or the
        text is too short to be worth it."""
        settings = self.settings
        if not (settings.system_prompt_cache and system and self.prompt_caches):
            return None
        import prompts
        if prompts.estimate_tokens(system) < settings.system_prompt_cache_min_tokens:
            return None
        return self.prompt_caches.system_path(model.id, model.path, system)

    def preload_file(self, model) -> Optional[str]:
        if not (self.settings.system_prompt_cache and self.prompt_caches):
            return None
        return self.prompt_caches.preload_path(model.id, model.path)

    @staticmethod
    def prefill_to_file(runtime, prompt: str, path: str) -> bool:
        """Prefill prompt alone on an empty cache and save the state to path. The run
        keeps nothing (keep_history=0) and generates one token nobody reads."""
        temporary = f"{path}.{os.getpid()}.tmp"
        _release_prompt_cache(runtime)
        runtime.clear_kv_cache()
        result = runtime.run(RunRequest(prompt=prompt, keep_history=False, max_new_tokens=1,
                                        prompt_cache_save_path=temporary), lambda event: None)
        if result.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH) or \
                not os.path.isfile(temporary):
            log.warning("could not save a prompt cache: %s", result.error or result.finish_reason)
            return False
        os.replace(temporary, path)
        return True


class CacheNotFound(EngineError):
    def __init__(self, model: str, name: str):
        super().__init__(f"prompt cache {name!r} of model {model!r} not found")
        self.model = model
        self.name = name


# ---- device slot ----------------------------------------------------------------
class DeviceSlot:
    """One device: its loaded runtime, who holds it, and who waits, in order.

    Fairness: each waiter appends a ticket; the slot goes to the ticket at the head
    of the queue, so requests are served in arrival order whatever the thread
    scheduler does. `cond` guards every field; the runtime itself is only used by
    the holder.
    """

    def __init__(self, device: str, kv_services: Optional[KvServices] = None):
        self.device = device
        self.cond = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.holder: Optional[str] = None        # label of whoever holds the slot
        self.held_since = 0.0
        self.runtime = None
        self.model = None                        # registry.ModelInfo of the runtime
        self.kv = KvSession(kv_services)
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
        self._ticket: Optional[KvTicket] = None
        # How the KV cache served this run: reuse | resume | full | standalone | raw.
        self.kv_mode = ""
        self.unapplied_sampling = _unapplied_sampling(runtime, job.run)
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

    @property
    def prompt_tokens(self) -> Optional[int]:
        """Tokens of the whole prompt (what usage reports), None without a BuiltPrompt."""
        built = self.job.conversation
        return built.prompt_tokens if _is_built_prompt(built) else None

    @property
    def prefilled_tokens(self) -> Optional[int]:
        """Tokens the runtime actually prefilled (perf), once the run is over."""
        result = self._raw_result
        return result.perf.prefill_tokens if result is not None else None

    @property
    def kv_reused_tokens(self) -> int:
        """Prompt tokens the KV cache already held (reuse, snapshot or prompt cache),
        so usage can report the whole prompt: perf prefill + this."""
        whole, prefilled = self.prompt_tokens, self.prefilled_tokens
        if whole is None or prefilled is None or self.kv_mode in ("standalone", "raw"):
            return 0
        return max(0, whole - prefilled)

    def commit_answer(self, content: str, tool_calls=None) -> bool:
        """Report the final answer of a completed run (content without reasoning, and
        the parsed tool calls) so the next turn of this conversation can reuse the KV
        cache. Never called = the cache content is unknown and the next turn resets it."""
        if self._ticket is None or not self.done:
            return False
        return self._slot.kv.commit(self._ticket, content, tool_calls)

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
            if self._abort_requested.is_set():  # cancelled before the run began
                result = RunResult("", FinishReason.ABORTED, PerfStats())
                self._queue.put(TokenEvent(EventKind.FINISH, perf=result.perf,
                                           finish_reason=FinishReason.ABORTED))
            else:
                self._running.set()  # from here abort() reaches the runtime
                try:
                    run, self._ticket = self._slot.kv.prepare(self._runtime, self.job)
                    self.kv_mode = self._ticket.mode
                    result = self._runtime.run(run, self._queue.put)
                finally:
                    self._running.clear()
        except Exception as exc:  # a runtime bug must not leave the slot taken
            failure = f"{type(exc).__name__}: {exc}"
            log.exception("request %s: run failed", self.request_id)
            result = RunResult("", FinishReason.ERROR, PerfStats(), error=failure)
        finally:
            with self._lock:
                self._raw_result = result
            self._slot.kv.after_run(self._ticket, result)
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
        log.info("request %s on %s/%s: %s%s, kv %s, prefill %d tokens %.0f ms, generated %d "
                 "tokens %.0f ms, %.1f s in all", self.request_id, self._slot.device,
                 self.model.id, result.finish_reason.value,
                 f" ({self.stop_cause})" if self.stop_cause else "", self.kv_mode or "-",
                 perf.prefill_tokens, perf.prefill_ms, perf.generate_tokens, perf.generate_ms,
                 time.monotonic() - self.started_at)


def _unapplied_sampling(runtime, run: RunRequest) -> tuple:
    """Sampling fields of the request the runtime cannot apply, known before the run
    (so a streamed reply can say it in a header). Runtimes without the method apply
    everything they are given."""
    check = getattr(runtime, "unapplied_sampling", None)
    if not callable(check):
        return ()
    try:
        return tuple(check(run.sampling))
    except Exception:
        log.exception("unapplied_sampling failed")
        return ()


# ---- the engine -------------------------------------------------------------------
class Engine:
    """Loads models on demand and runs generations, one per device at a time."""

    def __init__(self, settings, registry, runtime_factory=runtime_module.open_runtime):
        self.settings = settings
        self.registry = registry
        self._runtime_factory = runtime_factory
        self.kv_services = KvServices.from_settings(settings)
        self._slots = {device: DeviceSlot(device, self.kv_services) for device in DEVICES}
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

    # ---- named prompt caches (/v1/cache/<model>/<name>) ----
    def save_prompt_cache(self, model: str, name: str, prompt: str):
        """Prefill prompt alone on the model and save its KV state as the named cache;
        returns kvcache.NamedCache. Raises ModelNotFound, kvcache.CacheNameError, the
        queue errors, ModelLoadFailed, or EngineError when the runtime fails."""
        import kvcache
        kvcache.check_cache_name(name)
        info = self._resolve(model)
        files = self.kv_services.prompt_caches
        slot = self._acquire(info, f"cache:{info.id}")
        try:
            runtime = self._ensure_loaded(slot, info)
            slot.kv.leave_for_other_work(runtime)
            saved = self.kv_services.prefill_to_file(runtime, prompt,
                                                     files.named_path(info.id, name))
            slot.kv.reset(info)   # prefill_to_file left the cache empty
        finally:
            slot.release()
        if not saved:
            raise EngineError(f"the runtime could not save the prompt cache {name!r}")
        tokens = runtime.count_tokens(prompt)
        if tokens is None:
            import prompts
            tokens = prompts.estimate_tokens(prompt)
        return files.save_named(info.id, info.path, name, tokens)

    def prompt_cache(self, model: str, name: str):
        """The named cache (kvcache.NamedCache); CacheNotFound / ModelNotFound otherwise."""
        import kvcache
        kvcache.check_cache_name(name)
        info = self._resolve(model)
        cache = self.kv_services.prompt_caches.named(info.id, info.path, name)
        if cache is None:
            raise CacheNotFound(info.id, name)
        return cache

    def prompt_caches(self, model: str) -> list:
        info = self._resolve(model)
        return self.kv_services.prompt_caches.list_named(info.id, info.path)

    def delete_prompt_cache(self, model: str, name: str) -> None:
        import kvcache
        kvcache.check_cache_name(name)
        info = self._resolve(model)
        if not self.kv_services.prompt_caches.delete_named(info.id, name):
            raise CacheNotFound(info.id, name)

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
            # The model's sampling defaults: family profile + model_config.json
            # (librkllmrt 1.2 can only take them at init).
            runtime = self._runtime_factory(
                model.path, context_length=model.context_length, settings=self.settings,
                default_sampling=sampling.model_defaults(model.family, model.config))
        except Exception as exc:
            log.error("loading %s failed: %s", model.id, exc)
            raise ModelLoadFailed(model.id, str(exc) or type(exc).__name__) from exc
        base = self._preload_system_cache(runtime, model)
        with slot.cond:
            slot.runtime, slot.model = runtime, model
            slot.kv.reset(model, base)
        log.info("loaded %s on %s in %.1f s", model.id, slot.device, time.monotonic() - started)
        return runtime

    def _preload_system_cache(self, runtime, model) -> Optional[tuple]:
        """Load the system prompt cache this model used last, when still valid."""
        path = self.kv_services.preload_file(model)
        if path is None:
            return None
        try:
            runtime.load_prompt_cache(path)
        except Exception as exc:
            log.warning("preloading the system prompt cache %s failed: %s", path, exc)
            _release_prompt_cache(runtime)
            runtime.clear_kv_cache()
            return None
        log.info("preloaded the system prompt cache of %s", model.id)
        return ("system-cache", path)

    def _close_runtime(self, slot: DeviceSlot, reason: str) -> None:
        with slot.cond:
            runtime, model = slot.runtime, slot.model
            slot.runtime, slot.model = None, None
            slot.kv.reset()
        if runtime is None:
            return
        if self.kv_services.snapshots is not None and model is not None:
            self.kv_services.snapshots.forget_model(model.id)
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
