"""Slow and idle clients, and how close the run limits fire to their settings.

Prints, side by side in one run:
  - latency of GET /v1/models and of a short chat (librkllmrt double) on an idle
    server, then while 50 clients dribble their requests a byte every half second
    (25 stalled in the head, 25 in the body) and 50 kept-alive connections sit idle;
    for rkllm-api's worker (rkllm_api/http_worker.py) and for gunicorn's stock gthread
    worker serving the same app with the same 8 threads; a request that gets no answer
    within --timeout counts as a timeout;
  - for FIRST_TOKEN_TIMEOUT and TOTAL_TIMEOUT during a 4 s prefill the runtime cannot
    leave, and FALLBACK_SILENCE after a first token: when the client got its error,
    minus the setting.

Starts its own servers on 127.0.0.1 (free ports) and always stops them.
Usage: .venv/bin/python bench/lan_bench.py [--runs 5] [--timeout 5]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from doubles.build import build_rkllm_double  # noqa: E402
from support.live_server import NPU_MODEL_ID, LiveServers, free_port, start_npu_server  # noqa: E402

ABI = "1.3"
DRIBBLERS, IDLE = 50, 50
BODY = json.dumps({"model": NPU_MODEL_ID, "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


class StockGthread:
    """The same app under gunicorn's own gthread worker (-k gthread)."""

    def __init__(self, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-k", "gthread",
             "-b", f"127.0.0.1:{self.port}"], cwd=ROOT, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the stock gthread server did not start")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class HostileLoad:
    """50 dribbling and 50 idle kept-alive connections, for the length of a `with`."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.socks: list = []

    def __enter__(self):
        for _ in range(IDLE):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(b"GET /ready HTTP/1.1\r\nHost: b\r\n\r\n")
            sock.recv(4096)
            self.socks.append(sock)
        dribblers = [socket.create_connection(("127.0.0.1", self.port), timeout=10)
                     for _ in range(DRIBBLERS)]
        self.socks += dribblers
        threading.Thread(target=self._dribble, args=(dribblers,), daemon=True).start()
        time.sleep(1.0)
        return self

    def _dribble(self, socks):
        sent = [0] * len(socks)
        limits = [REQUEST.index(b"\r\n\r\n") if i % 2 == 0 else len(REQUEST) - 1
                  for i in range(len(socks))]
        while not self.stop.is_set():
            for i, sock in enumerate(socks):
                if sent[i] < limits[i]:
                    try:
                        sock.send(REQUEST[sent[i]:sent[i] + 1])
                        sent[i] += 1
                    except OSError:
                        pass
            self.stop.wait(0.5)

    def __exit__(self, *exc):
        self.stop.set()
        for sock in self.socks:
            sock.close()


def timed(call, timeout: float):
    started = time.perf_counter()
    try:
        response = call(timeout)
        ok = response.status_code == 200
    except requests.RequestException:
        ok = False
    return (time.perf_counter() - started) if ok else None


def latencies(url: str, runs: int, timeout: float) -> dict:
    models = [timed(lambda t: requests.get(url + "/v1/models", timeout=t), timeout)
              for _ in range(runs)]
    chats = [timed(lambda t: requests.post(url + "/v1/chat/completions", data=BODY, timeout=t,
                                           headers={"Content-Type": "application/json"}),
                   timeout) for _ in range(runs)]
    return {"models": models, "chat": chats}


def describe(samples: list) -> str:
    done = [s for s in samples if s is not None]
    timeouts = len(samples) - len(done)
    if not done:
        return f"all {timeouts} timed out"
    text = f"{statistics.median(done) * 1000:.1f} ms"
    return text + (f" ({timeouts} timed out)" if timeouts else "")


def limit_excess(servers: LiveServers, libs: dict, env: dict, prompt: str,
                 setting: float, runs: int) -> list:
    server = start_npu_server(servers, libs, FAKE_RKLLM_RECORD="", RKLLM_API_LOG_LEVEL="WARNING",
                              **env)
    excess = []
    for _ in range(runs):
        while server.get("/health", timeout=10).json()["devices"]["npu"]["busy"]:
            time.sleep(0.05)   # the previous run's prefill is still going
        started = time.perf_counter()
        requests.post(server.url + "/v1/chat/completions", timeout=30,
                      json={"model": NPU_MODEL_ID, "messages": [{"role": "user",
                                                                 "content": prompt}]})
        excess.append(time.perf_counter() - started - setting)
    return excess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lan-bench-") as tmp:
        libs = {ABI: build_rkllm_double(ABI, os.path.join(tmp, "double"))}
        servers = LiveServers(tmp)
        stock = None
        try:
            ours = start_npu_server(servers, libs, FAKE_RKLLM_RECORD="",
                                    RKLLM_API_LOG_LEVEL="WARNING")
            stock = StockGthread(ours.env)
            rows = []
            for name, url, port in (("rkllm-api worker", ours.url, ours.port),
                                    ("stock gthread", stock.url, stock.port)):
                latencies(url, 1, 30)   # load the model
                idle = latencies(url, args.runs, args.timeout)
                with HostileLoad(port):
                    loaded = latencies(url, args.runs, args.timeout)
                rows.append((name, idle, loaded))
            stock.stop()
            limits = [
                ("FIRST_TOKEN_TIMEOUT=1, 4 s prefill", {"FIRST_TOKEN_TIMEOUT": "1"},
                 "@@prefill:4000@@ @@count:2@@", 1.0),
                ("TOTAL_TIMEOUT=1.5, 4 s prefill", {"TOTAL_TIMEOUT": "1.5"},
                 "@@prefill:4000@@ @@count:2@@", 1.5),
                ("FALLBACK_SILENCE=1 after a token", {"FALLBACK_SILENCE": "1"}, "@@hang@@", 1.0),
            ]
            fired = [(name, limit_excess(servers, libs, env, prompt, setting, args.runs))
                     for name, env, prompt, setting in limits]
        finally:
            if stock is not None:
                stock.stop()
            servers.stop_all()

    print(f"{DRIBBLERS} dribbling + {IDLE} idle kept-alive connections, 8 request threads; "
          f"medians of {args.runs}, timeout {args.timeout:g} s")
    print(f"{'worker':<18}{'/v1/models idle':<20}{'/v1/models loaded':<26}"
          f"{'chat idle':<16}{'chat loaded':<26}")
    for name, idle, loaded in rows:
        print(f"{name:<18}{describe(idle['models']):<20}{describe(loaded['models']):<26}"
              f"{describe(idle['chat']):<16}{describe(loaded['chat']):<26}")
    print()
    print(f"{'limit':<36}{'error after the setting: median':<34}{'max':<10}")
    for name, excess in fired:
        print(f"{name:<36}{statistics.median(excess) * 1000:<34.0f}{max(excess) * 1000:<10.0f}"
              " ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
