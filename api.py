"""The HTTP layer: Flask app factory, OpenAI routes, the generation pipeline, `main()`.

A request is validated (protocol.py), turned into a prompt (prompts.py), handed to
the engine, and its token events flow through ONE pipeline that both reply styles
share:

    engine Generation.events()  ->  runtime_events()      TokenEvent -> pipeline events
                                ->  StopSequenceFilter     cut at stop strings, abort the run
                                ->  stream transforms      (thinking split, tool calls, ...)
                                ->  render_sse() | collect_body()

Importing this module does nothing but define things: the app exists only once
create_app() is called (gunicorn runs "api:create_app()" in its worker).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Optional

from flask import Flask, Response, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

import protocol
from config import Settings
from protocol import RequestError
from runtime import EventKind, FinishReason, RunRequest

log = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"
APP_EXTENSION = "rkllm_api"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# ----------------------------------------------------------------------------
# pipeline events: what flows between the stages (small, slotted, no logic)


class ContentDelta:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class ReasoningDelta(ContentDelta):
    __slots__ = ()


class ToolCallDelta:
    """OpenAI tool-call deltas: [{index, id?, type?, function: {name?, arguments}}]."""
    __slots__ = ("calls",)

    def __init__(self, calls: list):
        self.calls = calls


class Finished:
    __slots__ = ("reason",)   # OpenAI finish_reason: stop, length, tool_calls

    def __init__(self, reason: str):
        self.reason = reason


class UsageReport:
    __slots__ = ("usage",)

    def __init__(self, usage: protocol.Usage):
        self.usage = usage


class Failure:
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class KeepAlive:
    __slots__ = ()


KEEP_ALIVE = KeepAlive()

# The runtime's reasons in OpenAI words. An abort that reaches the client is a
# server limit (silence, total time, repetition guard): the answer was cut short.
OPENAI_FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                         FinishReason.ABORTED: "length", FinishReason.ERROR: "stop"}

StreamTransform = Callable[[Iterator], Iterator]


def runtime_events(generation) -> Iterator:
    """Engine events as pipeline events; always ends with Finished + UsageReport or Failure."""
    heartbeat = _heartbeat_class()
    text_kind, finish_kind = EventKind.TEXT, EventKind.FINISH
    for event in generation.events():
        if type(event) is heartbeat:
            yield KEEP_ALIVE
        elif event.kind is text_kind:
            if event.text:
                yield ContentDelta(event.text)
        elif event.kind is finish_kind:
            yield Finished(OPENAI_FINISH_REASONS.get(event.finish_reason, "stop"))
            yield UsageReport(usage_of(generation, event.perf))
            return
        else:
            yield Failure(event.error or "the runtime failed")
            return
    # events() ended without FINISH: the run was cancelled (e.g. by a stop sequence).
    result = generation.result
    reason = result.finish_reason if result else FinishReason.ABORTED
    yield Finished(OPENAI_FINISH_REASONS.get(reason, "stop"))
    yield UsageReport(usage_of(generation, result.perf if result else None))


def _heartbeat_class():
    from engine import Heartbeat
    return Heartbeat


def usage_of(generation, perf) -> protocol.Usage:
    """Token counts from the runtime's own perf figures. When the engine reused
    the KV cache and prefilled only the new tail, the tokens it kept count as
    prompt tokens too (hook: Generation.kv_reused_tokens, 0 or absent otherwise)."""
    if perf is None:
        return protocol.Usage(0, 0)
    kept = getattr(generation, "kv_reused_tokens", 0) or 0
    return protocol.Usage(perf.prefill_tokens + kept, perf.generate_tokens)


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


# ----------------------------------------------------------------------------
# the two renderings of one pipeline


def render_sse(events: Iterator, chunks: protocol.ChatChunks) -> Iterator[str]:
    role = chunks.role()
    if role:
        yield role
    content, reasoning = chunks.content, chunks.reasoning
    for event in events:
        kind = type(event)
        if kind is ContentDelta:
            yield content(event.text)
        elif kind is ReasoningDelta:
            yield reasoning(event.text)
        elif kind is KeepAlive:
            yield protocol.KEEP_ALIVE_LINE
        elif kind is ToolCallDelta:
            yield chunks.tool_calls(event.calls)
        elif kind is Finished:
            yield chunks.finish(event.reason)
        elif kind is UsageReport:
            if chunks.include_usage:
                yield chunks.usage(event.usage)
        elif kind is Failure:
            failure = protocol.runtime_failure(event.message)
            yield protocol.sse_line(failure.body())
            break
    yield protocol.DONE_LINE


class AnswerSoFar:
    """The reply the events describe so far: what the JSON body, the KV commit and
    the RAG response cache each need, folded in one place."""

    def __init__(self):
        self._content, self._reasoning, self.calls = [], [], []
        self.finish, self.usage, self.failure = "stop", protocol.Usage(0, 0), None

    def add(self, event) -> None:
        kind = type(event)
        if kind is ContentDelta:
            self._content.append(event.text)
        elif kind is ReasoningDelta:
            self._reasoning.append(event.text)
        elif kind is ToolCallDelta:
            for delta in event.calls:
                merge_tool_call_delta(self.calls, delta)
        elif kind is Finished:
            self.finish = event.reason
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


def collect_body(events: Iterator, chunks: protocol.ChatChunks) -> dict:
    answer = AnswerSoFar()
    for event in events:
        answer.add(event)
        if answer.failure is not None:
            raise protocol.runtime_failure(answer.failure)
    return chunks.body(answer.content, answer.reasoning, answer.calls, answer.finish,
                       answer.usage)


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


# ----------------------------------------------------------------------------
# the server object: what one app instance owns


class Server:
    """Settings, registry and engine of one app, plus its shutdown state."""

    def __init__(self, settings: Settings, registry, engine):
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.shutting_down = False
        self._shutdown_lock = threading.Lock()
        self._shut_down = False

    def shut_down(self) -> None:
        """Abort running generations and free the runtimes; safe to call twice."""
        self.shutting_down = True
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
            log.info("shutting down: aborting generations and closing runtimes")
            self.engine.shutdown()

    def resolve_model(self, name: Optional[str]):
        info = self.registry.resolve(name) if name else self.registry.default_model()
        if info is None:
            raise protocol.model_not_found(name or "(default)")
        return info


def system_fingerprint(info) -> str:
    digest = hashlib.sha1(f"{SERVER_VERSION}:{info.id}:{info.device}".encode()).hexdigest()
    return "fp_" + digest[:10]


# ----------------------------------------------------------------------------
# serving a generation request


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


def start_generation(server: Server, info, run: RunRequest, conversation=None,
                     use_cache: str = ""):
    """engine.generate with the engine's refusals in OpenAI error terms."""
    import engine as engine_module
    job = engine_module.GenerationJob(model=info.id, run=run,
                                      request_id=protocol.new_response_id("req"),
                                      conversation=conversation, use_cache=use_cache)
    try:
        return server.engine.generate(job)
    except engine_module.ModelNotFound:
        raise protocol.model_not_found(info.id) from None
    except engine_module.CacheNotFound as exc:
        raise cache_not_found(exc) from None
    except (engine_module.QueueFull, engine_module.QueueTimeout) as exc:
        raise protocol.server_busy(str(exc) or "the server is busy, try again later",
                                   getattr(exc, "retry_after", 5)) from None
    except engine_module.ModelLoadFailed as exc:
        raise protocol.runtime_failure(f"the model could not be loaded: {exc}") from None


