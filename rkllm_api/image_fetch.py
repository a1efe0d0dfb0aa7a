"""Fetching an image a request names by http(s) URL, within limits.

A URL in a request makes the server a client of whatever it names, so the fetch is
bounded every way a remote server could hold it: one deadline for the whole fetch
(connect, TLS handshake, headers, redirects, body; a watchdog shuts the socket at
the deadline, since a per-read timeout alone lets a server trickle a byte of its
headers at a time for ever), a byte limit checked against Content-Length before the
body and again while reading, at most MAX_REDIRECTS redirects, each re-checked, and
`Accept-Encoding: identity` so a small compressed body cannot expand into a large
one. Addresses that are not public (loopback, private ranges, link-local such as a
cloud's metadata service) are refused unless the setting allows them: the server
usually sits inside a home or office network a request must not reach through it.

The host is resolved once, the addresses checked, and the connection made to the
checked address (the name still goes into Host and, for https, into SNI and the
certificate check), so a name whose DNS answer changes between check and connect
(rebinding) cannot slip past the check. urllib3 is used directly for that: requests
resolves names itself.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3
READ_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)


class ImageFetchError(ValueError):
    """The URL cannot be fetched; the message says why (for a 400)."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0            # seconds for the whole fetch
    allow_private: bool = False      # loopback, RFC 1918, link-local, ...


class _Expired(Exception):
    pass


def fetch_image(url: str, policy: FetchPolicy) -> bytes:
    """The body at url (following up to MAX_REDIRECTS redirects), or ImageFetchError."""
    import urllib3  # only requests with URL images need it
    deadline = time.monotonic() + policy.timeout
    watchdog = _Watchdog(policy.timeout)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            address = check_url(url, policy)
            pool, response = _get(url, address, deadline, watchdog)
            try:
                if response.status in _REDIRECTS:
                    url = _redirect_target(url, response.headers.get("Location", ""))
                    continue
                if response.status != 200:
                    raise ImageFetchError(f"the server answered {response.status} "
                                          f"for {_shown(url)}")
                return _read_body(response, policy, deadline)
            finally:
                response.release_conn()
                pool.close()
        raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects from {_shown(url)}")
    except urllib3.exceptions.NewConnectionError:
        # urllib3 derives it from its TimeoutError, but it is mostly a refusal
        if watchdog.fired:
            raise _too_slow(url, policy) from None
        raise ImageFetchError(f"cannot connect to {_shown(url)}") from None
    except (_Expired, urllib3.exceptions.TimeoutError):
        raise _too_slow(url, policy) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if watchdog.fired:   # the socket was shut under the read: it was the deadline
            raise _too_slow(url, policy) from None
        if isinstance(exc, urllib3.exceptions.SSLError):   # mostly a self-signed certificate
            raise ImageFetchError(f"cannot fetch {_shown(url)}: its TLS certificate is not "
                                  "trusted or the TLS handshake failed") from None
        raise ImageFetchError(f"cannot fetch {_shown(url)}: {type(exc).__name__}") from None
    finally:
        watchdog.cancel()


def _too_slow(url: str, policy: FetchPolicy) -> ImageFetchError:
    return ImageFetchError(f"fetching {_shown(url)} took longer than {policy.timeout:g} s "
                           "(IMAGE_URL_TIMEOUT)")


class _Watchdog:
    """Shuts the fetch's sockets when its time is up. urllib3's timeouts bound each
    socket operation, not their sum: a server sending its status line and headers a
    byte at a time (or stalling the TLS handshake the same way) would otherwise hold
    the request thread for as long as it likes."""

    def __init__(self, seconds: float):
        self.fired = False
        self._sockets: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            fired = self.fired
        if fired:
            _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock) -> None:
    try:
        # the socket's own shutdown (not SSLSocket's, which drops its TLS state under
        # a read in progress): a blocked recv returns at once
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass   # closed already, or detached into the TLS socket (watched as well)


def _watched(connection_class, watchdog: _Watchdog):
    """connection_class, its sockets under the watchdog: the plain socket from the
    start (TCP, the TLS handshake) and, for https, the TLS socket wrapped around it."""
    class Watched(connection_class):
        def _new_conn(self):
            sock = super()._new_conn()
            watchdog.watch(sock)
            return sock

        def connect(self):
            super().connect()
            if self.sock is not None:
                watchdog.watch(self.sock)
    return Watched


