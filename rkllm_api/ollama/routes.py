"""The Ollama surface: Ollama's HTTP API (docs/api.md) over the same request path as
the OpenAI surface (rkllm_api/chat.py), rendered by render.py.

    GET/HEAD /            "Ollama is running" (rkllm_api/page.py: the page for browsers)
    GET  /api/version     the Ollama API release this surface follows
    GET  /api/tags        the models (models root + bundled model), as name:latest
    POST /api/show        details, parameters, capabilities, model_info
    GET  /api/ps          loaded models, their memory and when they unload
    POST /api/chat        chat; NDJSON stream by default, one object with stream:false
    POST /api/generate    one prompt (system, images, raw); an empty prompt loads
                          the model, with keep_alive 0 unloads it (as /api/chat
                          with no messages)
    POST /api/embed       embeddings of one or many inputs (/api/embeddings: legacy)

/api/pull is rkllm_api/pull.py's (downloads from a model hub). Models are not created,
copied, pushed or deleted through this API: every other /api/ path answers 404 in
Ollama's error format. keep_alive applies once the answer is complete
(engine.keep_alive).
"""
from __future__ import annotations

import itertools
import logging
import time

from flask import Blueprint, Response, jsonify, request

from rkllm_api import pipeline
from rkllm_api.errors import RequestError, runtime_failure
from rkllm_api.fields import optional_bool
from rkllm_api.logs import note_reply
from rkllm_api.ollama import models, protocol
from rkllm_api.ollama.render import OllamaAnswer, body_of, collect, render_ndjson
from rkllm_api.request import CompletionRequest
from rkllm_api.responses import CancelUnlessComplete, StreamBody, caller, coalesced, json_body
from rkllm_api.server import current_server

log = logging.getLogger(__name__)

blueprint = Blueprint("ollama", __name__)

# The Ollama release whose API this surface follows (thinking, streamed tool calls,
# structured outputs, /api/ps context_length); clients compare it as numbers.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
_ENDPOINTS = ("/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat",
              "/api/generate", "/api/embed", "/api/embeddings", "/api/pull")


def _body() -> dict:
    body = json_body(required=False, any_content_type=True)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def resolve_name(name: str):
    """A model by its Ollama name (protocol.name_candidates); 404 in Ollama's words."""
    registry = current_server().registry
    for candidate in protocol.name_candidates(name):
        info = registry.resolve(candidate)
        if info is not None:
            return info
    raise RequestError(f'model "{name}" not found; the models are listed at /api/tags',
                       status=404, param="model", code="model_not_found")


def _keep_alive(engine, model_id: str, seconds) -> None:
    """Apply a request's keep_alive once its answer is complete; never fails the answer.
    (The engine is passed in: a stream ends outside the request's app context.)"""
    try:
        engine.keep_alive(model_id, seconds)
    except Exception as exc:
        log.warning("keep_alive for %s failed: %s", model_id, exc)


# ---------------------------------------------------------------------------- status

@blueprint.get("/api/version")
def version():
    return jsonify({"version": OLLAMA_API_VERSION})


@blueprint.get("/api/tags")
def tags():
    infos = [info for info in current_server().registry.models() if info.available]
    return jsonify({"models": [models.tag_entry(info) for info in infos]})


@blueprint.post("/api/show")
def show():
    return jsonify(models.show(resolve_name(protocol.model_name(_body()))))


@blueprint.get("/api/ps")
def ps():
    resident = current_server().engine.resident_models()
    return jsonify({"models": [models.running_entry(info, device, left)
                               for info, device, left in resident]})