def respond(generation, chunks: protocol.ChatChunks, stream: bool, stops: tuple,
            transforms: list) -> Response:
    """Run the one pipeline and render it as SSE or as one JSON body."""
    stages = ([StopSequenceFilter(stops, generation.cancel)] if stops else []) + transforms
    events = run_pipeline(runtime_events(generation), stages)
    if not stream:
        with CancelUnlessComplete(generation, events) as run:
            body = collect_body(events, chunks)
            run.complete = True
        return jsonify(body)
    # Look at the first event before committing to a 200: a run that fails before
    # its first token still gets a proper 500 instead of an error event.
    with CancelUnlessComplete(generation, events) as run:
        first = next(events)
        if type(first) is Failure:
            raise protocol.runtime_failure(first.message)
        run.complete = True
    lines = render_sse(itertools.chain((first,), events), chunks)
    return Response(StreamBody(lines, generation, events), mimetype="text/event-stream",
                    headers=SSE_HEADERS)


class CancelUnlessComplete:
    """Abort the run when the block does not get to mark it complete (an exception,
    the client gone); a run that came to its end is left alone."""

    def __init__(self, generation, events):
        self.generation, self.events, self.complete = generation, events, False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if not self.complete:
            self.generation.cancel()
            self.events.close()
        return False


