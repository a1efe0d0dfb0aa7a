"""HTTP helpers every surface shares: reading the JSON body, and the body of a
streamed reply that aborts the run when the client goes away."""
from __future__ import annotations

import json
import re
import select
import socket
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from flask import request
from werkzeug.exceptions import HTTPException

from rkllm_api.errors import RequestError
from rkllm_api.http_worker import ARRIVAL_ENVIRON


MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_body(required: bool = True, any_content_type: bool = False):
    """The request's JSON body (None when optional and empty); 400 on anything else:
    not JSON, NaN or Infinity, invalid UTF-8, a lone surrogate in any string (json
    accepts "\\ud800" escapes, which no encoder can write back), nesting deeper than
    MAX_JSON_DEPTH. Every surface reads its body here, so text past this point is
    valid Unicode. any_content_type: Ollama's clients (and its curl examples) send
    JSON under any Content-Type."""
    raw = _read_body()
    if not raw.strip() and not required:
        return None
    if request.mimetype != "application/json" and not any_content_type:
        raise RequestError("Content-Type must be application/json")
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    check_json_text(body)
    return body


def _read_body() -> bytes:
    """The raw body. The worker read it whole before (http_worker.py); a framing error
    only the parser sees, or a socket error, is the client's: a 400, not a 500."""
    try:
        return request.get_data(cache=False)
    except HTTPException:   # 413 and friends keep their status
        raise
    except Exception as exc:
        raise RequestError(f"the request body could not be read ({type(exc).__name__})") \
            from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def check_json_text(value, where: str = "") -> None:
    """400 naming the field when a decoded JSON value holds a lone surrogate (in a
    key or a string) or nests deeper than MAX_JSON_DEPTH."""
    stack = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise RequestError(f"'{path or 'body'}' holds a lone UTF-16 surrogate, "
                                   f"which is not valid Unicode text", param=path or None)
            continue
        if depth >= MAX_JSON_DEPTH and isinstance(item, (dict, list)):
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for key, inner in item.items():
                inner_path = f"{path}.{key[:64]}" if path else key[:64]
                if _SURROGATE.search(key):
                    raise RequestError(f"a key in '{path or 'body'}' holds a lone UTF-16 "
                                       f"surrogate", param=path or None)
                stack.append((inner, inner_path, depth + 1))
        elif isinstance(item, list):
            stack.extend((inner, f"{path}[{i}]", depth + 1) for i, inner in enumerate(item))


@dataclass(frozen=True)
class Caller:
    """Who sent the request, as the engine needs to know: its arrival number (the
    order device queues serve in; None outside the HTTP worker) and a probe that
    says whether its connection is gone (checked while it waits for the device)."""
    arrival: Optional[int]
    gone: Callable[[], bool]


def caller() -> Caller:
    """The Caller of the current request."""
    environ = request.environ
    return Caller(environ.get(ARRIVAL_ENVIRON), _connection_probe(environ.get("gunicorn.socket")))


def _connection_probe(sock) -> Callable[[], bool]:
    """A function telling whether the client closed the connection: readable with
    nothing to read (EOF), or reset. The request body was read whole before, so
    readable data would be a pipelined next request, not a goodbye."""
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLERR | select.POLLHUP):
                return True
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):
            return True
    return gone


class CancelUnlessComplete:
    """Cancel the reply (abort its run) when the block does not get to mark it
    complete (an exception, the client gone); a reply that came to its end is left
    alone."""

    def __init__(self, reply):
        self.reply, self.complete = reply, False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if not self.complete:
            self.reply.cancel()
        return False


class StreamBody:
    """The WSGI body of a streamed reply. The server calls close() when it is done
    with it: after the last piece, or early when the client went away (a failed
    write) -- even before the first piece -- and then the run is aborted."""

    def __init__(self, pieces: Iterator[str], reply):
        self._pieces, self._reply = pieces, reply
        self._complete = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration:
            self._complete = True
            raise

    def close(self) -> None:
        if not self._complete:
            self._reply.cancel()
        self._pieces.close()


FLUSH_MARK = ""   # a renderer yields this for pipeline.Flush


def coalesced(pieces: Iterator[str], max_batch: int = 64) -> Iterator[str]:
    """The pieces a renderer yields, joined into one write between flush marks.
    Flush marks come when the runtime's queue has been drained, so nothing is held
    back that could already be sent: the client receives the same bytes, in fewer
    writes (one syscall and one chunk header instead of one per token). The first
    piece goes out alone (the response starts at once), and a runtime faster than
    the writer still gets a write every `max_batch` pieces."""
    batch: list = []
    first = True
    for piece in pieces:
        if piece:
            if first:
                first = False
                yield piece
                continue
            batch.append(piece)
            if len(batch) < max_batch:
                continue
        if batch:
            yield "".join(batch)
            batch = []
    if batch:
        yield "".join(batch)
