"""The gunicorn worker: gthread, with every request read whole, under deadlines,
before a request thread sees it.

Why. gthread hands a connection to a request thread once its first byte is there,
and the thread then reads the head and body with blocking reads. A client that
sends a byte a second holds that thread for as long as it likes: ten such clients
held all 8 threads, and nobody else got an answer. More threads only move the
number up.

What this worker does instead (still one process, still gthread's thread pool):

* The main loop, which already multiplexes every socket with a selector, reads
  each request itself, non-blocking, into a buffer (`RequestFraming` knows where
  the head ends, then the Content-Length or chunked body). Only a complete request
  goes to a thread, with its bytes put back in front of gunicorn's parser, so the
  parser and the app never wait for the network. Idle and dribbling clients cost a
  buffer and a selector entry, never a thread.
* Deadlines: the head must be complete within REQUEST_HEADER_TIMEOUT of the
  connection (or the next request on a kept-alive connection) starting, the body
  within REQUEST_BODY_TIMEOUT after the head; then the client gets a JSON 408 and
  the connection is closed. A head over MAX_HEAD_BYTES is a JSON 431, a body over
  MAX_REQUEST_BYTES a JSON 413 before it is read, a malformed chunked body a 400.
* `Expect: 100-continue` is answered here, when the head is in and the body is
  wanted; the header is taken out of what gunicorn parses so it is not answered
  twice.
* Writes: the request thread's socket gets SEND_TIMEOUT, so a client that stops
  reading a stream fails the write within that time; the stream's close() then
  aborts the run and frees the device.
* The connection count is capped by gunicorn's worker_connections
  (RKLLM_API_MAX_CONNECTIONS): past it the worker stops accepting until one closes.
* Errors gunicorn's parser raises (bad request line, header too long, bad header)
  are answered as JSON in the format of the surface the path belongs to
  (api.error_payload), instead of gunicorn's HTML page; none is a 5xx.
* Arrival order: a request gets its number (`ArrivalOrder.issue`) when the main
  loop has read it whole; the request thread finds it in the WSGI environ
  (ARRIVAL_ENVIRON), and the engine's device queues serve waiters by it.

The parser, the keep-alive handling, the thread pool and the response writing are
gunicorn's own.
"""
from __future__ import annotations

import json
import logging
import re
import selectors
import threading
import time
from functools import partial
from typing import Optional

from gunicorn import http, util
from gunicorn.http.errors import ParseException
from gunicorn.workers.gthread import ThreadWorker

log = logging.getLogger(__name__)

ARRIVAL_ENVIRON = "rkllm_api.arrival"
MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024
MAX_TRAILER_BYTES = 8 * 1024
RECV_BYTES = 256 * 1024
READ_BUDGET_BODIES = 4   # bodies of MAX_REQUEST_BYTES the read layer holds at most
_EXPECT_CONTINUE = re.compile(rb"(?im)^expect:[ \t]*100-continue[ \t]*\r\n")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# gunicorn's parse errors and the status each gets; any other ParseException is a
# 400. An unsupported transfer coding is 501 in gunicorn: a 400 here, so no client
# input is answered with a 5xx.
_PARSE_STATUS = {"LimitRequestLine": 414, "LimitRequestHeaders": 431,
                 "ExpectationFailed": 417, "ForbiddenProxyRequest": 403}
_CODES = {408: "request_timeout", 413: "request_too_large", 414: "request_line_too_long",
          431: "request_header_too_large", 500: "internal_error"}
