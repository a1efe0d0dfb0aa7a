"""The `rkllm-api` command line: its options, a --help that lists every setting with
its default, and the checks run before gunicorn starts, so that a bad setting or a
busy port is one clear sentence instead of a traceback from the worker.

api.main() uses this module; `rkllm-api doctor` has its own parser (doctor.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import socket
from typing import Optional

from rkllm_api.config import Settings, SettingsError

# The options main() hands to create_app() in the worker, through these variables.
OPTION_ENV = {"host": "RKLLM_API_HOST", "port": "RKLLM_API_PORT",
              "models_root": "RKLLM_MODELS_ROOT", "threads": "RKLLM_API_THREADS",
              "log_level": "RKLLM_API_LOG_LEVEL"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Commands that talk to a running server (rkllm_api/client_cli.py).
CLIENT_COMMANDS = ("pull", "run", "ps", "list", "rm")


def build_parser(version: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rkllm-api", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="OpenAI-compatible LLM server for Rockchip NPU boards.\n"
                    "`rkllm-api doctor` checks the board, the NPU runtime and the models.\n"
                    "`rkllm-api pull|run|ps|list|rm ...` use a running server "
                    "(`rkllm-api run --help`).",
        epilog=settings_help())
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; "
                                       "use 0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--models-root", help="folder of the models: .rkllm / .gguf files, "
                                              "or one sub-folder per model")
    parser.add_argument("--threads", type=int, help="request threads (default 40)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        help="log level (default INFO)")
    parser.add_argument("--version", action="version", version=f"rkllm-api {version}")
    return parser


def settings_help() -> str:
    """Every setting as the environment variable it is read from, with its default,
    grouped by the sections of config.py, with the first line of its description."""
    from rkllm_api.envfile import env_name, field_notes, format_value
    notes, defaults = field_notes(Settings), Settings()
    lines = ["settings (environment variables; an option above wins over its variable):"]
    section = None
    for f in dataclasses.fields(Settings):
        where, description = notes.get(f.name, ("", ()))
        if where != section:
            section = where
            lines.append(f"\n  {where or 'other'}:")
        default = format_value(getattr(defaults, f.name)).strip("'")
        lines.append(f"    {env_name(f)}={default}" if default else f"    {env_name(f)}=  (empty)")
        if description:
            lines.append(f"        {description[0]}")
    lines.append("\nREADME.md (section Settings) explains each of them.")
    return "\n".join(lines)


def check_settings(environ) -> Settings:
    """The settings the server will run with, or SettingsError naming the variable and
    what it expects."""
    from rkllm_api.models.registry import parse_model_aliases
    settings = Settings.from_env(environ)
    if not 1 <= settings.port <= 65535:
        raise SettingsError(f"RKLLM_API_PORT must be a port number from 1 to 65535, "
                            f"got {settings.port}")
    if settings.server_threads < 1:
        raise SettingsError(f"RKLLM_API_THREADS must be at least 1, got {settings.server_threads}")
    try:
        parse_model_aliases(settings.model_aliases, strict=True)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return settings


def port_problem(host: str, port: int) -> Optional[str]:
    """Why the server could not listen on host:port (None when it can), found by
    binding it once the way gunicorn will (SO_REUSEADDR: a port in TIME_WAIT is fine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return f"cannot resolve the host {host!r}: use an address (--host 0.0.0.0 or 127.0.0.1)"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return _bind_failure(host, port, exc)
    return None


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another rkllm-api?): "
                f"choose a free one with --port N (or RKLLM_API_PORT)")
    if exc.errno == errno.EACCES:
        return (f"no permission to listen on port {port}: ports below 1024 need root; "
                f"use --port 8000 (or another above 1023)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{host} is not an address of this machine: use --host 0.0.0.0 (every "
                f"interface) or 127.0.0.1 (this machine only)")
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
