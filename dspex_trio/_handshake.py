"""Who may open a websocket connection: the opening handshake's checks, sans-IO.

A server reachable by a browser is hostile territory: any web page the operator opens can try
``new WebSocket("ws://127.0.0.1:8765", "dspex.v1")`` (browsers send no token, but they do send the page's
``Origin``), and a DNS-rebinding page reaches the server under a name of its own (``Host:
evil.example:8765``). So :func:`check_handshake_untrusted` decides, from the request's headers alone:

1. **Credentials.** ``Authorization: Bearer <token>`` (or, from a browser, which cannot set that header
   on a websocket, the proposed subprotocol ``dspex.bearer.<token>``) compared in constant time with the admin token(s)
   (role ``admin``: may also change pool-wide settings) and the client token(s) (role ``client``). A
   token that matches neither is refused (401), even where none is required. When client tokens are set,
   a connection without one is refused (401).
2. **Host** (only for a connection without a token): it must name a loopback address or ``localhost``,
   with any port, so a rebound DNS name never reaches the server.
3. **Origin**: absent (not a browser), a loopback origin (``http(s)://localhost|127.x|[::1]`` with any
   port), or one of ``allowed_origins``. With a token, a set ``allowed_origins`` is still enforced (and
   loopback origins still pass); with a token and no list, any origin passes (a page cannot send the
   token).
4. **Subprotocol**: ``dspex.v1`` must be proposed.

Refusals are HTTP 401 (credentials), 403 (host, origin) or 400 (subprotocol), each with a body naming what
was wrong. Capacity checks (connection counts) are the server's, after these.
"""

from __future__ import annotations

import hmac
import ipaddress
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Final, Literal

import attrs

SUBPROTOCOL: Final = "dspex.v1"
"""The websocket subprotocol a client must propose (``Sec-WebSocket-Protocol``)."""
BEARER_SUBPROTOCOL_PREFIX: Final = "dspex.bearer."
"""A browser cannot set ``Authorization`` on a websocket: it proposes ``dspex.bearer.<token>`` beside
``dspex.v1`` instead (the dashboard does). Read only when no ``Authorization`` header is sent; the
server never selects it."""
LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost."})
MAX_HEADER_VALUE_CHARS: Final = 4096
"""Longest ``Host`` / ``Origin`` / ``Authorization`` value looked at, in characters (longer: refused)."""

