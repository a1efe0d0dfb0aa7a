"""One request's run on a device: the job, the worker thread that calls
runtime.run(), and the event stream the HTTP layer reads, with the first-token,
silence and total limits, the repetition guard and heartbeats applied."""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Iterator, Optional, Union

from rkllm_api.engine.kv_session import KvMode, KvTicket, is_built_prompt
from rkllm_api.engine.observer import GenerationReport, notify
from rkllm_api.engine.repetition import RepetitionGuard
from rkllm_api.runtimes.base import (EventKind, FinishReason, PerfStats, RunRequest, RunResult,
                                     TokenEvent)

if TYPE_CHECKING:
    from rkllm_api.engine.manager import Engine
    from rkllm_api.engine.slots import DeviceSlot

log = logging.getLogger(__name__)

CANCEL_WAIT_SECONDS = 0.2   # cancel() returns after this even if the run has not ended
STOP_WAIT_SECONDS = 3.0     # the repetition guard waits this long for the run to end
LIMIT_WAIT_SECONDS = 0.1    # a limit waits this long, then answers (the abort goes on)
ABORT_GIVE_UP_SECONDS = 900.0  # background aborting of a run that will not stop ends here
WEDGED_KILL_REASON = "killed by the server: still running ABORT_KILL_SECONDS after its abort"
ABORT_REPEAT_SECONDS = 0.05  # abort() again this often: a run starting just after the
                             # first abort (runtimes reset the flag in run()) still stops


class StopCause(str, Enum):
    """Why the engine ended a run early. The limits are named like their settings."""
    CANCELLED = "cancelled"
    FIRST_TOKEN_TIMEOUT = "first_token_timeout"
    SILENCE_TIMEOUT = "silence_timeout"
    TOTAL_TIMEOUT = "total_timeout"
    REPETITION = "repetition"
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return self.value


@dataclass
class GenerationJob:
    model: str                     # id or alias as the client sent it ("" = default model)
    run: RunRequest                # prompt, thinking, max_new_tokens, sampling ...
    request_id: str
    conversation: object = None    # prompts.BuiltPrompt: the KV plan (None = send run as is)
    use_cache: str = ""            # a named prompt cache to load before the run
    arrival: Optional[int] = None  # slots.ArrivalOrder number: the device queue's order
    client_gone: object = None     # () -> bool: the client left (never start the run)


@dataclass(frozen=True)
class Heartbeat:
    """Yielded by Generation.events() after heartbeat_seconds without tokens."""
    elapsed: float                 # seconds since the generation started
    waiting_for_first_token: bool  # True during prefill


class Drained:
    """Yielded by Generation.events() when it has passed on every event queued so
    far and is about to wait for the runtime: what a reader has buffered can be
    written now (several events in one write) without delaying anything."""
    __slots__ = ()


DRAINED = Drained()


class _WorkerDone:
    """Queue marker: the worker has returned (after FINISH/ERROR, or after a crash)."""

    def __init__(self, failure: Optional[str]):
        self.failure = failure


class _EndNow(_WorkerDone):
    """Queue marker: end the stream now (shutdown), even while the runtime is still in
    a call it cannot leave (a prefill on the NPU is not abortable)."""