def _redirect_target(url: str, location: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError:   # e.g. "http://[::1" (an unclosed IPv6 address)
        raise ImageFetchError(f"{_shown(url)} redirects to an invalid URL") from None


def _get(url: str, address: str, deadline: float, watchdog: _Watchdog):
    """(pool, response): GET url from `address` (already checked), no redirects."""
    import urllib3
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    remaining = _remaining(deadline)
    options = dict(timeout=urllib3.Timeout(connect=remaining, read=remaining),
                   retries=False, maxsize=1)
    if https:
        options.update(cert_reqs="CERT_REQUIRED", ca_certs=_ca_bundle(),
                       server_hostname=parts.hostname, assert_hostname=parts.hostname)
    pool_class = urllib3.HTTPSConnectionPool if https else urllib3.HTTPConnectionPool
    pool = pool_class(address, _port(parts), **options)
    pool.ConnectionCls = _watched(pool.ConnectionCls, watchdog)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]   # never send userinfo along
    try:
        return pool, pool.urlopen("GET", target, redirect=False, preload_content=False,
                                  headers={"Host": host, "Accept": "image/*",
                                           "Accept-Encoding": "identity",
                                           "User-Agent": "rkllm-api image fetch"})
    except BaseException:
        pool.close()
        raise


def _ca_bundle():
    try:
        import certifi
        return certifi.where()
    except ImportError:
        return None   # urllib3 then loads the system's certificates


def _read_body(response, policy: FetchPolicy, deadline: float) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise ImageFetchError(f"the image is {declared} bytes, over the limit of "
                              f"{policy.max_bytes} (IMAGE_MAX_BYTES)")
    body = bytearray()
    while True:
        _remaining(deadline)
        # read1 returns what arrived; read(n) would wait for n bytes from a trickling server
        chunk = response.read1(READ_CHUNK)
        if not chunk:
            _remaining(deadline)   # an end from the watchdog's shutdown is no end
            return bytes(body)
        body += chunk
        if len(body) > policy.max_bytes:
            raise ImageFetchError(f"the image is over the limit of {policy.max_bytes} bytes "
                                  "(IMAGE_MAX_BYTES)")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Expired()
    return left


def _port(parts) -> int:
    try:
        return parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ImageFetchError(f"{_shown(parts.geturl())} has an invalid port") from None


def check_url(url: str, policy: FetchPolicy) -> str:
    """The address to connect to for url; refuses what is not http(s) and (unless
    allowed) hosts with any non-public address."""
    try:
        parts = urlsplit(url)
        parts.hostname   # parses the host: "http://[::1" is a ValueError here
    except ValueError:
        raise ImageFetchError(f"{_shown(url)} is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ImageFetchError(f"{_shown(url)} is not an http(s) URL or a data URL")
    try:
        found = socket.getaddrinfo(parts.hostname, _port(parts), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise ImageFetchError(f"cannot resolve the host of {_shown(url)}") from None
    addresses = [info[4][0] for info in found]
    if not policy.allow_private:
        for address in addresses:
            if not _public(address):
                raise ImageFetchError(f"{_shown(url)} points to the non-public address "
                                      f"{address}; set IMAGE_URL_PRIVATE=true to allow it")
    return addresses[0]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")            # the well-known prefix
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")    # a network's own translator


def _public(address: str) -> bool:
    """A global address, and for an IPv6 address carrying an IPv4 one (NAT64, 6to4,
    IPv4-compatible) that one too: Python calls 64:ff9b::a00:1 global, but a NAT64
    gateway turns it into 10.0.0.1 on its own network."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if not ip.is_global:
        return False
    if ip.version == 6:
        if ip in _LOCAL_NAT64:
            return False
        embedded = ip.sixtofour
        if embedded is None and (ip in _NAT64 or int(ip) >> 32 == 0):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not embedded.is_global:
            return False
    return True


def _shown(url: str) -> str:
    """The URL for a message: no user info or query string (either may hold a
    secret), bounded length."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        text = (f"{parts.scheme}:" if parts.scheme else "") + (
            f"//{host}" if parts.netloc else "") + parts.path
    except ValueError:   # unparseable: what surely holds no user info or query
        text = url.split("?", 1)[0].rpartition("@")[2] or "the URL"
    return text if len(text) <= 80 else text[:77] + "..."
