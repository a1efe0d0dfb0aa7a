"""The worker's read layer (rkllm_api/http_worker.py) against a live gunicorn:
slow and idle clients do not hold the server, deadlines end them, a client that
stops reading a stream loses its run, malformed or oversized requests get JSON
errors (never gunicorn's HTML, never a 5xx), and HTTP/1.1's chunked bodies, 100-continue
and pipelining still work. The framing itself is tested in-process.

Latency figures under the same load are measured in bench/lan_bench.py; here every
wait is bounded (a hang fails) and nothing asserts a duration."""
import json
import socket
import threading
import time

import pytest
import requests

from rkllm_api.http_worker import RequestFraming
from support.live_server import NPU_MODEL_ID, start_npu_server
from support.openai_types import validate_openai_payload

WAIT = 20.0
DRIBBLERS, IDLE = 50, 50
BODY = json.dumps({"model": NPU_MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 4}).encode()
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (bounded by WAIT)."""
    sock.settimeout(WAIT)
    received = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server did not close the connection: {received[:300]!r}")


def json_error(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), raw[:300]
    assert b"content-type: application/json" in head.lower()
    payload = json.loads(body)
    validate_openai_payload(payload)
    return payload["error"]


def still_open(sock: socket.socket) -> bool:
    """Connected, and the server sent nothing (no error, no close)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


@pytest.fixture(scope="module")
def server(live_servers, rkllm_double_libs):
    # Long deadlines: the slow clients must still be there when the others are served.
    return start_npu_server(live_servers, rkllm_double_libs, REQUEST_HEADER_TIMEOUT="120",
                            REQUEST_BODY_TIMEOUT="120")


class Dribblers:
    """Connections that send a request a byte at a time (half stall in the head,
    half in the body), from one thread, until stopped."""

    def __init__(self, server, count: int):
        self.socks = [connect(server) for _ in range(count)]
        self.sent = [0] * count
        self.limits = [REQUEST.index(b"\r\n\r\n") if i % 2 == 0 else len(REQUEST) - 1
                       for i in range(count)]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.5):
            for i, sock in enumerate(self.socks):
                if self.sent[i] < self.limits[i]:
                    try:
                        sock.send(REQUEST[self.sent[i]:self.sent[i] + 1])
                        self.sent[i] += 1
                    except OSError:
                        pass

    def __enter__(self):
        for i, sock in enumerate(self.socks):   # everyone has started: a first byte each
            sock.send(REQUEST[:1])
            self.sent[i] = 1
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(WAIT)
        for sock in self.socks:
            sock.close()


def idle_keepalive_connections(server, count: int) -> list:
    """Connections that made one request and now sit idle, kept alive."""
    socks = []
    for _ in range(count):
        sock = connect(server)
        sock.sendall(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}\n"):
            received += sock.recv(4096)
        socks.append(sock)
    return socks


def test_slow_and_idle_clients_do_not_hold_the_server(server):
    idle = idle_keepalive_connections(server, IDLE)
    try:
        with Dribblers(server, DRIBBLERS) as dribblers:
            time.sleep(1.0)   # let them dribble a little
            for _ in range(3):
                models = requests.get(server.url + "/v1/models", timeout=WAIT)
                assert models.status_code == 200
                chat = server.post("/v1/chat/completions", data=BODY, timeout=WAIT,
                                   headers={"Content-Type": "application/json"})
                assert chat.status_code == 200, chat.text
                streamed = server.post("/v1/chat/completions", timeout=WAIT, stream=True,
                                       json={**json.loads(BODY), "stream": True})
                assert b"data: [DONE]" in streamed.content
            # They were served while every slow and idle client was still connected
            # and still waiting: nobody was cut to make room.
            assert all(still_open(sock) for sock in dribblers.socks)
            assert all(still_open(sock) for sock in idle)
            assert min(dribblers.sent) > 1
    finally:
        for sock in idle:
            sock.close()


@pytest.fixture(scope="module")
def strict_server(live_servers, rkllm_double_libs):
    return start_npu_server(live_servers, rkllm_double_libs, REQUEST_HEADER_TIMEOUT="1",
                            REQUEST_BODY_TIMEOUT="1", SEND_TIMEOUT="1",
                            MAX_REQUEST_BYTES="100000")


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_stalled_request_gets_408_at_its_deadline(strict_server, part):
    sock = connect(strict_server)
    cut = REQUEST.index(b"\r\n\r\n") - 5 if part == "head" else len(REQUEST) - 5
    sock.sendall(REQUEST[:cut])
    error = json_error(read_response(sock), 408)   # then the server closes
    assert error["code"] == "request_timeout"
    sock.close()