class Generation:
    """One request's run on a device. Iterate events() once; call cancel() when the
    client goes away (closing the events() generator early does the same). A
    Generation whose events() is never read keeps its slot until the run ends, so
    callers that give up before reading must cancel()."""

    def __init__(self, engine: "Engine", slot: DeviceSlot, model, runtime, job: GenerationJob,
                 submitted_at: Optional[float] = None):
        self.model = model
        self.job = job
        self.request_id = job.request_id
        self.stop_cause: Optional[StopCause] = None   # why the engine ended the run early
        self._engine = engine
        self._settings = engine.settings
        self._slot = slot
        self._runtime = runtime
        # SimpleQueue: put/get in C without Queue's Python-level condition (per token).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._raw_result: Optional[RunResult] = None
        self._override: dict = {}
        self._lock = threading.Lock()
        self._abort_requested = threading.Event()
        self._background_abort = False   # a thread keeps aborting a run that goes on
        self._running = threading.Event()
        self._iterated = False
        self._ticket: Optional[KvTicket] = None
        # How the KV cache served this run: reuse | resume | full | standalone | raw.
        self.kv_mode: Optional[KvMode] = None
        self.unapplied_sampling = _unapplied_sampling(runtime, job.run)
        self.started_at = time.monotonic()
        self.load_ms = 0.0   # time the engine spent loading the model for this run
        # When the engine received the job (queue wait and model load included): what
        # the time to first token counts from.
        self.submitted_at = self.started_at if submitted_at is None else submitted_at
        self._token_times: list = []     # monotonic time of each token the runtime sent
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
        """Tokens of the whole prompt (what usage reports): the runtime's exact count
        once a run of real turns is over, else the BuiltPrompt's; None without one."""
        result = self._raw_result
        if result is not None and result.prompt_tokens is not None:
            return result.prompt_tokens
        built = self.job.conversation
        return built.prompt_tokens if is_built_prompt(built) else None

    @property
    def prefilled_tokens(self) -> Optional[int]:
        """Tokens the runtime prefilled for this request once the run is over: the
        run's own (perf) plus those of cache-building runs it caused."""
        result = self._raw_result
        if result is None:
            return None
        return result.perf.prefill_tokens + self.extra_prefill_tokens

    @property
    def extra_prefill_tokens(self) -> int:
        """Prefilled before the run by cache-building runs (a system-prompt cache)."""
        ticket = self._ticket
        return getattr(ticket, "extra_prefill_tokens", 0) if ticket is not None else 0

    @property
    def constrains_output(self) -> bool:
        """The runtime decodes under RunRequest.response_schema (a grammar), so the
        answer cannot leave the schema while it is written."""
        return bool(self._runtime.capabilities.constrained_output)

    @property
    def cache_dropped(self) -> str:
        """A named cache this run asked for but could not use (it was removed); the run
        prefilled the whole prompt instead. "" when none."""
        ticket = self._ticket
        return getattr(ticket, "dropped_cache", "") if ticket is not None else ""

    @property
    def kv_reused_tokens(self) -> int:
        """Prompt tokens the KV cache already held (reuse, snapshot or prompt cache),
        so usage can report the whole prompt: perf prefill + this."""
        result = self._raw_result
        if result is not None and result.prompt_tokens is not None:   # exact: real turns
            return max(0, result.prompt_tokens - result.perf.prefill_tokens)
        whole, prefilled = self.prompt_tokens, self.prefilled_tokens
        if whole is None or prefilled is None or self.kv_mode in (KvMode.STANDALONE, KvMode.RAW):
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
                self.stop_cause = StopCause.CANCELLED
            aborting = self._background_abort
        if aborting:
            return   # a limit ended it already; its abort goes on in the background
        if not self.abort_and_wait(CANCEL_WAIT_SECONDS):
            self._abort_in_background()

    # ---- the event stream ----
    def events(self, report_drained: bool = False) -> Iterator[Union[TokenEvent, Heartbeat, Drained]]:
        """The run's events. report_drained: also yield DRAINED whenever every queued
        event has been passed on and the stream is about to wait (for writers that
        batch what is ready into one write)."""
        if self._iterated:
            raise RuntimeError("Generation.events() can be iterated only once")
        self._iterated = True
        finished = False
        try:
            for item in self._stream(report_drained):
                if isinstance(item, TokenEvent) and item.kind is not EventKind.TEXT:
                    finished = True
                yield item
        finally:
            if not finished:
                self.cancel()

    def _stream(self, report_drained: bool):
        settings = self._settings
        guard = RepetitionGuard(settings.repetition_window, settings.repetition_threshold)
        heartbeat = settings.heartbeat_seconds
        total = settings.total_timeout
        total_at = self.started_at + total if total and total > 0 else math.inf
        last_token: Optional[float] = None
        last_signal = self.started_at
        drained_told = False
        while True:
            try:
                item = self._queue.get_nowait()   # fast path: no deadline arithmetic
            except queue.Empty:
                if report_drained and not drained_told:
                    drained_told = True
                    yield DRAINED
                    continue   # the reader wrote meanwhile: look at the queue again
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
                        drained_told = False   # the heartbeat is to be written at once
                        yield Heartbeat(now - self.started_at, last_token is None)
                    continue
            drained_told = False
            if isinstance(item, _WorkerDone):  # run() raised before sending FINISH/ERROR
                message = item.failure if isinstance(item, _EndNow) else \
                    public_failure(self.request_id)   # the traceback is in the log
                yield TokenEvent(EventKind.ERROR, error=message, finish_reason=FinishReason.ERROR)
                return
            if item.kind is EventKind.TEXT:
                last_token = last_signal = time.monotonic()
                if last_token >= total_at:   # a steady stream still meets the total limit
                    yield self._stop_for_limit(StopCause.TOTAL_TIMEOUT)
                    return
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
        candidates = [(StopCause.TOTAL_TIMEOUT, self.started_at, settings.total_timeout)]
        if last_token is None:
            candidates.append((StopCause.FIRST_TOKEN_TIMEOUT, self.started_at,
                               settings.first_token_timeout))
        else:
            candidates.append((StopCause.SILENCE_TIMEOUT, last_token, settings.silence_timeout))
        best = (None, math.inf)
        for name, since, seconds in candidates:
            if seconds and seconds > 0 and since + seconds < best[1]:
                best = (name, since + seconds)
        return best

    def _stop_for_limit(self, limit: StopCause) -> TokenEvent:
        seconds = getattr(self._settings, limit.value)   # limits are named like settings
        what = {StopCause.FIRST_TOKEN_TIMEOUT: "no first token within",
                StopCause.SILENCE_TIMEOUT: "no new token within",
                StopCause.TOTAL_TIMEOUT: "generation exceeded"}[limit]
        message = f"{what} {seconds:g} s ({limit}); generation aborted"
        log.warning("request %s on %s: %s", self.request_id, self.model.id, message)
        # A runtime in a prefill it cannot leave would hold the answer for seconds:
        # the client gets its error now, the abort goes on until the runtime returns
        # (the device is freed then).
        self._end_early(limit, wait=LIMIT_WAIT_SECONDS, finish_reason=FinishReason.ERROR,
                        error=message)
        return TokenEvent(EventKind.ERROR, error=message, finish_reason=FinishReason.ERROR)

    def _stop_for_repetition(self) -> TokenEvent:
        log.warning("request %s on %s: repetition loop detected, generation stopped",
                    self.request_id, self.model.id)
        self._end_early(StopCause.REPETITION, finish_reason=FinishReason.STOP)
        result = self.result
        return TokenEvent(EventKind.FINISH, finish_reason=FinishReason.STOP,
                          perf=result.perf if result else PerfStats())

    def _end_early(self, cause: StopCause, wait: float = STOP_WAIT_SECONDS, **override) -> None:
        with self._lock:
            if self.stop_cause is None:
                self.stop_cause = cause
            self._override = override
        if not self.abort_and_wait(wait):
            self._abort_in_background()

    def _abort_in_background(self) -> None:
        """Keep aborting a run that did not stop yet (a prefill cannot be interrupted;
        an abort before the runtime began its run is reset by it) until it ends."""
        with self._lock:
            if self._background_abort or not self._worker.is_alive():
                return
            self._background_abort = True
        threading.Thread(target=self._abort_or_kill, daemon=True,
                         name=f"abort-{self.request_id}").start()

    def _abort_or_kill(self) -> None:
        """Abort until the run ends; a run wedged past ABORT_KILL_SECONDS in a child
        process loses the process (the engine reloads the model as after a crash)."""
        kill_after = self._settings.abort_kill_seconds
        kill = getattr(self._runtime, "kill_wedged", None)
        if kill is None or kill_after <= 0:
            self.abort_and_wait(ABORT_GIVE_UP_SECONDS)
            return
        if not self.abort_and_wait(kill_after):
            kill(WEDGED_KILL_REASON)
            self.abort_and_wait(ABORT_GIVE_UP_SECONDS)

    def _final_event(self, event: TokenEvent) -> TokenEvent:
        """The runtime's FINISH/ERROR, unless shutdown aborted the run: then an ERROR.
        A runtime's own error text may name files and libraries: it goes to the log,
        the client gets a message that does not."""
        if self.stop_cause is StopCause.SHUTDOWN:
            return TokenEvent(EventKind.ERROR, error="server is shutting down",
                              finish_reason=FinishReason.ERROR, perf=event.perf)
        if event.kind is EventKind.ERROR:
            log.error("request %s on %s: runtime error: %s", self.request_id, self.model.id,
                      event.error)
            return replace(event, error=public_failure(self.request_id))
        return event

    # ---- the worker ----
    def start(self) -> None:
        self._worker.start()

    def request_stop(self, cause: StopCause) -> None:
        """Mark the run to be aborted for `cause` (shutdown), without waiting."""
        with self._lock:
            self.stop_cause = self.stop_cause or cause
        self._abort_requested.set()
        if cause is StopCause.SHUTDOWN:
            self._queue.put(_EndNow("server is shutting down"))

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
                    result = self._runtime.run(run, self._timed_sink())
                    self.kv_mode = turns_mode(self._ticket, result)
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
            if result is not None:
                notify(self._engine.observer, "generation_finished", self._report())
            self._engine._generation_finished(self._slot, self)

    def _timed_sink(self):
        """The runtime's event sink: the queue's put, plus the time of each token (for
        the time to first token and the gaps between tokens). Kept to an append per
        token; the observer hears of the first token only."""
        put, stamp, times, text = self._queue.put, self._token_times.append, self._token_times, EventKind.TEXT
        clock = time.monotonic

        def sink(event):
            if event.kind is text:
                now = clock()
                if not times:
                    notify(self._engine.observer, "first_token", self.model.id,
                           self._slot.device, now - self.submitted_at)
                stamp(now)
            put(event)
        return sink

    def _report(self) -> GenerationReport:
        result, times = self.result, self._token_times
        perf = result.perf
        finish = str(self.stop_cause) if self.stop_cause else result.finish_reason.value
        reused, prefilled = self.kv_reused_tokens, perf.prefill_tokens + self.extra_prefill_tokens
        return GenerationReport(
            model=self.model.id, device=self._slot.device, finish=finish,
            kv_mode=str(self.kv_mode or "-"), prompt_tokens=prefilled + reused,
            prefilled_tokens=prefilled, reused_tokens=reused,
            generated_tokens=perf.generate_tokens, prefill_seconds=perf.prefill_ms / 1000,
            decode_seconds=perf.generate_ms / 1000,
            time_to_first_token=times[0] - self.submitted_at if times else None,
            token_gaps=tuple(later - earlier for earlier, later in zip(times, times[1:])))

    def abort_and_wait(self, budget: float) -> bool:
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
                 perf.prefill_tokens + self.extra_prefill_tokens, perf.prefill_ms,
                 perf.generate_tokens, perf.generate_ms, time.monotonic() - self.started_at)


def turns_mode(ticket: Optional[KvTicket], result: Optional[RunResult]) -> Optional[KvMode]:
    """How a run of real turns used the cache, known once it is over: reuse when the
    runtime kept part of the prompt, full when it prefilled it all."""
    if ticket is None:
        return None
    if ticket.turns and ticket.mode is KvMode.FULL and result is not None:
        kept = (result.prompt_tokens or 0) - result.perf.prefill_tokens
        if kept > 0:
            ticket.mode = KvMode.REUSE
    return ticket.mode


def public_failure(request_id: str) -> str:
    """What a client is told when the runtime failed: no paths, no library names."""
    return (f"the model failed while answering (request {request_id}); "
            f"the server log has the details")


def _unapplied_sampling(runtime, run: RunRequest) -> tuple:
    """Sampling fields of the request the runtime cannot apply, known before the run
    (so a streamed reply can say it in a header)."""
    try:
        return tuple(runtime.unapplied_sampling(run.sampling))
    except Exception:
        log.exception("unapplied_sampling failed")
        return ()
