"""The status surface: liveness and readiness (/metrics is metrics.py's)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from rkllm_api.chat import SERVER_VERSION
from rkllm_api.security import public
from rkllm_api.server import current_server

blueprint = Blueprint("status", __name__)


@blueprint.get("/health")
@public
def health():
    server = current_server()
    report = {"status": "shutting_down" if server.shutting_down else "ok",
              "version": SERVER_VERSION}
    engine = server.engine.health()
    report.update(seed_keys(engine, server.registry.models()))
    report.update(engine)
    report["checks"] = check_levels(server.checks)
    return jsonify(report)


def seed_keys(engine: dict, models: list) -> dict:
    """The keys the seed server's /health had, for monitoring that expects them: the
    model in use (the busy device's, else the NPU's, else the CPU's), whether one is
    loaded, how many models can be served, and a running request id."""
    devices = sorted(engine["devices"].values(), key=lambda d: not d["busy"])
    current = next((d["model"] for d in devices if d["model"]), None)
    return {"current_model": current, "model_loaded": current is not None,
            "models_available": sum(1 for m in models if m.available),
            "active_request": (engine["active_requests"] or [None])[0]}


_SEVERITY = ("ok", "info", "warn", "error")


def check_levels(checks) -> dict:
    """The startup checks as {subject: worst level} (details, with paths, are in the
    log and in `rkllm-api doctor`)."""
    if checks is None:
        return {}
    levels = {}
    for finding in checks.findings:
        worst = levels.get(finding.subject, "ok")
        levels[finding.subject] = max(worst, finding.level, key=_SEVERITY.index)
    return levels


@blueprint.get("/ready")
@public
def ready():
    if current_server().shutting_down:
        return jsonify({"ready": False, "reason": "shutting down"}), 503
    return jsonify({"ready": True})