@blueprint.route("/api/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
def unsupported(rest):
    path = f"/api/{rest}"
    if path in _ENDPOINTS:
        raise RequestError(f"{request.method} is not allowed on {path}", status=405)
    raise RequestError(f"{path} is not supported: models come from the models folder "
                       f"(or /api/pull) and are not created, copied, pushed or deleted "
                       f"through this API", status=404)


# ---------------------------------------------------------------------------- generation

@blueprint.post("/api/chat")
def chat():
    started = time.monotonic()
    body = _body()
    info = resolve_name(protocol.model_name(body))
    call = protocol.parse_chat(body, info.id)
    answer = OllamaAnswer(call.name, "chat", started)
    if call.request is None:
        return _load_or_unload(info, call.keep_alive, answer)
    reply = current_server().chat.chat(call.request, caller())
    return _respond(reply, answer, call.request.stream, info.id, call.keep_alive)


@blueprint.post("/api/generate")
def generate():
    started = time.monotonic()
    body = _body()
    info = resolve_name(protocol.model_name(body))
    call = protocol.parse_generate(body, info.id)
    answer = OllamaAnswer(call.name, "generate", started)
    if call.request is None:
        return _load_or_unload(info, call.keep_alive, answer)
    service = current_server().chat
    if isinstance(call.request, CompletionRequest):
        reply = service.complete(call.request, caller())
    else:
        reply = service.chat(call.request, caller())
    return _respond(reply, answer, call.request.stream, info.id, call.keep_alive)


def _load_or_unload(info, keep_alive, answer: OllamaAnswer) -> Response:
    engine = current_server().engine
    if keep_alive == 0:
        engine.unload(info.id)
        return jsonify(answer.status("unload"))
    engine.load(info.id)
    _keep_alive(engine, info.id, keep_alive)
    return jsonify(answer.status("load"))


def _respond(reply, answer: OllamaAnswer, stream: bool, model_id: str, keep_alive) -> Response:
    note_reply(reply)   # for the access log line
    engine = current_server().engine
    events = reply.events
    if not stream:
        with CancelUnlessComplete(reply) as run:
            folded = collect(events)
            if folded.failure is not None:
                raise runtime_failure(folded.failure)
            run.complete = True
        _keep_alive(engine, model_id, keep_alive)
        return _with_headers(jsonify(body_of(folded, answer)), reply)
    # A run that fails before its first piece still gets a proper status.
    with CancelUnlessComplete(reply) as run:
        first = next(events)
        while type(first) in (pipeline.Flush, pipeline.KeepAlive):
            first = next(events)
        if type(first) is pipeline.Failure:
            raise runtime_failure(first.message)
        run.complete = True
    lines = _then(coalesced(render_ndjson(itertools.chain((first,), events), answer)),
                  lambda: _keep_alive(engine, model_id, keep_alive))
    return _with_headers(Response(StreamBody(lines, reply), mimetype=NDJSON), reply,
                         streamed=True)


def _then(lines, after):
    """The lines, then `after()` once the last one is out (or the client left)."""
    try:
        yield from lines
    finally:
        after()


def _with_headers(response: Response, reply, streamed: bool = False) -> Response:
    response.headers.update(reply.headers(streamed))
    return response


# ---------------------------------------------------------------------------- embeddings

@blueprint.post("/api/embed")
def embed():
    return jsonify(_embed(legacy=False))


@blueprint.post("/api/embeddings")
def embeddings():
    return jsonify(_embed(legacy=True))


def _embed(legacy: bool) -> dict:
    started = time.monotonic()
    body = _body()
    name = protocol.model_name(body)
    info = resolve_name(name)
    texts = protocol.embed_inputs(body, legacy, current_server().settings.embed_max_inputs)
    dimensions = protocol.dimensions(body)
    truncate = optional_bool(body, "truncate", True)
    alive = protocol.keep_alive(body)
    engine = current_server().engine
    if legacy and not texts[0]:
        return {"embedding": []}
    resident, loading = info.id in engine.loaded_models(), time.monotonic()
    engine.load(info.id)
    load_seconds = 0.0 if resident else time.monotonic() - loading
    who = caller()
    result = engine.embed(info.id, texts, dimensions=dimensions, truncate=truncate,
                          arrival=who.arrival, client_gone=who.gone)
    _keep_alive(engine, info.id, alive)
    if legacy:
        return {"embedding": result.vectors[0]}
    return {"model": name, "embeddings": result.vectors,
            "total_duration": int((time.monotonic() - started) * 1e9),
            "load_duration": int(load_seconds * 1e9),
            "prompt_eval_count": result.prompt_tokens}
