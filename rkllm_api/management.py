"""The management surface: models (list, select, unload) and named prompt caches
(prefill a prompt once, save its KV state, start chats from it with `use_cache`).

Engine refusals are not caught here: the app's error table (rkllm_api/errors.py)
turns them into statuses."""
from __future__ import annotations

import time

from flask import Blueprint, jsonify

from rkllm_api.engine import kvcache
from rkllm_api.errors import RequestError
from rkllm_api.models import adapters
from rkllm_api.openai import protocol
from rkllm_api.responses import json_body
from rkllm_api.security import admin_only
from rkllm_api.server import current_server
from rkllm_api.text import prompts

blueprint = Blueprint("management", __name__)


@blueprint.get("/v1/models")
@blueprint.get("/models")   # the seed server's path; clients configured without /v1 use it
def list_models():
    models = current_server().registry.models()
    body = protocol.model_list(models)
    body["data"] += [adapter_card(info, adapter) for info in models
                     for adapter in adapters.of(info)]
    return jsonify(body)


def adapter_card(info, adapter) -> dict:
    """A LoRA adapter as a model of its own: `<model>:<adapter>`, pickable by that id."""
    card = protocol.model_card(info)
    card.update(id=adapters.adapter_id(info.id, adapter.name), aliases=[], parent=info.id,
                lora={"name": adapter.name, "scale": adapter.scale})
    return card


@blueprint.get("/v1/models/<path:model_id>")
def get_model(model_id):
    server = current_server()
    info = server.registry.resolve(model_id)
    if info is not None:
        return jsonify(protocol.model_card(info))
    info, adapter = server.chat.resolve_model_and_adapter(model_id)
    return jsonify(adapter_card(info, adapters.find(info, adapter[0])))


@blueprint.post("/v1/models/select")
@admin_only
def select_model():
    server = current_server()
    name = protocol.model_field(json_body(), required=True)
    info = server.chat.resolve_model(name)
    started = time.monotonic()
    loaded = server.engine.load(info.id)
    return jsonify({"status": "ok", "model": loaded.id, "device": loaded.device,
                    "load_seconds": round(time.monotonic() - started, 3)})


@blueprint.post("/v1/models/unload")
@admin_only
def unload_model():
    server = current_server()
    name = protocol.model_field(json_body(required=False), required=False)
    if name is not None:
        name = server.chat.resolve_model(name).id
    return jsonify({"status": "ok", "unloaded": server.engine.unload(name)})


def _cache_prompt(body, info) -> str:
    """The text a named cache holds: `prompt` as it is, or `messages` as a prompt."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    if isinstance(body.get("prompt"), str) and body["prompt"].strip():
        return prompts.strip_special_tokens(body["prompt"])
    if "messages" in body:
        messages = protocol.parse_messages(body["messages"])
        return current_server().chat.prompt_builder.build_chat(
            messages, context_length=info.context_length).text
    raise RequestError("give a non-empty 'prompt' string or 'messages'", param="prompt")


def _split(model_and_name: str) -> tuple:
    model, _, name = model_and_name.partition("/")
    return model, name


@blueprint.post("/v1/cache/<path:model>")
@admin_only
def create_cache(model):
    server = current_server()
    body = json_body()
    model, name = _split(model)
    if not name and isinstance(body, dict):
        name = body.get("cache_name") or body.get("name")
    if not name:
        raise RequestError("name the cache: /v1/cache/<model>/<name>", param="name")
    info = server.chat.resolve_model(model)
    kvcache.check_cache_name(name)
    prompt = _cache_prompt(body, info)
    started = time.monotonic()
    cache = server.engine.save_prompt_cache(info.id, name, prompt)
    return jsonify({**cache.as_dict(), "object": "cache.created",
                    "seconds": round(time.monotonic() - started, 3)}), 201


@blueprint.get("/v1/cache/<path:model>")
def read_cache(model):
    server = current_server()
    model, name = _split(model)
    info = server.chat.resolve_model(model)
    if not name:
        caches = server.engine.prompt_caches(info.id)
        return jsonify({"object": "list", "data": [c.as_dict() for c in caches]})
    return jsonify(server.engine.prompt_cache(info.id, name).as_dict())


@blueprint.delete("/v1/cache/<path:model>")
@admin_only
def delete_cache(model):
    server = current_server()
    model, name = _split(model)
    info = server.chat.resolve_model(model)
    if not name:
        raise RequestError("name the cache: /v1/cache/<model>/<name>", param="name")
    server.engine.delete_prompt_cache(info.id, name)
    return jsonify({"object": "cache.deleted", "model": info.id, "name": name,
                    "deleted": True})