def test_a_connection_that_never_sends_is_closed_quietly(strict_server):
    sock = connect(strict_server)
    assert read_response(sock) == b""
    sock.close()


def test_a_client_that_stops_reading_its_stream_loses_the_run(strict_server):
    """SEND_TIMEOUT: the write that cannot progress fails, the stream closes and
    aborts the run, so the device is free long before the run would have ended."""
    aborts_before = len(strict_server.record.entries("abort"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", strict_server.port))
    body = json.dumps({"model": NPU_MODEL_ID, "stream": True, "max_tokens": 1000000,
                       "messages": [{"role": "user", "content": "@@slow:1@@ @@count:1000000@@"}]}
                      ).encode()   # ~17 min of tokens
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body)
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")   # then it reads no more
    deadline = time.monotonic() + 60
    # One kept-alive connection for the polls: this server drops a connection that
    # sends nothing for 1 s, and a poller starved between connect and send on a
    # loaded machine would be dropped by design.
    with requests.Session() as poller:
        while poller.get(strict_server.url + "/health", timeout=5).json()[
                "devices"]["npu"]["busy"]:
            assert time.monotonic() < deadline, "the run kept the device"
            time.sleep(0.1)
    assert len(strict_server.record.entries("abort")) > aborts_before
    sock.close()
    assert strict_server.post("/v1/chat/completions", data=BODY,
                              headers={"Content-Type": "application/json"}).status_code == 200


def test_bodies_past_the_read_budget_wait_and_all_complete(live_servers, rkllm_double_libs):
    """Bodies held in memory are bounded (4 x MAX_REQUEST_BYTES): past it, all but the
    connection holding most wait unread, and every request still completes."""
    server = start_npu_server(live_servers, rkllm_double_libs, MAX_REQUEST_BYTES="12000")
    body = json.dumps({"model": NPU_MODEL_ID, "max_tokens": 2, "messages": [
        {"role": "user", "content": "x" * 11000}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    socks = [connect(server) for _ in range(6)]   # 6 x 10000 bytes held > 48000
    for sock in socks:
        sock.sendall(head + body[:10000])
    time.sleep(0.5)
    for sock in socks:
        sock.sendall(body[10000:])
    for sock in socks:
        assert read_response(sock).startswith(b"HTTP/1.1 200"), "a request was lost"
        sock.close()


MALFORMED = [
    # (id, raw request, status, code)
    ("head-too-large", b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70000
     + b"\r\n\r\n", 431, "request_header_too_large"),
    ("field-too-large", b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000
     + b"\r\n\r\n", 431, "request_header_too_large"),
    ("uri-too-long", b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, None),
    ("garbage-line", b"GARBAGE\r\n\r\n", 400, None),
    ("bad-method", b"G@T /v1/models HTTP/1.1\r\nHost: t\r\n\r\n", 400, None),
    ("bad-version", b"GET /v1/models HTTP/9.9\r\nHost: t\r\n\r\n", 400, None),
    ("bad-header-name", b"GET /v1/models HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n", 400, None),
    ("unknown-coding", b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: gzip\r\n\r\n", 400, None),
    ("length-and-chunked", b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, None),
    ("bad-length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: abc\r\n\r\n", 400, None),
    ("bad-chunk-size", b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n", 400, None),
    ("declared-too-large", b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
     b"Content-Length: 999999999999\r\n\r\n", 413, "request_too_large"),
    ("chunked-too-large", b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 200000 + b"a" * 10, 413,
     "request_too_large"),
    ("unknown-expectation", b"GET /ready HTTP/1.1\r\nHost: t\r\nExpect: magic\r\n\r\n", 417, None),
]


@pytest.mark.parametrize("raw,status,code", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_requests_get_json_errors(strict_server, raw, status, code):
    sock = connect(strict_server)
    sock.sendall(raw)
    error = json_error(read_response(sock), status)
    assert error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    sock.close()


def test_chunked_body_expect_continue_and_pipelining(server):
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
    sock = connect(server)
    sock.sendall(chunked)
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    sock.close()

    sock = connect(server)   # the body only after "100 Continue", which comes once
    sock.sendall(REQUEST[:REQUEST.index(b"\r\n\r\n")] + b"\r\nExpect: 100-continue\r\n"
                 b"Connection: close\r\n\r\n")
    assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(BODY)
    answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 200") and b"100 Continue" not in answer
    sock.close()

    sock = connect(server)   # three requests in one write, three answers in order
    sock.sendall(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n" + REQUEST
                 + b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    answers = read_response(sock)
    assert answers.count(b"HTTP/1.1 200 OK") == 3
    assert answers.index(b'"ready"') < answers.index(b'"chat.completion"') \
        < answers.index(b'"loaded_models"')
    sock.close()


# ---- the framing, in-process -----------------------------------------------------------

def framing_of(*pieces, max_body=1000) -> RequestFraming:
    framing = RequestFraming(max_body)
    for piece in pieces:
        framing.feed(piece)
    return framing


def test_framing_waits_for_head_and_body_in_any_pieces():
    for size in (1, 3, 7, len(REQUEST)):
        pieces = [REQUEST[i:i + size] for i in range(0, len(REQUEST), size)]
        framing = RequestFraming(10000)
        for piece in pieces[:-1]:
            framing.feed(piece)
            assert not framing.complete and framing.error is None
        framing.feed(pieces[-1])
        assert framing.complete and framing.data == REQUEST
        assert (framing.method, framing.path) == ("POST", "/v1/chat/completions")


def test_framing_of_chunked_bodies_and_trailers():
    head = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert framing_of(head, b"3\r\nabc\r\n0\r\n\r\n").complete
    assert framing_of(head, b"3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n").complete
    assert not framing_of(head, b"3\r\nabc\r\n0\r\nX-T: 1\r\n").complete
    assert framing_of(head, b"3\r\nabcd\r\n").error[0] == 400
    assert framing_of(head, b"400\r\n", max_body=100).error[0] == 413


def test_framing_takes_out_expect_continue_and_keeps_pipelined_bytes():
    framing = framing_of(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert framing.wants_body and framing.expect_continue
    framing.feed(b"okGET / HTTP/1.1\r\n\r\n")
    assert framing.complete
    assert framing.data == b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\n\r\n"


def test_framing_hands_unusual_framing_to_the_parser():
    """Framing the parser refuses is complete here, so the parser answers it."""
    assert framing_of(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").complete
    assert framing_of(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").complete
    assert framing_of(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n").complete


def _bare_worker():
    """The worker outside gunicorn's arbiter: its real read layer and request
    threads, a plain WSGI app, no main loop (the test drives it)."""
    from concurrent.futures import ThreadPoolExecutor
    import selectors
    from gunicorn import glogging
    from gunicorn.config import Config
    from rkllm_api.config import Settings
    from rkllm_api.http_worker import BoundedReadWorker

    cfg = Config()
    worker = BoundedReadWorker(0, 0, [], None, 30, cfg, glogging.Logger(cfg))
    worker._settings = Settings.from_env({}, header_timeout=1.0)
    worker.poller = selectors.DefaultSelector()
    worker.tpool = ThreadPoolExecutor(1)
    worker.method_queue.init()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    worker.wsgi = app
    return worker


def test_a_request_that_arrived_during_a_stall_is_served_not_dropped():
    """When the main loop stalls (a board swapping) past a connection's header
    deadline, the request that reached the kernel in time is read and served: the
    deadline check reads what arrived before it judges."""
    from gunicorn.workers.gthread import TConn
    worker = _bare_worker()
    client, served = socket.socketpair()
    client.settimeout(WAIT)
    try:
        worker.nr_conns = 1
        worker.enqueue_req(TConn(worker.cfg, served, ("127.0.0.1", 1), ("127.0.0.1", 2)))
        client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        (conn,) = worker._reading
        conn.reading.deadline = time.monotonic() - 0.5   # the stall outlived it
        worker.murder_pending()
        assert client.recv(1024).startswith(b"HTTP/1.1 200"), "dropped unread"
    finally:
        client.close()
        worker.tpool.shutdown(wait=True)
        worker.poller.close()
        worker.method_queue.close()