class StreamBody:
    """The WSGI body of a streamed reply. The server calls close() when it is done
    with it: after the last line, or early when the client went away (a failed
    write) -- even before the first line -- and then the run is aborted."""

    def __init__(self, lines: Iterator[str], generation, events):
        self._lines, self._generation, self._events = lines, generation, events
        self._complete = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._lines)
        except StopIteration:
            self._complete = True
            raise

    def close(self) -> None:
        if not self._complete:
            self._generation.cancel()
        self._lines.close()
        self._events.close()


# ----------------------------------------------------------------------------
# routes


def register_generation_routes(app: Flask, server: Server) -> None:
    settings = server.settings

    def chat_completions():
        req = protocol.parse_chat_request(json_body())
        info = server.resolve_model(req.model)
        task = classify_client(req)
        instant = instant_reply(server, req, info, task)
        if instant is not None:
            return instant
        thinking, messages = decide_thinking(req, info, policy_off=task.thinking_off)
        tool_spec, tools_prompt = parse_tools(req)
        retrieval = plan_retrieval(server, req, messages, info)
        cached = cached_reply(server, req, info, retrieval)
        if cached is not None:
            return cached
        thinking = thinking and not retrieval.thinking_off
        built = build_chat_prompt(server, retrieval.messages, req, info, tools_prompt)
        if task.background or retrieval.standalone:
            built = standalone_prompt(built)
        # The whole prompt, kept in the KV cache: the engine owns the KV plan and turns
        # this into a tail-only run when job.conversation matches what its cache holds
        # (a standalone turn, e.g. RAG or a background task, runs with keep_history=False).
        run = RunRequest(prompt=built.text, enable_thinking=thinking,
                         keep_history=not built.standalone,
                         max_new_tokens=answer_budget(req, settings, task),
                         sampling=req.sampling)
        use_cache = use_cache_field(server, req.body, info)
        generation = start_generation(server, info, run, conversation=built,
                                      use_cache=use_cache)
        chunks = protocol.ChatChunks(generation.model.id, system_fingerprint(info),
                                     req.include_usage and req.stream,
                                     legacy_functions=bool(tool_spec and tool_spec.legacy))
        transforms = chat_transforms(req, info, thinking, tool_spec)
        transforms.append(CommitAnswer(generation))
        if retrieval.cache_key is not None:
            transforms.append(CacheAnswer(rag_cache(server), retrieval.cache_key, generation))
        return sampling_header(generation, respond(generation, chunks, req.stream, req.stop,
                                                   transforms))

    def completions():
        req = protocol.parse_completion_request(json_body())
        info = server.resolve_model(req.model)
        built = build_completion_prompt(server, req, info)
        run = RunRequest(prompt=built.text, enable_thinking=False, keep_history=False,
                         max_new_tokens=req.max_tokens or settings.default_max_tokens,
                         sampling=req.sampling)
        generation = start_generation(server, info, run, conversation=built)
        chunks = protocol.CompletionChunks(generation.model.id, system_fingerprint(info),
                                           req.include_usage and req.stream)
        return sampling_header(generation,
                               respond(generation, chunks, req.stream, req.stop, []))

    for path in ("/v1/chat/completions", "/chat/completions"):
        app.add_url_rule(path, "chat_completions" + path, chat_completions, methods=["POST"])
    for path in ("/v1/completions", "/completions"):
        app.add_url_rule(path, "completions" + path, completions, methods=["POST"])


