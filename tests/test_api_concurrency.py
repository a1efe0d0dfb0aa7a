"""A live server under pressure: client disconnects, many clients at once, a full
queue, and SIGTERM in the middle of a stream (the librkllmrt double behind it)."""
import json
import re
import socket
import threading
import time

import pytest
import requests

from support.live_server import NPU_MODEL_ID, sse_data, start_npu_server

WAIT = 10.0  # bound on every polling loop


def user(text, **extra):
    return {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": text}], **extra}


def open_raw_stream(server, body: dict) -> socket.socket:
    """A streaming request on a bare socket, so the test decides when it goes away."""
    payload = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(payload) + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    deadline = time.monotonic() + WAIT
    while marker not in received:
        assert time.monotonic() < deadline, received[-500:]
        chunk = sock.recv(65536)
        assert chunk, "the server closed the stream early"
        received += chunk
    return received


def npu_state(server) -> dict:
    return server.get("/health", timeout=5).json()["devices"]["npu"]


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    # More threads than clients, so /health answers while 8 requests are held.
    return start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_THREADS="12")


def test_disconnect_mid_stream_aborts_the_run(server):
    aborts_before = len(server.record.entries("abort"))
    # 2000 tokens 20 ms apart: 40 s if nobody aborted it, far beyond the wait below.
    sock = open_raw_stream(server, user("@@slow:20@@ @@count:2000@@"))
    read_until(sock, b"tok5")
    assert npu_state(server)["busy"]
    sock.close()
    wait_for(lambda: not npu_state(server)["busy"], "the slot to be released")
    assert len(server.record.entries("abort")) > aborts_before
    # The device is free for the next client at once.
    body = server.post("/v1/chat/completions", json=user("@@count:2@@"), timeout=WAIT).json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1"


def test_eight_concurrent_clients_served_in_arrival_order(server):
    runs_before = len(server.record.entries("run"))
    results = {}

    def client(index):
        response = requests.post(server.url + "/v1/chat/completions", timeout=60,
                                 json=user(f"@@slow:10@@ @@count:5@@ client-{index}"))
        results[index] = (response.status_code, response.json())

    threads = []
    for index in range(8):
        thread = threading.Thread(target=client, args=(index,))
        thread.start()
        threads.append(thread)
        # Let this client reach the queue (or the device) before the next one arrives.
        wait_for(lambda: len(server.record.entries("run")) - runs_before
                 + npu_state(server)["queue_length"] >= index + 1, f"client {index}")
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(8))
    for status, body in results.values():
        assert status == 200
        assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4"
    prompts = [run["prompt"] for run in server.record.entries("run")[runs_before:]]
    order = [int(re.search(r"client-(\d+)", prompt).group(1)) for prompt in prompts]
    assert order == list(range(8))


def test_full_queue_answers_503_with_retry_after(live_servers, rkllm_double_libs):
    # Short heartbeats: a silent stream notices its client is gone when it next writes.
    server = start_npu_server(live_servers, rkllm_double_libs, QUEUE_MAX_LENGTH="1",
                              SSE_HEARTBEAT_SECONDS="0.2")
    holder = open_raw_stream(server, user("@@hang@@"))
    waiter_result = {}
    try:
        read_until(holder, b"waiting")  # the double's hang sends one token first ...
        read_until(holder, b"\r\n: keep-alive\n\n")  # ... then the server keeps it alive
        waiter = threading.Thread(target=lambda: waiter_result.update(response=requests.post(
            server.url + "/v1/chat/completions", json=user("@@count:2@@"), timeout=60)))
        waiter.start()
        wait_for(lambda: npu_state(server)["queue_length"] == 1, "the second client to queue")
        refused = server.post("/v1/chat/completions", json=user("hi"), timeout=WAIT)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_busy"
    finally:
        holder.close()  # the hang ends by abort when its client goes (next heartbeat)
    waiter.join(30)
    assert waiter_result["response"].status_code == 200
    assert waiter_result["response"].json()["choices"][0]["message"]["content"] == "tok0 tok1"


def test_sigterm_during_stream_exits_0_within_10s(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs)
    response = server.post("/v1/chat/completions", stream=True, timeout=WAIT,
                           json=user("@@slow:50@@ @@count:2000@@", stream=True))
    lines = response.iter_lines()
    first = [next(lines) for _ in range(6)]
    server.terminate()
    rest = [line for line in lines if line]
    code = server.wait(10.0)    # None when it was still running after 10 s
    assert code == 0, server.log()
    payloads = sse_data([line for line in first if line] + rest)
    assert payloads[-1] == "[DONE]"            # the stream ended properly ...
    assert "error" in payloads[-2]             # ... telling the client why
    assert "shutting down" in payloads[-2]["error"]["message"]
