"""Where the server's log lines go, and the access log (one line per request).

Destinations:
- stderr, always.
- Under systemd the journal already keeps (and timestamps) what the service writes to
  stderr, so stderr is all: a log file beside it kept every line twice, once in the
  journal and once in the file. systemd says that stderr is connected to the journal by
  setting JOURNAL_STREAM to "<device>:<inode>" of that stream; it is compared with
  file descriptor 2, so a program started from the service with its stderr sent
  elsewhere still gets its file (systemd.exec(5) recommends exactly this check).
- Otherwise a rotating file (10 MB x 3) per instance: RKLLM_API_LOG_FILE with `{port}`
  replaced by the port, so two servers on one machine never share a file; "" = none.

Access log: a surface notes the Reply it answered with (`note_reply`); when the
server closes the response (after the last byte of a stream) one line goes to the
`rkllm_api.access` logger: method, path, status, duration, model, prompt and
generated tokens, KV mode, and the name of the API key when the auth layer put one
into the request's WSGI environ (`KEY_NAME_ENVIRON`; never the key itself). /health,
/ready and /metrics, which monitoring polls, are logged at DEBUG only.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from typing import Optional

ACCESS_LOGGER = "rkllm_api.access"
KEY_NAME_ENVIRON = "rkllm_api.key_name"     # set by the auth layer: the key's name
# Polled by monitoring every few seconds: their lines only at DEBUG.
QUIET_PATHS = frozenset(("/health", "/ready", "/metrics"))
_REPLY_ENVIRON = "rkllm_api.reply"
_STARTED_ENVIRON = "rkllm_api.started"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"   # the journal adds the time
_FILE_BYTES, _FILE_BACKUPS = 10 * 1024 * 1024, 3


def stderr_is_journal(journal_stream: Optional[str], stream=None) -> bool:
    """True when JOURNAL_STREAM ("<device>:<inode>") names the stream behind stderr."""
    if not journal_stream:
        return False
    try:
        info = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return journal_stream.strip() == f"{info.st_dev}:{info.st_ino}"


def log_file_path(settings) -> str:
    """The instance's log file ("" = none): RKLLM_API_LOG_FILE with {port} filled in."""
    if not settings.log_file:
        return ""
    return os.path.expanduser(settings.log_file.replace("{port}", str(settings.port)))


def configure_logging(settings, journal_stream: Optional[str] = None) -> str:
    """Install the server's handlers on the root logger, replacing those an earlier
    call installed (never others'). Returns the log file in use ("" = none)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "rkllm_api", False)]:
        root.removeHandler(handler)
        handler.close()
    journal = stderr_is_journal(journal_stream)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(JOURNAL_FORMAT if journal else LOG_FORMAT))
    handlers = [stderr]
    path = "" if journal else log_file_path(settings)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=_FILE_BYTES, backupCount=_FILE_BACKUPS, encoding="utf-8",
            errors="backslashreplace")   # a lone surrogate in a message must not fail the line
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler.rkllm_api = True
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return path


# ---------------------------------------------------------------- access log

def note_reply(reply) -> None:
    """Called by a surface with the chat.Reply it answers with: the access line reads
    the model, the token counts and the KV mode from it once the response is closed."""
    from flask import request
    request.environ[_REPLY_ENVIRON] = reply


def install_access_log(app) -> None:
    """Time every request and write its access line when the response is closed."""
    from flask import request
    access = logging.getLogger(ACCESS_LOGGER)

    @app.before_request
    def start_clock():
        request.environ[_STARTED_ENVIRON] = time.monotonic()

    @app.after_request
    def log_when_closed(response):
        environ, method, path = request.environ, request.method, request.path
        client = request.remote_addr or "-"
        status = response.status_code
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        response.call_on_close(lambda: access.log(
            level, "%s", access_line(environ, method, path, status, client)))
        return response


def access_line(environ: dict, method: str, path: str, status: int, client: str) -> str:
    started = environ.get(_STARTED_ENVIRON)
    duration = f"{time.monotonic() - started:.3f}s" if started is not None else "-"
    fields = {"model": "-", "prompt_tokens": "-", "generated_tokens": "-", "kv": "-"}
    reply = environ.get(_REPLY_ENVIRON)
    if reply is not None:
        fields.update(_reply_fields(reply))
    fields["key"] = environ.get(KEY_NAME_ENVIRON) or "-"
    return f"{method} {path} {status} {duration} client={client} " + " ".join(
        f"{name}={value}" for name, value in fields.items())


def _reply_fields(reply) -> dict:
    fields = {"model": reply.model_id}
    generation = reply.generation
    result = generation.result if generation is not None else None
    if result is None:
        return fields
    from rkllm_api.pipeline import usage_of
    usage = usage_of(generation, result.perf)
    fields.update(prompt_tokens=usage.prompt_tokens, generated_tokens=usage.completion_tokens,
                  kv=str(generation.kv_mode or "-"))
    return fields