UNAPPLIED_SAMPLING_HEADER = "X-RKLLM-Sampling-Unapplied"


def sampling_header(generation, response: Response) -> Response:
    """Name the request's sampling fields the runtime could not apply (librkllmrt 1.2
    fixes sampling at load; no NPU runtime has a seed): the request still succeeds."""
    unapplied = getattr(generation, "unapplied_sampling", ())
    if not unapplied and generation.result is not None:
        unapplied = generation.result.unapplied_sampling
    if unapplied:
        response.headers[UNAPPLIED_SAMPLING_HEADER] = ",".join(unapplied)
    # How the KV cache served the run (known here for non-streamed replies only).
    prefilled = getattr(generation, "prefilled_tokens", None)
    if prefilled is not None:
        response.headers["X-RKLLM-Prefill-Tokens"] = str(prefilled)
        response.headers["X-RKLLM-KV"] = getattr(generation, "kv_mode", "") or "-"
    return response


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
                self.generation.commit_answer(answer.content, answer.calls or None)
            yield event


def use_cache_field(server: Server, body: dict, info) -> str:
    """The request's `use_cache` (a named prompt cache of this model), checked now so a
    bad or unknown name is a 400/404 before the run."""
    name = body.get("use_cache")
    if name is None or name == "":
        return ""
    import engine as engine_module
    import kvcache
    try:
        server.engine.prompt_cache(info.id, name)
    except kvcache.CacheNameError as exc:
        raise RequestError(str(exc), param="use_cache") from None
    except engine_module.CacheNotFound as exc:
        raise cache_not_found(exc) from None
    return name


def cache_not_found(exc) -> RequestError:
    return RequestError(str(exc), status=404, param="use_cache", code="cache_not_found")


def decide_thinking(req: protocol.ChatRequest, info, policy_off: bool = False) -> tuple:
    """(enable_thinking, messages): thinking.py decides from the model's capability
    and the request (chat_template_kwargs.enable_thinking, reasoning_effort, /think
    and /no_think in the last user message, which are removed from the prompt).
    policy_off: the server turns it off (background tasks, Home Assistant)."""
    import thinking
    messages = req.messages
    last_user = next((i for i in range(len(messages) - 1, -1, -1)
                      if messages[i]["role"] == "user"), None)
    last_text = messages[last_user]["content"] if last_user is not None else ""
    try:
        enable, cleaned = thinking.resolve_thinking(
            "thinking" in info.capabilities, req.body, last_text or "", policy_off=policy_off)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if last_user is not None and cleaned != last_text:
        messages = list(messages)
        messages[last_user] = dict(messages[last_user], content=cleaned)
    return enable, messages


class ThinkingTransform:
    """Stream transform: <think> blocks become reasoning deltas (thinking.py).
    starts_inside: thinking is on, and some templates open the block themselves."""

    def __init__(self, starts_inside: bool = False):
        self.starts_inside = starts_inside

    def __call__(self, events: Iterator) -> Iterator:
        import thinking
        splitter = thinking.ThinkSplitter(starts_inside=self.starts_inside)
        reasoning_kind = thinking.REASONING

        def deltas(pairs):
            for kind, text in pairs:
                yield ReasoningDelta(text) if kind == reasoning_kind else ContentDelta(text)

        for event in events:
            kind = type(event)
            if kind is ContentDelta:
                yield from deltas(splitter.feed(event.text))
            else:
                if kind is Finished or kind is Failure:
                    yield from deltas(splitter.finish())
                yield event


split_thinking = ThinkingTransform()


def chat_transforms(req: protocol.ChatRequest, info, thinking: bool, tool_spec) -> list:
    """The stream transforms a chat reply passes through, after stop sequences.
    A model that can think gets the think splitter even with thinking off: such
    models may still print an empty <think></think> pair."""
    transforms = []
    if "thinking" in info.capabilities:
        transforms.append(ThinkingTransform(starts_inside=thinking))
    if tool_spec is not None and tool_spec.choice != "none":
        transforms.append(ToolCallTransform(tool_spec))
    return transforms


