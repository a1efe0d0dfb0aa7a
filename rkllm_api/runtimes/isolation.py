"""Runtimes in child processes: the parent side (the child side is child.py).

librkllmrt is a closed binary that crashes (SIGILL on some boards, SIGSEGV when a
second init runs out of NPU memory): in the server's process that would end every
request. So each loaded model's runtime lives in a child process of its own, and
the engine holds a ChildRuntime, a proxy that implements the runtime protocol by
forwarding every call over a socket. A child that dies (a signal, an exit) ends
only its own run: run() delivers an ERROR event and returns; later calls raise
RuntimeCrashed; `crash` says how it died, so the engine can reload the model.

Children are started with fork+exec of a fresh interpreter (never a bare fork: the
gunicorn worker has threads) from one long-lived launcher thread, because the
parent-death signal the child asks for fires when the thread that started it
ends, not only the process.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from rkllm_api.runtimes.base import (EventKind, FinishReason, PerfStats, RunResult,
                                     RuntimeLoadError, TokenEvent)

log = logging.getLogger(__name__)

CLOSE_WAIT_SECONDS = 10.0   # a child told to close gets this long, then SIGKILL
REAP_WAIT_SECONDS = 2.0     # a child whose socket closed has this long to be reaped
CHILD_ENTRY = ("import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
               "from rkllm_api.runtimes.child import main; "
               "main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])")


class RuntimeCrashed(RuntimeLoadError):
    """The runtime's process died (`how`: "killed by SIGSEGV", "exited with status 3")."""

    def __init__(self, how: str, during: str):
        super().__init__(f"the runtime process died during {during} ({how})")
        self.how = how
        self.during = during


def describe_exit(returncode: Optional[int]) -> str:
    if returncode is None:
        return "closed its connection"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ChildSocket:
    """The parent's end of a child's socket, framed as multiprocessing.connection
    frames its messages (a 4-byte big-endian length, then a pickle), which the child
    reads with a Connection. Receiving takes whatever the child has written in one
    recv, so a fast runtime's tokens cost a system call per batch, not two per token.
    EOFError (or OSError) once the child's end is closed."""

    CHUNK = 256 * 1024

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = bytearray()
        self._ready: deque = deque()

    def send(self, message) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._sock.sendall(_FRAME_HEADER.pack(len(payload)) + payload)

    def recv(self):
        while not self._ready:
            self._fill()
        return self._ready.popleft()

    def _fill(self) -> None:
        data = self._sock.recv(self.CHUNK)
        if not data:
            raise EOFError("the child closed its end")
        buffer = self._buffer
        buffer += data
        start, length = 0, len(buffer)
        while length - start >= 4:
            (size,) = _FRAME_HEADER.unpack_from(buffer, start)
            header = 4
            if size == -1:   # a message over 2 GiB: an 8-byte length follows
                if length - start < 12:
                    break
                (size,), header = struct.unpack_from("!Q", buffer, start + 4), 12
            end = start + header + size
            if end > length:
                break
            body = start + header
            if buffer[body] == 0:    # child.TEXT_FRAME: a token's UTF-8, no pickle
                self._ready.append(buffer[body + 1:end].decode("utf-8", "surrogatepass"))
            else:
                self._ready.append(pickle.loads(buffer[body:end]))
            start = end
        del buffer[:start]

    def close(self) -> None:
        self._sock.close()


_FRAME_HEADER = struct.Struct("!i")


def rebuild_exception(state: tuple) -> BaseException:
    cls, args, attributes = state
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(attributes)
    return exc


class ChildLauncher:
    """Starts child processes from one thread that lives as long as the server (the
    children's parent-death signal is tied to the starting thread)."""

    def __init__(self):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-launcher")

    def start(self) -> tuple:
        """A running child and the parent's end of its socket: (Popen, ChildSocket)."""
        return self._thread.submit(self._start).result()

    @staticmethod
    def _start() -> tuple:
        parent_end, child_end = socket.socketpair()
        try:
            search_path = [p for p in sys.path if p]
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD_ENTRY, json.dumps(search_path),
                 str(child_end.fileno()), str(os.getpid()), str(level)],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()   # only the child holds it now: its death is our EOF
        return process, ChildSocket(parent_end)