Role = Literal["client", "admin"]


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is a loopback one."""
    if host is None:
        return False
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of_header(value: str) -> str | None:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``), or None
    when it is not one."""
    value = value.strip()
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        rest = value[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return value[1:end]
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and name and ":" not in name:
        return name
    return value if ":" not in value else None


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case (None when ``origin`` is not a serialized origin).

    ``null`` (sandboxed frames, ``file:`` pages) is kept as ``"null"``.
    """
    origin = origin.strip()
    if origin == "null":
        return "null"
    try:
        parts = urllib.parse.urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def is_loopback_origin(origin: str) -> bool:
    normalized = normalize_origin(origin)
    if normalized is None or normalized == "null":
        return False
    return is_loopback(urllib.parse.urlsplit(normalized).hostname)


@attrs.frozen
class Accepted:
    role: Role
    authenticated: bool
    """A valid token was presented."""


@attrs.frozen
class Refused:
    status: int
    reason: str
    """A short stable name of the check that failed (``token``, ``host``, ``origin``, ``subprotocol``)."""
    message: str
    """Sent as the response body, and logged."""
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen(kw_only=True)
class HandshakePolicy:
    """What the handshake accepts. Tokens are kept as bytes and never shown."""

    client_tokens: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    admin_tokens: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    allowed_origins: frozenset[str] = frozenset()
    """Normalized origins (``normalize_origin``) allowed besides the loopback ones."""

    @classmethod
    def build(
        cls,
        *,
        tokens: Iterable[str] = (),
        admin_tokens: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> HandshakePolicy:
        """A policy from plain strings. Raises ``ValueError`` for an empty token or a malformed origin."""
        client = tuple(_token_bytes(t) for t in tokens)
        admin = tuple(_token_bytes(t) for t in admin_tokens)
        origins = set()
        for origin in allowed_origins:
            normalized = normalize_origin(origin)
            if normalized is None:
                raise ValueError(
                    f"allowed origin {origin!r} is not an origin: write scheme://host[:port], e.g. "
                    "https://app.example.com"
                )
            origins.add(normalized)
        return cls(client_tokens=client, admin_tokens=admin, allowed_origins=frozenset(origins))

    @property
    def requires_token(self) -> bool:
        return bool(self.client_tokens)


def _token_bytes(token: str) -> bytes:
    token = token.strip()
    if not token:
        raise ValueError("a token must be a non-empty string")
    if any(c.isspace() for c in token):
        raise ValueError("a token must not contain whitespace")
    return token.encode()


def _matches(candidate: bytes, tokens: Sequence[bytes]) -> bool:
    found = False
    for token in tokens:  # compare with every token, in constant time each
        found |= hmac.compare_digest(candidate, token)
    return found


UNAUTHORIZED_HEADERS: Final = ((b"www-authenticate", b'Bearer realm="dspex-trio"'),)


def check_handshake_untrusted(
    policy: HandshakePolicy, headers: Sequence[tuple[bytes, bytes]], subprotocols: Sequence[str]
) -> Accepted | Refused:
    """Decide a client's opening handshake from its headers and proposed subprotocols."""
    values: dict[bytes, bytes] = {}
    for name, value in headers:
        values.setdefault(name.lower(), value)  # the first of repeated headers counts
    for name in (b"host", b"origin", b"authorization"):
        if len(values.get(name, b"")) > MAX_HEADER_VALUE_CHARS:
            return Refused(400, "header", f"the {name.decode()} header is too long")

    role: Role = "client"
    authenticated = False
    authorization = values.get(b"authorization")
    if authorization is None:  # a browser's token, proposed as a subprotocol
        for proposed in subprotocols:
            if proposed.startswith(BEARER_SUBPROTOCOL_PREFIX) and len(proposed) <= MAX_HEADER_VALUE_CHARS:
                authorization = b"Bearer " + proposed[len(BEARER_SUBPROTOCOL_PREFIX) :].encode(
                    "latin-1", "replace"
                )
                break
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(b" ")
        credentials = credentials.strip()
        if scheme.lower() != b"bearer" or not credentials:
            return Refused(
                401, "token", "unauthorized: send 'Authorization: Bearer <token>'", UNAUTHORIZED_HEADERS
            )
        if _matches(credentials, policy.admin_tokens):
            role, authenticated = "admin", True
        elif _matches(credentials, policy.client_tokens):
            authenticated = True
        else:
            return Refused(401, "token", "unauthorized: the token is not valid", UNAUTHORIZED_HEADERS)
    elif policy.requires_token:
        return Refused(
            401,
            "token",
            "unauthorized: this server requires 'Authorization: Bearer <token>'",
            UNAUTHORIZED_HEADERS,
        )

    if not authenticated:
        host = values.get(b"host", b"").decode("latin-1")
        if not is_loopback(host_of_header(host)):
            return Refused(
                403,
                "host",
                f"host {host!r} is not allowed: without a token this server answers only to localhost or a "
                "loopback address (a defence against DNS rebinding)",
            )

    raw_origin = values.get(b"origin")
    if raw_origin is not None:
        origin = raw_origin.decode("latin-1")
        normalized = normalize_origin(origin)
        allowed = normalized is not None and (
            normalized in policy.allowed_origins or is_loopback_origin(normalized)
        )
        if not allowed and not (authenticated and not policy.allowed_origins):
            return Refused(
                403,
                "origin",
                f"origin {origin!r} is not allowed: only loopback pages"
                + (" and the allowed origins" if policy.allowed_origins else "")
                + " may connect (the operator adds others with --allowed-origin)",
            )

    if SUBPROTOCOL not in subprotocols:
        return Refused(
            400,
            "subprotocol",
            f"the websocket subprotocol {SUBPROTOCOL!r} is required (Sec-WebSocket-Protocol: {SUBPROTOCOL})",
        )
    return Accepted(role, authenticated)