def parse_tools(req: protocol.ChatRequest):
    """(tools.ToolSpec or None, the prompt text describing the tools)."""
    if not (req.tools or req.body.get("functions")):
        return None, ""
    import tools
    try:
        spec = tools.parse_tool_request(req.body)
    except ValueError as exc:
        raise RequestError(str(exc), param="tools") from None
    return spec, (tools.render_tools_prompt(spec) if spec is not None else "")


class ToolCallTransform:
    """Stream transform: tool calls the model writes as text become tool-call
    deltas (tools.py), and finish_reason becomes "tool_calls" when there are any."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, events: Iterator) -> Iterator:
        import tools
        parser = tools.ToolCallParser(self.spec)
        for event in events:
            kind = type(event)
            if kind is ContentDelta:
                yield from self._deltas(parser.feed(event.text))
                continue
            if kind is Finished or kind is Failure:
                yield from self._deltas(parser.finish())
                if kind is Finished and parser.calls:
                    event = Finished("function_call" if self.spec.legacy else "tool_calls")
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


# ----------------------------------------------------------------------------
# client integrations: Open WebUI background tasks and Home Assistant (clients.py),
# retrieved context and its response cache (rag.py). They decide what runs and how;
# replies without a model run go through the same two renderings as the pipeline.


def classify_client(req: protocol.ChatRequest):
    """Who asks: an Open WebUI background task, Home Assistant, or a person chatting."""
    import clients
    return clients.classify(req.messages, req.tools, req.body.get("functions"))


def answer_budget(req: protocol.ChatRequest, settings: Settings, task) -> int:
    """max_new_tokens: the request's (or the default), capped for a background task
    so a rambling model cannot hold the device for housekeeping."""
    import clients
    wanted = req.max_tokens or settings.default_max_tokens
    budget = clients.task_budget(task.kind)
    return min(wanted, budget) if budget else wanted


def standalone_prompt(built):
    """A turn that must not disturb the conversation's KV state (a background task, a
    RAG turn): run with keep_history=False, its answer never remembered."""
    from dataclasses import replace
    return replace(built, standalone=True)


def canned_events(content: str, reasoning: str, usage: protocol.Usage) -> Iterator:
    """A finished answer as pipeline events, for replies that need no model run."""
    if reasoning:
        yield ReasoningDelta(reasoning)
    if content:
        yield ContentDelta(content)
    yield Finished("stop")
    yield UsageReport(usage)


def estimated_usage(messages: list, answer: str) -> protocol.Usage:
    """Token counts of a reply the model did not write: the project's estimate."""
    import prompts
    prompt_text = "\n".join(m.get("content") or "" for m in messages)
    return protocol.Usage(prompts.estimate_tokens(prompt_text), prompts.estimate_tokens(answer))


def respond_canned(req: protocol.ChatRequest, info, content: str, reasoning: str,
                   usage: protocol.Usage) -> Response:
    """respond() for an answer already known: the same renderings, no generation."""
    chunks = protocol.ChatChunks(info.id, system_fingerprint(info),
                                 req.include_usage and req.stream)
    events = canned_events(content, reasoning, usage)
    if not req.stream:
        return jsonify(collect_body(events, chunks))
    return Response(render_sse(events, chunks), mimetype="text/event-stream",
                    headers=SSE_HEADERS)


def instant_reply(server: Server, req: protocol.ChatRequest, info, task) -> Optional[Response]:
    """An Open WebUI background task answered without the model (title, tags,
    queries; each shortcut can be switched off in settings), or None."""
    if not task.background:
        return None
    import clients
    answer = clients.instant_answer(task, server.settings)
    if answer is None:
        return None
    return respond_canned(req, info, answer, "", estimated_usage(req.messages, answer))


