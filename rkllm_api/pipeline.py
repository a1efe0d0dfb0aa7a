"""The generation pipeline, independent of the wire: events and their transforms.

    engine Generation.events()  ->  runtime_events()      TokenEvent -> pipeline events
                                ->  StopSequenceFilter     cut at stop strings, abort the run
                                ->  ThinkingTransform      <think> blocks -> reasoning deltas
                                ->  ToolCallTransform      tool calls written as text -> calls
                                ->  CommitAnswer           the answer, for the next turn's KV reuse
                                ->  CacheAnswer            a RAG answer, into the response cache
                                ->  a surface's renderer   (OpenAI SSE / JSON; Ollama NDJSON / JSON)

A reply that needs no model run (an instant task answer, a cached RAG answer) is
the same events from canned_events(), so every surface renders one stream type.
Finish reasons are this module's words: "stop", "length", "tool_calls"; a surface
translates them (OpenAI's legacy functions mode says "function_call").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from rkllm_api.engine.generation import DRAINED, Heartbeat
from rkllm_api.request import ToolCall, ToolSpec
from rkllm_api.runtimes.base import EventKind, FinishReason
from rkllm_api.text import thinking, tools


@dataclass(frozen=True)
class Usage:
    """Token counts of one reply: every token the runtime prefilled for it (cache
    building included, and what KV reuse kept) and every token it generated; and the
    time the runtime spent on each, plus loading the model for it (milliseconds, from
    the runtime's perf figures; 0 for replies no model wrote)."""
    prompt_tokens: int
    completion_tokens: int
    prompt_ms: float = 0.0
    completion_ms: float = 0.0
    load_ms: float = 0.0
    kept_tokens: int = 0      # of prompt_tokens, those the KV cache already held

    @property
    def evaluated_tokens(self) -> int:
        """Prompt tokens the runtime prefilled for this reply (its perf figure)."""
        return self.prompt_tokens - self.kept_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def plus(self, other: Optional["Usage"]) -> "Usage":
        """Both replies' work (an answer that took two runs reports both)."""
        if other is None:
            return self
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens,
                     self.prompt_ms + other.prompt_ms,
                     self.completion_ms + other.completion_ms,
                     self.load_ms + other.load_ms,
                     self.kept_tokens + other.kept_tokens)


class ContentDelta:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class ReasoningDelta(ContentDelta):
    __slots__ = ()


class ReasoningRetracted:
    """The reasoning sent so far was the answer (thinking.ANSWER): the ContentDelta
    that follows repeats it as content. A whole reply drops its reasoning; a stream
    cannot take back what it sent, so renderers ignore this event."""
    __slots__ = ()


REASONING_RETRACTED = ReasoningRetracted()


class ToolCallDelta:
    """OpenAI tool-call deltas: [{index, id?, type?, function: {name?, arguments}}]."""
    __slots__ = ("calls",)

    def __init__(self, calls: list):
        self.calls = calls


class Finished:
    """reason: stop, length, tool_calls, or "error" when the answer had to be refused
    after the run (structured output that never validated): `error` says why."""
    __slots__ = ("reason", "error")

    def __init__(self, reason: str, error: Optional[str] = None):
        self.reason = reason
        self.error = error


class UsageReport:
    __slots__ = ("usage",)

    def __init__(self, usage: Usage):
        self.usage = usage


class Failure:
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class KeepAlive:
    __slots__ = ()


KEEP_ALIVE = KeepAlive()


class Flush:
    """Everything the runtime produced so far has passed: a renderer may write what
    it buffered now (see responses.coalesced)."""
    __slots__ = ()


FLUSH = Flush()

# The runtime's reasons in the pipeline's words. An abort that reaches the client is
# a server limit (silence, total time, repetition guard): the answer was cut short.
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                  FinishReason.ABORTED: "length", FinishReason.ERROR: "stop"}

StreamTransform = Callable[[Iterator], Iterator]


