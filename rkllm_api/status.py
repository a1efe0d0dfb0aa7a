"""The status surface: liveness and readiness (metrics and the page come later)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from rkllm_api.chat import SERVER_VERSION
from rkllm_api.server import current_server

blueprint = Blueprint("status", __name__)


@blueprint.get("/health")
def health():
    server = current_server()
    report = {"status": "shutting_down" if server.shutting_down else "ok",
              "version": SERVER_VERSION}
    report.update(server.engine.health())
    return jsonify(report)


@blueprint.get("/ready")
def ready():
    if current_server().shutting_down:
        return jsonify({"ready": False, "reason": "shutting down"}), 503
    return jsonify({"ready": True})