class RetrievalTurn:
    """rag.plan_turn's outcome for one request: the messages to answer and, for a
    turn that uses the sources, its response-cache key (None: no caching)."""

    def __init__(self, plan, messages: list, cache_key: Optional[str] = None):
        self.plan, self.messages, self.cache_key = plan, messages, cache_key

    @property
    def standalone(self) -> bool:
        """The sources are used: the turn is self-contained (sources + question)."""
        return self.plan is not None and self.plan.use_sources

    @property
    def thinking_off(self) -> bool:
        return self.standalone and self.plan.disable_thinking


def plan_retrieval(server: Server, req: protocol.ChatRequest, messages: list,
                   info) -> RetrievalTurn:
    """Retrieved context in the request: the cleaned reading-comprehension turn, the
    chat without the sources (a "thanks" or an off-topic follow-up), or no change."""
    import rag
    from datetime import date
    plan = rag.plan_turn(messages, context_length=info.context_length, today=date.today(),
                         settings=server.settings)
    if plan is None:
        return RetrievalTurn(None, messages)
    if not plan.use_sources:
        return RetrievalTurn(plan, plan.messages)
    turn = [{"role": "system", "content": plan.prompt.system},
            {"role": "user", "content": plan.prompt.user}]
    cache = rag_cache(server)
    # A stop sequence may cut an answer short for its own request only.
    key = None
    if cache.enabled and not req.stop:
        key = cache.key(info.id, plan.prompt.context_hash, plan.rag.question)
    return RetrievalTurn(plan, turn, key)


def cached_reply(server: Server, req: protocol.ChatRequest, info,
                 retrieval: RetrievalTurn) -> Optional[Response]:
    """The same question over the same cleaned sources: the stored answer, no run."""
    if retrieval.cache_key is None:
        return None
    hit = rag_cache(server).get(retrieval.cache_key)
    if hit is None:
        return None
    usage = estimated_usage(retrieval.messages, hit["content"])
    return respond_canned(req, info, hit["content"], hit["reasoning"], usage)


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
                and getattr(self.generation, "stop_cause", None) is None)


def rag_cache(server: Server):
    """The app's RAG response cache, made on first use (dict.setdefault is atomic,
    so two request threads cannot end up with two caches)."""
    cache = vars(server).get("rag_cache")
    if cache is None:
        import rag
        cache = vars(server).setdefault("rag_cache",
                                        rag.ResponseCache.from_settings(server.settings))
    return cache


def build_chat_prompt(server: Server, messages: list, req: protocol.ChatRequest, info,
                      tools_prompt: str = ""):
    import prompts
    try:
        return _prompt_builder(server).build_chat(
            messages, context_length=info.context_length, tools_prompt=tools_prompt,
            max_new_tokens=req.max_tokens or server.settings.default_max_tokens)
    except prompts.PromptTooLong as exc:
        raise RequestError(str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:
        raise RequestError(str(exc), param="messages") from None


def build_completion_prompt(server: Server, req: protocol.CompletionRequest, info):
    import prompts
    try:
        return _prompt_builder(server).build_completion(
            req.prompt, context_length=info.context_length,
            max_new_tokens=req.max_tokens or server.settings.default_max_tokens)
    except prompts.PromptTooLong as exc:
        raise RequestError(str(exc), param="prompt", code="context_length_exceeded") from None
    except ValueError as exc:
        raise RequestError(str(exc), param="prompt") from None


def _prompt_builder(server: Server):
    builder = getattr(server, "prompt_builder", None)
    if builder is None:
        import prompts
        builder = server.prompt_builder = prompts.PromptBuilder(server.settings)
    return builder


def register_model_routes(app: Flask, server: Server) -> None:
    import engine as engine_module

    @app.get("/v1/models")
    def list_models():
        return jsonify(protocol.model_list(server.registry.models()))

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id):
        info = server.registry.resolve(model_id)
        if info is None:
            raise protocol.model_not_found(model_id)
        return jsonify(protocol.model_card(info))

    @app.post("/v1/models/select")
    def select_model():
        name = protocol.model_field(json_body(), required=True)
        info = server.resolve_model(name)
        started = time.monotonic()
        try:
            loaded = server.engine.load(info.id)
        except engine_module.ModelNotFound:
            raise protocol.model_not_found(name) from None
        except (engine_module.QueueFull, engine_module.QueueTimeout) as exc:
            raise protocol.server_busy(str(exc) or "the device is busy",
                                       getattr(exc, "retry_after", 5)) from None
        except engine_module.ModelLoadFailed as exc:
            raise protocol.runtime_failure(f"the model could not be loaded: {exc}") from None
        return jsonify({"status": "ok", "model": loaded.id, "device": loaded.device,
                        "load_seconds": round(time.monotonic() - started, 3)})

    @app.post("/v1/models/unload")
    def unload_model():
        name = protocol.model_field(json_body(required=False), required=False)
        if name is not None:
            name = server.resolve_model(name).id
        return jsonify({"status": "ok", "unloaded": server.engine.unload(name)})


