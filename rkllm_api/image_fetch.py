"""Fetching an image a request names by http(s) URL, within limits.

A URL in a request makes the server a client of whatever it names, so the fetch is
bounded every way a remote server could hold it: one deadline for the whole fetch
(connect, redirects, body), a byte limit checked against Content-Length before the
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
    try:
        for _ in range(MAX_REDIRECTS + 1):
            address = check_url(url, policy)
            pool, response = _get(url, address, deadline)
            try:
                if response.status in _REDIRECTS:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                if response.status != 200:
                    raise ImageFetchError(f"the server answered {response.status} "
                                          f"for {_shown(url)}")
                return _read_body(response, policy, deadline)
            finally:
                response.release_conn()
                pool.close()
        raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects from {_shown(url)}")
    except (_Expired, urllib3.exceptions.TimeoutError):
        raise ImageFetchError(f"fetching {_shown(url)} took longer than {policy.timeout:g} s "
                              "(IMAGE_URL_TIMEOUT)") from None
    except urllib3.exceptions.HTTPError as exc:
        raise ImageFetchError(f"cannot fetch {_shown(url)}: {type(exc).__name__}") from None


def _get(url: str, address: str, deadline: float):
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
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ImageFetchError(f"{_shown(url)} is not an http(s) URL or a data URL")
    try:
        found = socket.getaddrinfo(parts.hostname, _port(parts), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise ImageFetchError(f"cannot resolve the host of {_shown(url)}") from None
    addresses = [info[4][0] for info in found]
    if not policy.allow_private:
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise ImageFetchError(f"{_shown(url)} points to the non-public address "
                                      f"{address}; set IMAGE_URL_PRIVATE=true to allow it")
    return addresses[0]


def _shown(url: str) -> str:
    """The URL for a message: no user info or query string (either may hold a
    secret), bounded length."""
    parts = urlsplit(url)
    text = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    return text if len(text) <= 80 else text[:77] + "..."
