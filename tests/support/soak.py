"""Mixed traffic for leak checks, and what a process holds as /proc shows it.

`mixed_round(server, round_number)` sends one round of every kind of request a long
running board sees (chats streamed and not, a stream whose client vanishes, a
request head that never completes, the Ollama surface, embeddings, completions, bad
JSON, read-only GETs, and a runtime crash with its reload) on the librkllmrt double.
Used by tests/test_soak.py (a few rounds, nothing may grow with the rounds) and
bench/soak_bench.py (many rounds, figures for docs/BENCHMARKS.md).
"""
from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from support.live_server import NPU_MODEL_ID
from support.processes import children_of, process_state

REQUESTS_PER_ROUND = 14
IDLE_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Footprint:
    """What one process holds."""
    fds: int
    threads: int
    rss_kb: int


def footprint(pid: int) -> Footprint:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss_kb = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return Footprint(fds, threads, rss_kb)


def live_children(pid: int) -> list:
    return [child for child in children_of(pid) if process_state(child) not in (None, "Z", "X")]


def zombie_children(pid: int) -> list:
    return [child for child in children_of(pid) if process_state(child) == "Z"]


def _chat(content: str, **extra) -> dict:
    return {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": content}], **extra}


def _post(server, path: str, body, stream: bool = False) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.url + path, data=data, stream=stream, timeout=60,
                         headers={"Content-Type": "application/json"})


def _expect(response: requests.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise AssertionError(f"{what}: {response.status_code} {response.text[:300]}")


def _vanishing_stream(server) -> None:
    """A streamed chat whose client reads the first bytes and closes the socket."""
    body = json.dumps(_chat("@@slow:5@@ @@count:400@@", stream=True)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        if not sock.recv(256).startswith(b"HTTP/1.1 200"):
            raise AssertionError("the vanishing stream was not answered")


def _unfinished_head(server) -> None:
    """A client that sends half a request head and goes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Le")


def mixed_round(server, round_number: int, crash: bool = True) -> None:
    """One round of REQUESTS_PER_ROUND requests of every kind, one after another
    (one fewer without the crash)."""
    tag = f"round {round_number}"
    if crash:   # first: the rest of the round runs on the model loaded again
        crashed = _post(server, "/v1/chat/completions",
                        _chat("@@count:5@@ @@crash:segv@@ @@crash_after:0@@"))
        _expect(crashed, 500, "crash")
    first = _post(server, "/v1/chat/completions", _chat(f"@@reply:first answer {tag}@@"))
    _expect(first, 200, "chat")
    follow_up = _chat("@@reply:second answer@@")
    follow_up["messages"][:0] = [{"role": "user", "content": f"@@reply:first answer {tag}@@"},
                                 {"role": "assistant",
                                  "content": first.json()["choices"][0]["message"]["content"]}]
    _expect(_post(server, "/v1/chat/completions", follow_up), 200, "follow-up")
    streamed = _post(server, "/v1/chat/completions", _chat("@@count:30@@", stream=True), True)
    _expect(streamed, 200, "stream")
    if not streamed.content.rstrip().endswith(b"data: [DONE]"):
        raise AssertionError("a stream did not end with [DONE]")
    _vanishing_stream(server)
    _unfinished_head(server)
    ollama = _post(server, "/api/chat", _chat("@@count:10@@", stream=True), True)
    _expect(ollama, 200, "ollama chat")
    if not json.loads(ollama.content.splitlines()[-1])["done"]:
        raise AssertionError("the Ollama stream did not end with done")
    embedded = _post(server, "/v1/embeddings", {"model": NPU_MODEL_ID,
                                                "input": [f"a {tag}", "b", "c"]})
    _expect(embedded, 200, "embeddings")
    _expect(_post(server, "/v1/completions", {"model": NPU_MODEL_ID, "max_tokens": 5,
                                              "prompt": "@@count:5@@"}), 200, "completion")
    _expect(_post(server, "/v1/chat/completions", b'{"model": "x", "messages": ['), 400,
            "bad JSON")
    for path in ("/v1/models", "/health", "/metrics"):
        _expect(requests.get(server.url + path, timeout=30), 200, path)


def fill_thread_pool(server, threads: int = 8) -> None:
    """Requests at once, so the server's request threads (a pool that grows on demand
    up to RKLLM_API_THREADS) all exist before anything is counted."""
    with ThreadPoolExecutor(threads + 2) as pool:
        answers = list(pool.map(lambda _: _post(server, "/v1/chat/completions",
                                                _chat("@@slow:20@@ @@count:3@@")),
                                range(threads + 2)))
    for answer in answers:
        _expect(answer, 200, "concurrent chat")


def wait_until_idle(server, worker_pid: int, expected_children: int = 1) -> None:
    """Bounded: until no request runs or waits, the runtime child is back and the
    connections of the round are closed (the read layer's deadlines included)."""
    deadline = time.monotonic() + IDLE_WAIT_SECONDS
    while time.monotonic() < deadline:
        health = requests.get(server.url + "/health", timeout=30).json()
        busy = health["queue_length"] or any(device["busy"]
                                             for device in health["devices"].values())
        if not busy and len(live_children(worker_pid)) == expected_children:
            return
        time.sleep(0.1)
    raise AssertionError("the server did not become idle")