def register_cache_routes(app: Flask, server: Server) -> None:
    """Named prompt caches: prefill a prompt once, save its KV state, load it before a
    chat with `use_cache` (kvcache.py; files confined to the cache directory)."""
    import engine as engine_module
    import kvcache

    def guarded(action):
        try:
            return action()
        except kvcache.CacheNameError as exc:
            raise RequestError(str(exc), param="name") from None
        except engine_module.ModelNotFound as exc:
            raise protocol.model_not_found(exc.model) from None
        except engine_module.CacheNotFound as exc:
            raise cache_not_found(exc) from None
        except (engine_module.QueueFull, engine_module.QueueTimeout) as exc:
            raise protocol.server_busy(str(exc), getattr(exc, "retry_after", 5)) from None
        except engine_module.EngineError as exc:
            raise protocol.runtime_failure(str(exc)) from None

    def cache_prompt(body, info) -> str:
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        if isinstance(body.get("prompt"), str) and body["prompt"].strip():
            import prompts
            return prompts.strip_special_tokens(body["prompt"])
        if "messages" in body:
            import prompts
            try:
                return _prompt_builder(server).build_chat(
                    body["messages"], context_length=info.context_length).text
            except ValueError as exc:
                raise RequestError(str(exc), param="messages") from None
        raise RequestError("give a non-empty 'prompt' string or 'messages'", param="prompt")

    @app.post("/v1/cache/<path:model>")
    def create_cache(model):
        body = json_body()
        model, _, name = model.partition("/")
        name = name or (body.get("cache_name") or body.get("name") if isinstance(body, dict)
                        else None)
        if not name:
            raise RequestError("name the cache: /v1/cache/<model>/<name>", param="name")
        info = server.resolve_model(model)
        guarded(lambda: kvcache.check_cache_name(name))
        prompt = guarded(lambda: cache_prompt(body, info))
        started = time.monotonic()
        cache = guarded(lambda: server.engine.save_prompt_cache(info.id, name, prompt))
        return jsonify({**cache.as_dict(), "object": "cache.created",
                        "seconds": round(time.monotonic() - started, 3)}), 201

    @app.get("/v1/cache/<path:model>")
    def read_cache(model):
        model, _, name = model.partition("/")
        info = server.resolve_model(model)
        if not name:
            caches = guarded(lambda: server.engine.prompt_caches(info.id))
            return jsonify({"object": "list", "data": [c.as_dict() for c in caches]})
        return jsonify(guarded(lambda: server.engine.prompt_cache(info.id, name)).as_dict())

    @app.delete("/v1/cache/<path:model>")
    def delete_cache(model):
        model, _, name = model.partition("/")
        info = server.resolve_model(model)
        if not name:
            raise RequestError("name the cache: /v1/cache/<model>/<name>", param="name")
        guarded(lambda: server.engine.delete_prompt_cache(info.id, name))
        return jsonify({"object": "cache.deleted", "model": info.id, "name": name,
                        "deleted": True})