class ChildRuntime:
    """A runtime running in a child process; implements runtimes.base.Runtime by
    forwarding. Methods and properties the runtime has beyond the protocol are
    forwarded too (by name, arguments pickled), so new runtime methods work here
    without changes. Like the runtimes, one call at a time, except abort()."""

    def __init__(self, launcher: ChildLauncher, model_path: str, **open_kwargs):
        # Held so the launcher's thread, whose end would kill the child, lives as long.
        self._launcher = launcher
        self._process, self._conn = launcher.start()
        self._send_lock = threading.Lock()   # abort() sends while run() waits
        self._call_lock = threading.Lock()   # one request/answer at a time
        self.crash: Optional[str] = None     # how the child died, once it did
        self._killed_because: Optional[str] = None   # kill_wedged's reason
        self.crash_during: str = ""
        self.closed = False
        self.pid = self._process.pid
        try:
            description = self._request(("open", model_path, open_kwargs), "init")
        except BaseException:
            self._reap(REAP_WAIT_SECONDS)
            raise
        self._values = description["values"]
        self._properties = frozenset(description["properties"])
        self._methods = frozenset(description["methods"])

    # ---- the runtime protocol, spelled out (the rest goes through __getattr__) ----
    @property
    def device(self) -> str:
        return self._values["device"]

    @property
    def model_path(self) -> str:
        return self._values["model_path"]

    @property
    def context_length(self) -> int:
        return self._values["context_length"]

    @property
    def capabilities(self):
        return self._values["capabilities"]

    @property
    def alive(self) -> bool:
        return self.crash is None and not self.closed

    @property
    def kv_length(self):
        return self._get("kv_length")

    @property
    def embedding_width(self) -> int:
        return self._get("embedding_width")

    @property
    def embedding_pooling(self):
        return self._get("embedding_pooling")

    def clear_kv_cache(self, *args, **kwargs):
        return self._call("clear_kv_cache", args, kwargs)

    def load_prompt_cache(self, path: str):
        return self._call("load_prompt_cache", (path,), {})

    def release_prompt_cache(self):
        return self._call("release_prompt_cache", (), {})

    def count_tokens(self, text: str):
        return self._call("count_tokens", (text,), {})

    def turns_prompt_length(self, messages, enable_thinking: bool = False,
                            max_new_tokens=None, continue_final: bool = False) -> int:
        return self._call("turns_prompt_length",
                          (tuple(messages), enable_thinking, max_new_tokens, continue_final), {})

    def save_kv_snapshot(self, path: str) -> bool:
        return self._call("save_kv_snapshot", (path,), {})

    def load_kv_snapshot(self, path: str) -> bool:
        return self._call("load_kv_snapshot", (path,), {})

    def unapplied_sampling(self, sampling) -> tuple:
        return self._call("unapplied_sampling", (sampling,), {})

    def hidden_states(self, inputs, truncate: bool = False) -> list:
        return self._call("hidden_states", (list(inputs), truncate), {})

    def load_lora(self, path: str, name: str, scale: float = 1.0) -> None:
        return self._call("load_lora", (path, name, scale), {})

    def __getattr__(self, name: str):
        if name.startswith("_") or "_methods" not in self.__dict__:
            raise AttributeError(name)
        if name in self._methods:
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        if name in self._properties:
            return self._get(name)
        if name in self._values:
            return self._values[name]
        raise AttributeError(name)

    # ---- runs ----
    def run(self, request, on_event) -> RunResult:
        """Streams the child's events into on_event. A sink that raises aborts the run
        (ERROR result, no more events), as the in-process runtimes do; a child that
        dies ends the run with an ERROR event at once."""
        with self._call_lock:
            self._check_alive()
            self._send(("run", request))
            return self._stream(on_event)

    def _stream(self, on_event) -> RunResult:
        text_parts, recv, text = [], self._conn.recv, EventKind.TEXT
        keep_text, sink_error = text_parts.append, None
        while True:
            try:
                item = recv()
            except (EOFError, OSError):
                return self._died_in_run(on_event if sink_error is None else None,
                                         "".join(text_parts))
            if type(item) is str:    # the common case, once per token: kept short
                keep_text(item)
                if sink_error is None:
                    try:
                        on_event(TokenEvent(text, item))
                    except Exception as exc:
                        sink_error = self._sink_failed(exc)
            elif item[0] == "event":
                if sink_error is None:
                    try:
                        on_event(item[1])
                    except Exception as exc:
                        sink_error = self._sink_failed(exc)
            elif item[0] == "ok":
                result = item[1]
                if sink_error is not None:
                    result = RunResult(result.text, FinishReason.ERROR, result.perf,
                                       error=f"event sink failed: {sink_error}")
                return result
            else:
                raise rebuild_exception(item[1])

    def _sink_failed(self, exc: Exception) -> str:
        """The run's sink raised: the run is aborted, the sink hears nothing more."""
        log.exception("event sink failed")
        self.abort()
        return f"{type(exc).__name__}: {exc}"

    def _died_in_run(self, on_event, text: str) -> RunResult:
        self.note_death("a run")
        message = f"the runtime process died during a run ({self.crash})"
        if on_event is not None:
            try:
                on_event(TokenEvent(EventKind.ERROR, error=message,
                                    finish_reason=FinishReason.ERROR))
            except Exception:
                log.exception("event sink failed")
        return RunResult(text, FinishReason.ERROR, PerfStats(), error=message)

    def abort(self) -> None:
        if self.alive:
            try:
                self._send(("abort",))
            except RuntimeCrashed:
                pass   # the run's reader reports the death

    # ---- requests ----
    def _call(self, name: str, args: tuple, kwargs: dict):
        return self._locked_request(("call", name, args, kwargs), name)

    def _get(self, name: str):
        return self._locked_request(("get", name), name)

    def _locked_request(self, message, during: str):
        with self._call_lock:
            self._check_alive()
            return self._request(message, during)

    def _request(self, message, during: str):
        self._send(message, during)
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self.note_death(during)
            raise RuntimeCrashed(self.crash, during) from None
        if kind == "raise":
            raise rebuild_exception(value)
        return value

    def _send(self, message, during: str = "a run") -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            self.note_death(during)
            raise RuntimeCrashed(self.crash, during) from None

    def _check_alive(self) -> None:
        if self.closed:
            raise RuntimeLoadError("the runtime was closed")
        if self.crash is not None:
            raise RuntimeCrashed(self.crash, self.crash_during)

    # ---- the process ----
    def kill_wedged(self, reason: str) -> None:
        """End the child now: its runtime is in a call that abort does not end. The
        run's reader sees the death and reports it like a crash (`reason` is its how)."""
        if self.alive and not self.exited():
            self._killed_because = reason
            log.error("killing runtime process %d: %s", self.pid, reason)
            self._process.kill()

    def exited(self) -> bool:
        return self._process.poll() is not None

    def note_death(self, during: str) -> None:
        if self.crash is None:
            self._reap(REAP_WAIT_SECONDS)
            self.crash = self._killed_because or describe_exit(self._process.returncode)
            self.crash_during = during
            log.error("the runtime process %d died during %s: %s", self.pid, during,
                      self.crash)

    def _reap(self, wait: float) -> None:
        """Wait for the child to end (killing it after `wait`), so no zombie stays."""
        try:
            self._process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=REAP_WAIT_SECONDS)
        try:
            self._conn.close()
        except OSError:
            pass

    def close(self) -> None:
        """Close the runtime in the child and reap the child; twice is fine."""
        if self.closed:
            return
        self.closed = True
        if self.crash is None:
            try:
                with self._send_lock:
                    self._conn.send(("close",))
            except (OSError, ValueError):
                pass
        started = time.monotonic()
        self._reap(CLOSE_WAIT_SECONDS)
        log.debug("runtime process %d ended (%s) in %.2f s", self.pid,
                  describe_exit(self._process.returncode), time.monotonic() - started)


class IsolatedRuntimes:
    """The engine's runtime factory when runtimes are isolated: open_runtime's
    signature, each runtime in a child of its own."""

    def __init__(self):
        self.launcher = ChildLauncher()

    def __call__(self, model_path: str, **kwargs) -> ChildRuntime:
        return ChildRuntime(self.launcher, model_path, **kwargs)


def crash_of(runtime, look: bool = False) -> Optional[str]:
    """How the runtime's process died, or None (alive, or not in a child). `look`: also
    ask the kernel, for a child that died while nothing talked to it (the OOM killer
    on an idle model); only for a runtime no run is using."""
    if not isinstance(runtime, ChildRuntime):
        return None
    if look and runtime.alive and runtime.exited():
        runtime.note_death("idle")
    return runtime.crash


def process_id(runtime) -> Optional[int]:
    """The pid of the child holding the runtime while it lives, else None."""
    if isinstance(runtime, ChildRuntime) and runtime.alive:
        return runtime.pid
    return None
