"""The monitoring routes, answered over plain HTTP: ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard.

They are served on the websocket's own port (``serve_websocket(..., http_routes=True)``: the plain-HTTP
answerer of ``_plain_http.py`` hands each request that is no websocket handshake to
:meth:`HttpRoutes.answer`), and on a port of their own by :func:`serve_http` (``dspex-trio serve
--http-port``, or an embedding application).

Who may read them: the websocket's rules (``_handshake.py``), request by request:

- ``/healthz``, ``/readyz``: the client token (or the admin token) when one is set; without one, only
  loopback ``Host`` names; browser ``Origin`` as for the websocket.
- ``/metrics``: the same, and also the scraper's own token (``metrics_token``, ``--metrics-token-file``)
  when one is set (then a scrape without a token is refused, even on loopback).
- The dashboard's files (``/``, ``/dashboard.js``, ``/dashboard.css``): no token (a browser sends none
  on a page load, and the files hold no data); the page asks for the token and sends it on its own
  websocket connection, which the usual rules guard. A strict Content-Security-Policy: scripts and styles
  from the page's own origin only, connections to the websocket only, no frames, no forms.

Every answer closes its connection (``Connection: close``); only ``GET`` and ``HEAD`` are served.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import logging
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
import trio

from dspex_trio._breaker import CircuitState
from dspex_trio._handshake import SUBPROTOCOL, HandshakePolicy, Refused, check_handshake_untrusted
from dspex_trio._plain_http import HEAD_END, MAX_HEAD_BYTES, READ_BYTES
from dspex_trio._states import WorkerState

if TYPE_CHECKING:
    from dspex_trio._backend import Backend
    from dspex_trio._metrics import RuntimeCollector
    from dspex_trio._websocket import WebsocketServer

logger = logging.getLogger("dspex_trio.http")

__all__ = [
    "DASHBOARD_FILES",
    "HttpRoutes",
    "HttpServer",
    "parse_request_head_untrusted",
    "readiness",
    "serve_http",
]

DASHBOARD_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
"""Request path -> (file in ``dspex_trio/dashboard/``, content type)."""
WEBSOCKET_URL: Final = re.compile(
    r"wss?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|wss?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)
"""What ``serve_http``'s ``websocket_url`` may be (it goes into a header and the page)."""
WEBSOCKET_META: Final = b'<meta name="dspex-websocket" content=""'
"""In ``index.html``: filled with the websocket's URL when the page is served from another port."""
REQUEST_TIMEOUT_S: Final = 10.0
"""Seconds a client of :func:`serve_http` has to send its request head."""
MAX_HTTP_CONNECTIONS: Final = 64
"""Connections :func:`serve_http` serves at once; more wait in the kernel's backlog."""
STATUS_TEXT: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    503: "Service Unavailable",
}


def _csp(connect: Sequence[str]) -> str:
    sources = " ".join(("'self'", *connect))
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {sources}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@attrs.frozen
class Request:
    """A request head, parsed."""

    method: str
    path: str
    """The target without its query string."""
    headers: tuple[tuple[bytes, bytes], ...]
    """Lower-cased names, stripped values, in order."""


def parse_request_head_untrusted(head: bytes) -> Request | None:
    """Parse a request head (peer bytes, up to its blank line); None when it is not one."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        method = parts[0].decode("ascii")
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not method.isalpha() or not target.startswith("/"):
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        headers.append((name.lower(), value.strip()))
    return Request(method, target.split("?", 1)[0].split("#", 1)[0], tuple(headers))


def response(
    method: str,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A full HTTP/1.1 response that closes its connection (no body for ``HEAD``)."""
    lines = [
        f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}",
        "Connection: close",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return "\r\n".join(lines).encode("latin-1") + HEAD_END + (b"" if method == "HEAD" else body)


def _json(method: str, status: int, value: Any) -> bytes:
    return response(method, status, json.dumps(value).encode() + b"\n", "application/json")


def readiness(backend: Backend) -> dict[str, Any]:
    """What ``/readyz`` says: ready when a worker takes calls (or the backend has no worker processes,
    as the mock) and the circuit is closed."""
    health = backend.health()
    ready = sum(
        1 for w in health.workers if w.state in (WorkerState.READY, WorkerState.BUSY) and not w.retiring
    )
    serving = ready > 0 or health.size == 0  # a backend without worker processes (mock) needs none
    return {
        "ready": serving and health.circuit is CircuitState.CLOSED,
        "ready_workers": ready,
        "circuit": str(health.circuit),
        "circuit_reason": health.circuit_reason,
    }


