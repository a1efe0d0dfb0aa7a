"""The OpenAI surface: chat and text completions, rendered as server-sent events or
one JSON body from the same pipeline events (rkllm_api/pipeline.py)."""
from __future__ import annotations

import itertools
from typing import Iterator

from flask import Blueprint, Response, jsonify

from rkllm_api import pipeline
from rkllm_api.errors import runtime_failure
from rkllm_api.logs import note_reply
from rkllm_api.openai import protocol
from rkllm_api.responses import (FLUSH_MARK, CancelUnlessComplete, StreamBody, caller, coalesced,
                                 json_body)
from rkllm_api.server import current_server

blueprint = Blueprint("openai", __name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def chat_completions():
    req = protocol.parse_chat_request(json_body())
    reply = current_server().chat.chat(req, caller())
    chunks = protocol.ChatChunks(reply.model_id, reply.fingerprint,
                                 req.include_usage and req.stream,
                                 legacy_functions=reply.legacy_functions)
    return respond(reply, chunks, req.stream)


def completions():
    req = protocol.parse_completion_request(json_body())
    reply = current_server().chat.complete(req, caller())
    chunks = protocol.CompletionChunks(reply.model_id, reply.fingerprint,
                                       req.include_usage and req.stream)
    return respond(reply, chunks, req.stream)


for _path in ("/v1/chat/completions", "/chat/completions"):
    blueprint.add_url_rule(_path, "chat_completions" + _path, chat_completions, methods=["POST"])
for _path in ("/v1/completions", "/completions"):
    blueprint.add_url_rule(_path, "completions" + _path, completions, methods=["POST"])


def respond(reply, chunks: protocol.ChatChunks, stream: bool) -> Response:
    """Render the reply's events as one JSON body or as server-sent events."""
    note_reply(reply)   # for the access log line
    events = reply.events
    if not stream:
        with CancelUnlessComplete(reply) as run:
            body = collect_body(events, chunks)
            run.complete = True
        return _with_headers(jsonify(body), reply)
    # Look at the first event before committing to a 200: a run that fails before
    # its first token still gets a proper 500 instead of an error event.
    with CancelUnlessComplete(reply) as run:
        first = next(events)
        while type(first) is pipeline.Flush:   # nothing produced yet: wait for the run
            first = next(events)
        if type(first) is pipeline.Failure:
            raise runtime_failure(first.message)
        run.complete = True
    lines = coalesced(render_sse(itertools.chain((first,), events), chunks))
    response = Response(StreamBody(lines, reply), mimetype="text/event-stream",
                        headers=SSE_HEADERS)
    return _with_headers(response, reply, streamed=True)


def _with_headers(response: Response, reply, streamed: bool = False) -> Response:
    response.headers.update(reply.headers(streamed))
    return response


def render_sse(events: Iterator, chunks: protocol.ChatChunks) -> Iterator[str]:
    role = chunks.role()
    if role:
        yield role
    content, reasoning = chunks.content, chunks.reasoning
    content_kind, reasoning_kind = pipeline.ContentDelta, pipeline.ReasoningDelta
    for event in events:
        kind = type(event)
        if kind is content_kind:
            yield content(event.text)
        elif kind is reasoning_kind:
            yield reasoning(event.text)
        elif kind is pipeline.Flush:
            yield FLUSH_MARK
        elif kind is pipeline.KeepAlive:
            yield protocol.KEEP_ALIVE_LINE
        elif kind is pipeline.ToolCallDelta:
            yield chunks.tool_calls(event.calls)
        elif kind is pipeline.Finished:
            yield chunks.finish(event.reason, event.error)
        elif kind is pipeline.UsageReport:
            if chunks.include_usage:
                yield chunks.usage(event.usage)
        elif kind is pipeline.Failure:
            yield protocol.sse_line(protocol.error_of(runtime_failure(event.message)))
            break
    yield protocol.DONE_LINE


def collect_body(events: Iterator, chunks: protocol.ChatChunks) -> dict:
    answer = pipeline.AnswerSoFar()
    for event in events:
        answer.add(event)
        if answer.failure is not None:
            raise runtime_failure(answer.failure)
    return chunks.body(answer.content, answer.reasoning, answer.calls, answer.finish,
                       answer.usage, answer.finish_error)
