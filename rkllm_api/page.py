"""The page at `/`: a look at the server and a quick chat, for a browser.

Plain HTML, CSS and JavaScript from rkllm_api/page_files/ (nothing from a CDN: a
board may be offline). The page calls the same API as any client: /v1/models,
/v1/chat/completions, and /ui/status (devices, the last runs from the metrics
module, NPU load), with a key when keys are set. It is same-origin only: its
Content-Security-Policy lets it talk to nothing but this server and no other site
may frame it.

`GET /` answers a browser (one that asks for text/html) with the page and anything
else with Ollama's "Ollama is running", which Ollama clients check.
"""
from __future__ import annotations

import os

from flask import Blueprint, Response, jsonify, request, send_from_directory

from rkllm_api import doctor
from rkllm_api.chat import SERVER_VERSION
from rkllm_api.metrics import KV_HITS
from rkllm_api.security import public
from rkllm_api.server import current_server

FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page_files")
ASSETS = {"app.js", "app.css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
blueprint = Blueprint("page", __name__)


def wants_html() -> bool:
    accepted = request.accept_mimetypes
    return accepted.best_match(["text/html", "text/plain"]) == "text/html" and \
        accepted["text/html"] > accepted["text/plain"]


@blueprint.get("/")
@public
def index():
    if not wants_html():
        return Response("Ollama is running", mimetype="text/plain")
    response = send_from_directory(FILES, "index.html", max_age=0)
    response.headers.update(SECURITY_HEADERS)
    return response


@blueprint.get("/ui/<name>")
@public
def asset(name):
    if name not in ASSETS:
        return Response("not found", status=404, mimetype="text/plain")
    response = send_from_directory(FILES, name, max_age=0)
    response.headers.update(SECURITY_HEADERS)
    return response


@blueprint.get("/ui/status")
def status():
    """What the page shows besides the models: devices and queues, the last runs,
    NPU load per core ({} without the rknpu load file)."""
    server = current_server()
    health = server.engine.health()
    observer = getattr(server.engine, "observer", None)
    recent = getattr(observer, "recent_runs", lambda: None)()
    return jsonify({
        "version": SERVER_VERSION,
        "shutting_down": server.shutting_down,
        "devices": {name: {k: d[k] for k in ("model", "busy", "queue_length", "idle_seconds")}
                    for name, d in health["devices"].items()},
        "recent": None if recent is None else [run_row(r) for r in recent],
        "npu_load": {str(core): load for core, load in
                     sorted(doctor.npu_load(server.settings.system_root).items())},
    })


def run_row(report) -> dict:
    """One finished run for the page: tokens/s of decoding and prompt tokens the KV
    cache saved from prefill."""
    rate = report.generated_tokens / report.decode_seconds if report.decode_seconds > 0 else None
    saved = report.reused_tokens if report.kv_mode in KV_HITS else 0
    return {"model": report.model, "device": report.device, "finish": report.finish,
            "prompt_tokens": report.prompt_tokens, "generated_tokens": report.generated_tokens,
            "tokens_per_second": round(rate, 1) if rate is not None else None,
            "prefill_tokens_saved": saved}
