"""The app: its factory, the surfaces it registers, its one error table, the
gunicorn hooks and the `rkllm-api` command.

A request travels: a surface's blueprint parses the body once into the typed
request (rkllm_api/request.py) -> the chat service decides and starts the run
(rkllm_api/chat.py) -> the pipeline's events (rkllm_api/pipeline.py) -> the
surface's renderer. docs/INTERNALS.md draws the whole map.

Importing this module does nothing but define things: the app exists only once
create_app() is called (gunicorn runs "api:create_app()" in its worker).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Optional

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from rkllm_api import cli
from rkllm_api.chat import SERVER_VERSION
from rkllm_api.config import Settings, SettingsError
from rkllm_api.errors import MAPPED_ERRORS, RequestError, as_request_error
from rkllm_api.logs import configure_logging
from rkllm_api.ollama import protocol as ollama_protocol
from rkllm_api.openai import protocol as openai_protocol
from rkllm_api.server import APP_EXTENSION, Server

log = logging.getLogger(__name__)

# How each surface writes a refusal; a blueprint not listed speaks OpenAI's format.
ERROR_RENDERERS = {"openai": openai_protocol.error_of, "ollama": ollama_protocol.error_of,
                   "ollama_pull": ollama_protocol.error_of}
DEFAULT_ERROR_RENDERER = openai_protocol.error_of

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def render_error(error: RequestError):
    render = ERROR_RENDERERS.get(request.blueprint or "", DEFAULT_ERROR_RENDERER)
    return jsonify(render(error)), error.status, error.headers


def error_payload(app: Flask, method: str, path: str, error: RequestError) -> dict:
    """The error body for a request refused outside Flask (the worker's read layer,
    gunicorn's parser), in the format of the surface whose route the path matches."""
    blueprint = ""
    try:
        if path.startswith("/"):
            endpoint, _ = app.url_map.bind("localhost").match(path, method=method or "GET")
            blueprint = endpoint.rpartition(".")[0]
    except Exception:   # no route, another method, a redirect: the default format
        pass
    return ERROR_RENDERERS.get(blueprint, DEFAULT_ERROR_RENDERER)(error)


def register_error_handlers(app: Flask) -> None:
    """One table for every surface: refusals, engine errors, HTTP errors, the rest."""

    @app.errorhandler(RequestError)
    def request_error(exc: RequestError):
        return render_error(exc)

    for kind in MAPPED_ERRORS:
        app.register_error_handler(kind, lambda exc: render_error(as_request_error(exc)))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 413:
            message = "the request body is larger than the server accepts"
        return render_error(RequestError(message, status=exc.code or 500,
                                         code=_HTTP_CODES.get(exc.code)))

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render_error(RequestError("internal error: the server failed to handle "
                                         "this request; its log has the details",
                                         status=500, code="internal_error"))


# ----------------------------------------------------------------------------
# the app


def create_app(settings: Optional[Settings] = None, *, registry=None, engine=None) -> Flask:
    from rkllm_api import logs, management, metrics, page, pull, security, status
    from rkllm_api.engine.manager import Engine
    from rkllm_api.models.registry import Registry
    from rkllm_api.ollama import routes as ollama_routes
    from rkllm_api.openai import routes as openai_routes

    settings = settings or Settings.from_env()
    # systemd names the journal's stream in JOURNAL_STREAM: then stderr is the only log.
    log_file = configure_logging(settings, journal_stream=os.environ.get("JOURNAL_STREAM"))
    gate = security.Gate.from_settings(settings)   # refuses bad keys/origins before any work
    registry = registry or Registry(settings)
    observer = metrics.create_observer()   # None without Prometheus: no /metrics
    if engine is None:
        engine = Engine(settings, registry, observer=observer)
        engine.start()
    elif observer is not None:
        engine.observer = observer
    app = Flask("rkllm-api")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    server = Server(settings, registry, engine)
    app.extensions[APP_EXTENSION] = server
    logs.install_access_log(app)  # first: its clock starts before the key check
    security.install(app, gate)   # keys and origins, checked before every route
    register_error_handlers(app)
    metrics.install(app, observer, engine, settings.system_root)
    for blueprint in (openai_routes.blueprint, management.blueprint, status.blueprint):
        app.register_blueprint(blueprint)
    pull.register(app, settings)   # before Ollama's blueprint: its /api/pull wins
    app.register_blueprint(page.blueprint)   # / for browsers; Ollama's answer otherwise
    app.register_blueprint(ollama_routes.blueprint)
    register_embedding_surfaces(app)
    server.checks = startup_checks(settings, registry)
    log.info("rkllm-api %s ready on %s:%d, log file %s", SERVER_VERSION, settings.host,
             settings.port, log_file or "none (stderr only)")
    return app


def startup_checks(settings: Settings, registry):
    """Scan the models and run doctor's checks once, into the log; never fatal (a
    machine without an NPU still serves CPU models). Returns doctor's report."""
    from rkllm_api import doctor
    try:
        report = doctor.run_doctor(settings, root=settings.system_root, registry=registry)
    except Exception:
        log.exception("the startup checks failed; serving anyway")
        return None
    doctor.log_summary(report, log)
    return report


def register_embedding_surfaces(app: Flask) -> None:
    """/v1/embeddings (OpenAI) and /v1/rerank (Jina / Cohere)."""
    from rkllm_api import rerank
    from rkllm_api.openai import embeddings
    app.register_blueprint(embeddings.blueprint)
    app.register_blueprint(rerank.blueprint)


def server_of(app: Flask) -> Server:
    return app.extensions[APP_EXTENSION]


# ----------------------------------------------------------------------------
# gunicorn hooks (referenced by gunicorn.conf.py) and the rkllm-api command


def on_worker_started(worker) -> None:
    """post_worker_init: SIGTERM, SIGINT (Ctrl-C reaches the whole process group) and
    SIGQUIT (what gunicorn's master sends on SIGINT) all stop the worker the same way:
    new work is refused, running generations are aborted and their streams end at
    once, and the worker exits well inside the graceful timeout. gunicorn's own
    SIGINT/SIGQUIT handler would exit at once, leaving a stream waiting for a prefill
    that cannot be aborted until the master's SIGKILL."""
    server = server_of(worker.wsgi)
    stop_worker = worker.handle_exit

    def handle_stop(sig, frame):
        server.shutting_down = True
        threading.Thread(target=server.shut_down, name="rkllm-shutdown", daemon=True).start()
        stop_worker(sig, frame)

    worker.handle_exit = handle_stop
    for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(stop_signal, handle_stop)


def on_worker_exit(worker) -> None:
    """worker_exit: free the runtimes (again a no-op after a signal's shutdown). When a
    runtime is still inside a call it cannot leave (a prefill), the process ends now:
    interpreter teardown would otherwise run alongside that C thread."""
    wsgi = getattr(worker, "wsgi", None)
    if isinstance(wsgi, Flask) and APP_EXTENSION in wsgi.extensions:
        server = server_of(wsgi)
        server.shut_down()
        if server.runtime_left_running:
            log.warning("worker exits with a runtime call still running; ending it with "
                        "the process")
            logging.shutdown()
            os._exit(0)


# main() hands its options to create_app() in the worker through these variables.
_OPTION_ENV = cli.OPTION_ENV


def parse_args(argv=None) -> argparse.Namespace:
    return cli.build_parser(SERVER_VERSION).parse_args(argv)


def main(argv=None) -> int:
    from gunicorn.app.base import BaseApplication

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["doctor"]:
        from rkllm_api import doctor
        return doctor.main(argv[1:])
    if argv[:1] and argv[0] in cli.CLIENT_COMMANDS:   # pull, run, ps, list, rm
        from rkllm_api import client_cli
        return client_cli.main(argv)
    args = parse_args(argv)
    for option, variable in _OPTION_ENV.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[variable] = str(value)
    try:
        settings = cli.check_settings(os.environ)
    except SettingsError as exc:
        print(f"rkllm-api: {exc}", file=sys.stderr)
        return 2
    problem = cli.port_problem(settings.host, settings.port)
    if problem:
        print(f"rkllm-api: {problem}", file=sys.stderr)
        return 1
    from rkllm_api import gunicorn_settings
    options = gunicorn_settings.options(settings)

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
