"""An HTTP server on 127.0.0.1 that serves images to the server under test.

`image_server` (module-scoped) serves `image_server.files[path] = bytes` at
`image_server.url + path`, plus awkward answers: `/slow/<path>` sends the file a
few bytes at a time with pauses (bounded: it gives up after SLOW_LIMIT seconds or
when the client is gone), `/redirect/<path>` answers 302 to the file, `/endless`
declares no length and streams zeros (bounded by ENDLESS_LIMIT bytes),
`/slow-headers` sends its status line and headers a byte at a time (bounded like
/slow), `/bad-redirect` answers 302 to an unparseable URL, and unknown paths are 404.
`image_server.hits` lists the paths asked for. `image_server.start_https(cert, key)`
serves the same over TLS and returns its URL.
"""
from __future__ import annotations

import ssl
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
            elif self.path == "/slow-headers":
                self._slow_headers()
            elif self.path == "/bad-redirect":
                self.send_response(302)
                self.send_header("Location", "http://[::1/unclosed.png")
                self.end_headers()
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

    def _slow_headers(self):
        """Each byte well within any read timeout, the whole far beyond a fetch's."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"x" * 200
        deadline = time.monotonic() + SLOW_LIMIT
        for byte in head:
            if time.monotonic() > deadline:
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)

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
        self._https = None

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def start_https(self, cert: str, key: str) -> str:
        """The same files over TLS with this certificate (on 127.0.0.1); its URL."""
        if self._https is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self._https = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            self._https.daemon_threads = True
            self._https.owner = self
            self._https.socket = context.wrap_socket(self._https.socket, server_side=True)
            threading.Thread(target=self._https.serve_forever, daemon=True).start()
        return f"https://127.0.0.1:{self._https.server_address[1]}"

    def stop(self) -> None:
        for httpd in (self._httpd, self._https):
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer().start()
    try:
        yield server
    finally:
        server.stop()


__all__ = ["ImageServer", "image_server"]
