"""The device queue and the run limits on a live server (librkllmrt double): a client
that leaves while queued never reaches the device, requests start strictly in the
order they arrived, and each limit answers the client when it strikes even while the
runtime sits in a prefill it cannot leave (the device is freed when it returns).

How close to its setting a limit fires is measured in bench/lan_bench.py; here the
tests check causes: the error came while the runtime was still busy, it names the
setting, and it never came early."""
import json
import re
import socket
import time

import pytest
import requests

from rkllm_api.engine.slots import ArrivalOrder
from support.live_server import NPU_MODEL_ID, start_npu_server

WAIT = 20.0
CHAT = "/v1/chat/completions"


def user(text, **extra):
    return {"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": text}], **extra}


def raw_request(server, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(payload) + payload)
    return sock


def npu(server) -> dict:
    return server.get("/health", timeout=5).json()["devices"]["npu"]


def wait_for(condition, what: str, wait: float = WAIT):
    deadline = time.monotonic() + wait
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def run_prompts(server, since: int) -> list:
    return [run["prompt"] for run in server.record.entries("run")[since:]]


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    # Threads for every waiter, so the order below is the queue's and not the pool's;
    # frequent heartbeats, so a holder whose client left is noticed at once.
    return start_npu_server(live_servers, rkllm_double_libs, RKLLM_API_THREADS="24",
                            QUEUE_MAX_LENGTH="20", SSE_HEARTBEAT_SECONDS="0.2")


def hold_the_device(server) -> socket.socket:
    """A stream that runs until its client goes away."""
    sock = raw_request(server, user("@@hang@@ holder", stream=True))
    wait_for(lambda: npu(server)["busy"], "the holder to start")
    return sock


def release(server, holder: socket.socket) -> None:
    holder.close()
    wait_for(lambda: not npu(server)["busy"], "the device to be free")


def test_a_client_that_leaves_while_queued_never_reaches_the_device(server):
    runs_before = len(server.record.entries("run"))
    holder = hold_the_device(server)
    queued = raw_request(server, user("@@count:2@@ left-while-queued"))
    wait_for(lambda: npu(server)["queue_length"] == 1, "the request to queue")
    queued.close()
    # The waiter notices while the device is still busy, and leaves the queue.
    wait_for(lambda: npu(server)["queue_length"] == 0, "the queue to drop it")
    assert npu(server)["busy"]
    release(server, holder)
    after = server.post(CHAT, json=user("@@count:2@@ next"), timeout=WAIT)
    assert after.json()["choices"][0]["message"]["content"] == "tok0 tok1"
    prompts = run_prompts(server, runs_before)
    assert not any("left-while-queued" in p for p in prompts), prompts
    assert any("next" in p for p in prompts)


def test_concurrent_streams_start_strictly_in_arrival_order(server):
    """16 streams sent one right after the other while the device is busy: each
    request is complete before the next one is sent, so that is their arrival order,
    and the runs must start in it (the threads that carry them may be scheduled in
    any order)."""
    runs_before = len(server.record.entries("run"))
    holder = hold_the_device(server)
    socks = [raw_request(server, user(f"@@count:3@@ client-{i}", stream=True))
             for i in range(16)]
    wait_for(lambda: npu(server)["queue_length"] == 16, "all 16 to queue")
    release(server, holder)
    for sock in socks:
        sock.settimeout(WAIT)
        received = b""
        while b"data: [DONE]" not in received:
            chunk = sock.recv(65536)
            assert chunk, received[-300:]
            received += chunk
        sock.close()
    prompts = run_prompts(server, runs_before)
    order = [int(m.group(1)) for m in (re.search(r"client-(\d+)", p) for p in prompts) if m]
    assert order == list(range(16))


def test_queue_wait_still_ends_at_queue_timeout(live_servers, rkllm_double_libs):
    server = start_npu_server(live_servers, rkllm_double_libs, QUEUE_TIMEOUT="1",
                              SSE_HEARTBEAT_SECONDS="0.2")
    holder = hold_the_device(server)
    try:
        started = time.monotonic()
        response = server.post(CHAT, json=user("@@count:1@@ too late"), timeout=WAIT)
        assert time.monotonic() - started >= 1.0
        assert response.status_code == 503 and "Retry-After" in response.headers
    finally:
        release(server, holder)


# ---- limits ------------------------------------------------------------------------------

LIMITS = [
    # (settings, prompt, setting named in the error, seconds, the runtime cannot stop)
    ({"FIRST_TOKEN_TIMEOUT": "1"}, "@@prefill:4000@@ @@count:2@@", "first_token_timeout", 1.0,
     True),
    ({"TOTAL_TIMEOUT": "1.5"}, "@@prefill:4000@@ @@count:2@@", "total_timeout", 1.5, True),
    ({"FALLBACK_SILENCE": "1"}, "@@hang@@", "silence_timeout", 1.0, False),
]


@pytest.fixture(scope="module")
def limit_server(live_servers, rkllm_double_libs):
    """One server per limit setting, shared by the streaming and JSON cases."""
    started = {}

    def server_for(env: dict):
        key = tuple(sorted(env.items()))
        if key not in started:
            started[key] = start_npu_server(live_servers, rkllm_double_libs, **env)
        return started[key]
    return server_for


@pytest.mark.parametrize("env,prompt,setting,seconds,stuck", LIMITS,
                         ids=[case[2] for case in LIMITS])
@pytest.mark.parametrize("stream", [False, True])
def test_a_limit_answers_when_it_strikes(limit_server, env, prompt, setting, seconds, stuck,
                                         stream):
    server = limit_server(env)
    aborts_before = len(server.record.entries("abort"))
    started = time.monotonic()
    response = requests.post(server.url + CHAT, json=user(prompt, stream=stream), timeout=WAIT)
    elapsed = time.monotonic() - started
    busy_at_answer = npu(server)["busy"]
    assert setting in response.text, response.text
    assert elapsed >= seconds   # never early
    if stuck:
        # The answer did not wait for the runtime: it is still in its 4 s prefill.
        assert response.status_code == 500 and busy_at_answer
    wait_for(lambda: not npu(server)["busy"], "the device to be freed")
    assert len(server.record.entries("abort")) > aborts_before


# ---- the arrival order, in-process --------------------------------------------------------

def test_arrivals_leave_in_any_order():
    order = ArrivalOrder()
    first, second, third = order.issue(), order.issue(), order.issue()
    order.leave(second)
    assert order.earlier_on_the_way(third)       # the first is still on its way
    assert not order.earlier_on_the_way(first)
    order.leave(first)
    order.leave(None)                             # ignored
    assert not order.earlier_on_the_way(third)
    assert order.issue_and_leave() == third + 1


def test_an_arrival_that_never_reports_back_is_skipped():
    now = [100.0]
    order = ArrivalOrder(clock=lambda: now[0])
    order.issue()                                 # its request never says it left
    mine = order.issue()
    assert order.earlier_on_the_way(mine)
    now[0] += 31.0
    assert not order.earlier_on_the_way(mine)
