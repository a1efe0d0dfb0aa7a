"""A small Hugging Face hub on 127.0.0.1 for pull tests: the listing route
(`/api/models/<repo>/tree/<rev>`) and the file route (`/<repo>/resolve/<rev>/<path>`,
HEAD and GET with Range) that huggingface_hub calls, with the headers it reads
(X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size); a GET of a large (LFS) file is
redirected to `/cdn/...` as the real hub redirects to its CDN.

`fake_hub` (fixture) serves REPOS; `hub.cuts[path] = n` makes the next n GETs of
that file stop half way (the connection closes), `hub.corrupt.add(path)` serves
that file with one byte changed (its size stays right), `hub.requests` records
(method, path, Range header).
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _blob(size: int, seed: str) -> bytes:
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _config(text: str) -> bytes:
    return json.dumps({"note": text}).encode()


# Two repos: one with a model per board (and per SDK generation for rk3588), a vision
# encoder per board and config files; one with a single model naming no board.
REPOS = {
    "acme/Qwen3-0.6B-RKLLM": {
        "qwen3-0.6b-w8a8-rk3588-v1.2.1.rkllm": _blob(300_000, "a"),
        "qwen3-0.6b-w8a8-rk3588-v1.1.4.rkllm": _blob(200_000, "b"),
        "qwen3-0.6b-w8a8-rk3576.rkllm": _blob(250_000, "c"),
        "vision-rk3588.rknn": _blob(40_000, "d"),
        "vision-rk3576.rknn": _blob(40_000, "e"),
        "tokenizer.json": _config("tokenizer"),
        "config.json": _config("config"),
        "README.md": b"# a model card\n",
    },
    "acme/tiny-chat": {
        # Larger than huggingface_hub's 10 MB write chunk: a cut half way leaves bytes
        # on disk for the next attempt to resume from.
        "models/tiny-chat.rkllm": _blob(24 << 20, "f"),
        "models/tokenizer_config.json": _config("tokenizer config"),
        ".gitattributes": b"*.rkllm filter=lfs\n",
    },
}


def is_lfs(path: str) -> bool:
    return path.endswith((".rkllm", ".rknn"))


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    def __init__(self, repos: dict):
        self.repos = repos
        self.cuts: dict = {}       # file -> how many more GETs stop half way
        self.corrupt: set = set()
        self.requests: list = []
        self.huge: set = set()     # files the listing says are 1 TB (the disk check)
        self.hold = threading.Event()   # file GETs wait for it (joining a running pull)
        self.hold.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def tree(self, repo: str) -> list:
        entries = []
        for path, data in self.repos[repo].items():
            size = 10 ** 12 if path in self.huge else len(data)
            entry = {"type": "file", "oid": git_blob_id(data), "size": size, "path": path}
            if is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": size,
                                "pointerSize": 134}
            entries.append(entry)
        return entries

    def gets_of(self, path: str) -> list:
        """The Range headers of every GET that served a file's bytes (None for a
        whole-file GET); large files are served by the "CDN" the hub redirects to."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + path)
                and (p.startswith("/cdn/") or not is_lfs(path))]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _repo_and_rest(self, prefix: str):
                path = unquote(urlparse(self.path).path)
                if not path.startswith(prefix):
                    return None, None
                parts = path[len(prefix):].split("/")
                return "/".join(parts[:2]), parts[2:]

            def _not_found(self, code: str = "RepoNotFound"):
                body = json.dumps({"error": "Repository not found"}).encode()
                self.send_response(404 if code != "EntryNotFound" else 404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", urlparse(self.path).path, self.headers.get("Range")))
                if self.path.startswith("/api/models/"):
                    return self._listing()
                if self.path.startswith("/cdn/"):
                    return self._file(send_body=True, prefix="/cdn/")
                return self._file(send_body=True, redirect_lfs=True)

            def do_HEAD(self):
                hub.requests.append(("HEAD", urlparse(self.path).path, None))
                return self._file(send_body=False)

            def _listing(self):
                repo, rest = self._repo_and_rest("/api/models/")
                if repo not in hub.repos or not rest or rest[0] != "tree":
                    return self._not_found()
                body = json.dumps(hub.tree(repo)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, send_body: bool, prefix: str = "/", redirect_lfs: bool = False):
                repo, rest = self._repo_and_rest(prefix)
                if repo not in hub.repos or len(rest) < 3 or rest[0] != "resolve":
                    return self._not_found()
                name = "/".join(rest[2:])
                data = hub.repos[repo].get(name)
                if data is None:
                    return self._not_found("EntryNotFound")
                etag = (hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_id(data))
                if redirect_lfs and is_lfs(name):   # as the hub does: large files from a CDN
                    self.send_response(302)
                    self.send_header("Location", "/cdn" + urlparse(self.path).path)
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if send_body and name in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                ranged = self.headers.get("Range", "")
                if send_body and ranged.startswith("bytes="):
                    start = int(ranged[len("bytes="):].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                if is_lfs(name):
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not send_body:
                    return
                hub.hold.wait(timeout=60)
                if hub.cuts.get(name, 0) > 0:
                    hub.cuts[name] -= 1
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

        return Handler


@pytest.fixture
def fake_hub():
    hub = FakeHub({repo: dict(files) for repo, files in REPOS.items()}).start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def module_fake_hub():
    """One hub for a module's live server (HF_ENDPOINT is read when it starts)."""
    hub = FakeHub({repo: dict(files) for repo, files in REPOS.items()}).start()
    try:
        yield hub
    finally:
        hub.stop()
