"""HTTP helpers every surface shares: reading the JSON body, and the body of a
streamed reply that aborts the run when the client goes away."""
from __future__ import annotations

import json
from typing import Iterator

from flask import request

from rkllm_api.errors import RequestError


def json_body(required: bool = True):
    """The request's JSON body (None when optional and empty); 400 on anything else."""
    raw = request.get_data(cache=False)
    if not raw.strip() and not required:
        return None
    if request.mimetype != "application/json":
        raise RequestError("Content-Type must be application/json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


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


def coalesced(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces a renderer yields, joined into one write between flush marks.
    Flush marks come when the runtime's queue has been drained, so nothing is held
    back that could already be sent: the client receives the same bytes, in fewer
    writes (one syscall and one chunk header instead of one per token)."""
    batch: list = []
    for piece in pieces:
        if piece:
            batch.append(piece)
        elif batch:
            yield "".join(batch)
            batch = []
    if batch:
        yield "".join(batch)
