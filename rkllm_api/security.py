"""Who may call the server, and from which browser pages.

One `Gate` runs before every request of every surface (a Flask before_request hook
installed by api.create_app), so a blueprint added later is covered without doing
anything:

* Origins: a request that carries an `Origin` header (a browser page made it) is
  refused with 403 unless the origin is the server's own or listed in CORS_ORIGINS;
  flask-cors answers preflights for the listed origins only. Without a list no
  page of another origin can use the API.
* API keys (RKLLM_API_KEYS, RKLLM_API_KEYS_FILE, RKLLM_ADMIN_KEYS): once any key is
  configured every route needs one, except /health and /ready (and /metrics when
  METRICS_PUBLIC is on). A key is accepted as `Authorization: Bearer <key>` (the
  openai and ollama clients, Open WebUI, Home Assistant), `x-api-key` or `api-key`.
  Keys are compared as SHA-256 digests with hmac.compare_digest against every
  configured key, so the time taken does not tell which key or how much of it
  matched. Routes marked with `admin_only` (model select/unload, cache create/delete)
  need an admin key.
* Keyless clients (KEYLESS_CLIENTS): a request without a key from a listed address or
  network (the TCP peer's, never a forwarding header) passes as a non-admin key named
  `keyless@<address>`: for clients that cannot send a key, such as Home Assistant's
  Ollama integration. A wrong key is still refused.

Refusals are RequestErrors, so api.py's one error table renders them in the format
of the surface the path belongs to. The name of the key that was used (never the
key) is put into the WSGI environ as `rkllm_api.key_name` for the access log.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from flask import current_app, request
from flask_cors import CORS

from rkllm_api.errors import RequestError
from rkllm_api.logs import KEY_NAME_ENVIRON   # the access log prints the key's name

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 8
METRICS_PATH = "/metrics"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_KEY = re.compile(r"^[\x21-\x7e]+$")   # printable ASCII, no spaces
_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")
_EXPOSED_HEADERS = ("X-RKLLM-KV", "X-RKLLM-Prefill-Tokens", "X-RKLLM-Sampling-Unapplied",
                    "X-RKLLM-Cache-Dropped", "Retry-After")


class SecurityConfigError(ValueError):
    """A key or origin setting the server cannot use; it refuses to start."""


# ----------------------------------------------------------------------------
# marks on views


def admin_only(view: Callable) -> Callable:
    """Mark a view as management: it needs an admin key once keys are set."""
    view.rkllm_admin = True
    return view


def public(view: Callable) -> Callable:
    """Mark a view as open: it never needs a key (liveness and readiness)."""
    view.rkllm_public = True
    return view


# ----------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class ApiKey:
    name: str
    admin: bool
    digest: bytes     # SHA-256 of the key; the key itself is not kept


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _checked_key(key: str, where: str) -> str:
    if not _KEY.match(key):
        raise SecurityConfigError(f"{where}: an API key must be printable ASCII without spaces")
    if len(key) < MIN_KEY_LENGTH:
        raise SecurityConfigError(f"{where}: an API key must be at least {MIN_KEY_LENGTH} "
                                  f"characters long")
    return key


def parse_keys_file(text: str, path: str = "keys file") -> list:
    """(key, name, admin) per line "KEY [NAME] [admin]"; blank lines and '#' comments skipped."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path} line {number}"
        if len(words) > 3 or (len(words) == 3 and words[2] != "admin"):
            raise SecurityConfigError(f"{where}: expected 'KEY [NAME] [admin]'")
        key = _checked_key(words[0], where)
        name = words[1] if len(words) > 1 else f"line-{number}"
        if not _NAME.match(name):
            raise SecurityConfigError(f"{where}: a key name is 1-64 letters, digits, "
                                      f"'.', '_', '@' or '-'")
        found.append((key, name, len(words) == 3))
    return found


class KeyRing:
    """The configured keys; empty = no authentication."""

    def __init__(self, keys: tuple = ()):
        self.keys = tuple(keys)

    @classmethod
    def from_settings(cls, settings) -> "KeyRing":
        entries = []
        for variable, value, admin in (("RKLLM_API_KEYS", settings.api_keys, False),
                                       ("RKLLM_ADMIN_KEYS", settings.admin_keys, True)):
            words = [w.strip() for w in value.split(",") if w.strip()]
            prefix = "admin" if admin else "key"
            entries += [(_checked_key(w, variable), f"{prefix}-{i}", admin)
                        for i, w in enumerate(words, 1)]
        if settings.api_keys_file:
            entries += parse_keys_file(_read(settings.api_keys_file), settings.api_keys_file)
        by_digest: dict = {}
        for key, name, admin in entries:   # a key listed twice keeps its strongest role
            digest = _digest(key)
            known = by_digest.get(digest)
            if known is None or (admin and not known.admin):
                by_digest[digest] = ApiKey(name, admin, digest)
        return cls(tuple(by_digest.values()))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @property
    def has_admin(self) -> bool:
        return any(key.admin for key in self.keys)

    def match(self, presented: str) -> Optional[ApiKey]:
        """The key presented, or None. Every configured key is compared, always."""
        digest = _digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(f"RKLLM_API_KEYS_FILE {path!r} cannot be read: {exc}") from None


