"""A real LiteLLM proxy (litellm.proxy.proxy_cli, under uvicorn) on 127.0.0.1.

`LiteLLMProxy(workdir, config_text, env).start()` writes the config, launches the
proxy in its own process group on a free port and waits (bounded) until its liveness
route answers; `stop()` ends the group (SIGTERM, then SIGKILL). With `trace=True` the
proxy runs under `strace -f -e trace=connect`, so a test can read every address the
proxy (and anything it starts) tried to reach: `connections()`.

The environment turns off what would reach the internet or need a database:
LITELLM_LOCAL_MODEL_COST_MAP (the price list bundled with the package instead of a
download from GitHub at startup), DISABLE_ADMIN_UI; no DATABASE_URL.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import requests

from support.live_server import free_port

START_TIMEOUT = 180.0   # the proxy imports a lot: about 25 s on two busy cores
STOP_TIMEOUT = 15.0
OFFLINE_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "DISABLE_ADMIN_UI": "True"}

# connect(3, {sa_family=AF_INET, sin_port=htons(8000), sin_addr=inet_addr("127.0.0.1")}, 16)
_CONNECT = re.compile(r"connect\(\d+, \{sa_family=(?P<family>AF_\w+)(?P<rest>.*?)\}, \d+\)")
_INET = re.compile(r'sin_port=htons\((?P<port>\d+)\), sin_addr=inet_addr\("(?P<host>[^"]+)"\)')
_INET6 = re.compile(r'sin6_port=htons\((?P<port>\d+)\).*?inet_pton\(AF_INET6, "(?P<host>[^"]+)"')
_UNIX = re.compile(r'sun_path="(?P<path>[^"]*)"')


def strace_available() -> bool:
    return shutil.which("strace") is not None


class LiteLLMProxy:
    def __init__(self, workdir: str, config_text: str, env: dict, trace: bool = False):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(workdir, "litellm.yaml")
        self.log_path = os.path.join(workdir, "proxy.log")
        self.trace_path = os.path.join(workdir, "connect.trace") if trace else None
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        self.env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        self.env.update(OFFLINE_ENV)
        self.env.update({"PYTHONUNBUFFERED": "1"})
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "LiteLLMProxy":
        command = [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", self.config_path,
                   "--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"]
        if self.trace_path:
            # --seccomp-bpf: only connect() stops the process, everything else runs free.
            command = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect",
                       "-o", self.trace_path] + command
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=self.workdir, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LiteLLM proxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health/liveliness", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"LiteLLM proxy not live within {START_TIMEOUT}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()[-20000:]
        except OSError:
            return ""

    def connections(self) -> list:
        """Every connect() the traced proxy made so far, as (family, host or path, port)."""
        if not self.trace_path or not os.path.exists(self.trace_path):
            return []
        found = []
        with open(self.trace_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                call = _CONNECT.search(line)
                if not call:
                    continue
                family, rest = call.group("family"), call.group("rest")
                address = (_INET.search(rest) if family == "AF_INET" else
                           _INET6.search(rest) if family == "AF_INET6" else None)
                if address:
                    found.append((family, address.group("host"), int(address.group("port"))))
                else:
                    unix = _UNIX.search(rest)
                    found.append((family, unix.group("path") if unix else rest.strip(", "), None))
        return found