def runtime_events(generation) -> Iterator:
    """Engine events as pipeline events; always ends with Finished + UsageReport or Failure."""
    text_kind, finish_kind = EventKind.TEXT, EventKind.FINISH
    for event in generation.events(report_drained=True):
        if event is DRAINED:
            yield FLUSH
        elif type(event) is Heartbeat:
            yield KEEP_ALIVE
        elif event.kind is text_kind:
            if event.text:
                yield ContentDelta(event.text)
        elif event.kind is finish_kind:
            yield Finished(FINISH_REASONS.get(event.finish_reason, "stop"))
            yield UsageReport(usage_of(generation, event.perf))
            return
        else:
            yield Failure(event.error or "the runtime failed")
            return
    # events() ended without FINISH: the run was cancelled (e.g. by a stop sequence).
    result = generation.result
    reason = result.finish_reason if result else FinishReason.ABORTED
    yield Finished(FINISH_REASONS.get(reason, "stop"))
    yield UsageReport(usage_of(generation, result.perf if result else None))


def usage_of(generation, perf) -> Usage:
    """Token counts from the runtime's own perf figures. When the engine reused
    the KV cache and prefilled only the new tail, the tokens it kept count as
    prompt tokens too (hook: Generation.kv_reused_tokens, 0 or absent otherwise)."""
    if perf is None:
        return Usage(0, 0)
    kept = generation.kv_reused_tokens
    # Cache-building runs the request caused (a system-prompt cache) count as its work.
    prefilled = perf.prefill_tokens + getattr(generation, "extra_prefill_tokens", 0)
    return Usage(prefilled + kept, perf.generate_tokens, perf.prefill_ms,
                 perf.generate_ms, getattr(generation, "load_ms", 0.0), kept)


