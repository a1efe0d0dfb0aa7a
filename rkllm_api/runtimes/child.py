"""The child-process side of an isolated runtime (the parent side is isolation.py).

Run as `python -c ... child.main(fd, parent_pid)` by isolation.ChildLauncher: one
process per loaded model. It opens the runtime with runtimes.factory.open_runtime
and then serves the parent's messages on the socket `fd` until told to close:

  (frames as multiprocessing.connection frames them: 4-byte length, then payload)
  parent -> child   ("open", model_path, kwargs)     first message only
                    ("call", name, args, kwargs)     any method of the runtime
                    ("get", name)                    an attribute or property
                    ("run", RunRequest)              streams events, then the result
                    ("abort",)                       handled at once, even during a run
                    ("close",)                       close the runtime and exit
  child -> parent   TEXT_FRAME + UTF-8: a TEXT token of the running run,
                    ("event", TokenEvent) a FINISH or ERROR event,
                    ("ok", value) / ("raise", ExceptionState) the answer to a request

Events are sent from the runtime's callback as they come, before the callback
returns: a token the runtime produced has reached the socket even when the library
crashes right after it (a sender thread would lose what it had not sent yet). The
process ends itself when the parent goes away (PR_SET_PDEATHSIG, and the socket's
EOF), and ignores SIGINT and SIGTERM: a terminal's Ctrl-C or systemd's SIGTERM reach
the whole process group, and the parent decides when a runtime closes.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
from multiprocessing.connection import Connection

log = logging.getLogger("rkllm_api.runtimes.child")

PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 0.5   # how often the child looks whether its parent still lives
FAILED_OPEN_EXIT = 3        # the runtime could not be opened (the parent got the error)
FRAME_HEADER = struct.Struct("!i")
TEXT_FRAME = b"\x00"         # a payload starting so is a TEXT token (a pickle starts 0x80)


def main(fd: int, parent_pid: int, log_level: str = "INFO") -> None:
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(levelname)s %(name)s[{os.getpid()}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid)
    ChildHost(Connection(fd)).serve()


def die_with_parent(parent_pid: int) -> None:
    """Be killed when the parent dies (the kernel's parent-death signal, which the
    launcher thread of the parent keeps valid by living as long as the parent), and
    look every PARENT_POLL_SECONDS as a second line: a parent that died before prctl
    ran, or a runtime inside a C call that holds the socket reader back."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable; watching the parent instead")
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(PARENT_POLL_SECONDS)
        os._exit(0)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exception_state(exc: BaseException) -> tuple:
    """An exception as (class, args, attributes): rebuilt without calling its
    __init__, which for some (EmbeddingInputError) takes more than args."""
    attributes = {k: v for k, v in vars(exc).items() if not k.startswith("__")}
    return (type(exc), exc.args, attributes)


class ChildHost:
    """Serves one runtime to the parent over `conn`."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.runtime = None
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self._send_lock = threading.Lock()   # the runtime may call back from its own thread
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))   # raw writes: no pickler

    def serve(self) -> None:
        threading.Thread(target=self._read_loop, name="child-reader", daemon=True).start()
        message = self.requests.get()
        if not self._open(message):
            os._exit(FAILED_OPEN_EXIT)
        while True:
            message = self.requests.get()
            if message[0] == "close":
                self._close()
                os._exit(0)
            self._answer(message)

    # ---- the socket ----
    def _read_loop(self) -> None:
        """Reads every message; abort is done here at once (the main thread may be
        inside a run), the rest queue for the main thread. EOF: the parent is gone."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            if message[0] == "abort":
                runtime = self.runtime
                if runtime is not None:
                    try:
                        runtime.abort()
                    except Exception:
                        log.exception("abort failed")
                continue
            self.requests.put(message)

    def send(self, message) -> None:
        self._write(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _write(self, payload: bytes) -> None:
        """One frame as multiprocessing.connection frames it (4-byte big-endian length,
        then the payload), written whole before returning."""
        try:
            with self._send_lock:
                self._sock.sendall(FRAME_HEADER.pack(len(payload)) + payload)
        except (OSError, ValueError):
            os._exit(0)                # the parent is gone

    # ---- requests ----
    def _open(self, message) -> bool:
        _, model_path, kwargs = message
        try:
            from rkllm_api.runtimes.factory import open_runtime
            self.runtime = open_runtime(model_path, **kwargs)
        except BaseException as exc:
            self._send_failure(exc)
            return False
        self.send(("ok", describe(self.runtime)))
        return True

    def _answer(self, message) -> None:
        kind = message[0]
        try:
            if kind == "run":
                value = self.runtime.run(message[1], self._sink())
            elif kind == "call":
                _, name, args, kwargs = message
                value = getattr(self.runtime, name)(*args, **kwargs)
            elif kind == "get":
                value = getattr(self.runtime, message[1])
            else:
                raise ValueError(f"unknown request {kind!r}")
        except BaseException as exc:
            self._send_failure(exc)
            return
        try:
            payload = pickle.dumps(("ok", value), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:   # an answer that cannot cross: say so, do not die
            what = message[1] if kind in ("call", "get") else kind
            self._send_failure(TypeError(f"{what}: the answer cannot be sent to the "
                                         f"server ({exc})"))
            return
        self._write(payload)

    def _send_failure(self, exc: BaseException) -> None:
        """The exception as the parent can rebuild it, else as a RuntimeError naming it
        (a class the parent cannot import, attributes that do not pickle)."""
        try:
            payload = pickle.dumps(("raise", exception_state(exc)),
                                   protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            fallback = RuntimeError(f"{type(exc).__name__}: {exc}")
            payload = pickle.dumps(("raise", exception_state(fallback)))
        self._write(payload)

    def _sink(self):
        """The runtime's event sink: a TEXT token goes out as TEXT_FRAME + its UTF-8
        bytes (no pickle either side: this runs once per token), FINISH and ERROR as a
        pickled ("event", TokenEvent)."""
        from rkllm_api.runtimes.base import EventKind
        send, write, text_kind = self.send, self._write, EventKind.TEXT

        def sink(event) -> None:
            if event.kind is text_kind:
                write(TEXT_FRAME + event.text.encode("utf-8", "surrogatepass"))
            else:
                send(("event", event))
        return sink

    def _close(self) -> None:
        try:
            self.runtime.close()
        except Exception:
            log.exception("closing the runtime failed")


# Read once at open: fixed for a runtime's life (the protocol says so). Any other public
# attribute may change (a runtime's own bookkeeping), so the proxy asks for it each time.
FIXED_ATTRIBUTES = ("device", "model_path", "context_length", "capabilities")


def describe(runtime) -> dict:
    """What the parent's proxy needs to know of the runtime: the fixed values, the
    attributes and properties it must ask for when read (kv_length ...), and the
    methods it forwards."""
    values = {name: getattr(runtime, name) for name in FIXED_ATTRIBUTES}
    properties, methods = [], []
    names = set(vars(runtime)) | set(dir(type(runtime)))
    for name in sorted(names):
        if name.startswith("_") or name in values:
            continue
        member = getattr(type(runtime), name, None)
        if isinstance(member, property) or member is None:
            properties.append(name)          # a property, or an instance attribute
        elif callable(member):
            methods.append(name)
        else:
            properties.append(name)          # a class attribute: still read live
    return {"values": values, "properties": properties, "methods": methods}