def register_status_routes(app: Flask, server: Server) -> None:
    @app.get("/health")
    def health():
        report = {"status": "shutting_down" if server.shutting_down else "ok",
                  "version": SERVER_VERSION}
        report.update(server.engine.health())
        return jsonify(report)

    @app.get("/ready")
    def ready():
        if server.shutting_down:
            return jsonify({"ready": False, "reason": "shutting down"}), 503
        return jsonify({"ready": True})


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def request_error(exc: RequestError):
        return jsonify(exc.body()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = exc.description or exc.name
        if exc.code == 413:
            message = "the request body is larger than the server accepts"
        kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
        body = protocol.error_body(message, type=kind, code=codes.get(exc.code))
        return jsonify(body), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = protocol.error_body(f"internal error: {exc}", type="server_error",
                                   code="internal_error")
        return jsonify(body), 500


# ----------------------------------------------------------------------------
# the app


def create_app(settings: Optional[Settings] = None, *, registry=None, engine=None) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging(settings)
    if registry is None:
        from registry import Registry
        registry = Registry(settings)
    if engine is None:
        from engine import Engine
        engine = Engine(settings, registry)
        engine.start()
    server = Server(settings, registry, engine)
    app = Flask("rkllm-api")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    app.extensions[APP_EXTENSION] = server
    CORS(app)
    register_error_handlers(app)
    register_generation_routes(app, server)
    register_model_routes(app, server)
    register_cache_routes(app, server)
    register_status_routes(app, server)
    log.info("rkllm-api %s ready: models root %s", SERVER_VERSION, settings.models_root_path)
    return app


def server_of(app: Flask) -> Server:
    return app.extensions[APP_EXTENSION]


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """stderr plus, when settings.log_file is set, a rotating file (10 MB x 3).
    Replaces the handlers an earlier create_app installed, never others'."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "rkllm_api", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(sys.stderr)]
    if settings.log_file:
        path = os.path.expanduser(settings.log_file)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            path, maxBytes=10 * 1024 * 1024, backupCount=3, encoding="utf-8"))
    for handler in handlers:
        handler.rkllm_api = True
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


# ----------------------------------------------------------------------------
# gunicorn hooks (referenced by gunicorn.conf.py) and the rkllm-api command


def on_worker_started(worker) -> None:
    """post_worker_init: on SIGTERM, abort generations at once so the streams end
    and the worker can exit well inside the graceful timeout."""
    server = server_of(worker.wsgi)
    stop_worker = worker.handle_exit

    def handle_sigterm(sig, frame):
        server.shutting_down = True
        threading.Thread(target=server.shut_down, name="rkllm-shutdown", daemon=True).start()
        stop_worker(sig, frame)

    worker.handle_exit = handle_sigterm
    signal.signal(signal.SIGTERM, handle_sigterm)


def on_worker_exit(worker) -> None:
    """worker_exit: free the runtimes (again a no-op after a SIGTERM shutdown)."""
    wsgi = getattr(worker, "wsgi", None)
    if isinstance(wsgi, Flask) and APP_EXTENSION in wsgi.extensions:
        server_of(wsgi).shut_down()


# main() hands its options to create_app() in the worker through these variables.
_OPTION_ENV = {"host": "RKLLM_API_HOST", "port": "RKLLM_API_PORT",
               "models_root": "RKLLM_MODELS_ROOT", "threads": "RKLLM_API_THREADS"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rkllm-api", description="OpenAI-compatible LLM server for Rockchip NPU boards")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; "
                                       "use 0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--models-root", help="folder holding one sub-folder per model")
    parser.add_argument("--threads", type=int, help="request threads (default 8)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from gunicorn.app.base import BaseApplication

    args = parse_args(argv)
    for option, variable in _OPTION_ENV.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[variable] = str(value)
    import gunicorn_settings
    options = gunicorn_settings.options()

    class RkllmApiServer(BaseApplication):
        def load_config(self):
            for name, value in options.items():
                if name in self.cfg.settings and name != "wsgi_app":
                    self.cfg.set(name, value)

        def load(self):
            return create_app()

    RkllmApiServer().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