def presented_key(headers) -> Optional[str]:
    """The key a client sent: Authorization: Bearer, x-api-key or api-key."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for name in ("x-api-key", "api-key"):
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


# ----------------------------------------------------------------------------
# origins


class OriginPolicy:
    """Browser origins allowed besides the server's own ("*" = any, not advised)."""

    def __init__(self, listed: tuple = ()):
        self.listed = tuple(listed)
        self.any = "*" in self.listed
        self._lowered = frozenset(o.lower() for o in self.listed)

    @classmethod
    def from_settings(cls, settings) -> "OriginPolicy":
        origins = []
        for word in (w.strip().rstrip("/") for w in settings.cors_origins.split(",")):
            if not word:
                continue
            if word != "*" and not _ORIGIN.match(word):
                raise SecurityConfigError(
                    f"CORS_ORIGINS: {word!r} is not an origin like http://host:port "
                    f"(scheme, host and port only, no path)")
            origins.append(word)
        return cls(tuple(origins))

    def allows(self, origin: str, own_url: str) -> bool:
        if self.any and origin != "null":
            return True
        if origin.lower() in self._lowered:
            return True
        return _same_origin(origin, own_url)


def _same_origin(origin: str, own_url: str) -> bool:
    """Origin equals the scheme://host:port the request was sent to."""
    try:
        theirs, ours = urlsplit(origin), urlsplit(own_url)
        return (theirs.scheme, theirs.hostname, _port(theirs)) == \
            (ours.scheme, ours.hostname, _port(ours))
    except ValueError:
        return False


def _port(parts) -> Optional[int]:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme)


# ----------------------------------------------------------------------------
# the gate


class KeylessClients:
    """Addresses whose requests need no key (KEYLESS_CLIENTS). Judged by the TCP peer's
    address only: a forwarding header is the client's word and is never read."""

    def __init__(self, networks: tuple = ()):
        self.networks = tuple(networks)

    @classmethod
    def from_settings(cls, settings) -> "KeylessClients":
        networks = []
        for word in (w.strip() for w in settings.keyless_clients.split(",")):
            if not word:
                continue
            try:
                networks.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                raise SecurityConfigError(
                    f"KEYLESS_CLIENTS: {word!r} is not an IP address or network "
                    f"(such as 192.168.1.20 or 192.168.1.0/24)") from None
        return cls(tuple(networks))

    def admits(self, address: Optional[str]) -> bool:
        if not self.networks or not address:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if getattr(ip, "ipv4_mapped", None) is not None:   # ::ffff:a.b.c.d on a v6 socket
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)


class Gate:
    """The before_request check of every route."""

    def __init__(self, keys: KeyRing, origins: OriginPolicy, metrics_public: bool = False,
                 keyless: Optional[KeylessClients] = None):
        self.keys = keys
        self.origins = origins
        self.metrics_public = metrics_public
        self.keyless = keyless or KeylessClients()

    @classmethod
    def from_settings(cls, settings) -> "Gate":
        return cls(KeyRing.from_settings(settings), OriginPolicy.from_settings(settings),
                   settings.metrics_public, KeylessClients.from_settings(settings))

    def check(self) -> None:
        if request.method == "OPTIONS":
            return   # preflights carry no credentials; flask-cors answers them
        origin = request.headers.get("Origin")
        if origin is not None and not self.origins.allows(origin, request.host_url):
            raise RequestError(f"requests from the web page origin {origin!r} are not "
                               f"allowed; list it in CORS_ORIGINS to allow it",
                               status=403, code="origin_not_allowed")
        view = current_app.view_functions.get(request.endpoint or "")
        if not self.keys.enabled or self._is_open(view):
            return
        presented = presented_key(request.headers)
        key = self.keys.match(presented) if presented else None
        if key is None and presented is None and self.keyless.admits(request.remote_addr):
            key = ApiKey(f"keyless@{request.remote_addr}", False, b"")
        if key is None:
            raise _unauthorized(presented is not None)
        request.environ[KEY_NAME_ENVIRON] = key.name
        if getattr(view, "rkllm_admin", False) and not key.admin:
            raise RequestError("this endpoint manages the server and needs an admin key "
                               "(RKLLM_ADMIN_KEYS, or 'admin' in RKLLM_API_KEYS_FILE)",
                               status=403, code="admin_key_required")

    def _is_open(self, view) -> bool:
        if getattr(view, "rkllm_public", False):
            return True
        return self.metrics_public and request.path == METRICS_PATH


def _unauthorized(wrong: bool) -> RequestError:
    if wrong:
        message = "Incorrect API key provided."
    else:
        message = ("You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                   "or 'x-api-key: <key>'.")
    return RequestError(message, status=401, code="invalid_api_key",
                        headers={"WWW-Authenticate": 'Bearer realm="rkllm-api"'})


def install(app, gate: Gate) -> Gate:
    """Check every request of `app` through the gate (Gate.from_settings refuses
    unusable settings first) and answer CORS for the listed origins only."""
    if gate.origins.listed:
        CORS(app, origins=list(gate.origins.listed), expose_headers=list(_EXPOSED_HEADERS),
             max_age=600)
    app.before_request(gate.check)
    if gate.keys.enabled:
        log.info("API keys on: %d key(s), %d admin", len(gate.keys.keys),
                 sum(k.admin for k in gate.keys.keys))
        if gate.keyless.networks:
            log.info("no key needed from %s (KEYLESS_CLIENTS; never admin)",
                     ", ".join(map(str, gate.keyless.networks)))
    else:
        log.info("API keys off: every client that reaches the port may use the API")
        if gate.keyless.networks:
            log.warning("KEYLESS_CLIENTS has no effect while no API keys are set")
    return gate