_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
            413: "Content Too Large", 414: "URI Too Long", 417: "Expectation Failed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class RequestFraming:
    """Where one HTTP/1.x request ends in the bytes received so far.

    feed() bytes as they come; `complete` once the head and the whole body are in,
    `error` = (status, message) when the request must be refused before it is
    complete. Malformed heads (no usable framing) count as complete: gunicorn's
    parser then refuses them with its own error. `data` is what to hand to the
    parser: the bytes received, with an `Expect: 100-continue` line taken out."""

    def __init__(self, max_body: int, max_head: int = MAX_HEAD_BYTES):
        self.max_body, self.max_head = max_body, max_head
        self.buffer = bytearray()
        self.head_end = -1           # offset just past the blank line ending the head
        self.method = self.path = ""
        self.complete = False
        self.error: Optional[tuple] = None
        self.expect_continue = False
        self._length: Optional[int] = None   # Content-Length body
        self._chunked = False
        self._chunk_at = 0           # offset of the next chunk-size line
        self._chunked_bytes = 0

    @property
    def started(self) -> bool:
        return bool(self.buffer)

    @property
    def data(self) -> bytes:
        if self.expect_continue and self.head_end >= 0:
            head = _EXPECT_CONTINUE.sub(b"", bytes(self.buffer[:self.head_end]), count=1)
            return head + bytes(self.buffer[self.head_end:])
        return bytes(self.buffer)

    @property
    def wants_body(self) -> bool:
        return self.head_end >= 0 and not self.complete and self.error is None

    def feed(self, data: bytes) -> None:
        if self.complete or self.error:
            self.buffer += data   # a pipelined next request: the parser keeps it
            return
        searched_to = max(0, len(self.buffer) - 3)
        self.buffer += data
        if not self.method:
            self._read_request_line()
        if self.head_end < 0:
            self._find_head(searched_to)
        if self.head_end >= 0 and not self.complete and not self.error:
            self._check_body()

    # -- the head
    def _read_request_line(self) -> None:
        """Method and path as soon as the first line is in, so that even a head
        refused for its size is answered in the format of the path's surface."""
        start = 0
        while self.buffer[start:start + 2] == b"\r\n":
            start += 2
        end = self.buffer.find(b"\r\n", start, start + self.max_head)
        if end < 0:
            return
        parts = bytes(self.buffer[start:end]).decode("latin-1").split(" ")
        if len(parts) == 3:
            self.method, self.path = parts[0], parts[1].split("?", 1)[0]
        else:
            self.method = "-"   # not a request line: the parser will say so

    def _find_head(self, start: int) -> None:
        if start == 0:   # blank lines before a request line are allowed (RFC 9112 2.2)
            while self.buffer[:2] == b"\r\n":
                del self.buffer[:2]
        end = self.buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self.buffer) > self.max_head:
                self.error = (431, f"the request head is larger than {self.max_head} bytes")
            return
        if end + 4 > self.max_head:
            self.error = (431, f"the request head is larger than {self.max_head} bytes")
            return
        self.head_end = end + 4
        self._read_head(bytes(self.buffer[:end]).decode("latin-1"))

    def _read_head(self, head: str) -> None:
        lines = head.split("\r\n")
        lengths, codings = [], []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if not colon:
                continue
            if name == "content-length":
                lengths.append(value)
            elif name == "transfer-encoding":
                codings += [c.strip().lower() for c in value.split(",")]
            elif name == "expect" and value.lower() == "100-continue" and \
                    not lines[0].endswith("HTTP/1.0"):
                self.expect_continue = True
        if codings:
            if codings[-1] != "chunked" or lengths:
                self.complete = True   # gunicorn refuses this framing itself
            else:
                self._chunked, self._chunk_at = True, self.head_end
            return
        if len(set(lengths)) > 1 or (lengths and not lengths[0].isdigit()):
            self.complete = True       # gunicorn refuses it
            return
        self._length = int(lengths[0]) if lengths else 0
        if self._length > self.max_body:
            self.error = (413, "the request body is larger than the server accepts")

    # -- the body
    def _check_body(self) -> None:
        if self._chunked:
            self._scan_chunks()
        elif len(self.buffer) - self.head_end >= self._length:
            self.complete = True

    def _scan_chunks(self) -> None:
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n", self._chunk_at)
            if line_end < 0:
                if len(buffer) - self._chunk_at > MAX_CHUNK_LINE:
                    self.error = (400, "malformed chunked body: chunk-size line too long")
                return
            size_text = bytes(buffer[self._chunk_at:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self.error = (400, "malformed chunked body: bad chunk size")
                return
            if size < 0:
                self.error = (400, "malformed chunked body: bad chunk size")
                return
            if size == 0:
                self._find_trailer_end(line_end + 2)
                return
            self._chunked_bytes += size
            if self._chunked_bytes > self.max_body:
                self.error = (413, "the request body is larger than the server accepts")
                return
            data_end = line_end + 2 + size
            if len(buffer) < data_end + 2:
                return
            if buffer[data_end:data_end + 2] != b"\r\n":
                self.error = (400, "malformed chunked body: chunk not followed by CRLF")
                return
            self._chunk_at = data_end + 2

    def _find_trailer_end(self, start: int) -> None:
        if self.buffer[start:start + 2] == b"\r\n":
            self.complete = True
            return
        end = self.buffer.find(b"\r\n\r\n", start)
        if end >= 0:
            self.complete = True
        elif len(self.buffer) - start > MAX_TRAILER_BYTES:
            self.error = (400, "malformed chunked body: trailer section too long")


class ArrivalStamp:
    """WSGI middleware: puts the arrival number of the request the current thread
    serves into the environ, and reports it left once the app has answered (by
    then a generation has taken its place in a device queue)."""

    def __init__(self, wsgi_app, local: threading.local, arrivals):
        self.wsgi_app, self.local, self.arrivals = wsgi_app, local, arrivals

    def __call__(self, environ, start_response):
        number = getattr(self.local, "arrival", None)
        if number is None:
            return self.wsgi_app(environ, start_response)
        environ[ARRIVAL_ENVIRON] = number
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            self.arrivals.leave(number)


class _Reading:
    """A connection whose request is being read by the main loop."""

    def __init__(self, framing: RequestFraming, deadline: float):
        self.framing = framing
        self.deadline = deadline
        self.continued = False
        self.held = 0        # bytes received so far (counted against the read budget)


class BoundedReadWorker(ThreadWorker):
    """gthread, with requests read whole by the main loop under deadlines (see the
    module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reading: set = set()
        self._paused: set = set()    # reading, but not polled: over the read budget
        self._buffered = 0           # bytes held by requests being read
        self._local = threading.local()
        self._settings = None
        self._arrivals = None

    # -- setup: the app's settings and arrival order, once the app is loaded
    def load_wsgi(self):
        super().load_wsgi()
        from rkllm_api.config import Settings
        from rkllm_api.server import APP_EXTENSION
        server = getattr(self.wsgi, "extensions", {}).get(APP_EXTENSION)
        self._settings = server.settings if server is not None else Settings.from_env()
        if server is not None:
            self._arrivals = server.engine.arrivals
            self.wsgi.wsgi_app = ArrivalStamp(self.wsgi.wsgi_app, self._local, self._arrivals)

    # -- connections enter the read layer instead of the thread pool
    def enqueue_req(self, conn):
        if getattr(conn, "request_ready", False) or self.cfg.is_ssl or self._settings is None:
            conn.request_ready = False
            super().enqueue_req(conn)
            return
        self._start_reading(conn)

    def _start_reading(self, conn) -> None:
        settings = self._settings
        state = _Reading(RequestFraming(settings.max_request_bytes),
                         time.monotonic() + settings.header_timeout)
        conn.reading = state
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.sock.setblocking(False)
        self._reading.add(conn)
        if leftover:   # the start of a pipelined request, read with the previous one
            self._feed(conn, leftover)
            if conn not in self._reading or conn in self._paused:
                return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn, _sock) -> None:
        self._receive(conn)

    def _receive(self, conn) -> bool:
        """One non-blocking read, fed to the framing; False when nothing was there
        (or the connection is gone)."""
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._drop(conn)
            return False
        if not data:   # the client closed: nothing to answer
            self._drop(conn)
            return False
        self._feed(conn, data)
        return True

    def _feed(self, conn, data: bytes) -> None:
        state = conn.reading
        framing = state.framing
        had_head = framing.head_end >= 0
        framing.feed(data)
        state.held += len(data)
        self._buffered += len(data)
        if framing.error is not None:
            status, message = framing.error
            self._refuse(conn, status, message, framing)
            return
        if framing.complete:
            self._hand_over(conn)
            return
        if self._over_budget(conn):
            self._pause(conn)
        if framing.head_end >= 0 and not had_head:
            state.deadline = time.monotonic() + self._settings.body_timeout
        if framing.wants_body and framing.expect_continue and not state.continued:
            state.continued = True
            _send_quietly(conn.sock, _CONTINUE)

    def _hand_over(self, conn) -> None:
        framing = conn.reading.framing
        self._forget(conn)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(framing.data)
        conn.data_ready = True
        conn.arrival = self._arrivals.issue() if self._arrivals is not None else None
        conn.request_ready = True
        conn.reading = None
        super().enqueue_req(conn)

    def _forget(self, conn) -> None:
        if conn in self._reading:
            self._buffered -= conn.reading.held
        self._reading.discard(conn)
        self._paused.discard(conn)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self._resume_paused()

    # -- the read budget: bodies held in memory are bounded (about READ_BUDGET_BODIES
    # bodies of MAX_REQUEST_BYTES, plus one); past it, every connection but the one
    # holding most (so one always completes) waits, unread, in its TCP window.
    def _over_budget(self, conn) -> bool:
        budget = READ_BUDGET_BODIES * self._settings.max_request_bytes
        if self._buffered <= budget:
            return False
        return conn is not max(self._reading, key=lambda c: c.reading.held)

    def _pause(self, conn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self._paused.add(conn)

    def _resume_paused(self) -> None:
        for conn in list(self._paused):
            self._paused.discard(conn)
            try:
                self.poller.register(conn.sock, selectors.EVENT_READ,
                                     partial(self._on_readable, conn))
            except (KeyError, ValueError, OSError):
                pass   # registered already, or closed: the deadline check handles it

    def _drop(self, conn) -> None:
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()

    def _refuse(self, conn, status: int, message: str, framing: RequestFraming) -> None:
        log.warning("refused a request from %s: %s", _peer(conn), message)
        body = self._error_body(status, message, framing.method, framing.path)
        _send_quietly(conn.sock, _raw_response(status, body))
        self._drop(conn)

    # -- deadlines (the main loop calls murder_pending about once a second)
    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self._reading):
            if now >= conn.reading.deadline and conn not in self._paused:
                # Bytes the kernel already holds arrived in time, even when this loop
                # did not get to them (a stalled process): read them before judging.
                self._read_what_arrived(conn)
                if conn not in self._reading:
                    continue
            framing = conn.reading.framing
            if not self.alive and not framing.started:
                self._drop(conn)
            elif now >= conn.reading.deadline:
                if framing.started:
                    self._refuse(conn, 408, "the request was not received in time "
                                 "(REQUEST_HEADER_TIMEOUT / REQUEST_BODY_TIMEOUT)", framing)
                else:
                    self._drop(conn)   # opened and never used: close like a keep-alive

    def _read_what_arrived(self, conn) -> None:
        for _ in range(MAX_HEAD_BYTES // 1024):   # bounded: a request is capped anyway
            if not self._receive(conn) or conn not in self._reading or conn in self._paused:
                return

    def wait_for_and_dispatch_events(self, timeout):
        # Wake a little more often than gthread's 1 s, so a deadline is kept closely.
        super().wait_for_and_dispatch_events(min(timeout, 0.25))

    # -- the request thread
    def handle(self, conn):
        try:
            return super().handle(conn)
        finally:
            number = getattr(conn, "arrival", None)
            if number is not None and self._arrivals is not None:
                self._arrivals.leave(number)   # also when the parser refused the request
            conn.arrival = None

    def handle_request(self, req, conn):
        # Reads are served from the buffer; this bounds writes: a client that stops
        # reading fails its stream's write within SEND_TIMEOUT.
        conn.sock.settimeout(self._settings.send_timeout if self._settings and
                             self._settings.send_timeout > 0 else None)
        self._local.arrival = getattr(conn, "arrival", None)
        try:
            return super().handle_request(req, conn)
        finally:
            self._local.arrival = None

    def handle_error(self, req, client, addr, exc):
        """gunicorn's parse errors as JSON (never a 5xx); anything else a JSON 500."""
        if isinstance(exc, ParseException) and type(exc).__name__ != "ConfigurationProblem":
            status = _PARSE_STATUS.get(type(exc).__name__, 400)
            message = f"malformed request: {exc}"
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        else:
            status, message = 500, "internal error: the server failed to handle this request"
            self.log.exception("Error handling request")
        body = self._error_body(status, message, getattr(req, "method", "") or "",
                                getattr(req, "path", "") or "")
        try:
            util.write_nonblock(client, _raw_response(status, body))
        except Exception:
            self.log.debug("Failed to send error message.")

    def _error_body(self, status: int, message: str, method: str, path: str) -> bytes:
        try:
            import api
            from rkllm_api.errors import RequestError
            payload = api.error_payload(self.wsgi, method, path, RequestError(
                message, status=status, code=_CODES.get(status, "malformed_request")))
        except Exception:   # the error page must never fail
            payload = {"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": None}}
        return json.dumps(payload, ensure_ascii=True).encode("ascii")


def _raw_response(status: int, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


def _send_quietly(sock, data: bytes) -> None:
    """One non-blocking send: a client that cannot take a small reply is dropped."""
    try:
        sock.send(data)
    except OSError:
        pass


def _peer(conn) -> str:
    client = getattr(conn, "client", None)
    return client[0] if isinstance(client, tuple) and client else "?"