class StopSequenceFilter:
    """Cuts the output at the first stop sequence, even one split across tokens.
    Holds back only the shortest tail that could still grow into a stop sequence;
    on a hit it calls on_hit (abort the run) and reports finish_reason "stop"."""

    def __init__(self, stops: Iterable[str], on_hit: Callable[[], None]):
        self.stops = tuple(stops)
        self.on_hit = on_hit

    def __call__(self, events: Iterator) -> Iterator:
        held, stopped = "", False
        for event in events:
            kind = type(event)
            if kind is ContentDelta:
                if stopped:
                    continue
                text = held + event.text
                cut = self._first_match(text)
                if cut is not None:
                    stopped, held = True, ""
                    if cut:
                        yield ContentDelta(text[:cut])
                    self.on_hit()
                    yield Finished("stop")
                    continue
                keep = self._unsafe_tail(text)
                held = text[len(text) - keep:] if keep else ""
                if len(text) > keep:
                    yield ContentDelta(text[:len(text) - keep])
            elif stopped and kind in (Finished, Failure):
                continue  # the run we aborted ends as it may; the client already has its end
            else:
                if held and kind in (Finished, Failure):
                    yield ContentDelta(held)
                    held = ""
                yield event

    def _first_match(self, text: str) -> Optional[int]:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _unsafe_tail(self, text: str) -> int:
        """Length of the longest end of text that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def run_pipeline(source: Iterator, transforms: Iterable[StreamTransform]) -> Iterator:
    for transform in transforms:
        source = transform(source)
    return source


class AnswerSoFar:
    """The reply the events describe so far: what the JSON body, the KV commit and
    the RAG response cache each need, folded in one place."""

    def __init__(self):
        self._content, self._reasoning, self.calls = [], [], []
        self.finish, self.usage, self.failure = "stop", Usage(0, 0), None
        self.finish_error: Optional[str] = None   # why a finish "error" refused the answer

    def add(self, event) -> None:
        kind = type(event)
        if kind is ContentDelta:
            self._content.append(event.text)
        elif kind is ReasoningDelta:
            self._reasoning.append(event.text)
        elif kind is ReasoningRetracted:
            self._reasoning = []
        elif kind is ToolCallDelta:
            for delta in event.calls:
                merge_tool_call_delta(self.calls, delta)
        elif kind is Finished:
            self.finish = event.reason
            self.finish_error = event.error
        elif kind is UsageReport:
            self.usage = event.usage
        elif kind is Failure:
            self.failure = event.message

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    def tool_calls(self) -> tuple:
        """The calls as typed ToolCalls (what the engine keeps as the answer)."""
        return tuple(ToolCall(c["function"]["name"], c["function"]["arguments"], c["id"])
                     for c in self.calls)


def merge_tool_call_delta(calls: list, delta: dict) -> None:
    """Fold one streamed tool-call delta into the complete calls of a JSON reply."""
    index = delta.get("index", len(calls))
    while len(calls) <= index:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    if delta.get("id"):
        call["id"] = delta["id"]
    function = delta.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]


class CommitAnswer:
    """Last stream transform of a chat reply: once the run finished normally, tell the
    engine the answer (content + tool calls) so the next turn can reuse the KV cache."""

    def __init__(self, generation):
        self.generation = generation

    def __call__(self, events: Iterator) -> Iterator:
        answer = AnswerSoFar()
        for event in events:
            answer.add(event)
            if type(event) is Finished:
                self.generation.commit_answer(answer.content, answer.tool_calls())
            yield event


class ThinkingTransform:
    """Stream transform: <think> blocks become reasoning deltas (thinking.py).
    starts_inside: thinking is on, and some templates open the block themselves."""

    def __init__(self, starts_inside: bool = False):
        self.starts_inside = starts_inside

    def __call__(self, events: Iterator) -> Iterator:
        splitter = thinking.ThinkSplitter(starts_inside=self.starts_inside)
        reasoning_kind, answer_kind = thinking.REASONING, thinking.ANSWER

        def deltas(pairs):
            for kind, text in pairs:
                if kind == reasoning_kind:
                    yield ReasoningDelta(text)
                    continue
                if kind == answer_kind:
                    yield REASONING_RETRACTED
                yield ContentDelta(text)

        for event in events:
            kind = type(event)
            if kind is ContentDelta:
                yield from deltas(splitter.feed(event.text))
            else:
                if kind is Finished or kind is Failure:
                    yield from deltas(splitter.finish())
                yield event


split_thinking = ThinkingTransform()


class ToolCallTransform:
    """Stream transform: tool calls the model writes as text become tool-call
    deltas (tools.py), and finish_reason becomes "tool_calls" when there are any."""

    def __init__(self, spec: ToolSpec):
        self.spec = spec

    def __call__(self, events: Iterator) -> Iterator:
        parser = tools.ToolCallParser(self.spec)
        for event in events:
            kind = type(event)
            if kind is ContentDelta:
                yield from self._deltas(parser.feed(event.text))
                continue
            if kind is Finished or kind is Failure:
                yield from self._deltas(parser.finish())
                if kind is Finished and parser.calls:
                    event = Finished("tool_calls")
            yield event

    @staticmethod
    def _deltas(tool_events) -> Iterator:
        for item in tool_events:
            if item.kind == "content":
                if item.text:
                    yield ContentDelta(item.text)
            elif item.kind == "call":
                yield ToolCallDelta([{"index": item.index, "id": item.call_id,
                                      "type": "function",
                                      "function": {"name": item.name, "arguments": ""}}])
            elif item.kind == "arguments":
                yield ToolCallDelta([{"index": item.index,
                                      "function": {"arguments": item.text}}])


def canned_events(content: str, reasoning: str, usage: Usage) -> Iterator:
    """A finished answer as pipeline events, for replies that need no model run."""
    if reasoning:
        yield ReasoningDelta(reasoning)
    if content:
        yield ContentDelta(content)
    yield Finished("stop")
    yield UsageReport(usage)


class CacheAnswer:
    """Stream transform, last in the chain: a RAG answer that came to its natural
    end (no tool call, no failure, no server limit) goes into the response cache."""

    def __init__(self, cache, key: str, generation):
        self.cache, self.key, self.generation = cache, key, generation

    def __call__(self, events: Iterator) -> Iterator:
        answer = AnswerSoFar()
        for event in events:
            answer.add(event)
            if type(event) is Finished and self._complete(answer):
                self.cache.put(self.key, {"content": answer.content,
                                          "reasoning": answer.reasoning})
            yield event

    def _complete(self, answer: AnswerSoFar) -> bool:
        return (answer.finish == "stop" and not answer.calls and answer.failure is None
                and self.generation.stop_cause is None)
