"""An HTTP server on 127.0.0.1 that serves images to the server under test.

`image_server` (module-scoped) serves `image_server.files[path] = bytes` at
`image_server.url + path`, plus awkward answers: `/slow/<path>` sends the file a
few bytes at a time with pauses (bounded: it gives up after SLOW_LIMIT seconds or
when the client is gone), `/redirect/<path>` answers 302 to the file, `/endless`
declares no length and streams zeros (bounded by ENDLESS_LIMIT bytes), and unknown
paths are 404. `image_server.hits` lists the paths asked for.
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SLOW_LIMIT = 8.0              # seconds a slow answer trickles at most
ENDLESS_LIMIT = 64 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet test output
        pass

    def do_GET(self):
        owner = self.server.owner
        owner.hits.append(self.path)
        try:
            if self.path.startswith("/redirect/"):
                self.send_response(302)
                self.send_header("Location", self.path[len("/redirect"):])
                self.end_headers()
            elif self.path.startswith("/slow/"):
                self._slow(owner.files.get(self.path[len("/slow"):]))
            elif self.path == "/endless":
                self._endless()
            elif self.path in owner.files:
                self._send(owner.files[self.path])
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow(self, body):
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        deadline = time.monotonic() + SLOW_LIMIT
        for start in range(0, len(body), 4):
            if time.monotonic() > deadline:
                return
            self.wfile.write(body[start:start + 4])
            self.wfile.flush()
            time.sleep(0.2)

    def _endless(self):
        self.send_response(200)
        self.end_headers()  # no length: the body ends when the connection does
        block = b"\0" * 65536
        for _ in range(ENDLESS_LIMIT // len(block)):
            self.wfile.write(block)


class ImageServer:
    def __init__(self):
        self.files: dict = {}
        self.hits: list = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer().start()
    try:
        yield server
    finally:
        server.stop()


__all__ = ["ImageServer", "image_server"]
