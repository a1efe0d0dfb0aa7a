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
import logging.handlers
import os
import signal
import sys
import threading
from typing import Optional

from flask import Flask, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from rkllm_api.chat import SERVER_VERSION
from rkllm_api.config import Settings
from rkllm_api.errors import MAPPED_ERRORS, RequestError, as_request_error
from rkllm_api.openai import protocol as openai_protocol
from rkllm_api.server import APP_EXTENSION, Server

log = logging.getLogger(__name__)

# How each surface writes a refusal; a blueprint not listed speaks OpenAI's format.
ERROR_RENDERERS = {"openai": openai_protocol.error_of}
DEFAULT_ERROR_RENDERER = openai_protocol.error_of

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def render_error(error: RequestError):
    render = ERROR_RENDERERS.get(request.blueprint or "", DEFAULT_ERROR_RENDERER)
    return jsonify(render(error)), error.status, error.headers


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
    from rkllm_api import management, status
    from rkllm_api.engine.manager import Engine
    from rkllm_api.models.registry import Registry
    from rkllm_api.openai import routes as openai_routes

    settings = settings or Settings.from_env()
    configure_logging(settings)
    registry = registry or Registry(settings)
    if engine is None:
        engine = Engine(settings, registry)
        engine.start()
    app = Flask("rkllm-api")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    app.extensions[APP_EXTENSION] = Server(settings, registry, engine)
    CORS(app)
    register_error_handlers(app)
    for blueprint in (openai_routes.blueprint, management.blueprint, status.blueprint):
        app.register_blueprint(blueprint)
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

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["doctor"]:
        from rkllm_api import doctor
        return doctor.main(argv[1:])
    args = parse_args(argv)
    for option, variable in _OPTION_ENV.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[variable] = str(value)
    from rkllm_api import gunicorn_settings
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
