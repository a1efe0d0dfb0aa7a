"""The server as a process: its command line, the checks before gunicorn starts, Ctrl-C
during a prefill, where its log lines go, what it logs at startup and per request.
Every server is a real gunicorn on 127.0.0.1 (tests/support/live_server.py)."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

import requests

import api
from rkllm_api.config import Settings
from support.board import make_board, write
from support.doubles import make_fake_rkllm_model
from support.live_server import ROOT, NPU_MODEL_ID, LiveServer, sse_data, start_npu_server

COMMAND = [sys.executable, "-c", "import sys, api; sys.exit(api.main())"]
# The bar for Ctrl-C: gunicorn's master SIGKILLs a worker after its graceful
# timeout (10 s), so a clean exit has to come before that.
CTRL_C_EXIT_BOUND = 10.0


def run_command(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RKLLM_", "MODEL_"))}
    environ.update(env or {})
    return subprocess.run(COMMAND + list(args), cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def log_lines(server, logger: str) -> list:
    """The messages `logger` wrote to the server's stderr, in order."""
    pattern = re.compile(rf"^(?:\S+ \S+ )?\w+ {re.escape(logger)}: (.*)$")
    return [m.group(1) for m in map(pattern.match, server.log().splitlines()) if m]


def wait_until(predicate, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


# ------------------------------------------------------------------ command line

def test_version_and_help_list_every_setting():
    version = run_command("--version")
    assert version.returncode == 0 and version.stdout.strip() == "rkllm-api 0.1.0"
    shown = run_command("--help")
    assert shown.returncode == 0
    for f in dataclasses.fields(Settings):
        assert f"    {f.metadata['env']}=" in shown.stdout, f.metadata["env"]
    assert "RKLLM_API_PORT=8000" in shown.stdout and "--log-level" in shown.stdout
    assert "rkllm-api doctor" in shown.stdout
    # --log-level reaches the worker as RKLLM_API_LOG_LEVEL, like --port and --host
    assert api.parse_args(["--log-level", "warning"]).log_level == "WARNING"
    assert api._OPTION_ENV["log_level"] == "RKLLM_API_LOG_LEVEL"


def test_a_bad_value_names_the_variable_without_a_traceback():
    for env, words in (({"RKLLM_API_PORT": "abc"}, "RKLLM_API_PORT must be a whole number, got 'abc'"),
                       ({"RKLLM_API_PORT": "70000"}, "RKLLM_API_PORT must be a port number"),
                       ({"KV_REUSE": "maybe"}, "KV_REUSE must be a boolean"),
                       ({"RAG_DEDUP_THRESHOLD": "high"}, "RAG_DEDUP_THRESHOLD must be a number"),
                       ({"RKLLM_API_LOG_LEVEL": "chatty"}, "RKLLM_API_LOG_LEVEL must be one of DEBUG"),
                       ({"MODEL_ALIASES": "gpt-4o-mini"}, "MODEL_ALIASES expects name=model")):
        done = run_command(env=env)
        assert done.returncode == 2, (env, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, done.stderr
    bad_option = run_command("--log-level", "chatty")
    assert bad_option.returncode == 2 and "invalid choice" in bad_option.stderr


def test_a_port_in_use_is_named_with_the_way_out():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_command("--port", str(port))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "--port" in done.stderr


# ------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_during_a_long_prefill_exits_cleanly(live_servers, rkllm_double_libs):
    """SIGINT to the whole process group (what Ctrl-C in a terminal does) while the
    double sits in a 60 s prefill that no abort can shorten: the stream ends with an
    error event, and the server exits 0 before gunicorn would SIGKILL its worker."""
    server = start_npu_server(live_servers, rkllm_double_libs, SSE_HEARTBEAT_SECONDS="1")
    response = requests.post(server.base_url + "/chat/completions", stream=True, timeout=60,
                             json={"model": NPU_MODEL_ID, "stream": True, "messages": [
                                 {"role": "user", "content": "@@prefill:60000@@ long prompt"}]})
    lines = response.iter_lines()
    started = []
    for line in lines:               # the role chunk, then keep-alives while it prefills
        started.append(line)
        if line == b": keep-alive":
            break
    assert server.get("/health").json()["active_request"]
    os.killpg(server.proc.pid, signal.SIGINT)
    exit_code = server.wait(CTRL_C_EXIT_BOUND)
    rest = sse_data([line for line in started + list(lines) if line])
    assert exit_code == 0, server.log()
    assert rest[-1] == "[DONE]" and "shutting down" in rest[-2]["error"]["message"]
    log = server.log()
    assert "SIGKILL" not in log and "Worker exiting" in log
    assert "worker exits with a runtime call still running" in log


# ------------------------------------------------------------------ startup and access logs

def test_startup_log_lists_the_models_and_the_checks(live_servers, tmp_path):
    board = make_board(tmp_path / "board", runtime="1.2.3")
    models = tmp_path / "models"
    make_fake_rkllm_model(models / "Qwen3-1.7B-4k", "qwen3-1.7b_w8a8_rk3588")
    make_fake_rkllm_model(models, "gemma-3-1b_rk3576")            # a file in the root
    write(models, "cut.gguf", b"GGUF\x03\x00\x00\x00")
    server = live_servers.start({"RKLLM_MODELS_ROOT": str(models), "RKLLM_SYSTEM_ROOT": board,
                                 "RKLLM_BUNDLED_MODEL": "0", "RKLLM_LIB_PATH": ""})
    registry_lines = log_lines(server, "rkllm_api.models.registry")
    assert any(line.startswith(f"models root {models}: ") and "qwen3-1.7b-4k [npu, ctx 4096"
               in line and "gemma-3-1b-rk3576 [npu" in line for line in registry_lines)
    assert f"model cut ({models / 'cut.gguf'}) is unavailable: GGUF header does not parse " \
           "(truncated header): corrupt or truncated" in registry_lines
    checks = log_lines(server, "api")
    assert "check board: Rockchip rk3588 (device tree)" in checks
    assert any(line.startswith("check npu: NPU device /dev/rknpu (rknpu driver")
               for line in checks)
    assert f"check librkllmrt: {board}/usr/lib/librkllmrt.so: runtime 1.2.3, ABI 1.2" in checks
    assert any(line.startswith("check model gemma-3-1b-rk3576: built for rk3576") for line in checks)
    assert "checks done: 1 of 3 models can run (rkllm-api doctor explains)" in checks
    log_file = os.path.expanduser(f"~/.local/state/rkllm-api/rkllm-api-{server.port}.log")
    ready = f"rkllm-api 0.1.0 ready on 127.0.0.1:{server.port}, log file {log_file}"
    assert ready in checks
    with open(log_file, encoding="utf-8") as handle:   # one file per instance: its own
        own = handle.read()
    assert re.findall(r"ready on 127\.0\.0\.1:(\d+)", own) == [str(server.port)]
    models_now = server.get("/v1/models").json()["data"]
    assert {m["id"]: m["available"] for m in models_now} == {
        "qwen3-1.7b-4k": True, "gemma-3-1b-rk3576": True, "cut": False}


def test_one_access_line_per_request(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs)
    chat = {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": "@@count:5@@ go"}]}
    answered = server.post("/v1/chat/completions", json=chat)
    usage = answered.json()["usage"]
    _, payloads = server.stream_chat({**chat, "stream_options": {"include_usage": True}})
    streamed = payloads[-2]["usage"]
    server.get("/v1/models")
    server.post("/v1/chat/completions", json={**chat, "model": "no-such-model"})
    wait_until(lambda: len(log_lines(server, "rkllm_api.access")) >= 4)
    lines = log_lines(server, "rkllm_api.access")
    pattern = re.compile(r"^(\S+) (\S+) (\d{3}) (\d+\.\d{3})s client=127\.0\.0\.1 model=(\S+) "
                         r"prompt_tokens=(\S+) generated_tokens=(\S+) kv=(\S+) key=(\S+)$")
    fields = [pattern.match(line).groups() for line in lines]
    assert [f[:3] for f in fields] == [("POST", "/v1/chat/completions", "200"),
                                       ("POST", "/v1/chat/completions", "200"),
                                       ("GET", "/v1/models", "200"),
                                       ("POST", "/v1/chat/completions", "404")]
    assert fields[0][4:] == (NPU_MODEL_ID, str(usage["prompt_tokens"]),
                             str(usage["completion_tokens"]), "full", "-")
    # the stream's line is written when its last byte went out: its counts are final
    assert fields[1][4:8] == (NPU_MODEL_ID, str(streamed["prompt_tokens"]),
                              str(streamed["completion_tokens"]), "full")
    assert fields[2][4:] == ("-", "-", "-", "-", "-") and fields[3][4] == "-"


# ------------------------------------------------------------------ where the lines go

def start_with_stderr(live_servers, env: dict, journal: str) -> LiveServer:
    """A server whose stderr file exists before it starts, so JOURNAL_STREAM can name
    it ("same": its device and inode, as systemd sets it; "other": another file's)."""
    workdir = os.path.join(live_servers.tmp_dir, f"journal{len(live_servers.started)}")
    os.makedirs(workdir)
    server = LiveServer(workdir, env)
    named = server.log_path if journal == "same" else os.path.join(workdir, "other")
    open(named, "ab").close()
    info = os.stat(named)
    server.env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    live_servers.started.append(server)
    return server.start()


def test_under_the_journal_stderr_is_the_only_log(live_servers, rkllm_double_libs, tmp_path):
    file_setting = str(tmp_path / "logs" / "rkllm-api-{port}.log")
    env = {"RKLLM_API_LOG_FILE": file_setting, "RKLLM_BUNDLED_MODEL": "0"}
    journal = start_with_stderr(live_servers, env, "same")
    elsewhere = start_with_stderr(live_servers, env, "other")
    for server in (journal, elsewhere):
        server.get("/v1/models")
        server.stop()
    assert not os.path.exists(file_setting.format(port=journal.port))
    ready = [line for line in journal.log().splitlines() if " api: rkllm-api 0.1.0 ready" in line]
    assert ready == [f"INFO api: rkllm-api 0.1.0 ready on 127.0.0.1:{journal.port}, "
                     f"log file none (stderr only)"]        # no timestamp: the journal adds it
    assert journal.log().count("GET /v1/models 200") == 1   # each line once
    # stderr elsewhere (JOURNAL_STREAM inherited from a service): the file is written
    with open(file_setting.format(port=elsewhere.port), encoding="utf-8") as handle:
        assert "GET /v1/models 200" in handle.read()
