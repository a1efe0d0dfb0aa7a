"""The Ollama renderer: the pipeline's events (rkllm_api/pipeline.py) as NDJSON lines
or as one JSON object, for /api/chat (a `message`) and /api/generate (a `response`).

A stream is one JSON object per line: a delta per piece of content or thinking,
the tool calls (complete, arguments as objects) in one object once the answer is
known, then the final object (`done: true`) with `done_reason` and the counts and
durations of protocol.statistics(). A failure after the stream began is a line
`{"error": "..."}`, as Ollama writes it. Keep-alives are dropped: NDJSON has no
comment line and Ollama's clients parse every line as JSON.
"""
from __future__ import annotations

import json
import time
from typing import Iterator, Optional

from rkllm_api import pipeline
from rkllm_api.ollama import protocol
from rkllm_api.responses import FLUSH_MARK

_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}
_SLOT = "\u0000slot\u0000"   # json.dumps renders it as a unique quoted string


def ndjson_line(payload: dict) -> str:
    return json.dumps(payload, **_COMPACT) + "\n"


class _Template:
    """One line with a single string slot, rendered by concatenation (per token)."""

    __slots__ = ("head", "tail")

    def __init__(self, payload: dict):
        self.head, self.tail = ndjson_line(payload).split(json.dumps(_SLOT, **_COMPACT))

    def render(self, text: str) -> str:
        return self.head + json.dumps(text, ensure_ascii=False) + self.tail


class OllamaAnswer:
    """Builds the objects of one answer. kind: "chat" (message objects) or
    "generate" (response strings); started: time.monotonic() when the request came."""

    def __init__(self, name: str, kind: str, started: float):
        self.name, self.kind, self.started = name, kind, started
        self._stamp()

    def _stamp(self) -> None:
        """Deltas carry the time of the write they go out in (one clock read each)."""
        created = protocol.timestamp()
        self._content = _Template(self._object(created, content=_SLOT))
        self._thinking = _Template(self._object(created, content="", thinking=_SLOT))

    def _object(self, created: str, content: str = "", thinking: Optional[str] = None,
                tool_calls: Optional[list] = None, done: bool = False) -> dict:
        payload = {"model": self.name, "created_at": created}
        if self.kind == "chat":
            message = {"role": "assistant", "content": content}
            if thinking is not None:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload["message"] = message
        else:
            payload["response"] = content
            if thinking is not None:
                payload["thinking"] = thinking
        payload["done"] = done
        return payload

    def content(self, text: str) -> str:
        return self._content.render(text)

    def thinking(self, text: str) -> str:
        return self._thinking.render(text)

    def flushed(self) -> None:
        self._stamp()

    def tool_calls(self, calls: list) -> str:
        return ndjson_line(self._object(protocol.timestamp(),
                                        tool_calls=protocol.tool_calls_out(calls)))

    def final(self, reason: str, usage, error: Optional[str] = None, content: str = "",
              thinking: str = "", calls: Optional[list] = None) -> dict:
        payload = self._object(protocol.timestamp(), content=content,
                               thinking=thinking or None,
                               tool_calls=protocol.tool_calls_out(calls) if calls else None,
                               done=True)
        payload["done_reason"] = protocol.DONE_REASONS.get(reason, reason)
        payload.update(protocol.statistics(usage, time.monotonic() - self.started))
        if error:
            payload["error"] = error
        return payload

    def status(self, reason: str) -> dict:
        """The one object of a load or unload (no generation, no statistics)."""
        payload = self._object(protocol.timestamp(), done=True)
        payload["done_reason"] = reason
        return payload


def render_ndjson(events: Iterator, answer: OllamaAnswer) -> Iterator[str]:
    calls: list = []
    reason, error, usage = "stop", None, pipeline.Usage(0, 0)
    content_kind, thinking_kind = pipeline.ContentDelta, pipeline.ReasoningDelta
    for event in events:
        kind = type(event)
        if kind is content_kind:
            yield answer.content(event.text)
        elif kind is thinking_kind:
            yield answer.thinking(event.text)
        elif kind is pipeline.Flush:
            answer.flushed()
            yield FLUSH_MARK
        elif kind is pipeline.ToolCallDelta:
            for delta in event.calls:
                pipeline.merge_tool_call_delta(calls, delta)
        elif kind is pipeline.Finished:
            reason, error = event.reason, event.error
        elif kind is pipeline.UsageReport:
            usage = event.usage
        elif kind is pipeline.Failure:
            yield ndjson_line({"error": event.message})
            return
    if calls:
        yield answer.tool_calls(calls)
    yield ndjson_line(answer.final(reason, usage, error))


def collect(events: Iterator) -> pipeline.AnswerSoFar:
    """Every event folded; the caller raises on a failure before writing anything."""
    folded = pipeline.AnswerSoFar()
    for event in events:
        folded.add(event)
        if folded.failure is not None:
            break
    return folded


def body_of(folded: pipeline.AnswerSoFar, answer: OllamaAnswer) -> dict:
    content = "" if folded.finish_error else folded.content
    return answer.final(folded.finish, folded.usage, folded.finish_error, content=content,
                        thinking=folded.reasoning, calls=folded.calls)