@attrs.define(eq=False)
class HttpRoutes:
    """The routes of one server (see the module doc). Build with :meth:`build`."""

    backend: Backend
    policy: HandshakePolicy = attrs.field(repr=False)
    metrics_policy: HandshakePolicy = attrs.field(repr=False)
    server: WebsocketServer | None = None
    """The websocket server whose figures ``/metrics`` adds, when it is one."""
    connect_sources: tuple[str, ...] = ()
    """Websocket URLs the dashboard may connect to besides its own origin (CSP ``connect-src``)."""
    on_refused: Callable[[str, Refused], object] | None = None
    """Called with (peer, refusal) for each request refused by the token, Host or Origin rules."""
    collector: RuntimeCollector | None = None

    @classmethod
    def build(
        cls,
        backend: Backend,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        metrics_token: str | None = None,
        allowed_origins: Sequence[str] = (),
        server: WebsocketServer | None = None,
        connect_sources: Sequence[str] = (),
        on_refused: Callable[[str, Refused], object] | None = None,
    ) -> HttpRoutes:
        tokens = [token] if token is not None else []
        admins = [admin_token] if admin_token is not None else []
        policy = HandshakePolicy.build(tokens=tokens, admin_tokens=admins, allowed_origins=allowed_origins)
        scraper = [*tokens, metrics_token] if metrics_token is not None else tokens
        metrics_policy = HandshakePolicy.build(
            tokens=scraper, admin_tokens=admins, allowed_origins=allowed_origins
        )
        from dspex_trio._metrics import RuntimeCollector

        # built now, not at the first scrape: worker starts and exits count from the server's start
        collector = RuntimeCollector(backend, server=server)
        return cls(backend, policy, metrics_policy, server, tuple(connect_sources), on_refused, collector)

    def answer(self, peer: str, head: bytes) -> bytes | None:
        """The response to a plain HTTP request ``head`` (peer bytes), or None when its path is none of
        the routes (the caller answers it)."""
        request = parse_request_head_untrusted(head)
        if request is None:
            return response("GET", 400, b"malformed request\n")
        path = request.path
        if path not in DASHBOARD_FILES and path not in ("/metrics", "/healthz", "/readyz"):
            return None
        if request.method not in ("GET", "HEAD"):
            return response(request.method, 405, b"only GET and HEAD\n", headers=[("Allow", "GET, HEAD")])
        if path in DASHBOARD_FILES:
            return self._dashboard(request)
        policy = self.metrics_policy if path == "/metrics" else self.policy
        decision = check_handshake_untrusted(policy, request.headers, [SUBPROTOCOL])
        if isinstance(decision, Refused):
            if self.on_refused is not None:
                self.on_refused(peer, decision)
            headers = [(name.decode(), value.decode()) for name, value in decision.headers]
            return response(
                request.method, decision.status, decision.message.encode() + b"\n", headers=headers
            )
        if path == "/healthz":
            return _json(request.method, 200, {"status": "ok"})
        if path == "/readyz":
            state = readiness(self.backend)
            return _json(request.method, 200 if state["ready"] else 503, state)
        return self._metrics(request)

    def _metrics(self, request: Request) -> bytes:
        from dspex_trio._metrics import RuntimeCollector, render_metrics

        if self.collector is None:
            self.collector = RuntimeCollector(self.backend, server=self.server)
        body, content_type = render_metrics(self.collector)
        return response(request.method, 200, body, content_type)

    def _dashboard(self, request: Request) -> bytes:
        name, content_type = DASHBOARD_FILES[request.path]
        body = _dashboard_file(name)
        if name == "index.html" and self.connect_sources:  # the websocket is elsewhere: name it
            named = html.escape(self.connect_sources[0], quote=True).encode()
            body = body.replace(WEBSOCKET_META, WEBSOCKET_META[:-1] + named + b'"', 1)
        headers = [
            ("Content-Security-Policy", _csp(self.connect_sources)),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
        ]
        return response(request.method, 200, body, content_type, headers)


_files: dict[str, bytes] = {}


def _dashboard_file(name: str) -> bytes:
    """A file of the dashboard, read from the package once."""
    body = _files.get(name)
    if body is None:
        body = _files[name] = (importlib.resources.files("dspex_trio") / "dashboard" / name).read_bytes()
    return body


# -- a port of its own ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class HttpServer:
    """A running :func:`serve_http`."""

    host: str
    port: int
    """The bound port (the kernel's choice for ``port=0``)."""
    routes: HttpRoutes

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


async def _serve_one(routes: HttpRoutes, limiter: trio.CapacityLimiter, stream: trio.SocketStream) -> None:
    async with stream, limiter:
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            return
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                while HEAD_END not in head and len(head) < MAX_HEAD_BYTES:
                    data = await stream.receive_some(READ_BYTES)
                    if not data:
                        return
                    head += data
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        end = head.find(HEAD_END)
        if end < 0:
            answer = response("GET", 400, b"incomplete request head\n")
        else:
            answer = routes.answer(peer, head[:end]) or response("GET", 404, b"not found\n")
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def serve_http(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    admin_token: str | None = None,
    metrics_token: str | None = None,
    allowed_origins: Sequence[str] = (),
    websocket_url: str | None = None,
    listeners: Sequence[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard of ``backend`` over plain HTTP on
    ``host``:``port`` until cancelled.

    ``server = await nursery.start(serve_http, pool, ...)`` returns once the port is bound: an
    :class:`HttpServer` with ``.port`` and ``.url``. The token rules are the websocket's (see the
    module doc): binding a non-loopback address without ``token`` raises ``ValueError``.
    ``websocket_url`` is the endpoint the dashboard reads (``?ws=<url>`` on the page's address; it is
    also allowed by the page's Content-Security-Policy). ``listeners``: sockets bound already (on
    ``host``; ``port`` is then ignored), so that a port in use fails before anything else starts.
    """
    from dspex_trio._handshake import is_loopback

    if websocket_url is not None and not WEBSOCKET_URL.fullmatch(websocket_url):
        raise ValueError(f"websocket_url must be ws://host:port or wss://host:port, not {websocket_url!r}")
    if token is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve HTTP on {host!r} without a token: pass token=..., or bind 127.0.0.1"
        )
    routes = HttpRoutes.build(
        backend,
        token=token,
        admin_token=admin_token,
        metrics_token=metrics_token,
        allowed_origins=allowed_origins,
        connect_sources=[websocket_url] if websocket_url else [],
    )
    bound = list(listeners) if listeners is not None else await trio.open_tcp_listeners(port, host=host)
    server = HttpServer(host, bound[0].socket.getsockname()[1], routes)
    limiter = trio.CapacityLimiter(MAX_HTTP_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, partial(_serve_one, routes, limiter), bound)
        logger.info("monitoring routes on %s", server.url)
        task_status.started(server)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
