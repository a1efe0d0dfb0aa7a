"""Pulling models over HTTP: `POST /api/pull` (Ollama's NDJSON progress objects, or
one object with `"stream": false`), `POST /v1/models/pull` (the same objects as SSE)
and `DELETE /v1/models/<id>` (remove a pulled model). All three manage the server:
they need an admin key once keys are set.

One pull runs per model spec in a background thread (rkllm_api/models/hub.py does
the work); a second request for the same spec joins it and sees every event from
the first. A client that goes away does not stop the pull.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from typing import Iterator, Optional

from flask import Blueprint, Response, current_app, jsonify, stream_with_context

from rkllm_api.errors import RequestError, model_not_found
from rkllm_api.fields import optional_bool
from rkllm_api.models import hub
from rkllm_api.ollama.routes import resolve_name
from rkllm_api.responses import json_body
from rkllm_api.security import admin_only
from rkllm_api.server import current_server

log = logging.getLogger(__name__)

EXTENSION = "rkllm_api.pulls"
ollama_blueprint = Blueprint("ollama_pull", __name__)   # errors in Ollama's format
blueprint = Blueprint("pull", __name__)


class PullJob:
    """One running pull: its events so far, and whether it ended."""

    def __init__(self):
        self.events: list = []
        self.done = False
        self._cond = threading.Condition()

    def emit(self, event: dict) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def follow(self) -> Iterator[dict]:
        """Every event from the first one on, until the pull ends."""
        seen = 0
        while True:
            with self._cond:
                while seen == len(self.events) and not self.done:
                    self._cond.wait(timeout=30)
                fresh, seen = self.events[seen:], len(self.events)
                ended = self.done
            yield from fresh
            if ended and seen == len(self.events):
                return


class PullService:
    """Starts pulls, one per spec, and lets later requests join a running one."""

    def __init__(self, settings, puller: Optional[hub.Puller] = None):
        self.settings = settings
        self._jobs: dict = {}
        self._lock = threading.Lock()
        self._puller = puller

    def puller(self) -> hub.Puller:
        if self._puller is None:   # reads the board once, on the first pull
            self._puller = hub.Puller(self.settings.models_root_path, board_of(self.settings))
        return self._puller

    def start(self, spec: str) -> PullJob:
        hub.parse_spec(spec)   # a malformed name is refused before a thread starts
        key = spec.strip().lower()
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                return job
            job = self._jobs[key] = PullJob()
        threading.Thread(target=self._run, args=(key, spec, job), name="rkllm-pull",
                         daemon=True).start()
        return job

    def _run(self, key: str, spec: str, job: PullJob) -> None:
        try:
            model_id = self.puller().pull(spec, job.emit)
            log.info("pulled %s as model %s", spec, model_id)
        except hub.PullError as exc:
            log.warning("pull of %s failed: %s", spec, exc.message)
            job.emit({"error": exc.message, "status_code": exc.status, "code": exc.code})
        except Exception as exc:   # never leave a joined client waiting on a dead thread
            log.exception("pull of %s failed", spec)
            job.emit({"error": f"the pull failed: {exc}; the server log has the details",
                      "status_code": 500, "code": "pull_failed"})
        finally:
            with self._lock:
                self._jobs.pop(key, None)
            job.finish()


def board_of(settings) -> hub.Board:
    """This board's SoC and the installed librkllmrt's versions, as doctor sees them."""
    from rkllm_api import doctor
    root = settings.system_root
    soc = doctor.board_soc(root)
    try:
        path, _ = doctor.find_rkllm_library(settings, root)
        versions = tuple(doctor.library_generation(path, settings.rkllm_abi)[0]) if path else ()
    except Exception:   # no library, or one that cannot be read: no SDK preference
        versions = ()
    return hub.Board(soc, versions)


def register(app, settings) -> None:
    app.extensions[EXTENSION] = PullService(settings)
    app.register_blueprint(ollama_blueprint)
    app.register_blueprint(blueprint)


def _pulls() -> PullService:
    return current_app.extensions[EXTENSION]


def _spec_of(body) -> str:
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    spec = body.get("model", body.get("name"))
    if not isinstance(spec, str) or not spec.strip():
        raise RequestError("'model' must name a Hugging Face repo: 'owner/name' or "
                           "'owner/name/file.rkllm'", param="model")
    if len(spec) > 1000 or any(0xD800 <= ord(c) <= 0xDFFF or ord(c) < 32 for c in spec):
        raise RequestError("'model' holds characters no repo name has", param="model")
    return spec


def _start(spec: str) -> PullJob:
    try:
        return _pulls().start(spec)
    except hub.PullError as exc:
        raise RequestError(exc.message, status=exc.status, code=exc.code, param="model") from None


def _public(event: dict) -> dict:
    return {k: v for k, v in event.items() if k not in ("status_code", "code")}


@ollama_blueprint.post("/api/pull")
@admin_only
def ollama_pull():
    # Any Content-Type, as on the rest of the Ollama surface: `curl -d` (Ollama's own
    # examples) sends application/x-www-form-urlencoded.
    body = json_body(any_content_type=True)
    spec = _spec_of(body)
    stream = optional_bool(body, "stream", True)   # "no" is a 400, not a stream
    if "/" not in spec:   # a bare name: Ollama's "is it here?" answer
        resolve_name(spec.strip())   # Ollama's names: "x:latest" too
        return jsonify({"status": "success"})
    job = _start(spec)
    if not stream:
        last = list(job.follow())[-1]
        if "error" in last:
            raise RequestError(last["error"], status=last["status_code"], code=last["code"])
        return jsonify(last)
    lines = (json.dumps(_public(event), ensure_ascii=False) + "\n" for event in job.follow())
    return Response(stream_with_context(lines), mimetype="application/x-ndjson")


@blueprint.post("/v1/models/pull")
@admin_only
def openai_pull():
    spec = _spec_of(json_body())
    job = _start(spec)

    def events():
        for event in job.follow():
            if "error" in event:
                event = {"error": {"message": event["error"], "type": "pull_error",
                                   "code": event["code"]}}
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache"})


@blueprint.delete("/v1/models/<path:model_id>")
@admin_only
def delete_model(model_id):
    """Unload the model and remove its folder (or its file, lying in the models root)."""
    server = current_server()
    info = server.chat.resolve_model(model_id)
    root = os.path.realpath(server.settings.models_root_path)
    path, folder = os.path.realpath(info.path), os.path.realpath(info.folder)
    if info.bundled or not path.startswith(root + os.sep):
        raise RequestError(f"{info.id} is not in the models folder and cannot be removed",
                           status=400, code="model_not_removable")
    server.engine.unload(info.id)   # frees it when loaded; nothing to do otherwise
    try:
        if folder == root:
            os.remove(path)
        else:
            shutil.rmtree(folder)
    except FileNotFoundError:
        # Removed already (a second DELETE, before the registry's next rescan sees it
        # gone): the same 404 as once the registry knows.
        raise model_not_found(model_id) from None
    return jsonify({"id": info.id, "object": "model", "deleted": True})
