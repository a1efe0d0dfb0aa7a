"""A real rkllm-api server (gunicorn, started through `api.main()`) on 127.0.0.1.

`live_servers` is a factory fixture: `live_servers.start(env={...})` launches a
server on a free port with RKLLM_MODELS_ROOT pointing at a fresh temporary folder
(unless env says otherwise), waits (bounded) until /ready answers 200, and every
server it started is stopped at teardown, killed if SIGTERM is not enough.
`start_npu_server(...)` starts one whose models root holds a single dummy .rkllm
model served by the compiled librkllmrt double (see tests/support/doubles.py),
with the double's call record turned on; `start_cpu_server(...)` one that serves
only the bundled SmolLM2 GGUF on the CPU runtime.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import pytest
import requests

from support.doubles import RkllmRecord, make_fake_rkllm_model
from support.openai_types import validate_openai_payload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
NPU_MODEL_ID = "fake-npu-model"
FAILURE_LOG_CHARS = 4000
_running: list = []   # servers started and not stopped, for failure reports


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, workdir: str, env: dict):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log_path = os.path.join(workdir, "server.log")
        self.env = dict(os.environ)
        self.env.setdefault("RKLLM_MODELS_ROOT", os.path.join(workdir, "models"))
        self.env.update({"PYTHONUNBUFFERED": "1", "RKLLM_API_THREADS": "8"})
        self.env.update({k: str(v) for k, v in env.items()})
        os.makedirs(self.env["RKLLM_MODELS_ROOT"], exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "LiveServer":
        command = [sys.executable, "-c", "import sys, api; sys.exit(api.main())",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready within {START_TIMEOUT}s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM to the gunicorn master, as systemd or docker would send."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if not self.running:
            return
        self.terminate()
        if self.wait(STOP_TIMEOUT) is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-20000:]
        except OSError:
            return ""

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return requests.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        response = requests.post(self.url + path, **kwargs)
        if not kwargs.get("stream") and response.headers.get("Content-Type", "").startswith(
                "application/json"):
            validate_openai_payload(response.json())
        return response

    def stream_chat(self, body: dict, timeout: float = 60,
                    path: str = "/v1/chat/completions") -> tuple:
        """POST a streaming request; (response, SSE payloads with "[DONE]" as a string)."""
        response = self.post(path, json={**body, "stream": True}, stream=True,
                             timeout=timeout)
        if response.status_code != 200:
            return response, []
        return response, sse_data(sse_lines(response))


def sse_lines(response: requests.Response) -> list:
    """Every non-empty line of an SSE body, as bytes ("data: ...", ": keep-alive")."""
    return [line for line in response.iter_lines() if line]


def sse_data(lines: list) -> list:
    """The JSON payloads of the data lines; the final "[DONE]" stays a string."""
    payloads = []
    for raw in lines:
        line = raw.decode("utf-8")
        if line.startswith("data: "):
            data = line[len("data: "):]
            payload = data if data == "[DONE]" else json.loads(data)
            validate_openai_payload(payload)
            payloads.append(payload)
    return payloads


def streamed_content(payloads: list) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or ""
                   for p in payloads if isinstance(p, dict) and p.get("choices"))


class LiveServers:
    """Starts servers in numbered folders under one temporary directory and
    stops them all at teardown."""

    def __init__(self, tmp_dir: str):
        self.tmp_dir = tmp_dir
        self.started: list[LiveServer] = []

    def start(self, env: Optional[dict] = None) -> LiveServer:
        workdir = os.path.join(self.tmp_dir, f"server{len(self.started)}")
        os.makedirs(workdir, exist_ok=True)
        server = LiveServer(workdir, env or {})
        self.started.append(server)
        _running.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()
            if server in _running:
                _running.remove(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the tail of every running server's log: a
    failure seen only in CI can then be read from CI's output."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        for server in _running:
            report.sections.append((f"server log {server.url} (tail)",
                                    server.log()[-FAILURE_LOG_CHARS:]))


@pytest.fixture(scope="module")
def live_servers(tmp_path_factory):
    servers = LiveServers(str(tmp_path_factory.mktemp("live")))
    try:
        yield servers
    finally:
        servers.stop_all()


NPU_DOUBLE_ABI = "1.3"


def start_npu_server(live_servers: LiveServers, double_libs: dict, abi: str = NPU_DOUBLE_ABI,
                     extra_models: tuple = (), model_configs: Optional[dict] = None,
                     prepare_models=None, **env) -> LiveServer:
    """A server whose model is NPU_MODEL_ID (plus extra_models, ids whose names
    give them capabilities, e.g. "qwen3-..." thinks) on the librkllmrt double.
    model_configs: {model id: dict written as that model's model_config.json}.
    prepare_models(models_root): called before the server starts (add files to the
    model folders, e.g. a vision encoder). server.record reads the double's record."""
    folder = os.path.join(live_servers.tmp_dir, f"npu{len(live_servers.started)}")
    for model_id in (NPU_MODEL_ID,) + tuple(extra_models):
        make_fake_rkllm_model(os.path.join(folder, "models", model_id), model_id)
    for model_id, config in (model_configs or {}).items():
        with open(os.path.join(folder, "models", model_id, "model_config.json"), "w",
                  encoding="utf-8") as handle:
            json.dump(config, handle)
    if prepare_models is not None:
        prepare_models(os.path.join(folder, "models"))
    record = os.path.join(folder, "rkllm-record.jsonl")
    settings = {"RKLLM_MODELS_ROOT": os.path.join(folder, "models"),
                "RKLLM_BUNDLED_MODEL": "false", "RKLLM_LIB_PATH": double_libs[abi],
                "RKLLM_ABI": abi, "FAKE_RKLLM_RECORD": record}
    settings.update(env)
    server = live_servers.start(settings)
    server.record = RkllmRecord(record)
    return server


def start_cpu_server(live_servers: LiveServers, **env) -> LiveServer:
    """A server with an empty models root: only the bundled SmolLM2 GGUF (CPU).
    One llama.cpp thread: on a shared machine more threads spin against each other
    and make a tiny model many times slower."""
    return live_servers.start({"RKLLM_BUNDLED_MODEL": "true", "CPU_THREADS": "1", **env})


@pytest.fixture(scope="module")
def npu_server(live_servers, rkllm_double_libs) -> LiveServer:
    return start_npu_server(live_servers, rkllm_double_libs)


@pytest.fixture(scope="module")
def cpu_server(live_servers) -> LiveServer:
    return start_cpu_server(live_servers)
