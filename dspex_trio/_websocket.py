"""The websocket endpoint: the trio-websocket glue around the API (``_ws_api.py``), over any backend.

This module owns the socket: the opening handshake (``_handshake.py`` decides; connection counts are
reserved here before any await), one writer task per connection (the only one that writes, fed by a
bounded queue), the reader loop, keep-alive pings and the idle timeout, backpressure and close codes.
The protocol (methods, sessions, executions, subscriptions) is :class:`~dspex_trio._ws_api.ApiConnection`.

Backpressure: replies and execution events must be delivered; when the outbound queue stays full for
longer than ``slow_consumer_grace`` the connection is closed with 1008. Health events may be dropped
instead: a subscription's backend-side buffer overflows, and the client then receives ``lagged`` and a
fresh snapshot.

Shutdown: :meth:`WebsocketServer.drain` refuses new executions and waits for the running ones;
:meth:`WebsocketServer.shutdown` then ends every execution still running with its terminal ``cancelled``
event (reason ``server_shutdown``), flushes each connection and closes it with 1001 (idle connections at
once). Cancelling ``serve_websocket`` without them still closes everything, without those events.
"""

from __future__ import annotations

import collections
import logging
import math
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Final, NoReturn

import attrs
import trio
import trio_websocket
from websockets.frames import Frame, Opcode
from wsproto.connection import ConnectionState

from dspex_trio import _jsonrpc as rpc
from dspex_trio._backend import Backend
from dspex_trio._client_lm import NamedLM
from dspex_trio._handshake import (
    SUBPROTOCOL,
    Accepted,
    HandshakePolicy,
    Refused,
    Role,
    check_handshake_untrusted,
    is_loopback,
)
from dspex_trio._http_routes import HttpRoutes
from dspex_trio._options import options_from
from dspex_trio._plain_http import PlainHttpListener, upgrade_required
from dspex_trio._ws_api import ApiConnection, ApiService, open_api_connection
from dspex_trio._ws_direct import direct_socket, write_nowait
from dspex_trio._ws_options import WebsocketOptions
from dspex_trio._ws_reader import FastReadStream

logger = logging.getLogger("dspex_trio.websocket")

__all__ = [
    "SUBPROTOCOL",
    "WebsocketOptions",
    "WebsocketServer",
    "WebsocketStatistics",
    "is_loopback",
    "serve_websocket",
]

MAX_REFUSAL_LOG_PEERS: Final = 1024
"""Peers remembered for rate-limiting the log lines about refused handshakes."""
MESSAGE_QUEUE_SIZE: Final = 4
"""Messages trio-websocket buffers from one client before it stops reading that socket."""
MAX_WRITE_BATCH: Final = 64
"""Messages the writer sends in one socket write when that many are queued."""


def _frames_of(ws: trio_websocket.WebSocketConnection) -> tuple[Any, Any] | None:
    """``(stream, its lock)`` when this connection's messages can be framed here: trio-websocket's
    internals as 0.12 has them, its wsproto connection open, and no extension negotiated (frames then
    carry the text as it is). None otherwise: send through trio-websocket itself."""
    protocol, stream, lock = (getattr(ws, name, None) for name in ("_wsproto", "_stream", "_stream_lock"))
    proto = getattr(getattr(protocol, "connection", None), "_proto", None)
    if stream is None or lock is None or proto is None or getattr(proto, "extensions", True):
        return None
    if getattr(protocol, "state", None) is not ConnectionState.OPEN:
        return None
    return stream, lock


def _frame(text: str) -> bytes:
    """One unmasked text frame (a server's; no extension negotiated)."""
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


async def _send_texts(ws: trio_websocket.WebSocketConnection, texts: list[str]) -> None:
    """Send text messages in order, in one socket write: a reply and the ``started`` event queued with it
    cost the server one system call and the client one read instead of two.

    trio-websocket sends one message per write, framed by wsproto (pure Python, ~3x the cost of the
    ``websockets`` library's frame serializer here). This does what its ``_send`` does (written under its
    stream lock, the connection aborted when the stream breaks) for several messages at once, framed by
    ``websockets.frames`` (a server's frames are unmasked, and no extension is negotiated).
    """
    if ws.closed:
        raise trio_websocket.ConnectionClosed(ws.closed)
    target = _frames_of(ws)
    if target is None:  # closing, or another trio-websocket
        for text in texts:
            await ws.send_message(text)
        return
    stream, lock = target
    data = b"".join([_frame(text) for text in texts])
    async with lock:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise trio_websocket.ConnectionClosed(ws.closed) from None


@attrs.frozen
class WebsocketStatistics:
    """A snapshot of the websocket server."""

    connections: int
    """Connections open now."""
    connections_total: int
    """Connections accepted since the server started."""
    rejected: int
    """Handshakes refused (token, host, origin, subprotocol, too many connections) and plain HTTP
    requests answered with 426."""
    refusals: dict[str, int]
    """Refused handshakes by reason (``token``, ``host``, ``origin``, ``subprotocol``, ``capacity``,
    ``peer_capacity``, ``header``; ``not_websocket``: a plain HTTP request, answered with 426)."""
    executions: int
    """Executions in flight, all connections together."""
    closing: bool
    """True once ``drain()`` began: new executions are refused with ``unavailable``."""
    execution_outcomes: dict[str, int] = attrs.Factory(dict)
    """Executions ended since the server started, by outcome (``completed``, ``failed``, ``cancelled``)."""


def _peer(endpoint: object) -> str:
    address = getattr(endpoint, "address", None)
    return str(address) if address is not None else str(endpoint)


@attrs.define(eq=False)
class WebsocketServer:
    """A running websocket endpoint, as given by ``await nursery.start(serve_websocket, backend, ...)``."""

    backend: Backend
    host: str
    port: int
    """The bound port (the one the kernel chose when asked for port 0)."""
    options: WebsocketOptions
    _service: ApiService
    _policy: HandshakePolicy = attrs.field(repr=False)
    _connections: set[_Connection] = attrs.Factory(set)
    _reserved: int = 0
    _per_peer: collections.Counter[str] = attrs.Factory(collections.Counter)
    _connections_total: int = 0
    _refusals: collections.Counter[str] = attrs.Factory(collections.Counter)
    _refusal_logged: collections.OrderedDict[str, float] = attrs.Factory(collections.OrderedDict)
    _all_closed: trio.Event = attrs.Factory(trio.Event)
    tls: bool = False
    """Whether it serves ``wss://`` (TLS in the server: ``ssl_context``)."""
    routes: HttpRoutes | None = None
    """The monitoring routes answered on this port (``http_routes=True``; ``_http_routes.py``)."""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}"

    def statistics(self) -> WebsocketStatistics:
        return WebsocketStatistics(
            connections=len(self._connections),
            connections_total=self._connections_total,
            rejected=sum(self._refusals.values()),
            refusals=dict(self._refusals),
            executions=self._service.executions,
            closing=self._service.closing,
            execution_outcomes=dict(self._service.outcomes),
        )

    async def drain(self) -> None:
        """Refuse new executions (``unavailable``) and wait until every running one has ended.

        Bound it with a timeout; then call :meth:`shutdown`.
        """
        await self._service.drain()

    async def shutdown(self) -> None:
        """End every execution still running with its terminal ``cancelled`` event (reason
        ``server_shutdown``), flush every connection and close it with 1001; returns once every connection
        is closed (each bounded by ``close_timeout``). New connections are refused meanwhile (the caller
        then cancels ``serve_websocket``)."""
        self._service.closing = True
        for connection in list(self._connections):
            connection.stop()
        if self._reserved:
            await self._all_closed.wait()
        else:
            await trio.lowlevel.checkpoint()

    # -- handshake -------------------------------------------------------------------------------------
    def _refuse(self, peer: str, refused: Refused) -> Refused:
        self._refusals[refused.reason] += 1
        now = trio.current_time()
        last = self._refusal_logged.get(peer)
        if last is None or now - last >= self.options.refusal_log_interval:
            self._refusal_logged[peer] = now
            self._refusal_logged.move_to_end(peer)
            while len(self._refusal_logged) > MAX_REFUSAL_LOG_PEERS:
                self._refusal_logged.popitem(last=False)
            logger.info("handshake from %s refused (%d): %s", peer, refused.status, refused.message)
        return refused

    def _answer_plain(self, peer: str, head: bytes) -> bytes:
        """A plain HTTP request (no websocket upgrade) reached the endpoint: a monitoring route's answer,
        or say what the endpoint is (426)."""
        if self.routes is not None:
            answer = self.routes.answer(peer, head)
            if answer is not None:
                return answer
        text = (
            "This is a dspex-trio websocket endpoint: connect with a websocket client (a ws:// or wss:// "
            f"URL; JSON-RPC 2.0, subprotocol {SUBPROTOCOL}).\n"
        )
        self._refuse(peer, Refused(426, "not_websocket", "a plain HTTP request, not a websocket handshake"))
        return upgrade_required(head, text)

    def _admit(self, request: trio_websocket.WebSocketRequest, peer: str) -> Accepted | Refused:
        """Check the handshake and reserve the connection's place (before any await: no overshoot)."""
        # wsproto keeps the Host header apart from the others
        host = getattr(getattr(request, "_event", None), "host", None) or ""
        headers = [(b"host", host.encode("utf-8", "replace")), *request.headers]
        decision = check_handshake_untrusted(self._policy, headers, request.proposed_subprotocols)
        if isinstance(decision, Refused):
            return self._refuse(peer, decision)
        if self._service.closing:
            return self._refuse(peer, Refused(503, "closing", "the server is shutting down"))
        if self._reserved >= self.options.max_connections:
            limit = self.options.max_connections
            return self._refuse(peer, Refused(503, "capacity", f"too many connections (at most {limit})"))
        if self._per_peer[peer] >= self.options.max_connections_per_peer:
            limit = self.options.max_connections_per_peer
            return self._refuse(
                peer, Refused(429, "peer_capacity", f"too many connections from {peer} (at most {limit})")
            )
        self._reserved += 1
        self._per_peer[peer] += 1
        return decision

    def _release(self, peer: str) -> None:
        self._reserved -= 1
        self._per_peer[peer] -= 1
        if not self._per_peer[peer]:
            del self._per_peer[peer]
        if not self._reserved:
            self._all_closed.set()
            self._all_closed = trio.Event()

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        peer = _peer(request.remote)
        decision = self._admit(request, peer)
        if isinstance(decision, Refused):
            await request.reject(
                decision.status, extra_headers=list(decision.headers), body=decision.message.encode() + b"\n"
            )
            # trio-websocket (0.12) leaves the TCP connection open after a rejected handshake until the
            # client closes it: a client that never does (a flood of bad tokens) would hold a socket and
            # a reader task here indefinitely. Close it now.
            stream = getattr(getattr(request, "_connection", None), "_stream", None)
            if stream is not None:
                await stream.aclose()
            return
        try:
            websocket = await request.accept(subprotocol=SUBPROTOCOL)
            self._connections_total += 1
            logger.info("connection from %s opened (%s)", peer, decision.role)
            connection = _Connection(self, websocket, peer, decision.role)
            self._connections.add(connection)
            try:
                await connection.run()
            finally:
                self._connections.discard(connection)
                logger.info(
                    "connection from %s closed (%d %s)",
                    peer,
                    connection.close_code,
                    connection.close_reason,
                )
        finally:
            self._release(peer)


# -- one connection -------------------------------------------------------------------------------------


class _Connection:
    """The transport of one client: writer, reader, keep-alive; the API connection does the rest."""

    def __init__(
        self, server: WebsocketServer, websocket: trio_websocket.WebSocketConnection, peer: str, role: Role
    ) -> None:
        self.server = server
        self.options = server.options
        self.ws = websocket
        self.peer = peer
        self.role = role
        self.send_channel, self.receive_channel = trio.open_memory_channel[str](self.options.outbound_queue)
        self.close_code = 1000
        self.close_reason = "the client closed the connection"
        self.outer: trio.Nursery | None = None
        self.inner: trio.Nursery | None = None
        self.api: ApiConnection | None = None
        self.stopping = False
        self.write_scope: trio.CancelScope | None = None
        self.finish_scope: trio.CancelScope | None = None
        self.write_deadline = math.inf
        self.broken = False
        self.last_heard = trio.current_time()
        self.queued = 0
        """Messages handed to the writer and not yet written (a direct write needs none before it)."""
        stream = getattr(websocket, "_stream", None)
        self.socket = direct_socket(stream)
        """The TCP socket for direct writes (``_ws_direct.py``); None: every message goes to the writer."""
        if stream is not None and _frames_of(websocket) is not None:  # trio-websocket as 0.12 has it
            # trio-websocket's reader reads through it from its next read on (``_ws_reader.py``)
            websocket._stream = FastReadStream(stream, websocket, self.options.max_message_size)

    # -- the outbox (what the API sends) --------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        """Send a message to the client: written at once when the socket takes it and nothing is queued
        before it (``_ws_direct.py``), else queued for the writer; closes the connection (1008) if the
        client stays too slow to read."""
        text = rpc.encode(message)
        if not self.queued and self.socket is not None:
            rest = self._write_now(text)
            if rest is not None:
                if rest:
                    await self._finish_frame(rest)
                return
        self.queued += 1
        try:
            self.send_channel.send_nowait(text)
            return
        except trio.WouldBlock:
            pass
        except BaseException:
            self.queued -= 1
            raise
        queued = False
        try:
            with trio.move_on_after(self.options.slow_consumer_grace):
                await self.send_channel.send(text)
                queued = True
                return
        finally:
            if not queued:
                self.queued -= 1
        grace = self.options.slow_consumer_grace
        self.close(1008, f"client too slow: its outbound queue stayed full for {grace} s")
        await trio.lowlevel.checkpoint()  # raises Cancelled: the connection is closing

    async def send_lossy(self, message: dict[str, Any]) -> None:
        self.queued += 1
        queued = False
        try:
            await self.send_channel.send(rpc.encode(message))
            queued = True
        finally:
            if not queued:
                self.queued -= 1

    def _write_now(self, text: str) -> bytes | None:
        """Write ``text``'s frame from the sending task, without waiting (``_ws_direct.py``); only when
        nothing is queued before it. None: nothing was written (queue it); ``b""``: sent whole; else the
        rest of a frame begun, to finish with :meth:`_finish_frame` before any other await."""
        if self.write_deadline != math.inf:  # closing: the writer flushes (or drops) what is queued
            return None
        target = _frames_of(self.ws)
        if target is None or self.ws.closed or target[1].locked():
            return None  # closing; or a write in progress (the writer's, trio-websocket's pong or close)
        data = _frame(text)
        try:
            written = write_nowait(self.socket, data)
        except OSError:  # closed or broken: the writer's own write says which
            return None
        if not written:
            return None
        return data[written:]

    async def _finish_frame(self, rest: bytes) -> None:
        """Write the rest of a frame begun by :meth:`_write_now` before anything else may write: the stream
        lock is free and taken before the first await (a pong or a close frame waits for it), and the
        write is shielded, as the writer's is. A client that takes none of it for ``slow_consumer_grace``
        has the connection closed with 1008 (as a full queue does); the frame may still be finished
        within ``close_timeout`` (the close frame follows it), else the TCP link is dropped."""
        target = _frames_of(self.ws)
        assert target is not None and self.socket is not None  # nothing awaited since the frame began
        lock = target[1]
        grace = self.options.slow_consumer_grace
        slow_at = trio.current_time() + grace
        with trio.CancelScope(shield=True):
            async with lock:
                while rest:
                    with trio.CancelScope(deadline=min(slow_at, self.write_deadline)) as wait:
                        self.finish_scope = wait
                        try:
                            await trio.lowlevel.wait_writable(self.socket)
                        except trio.ClosedResourceError:
                            break  # closed under us: the connection is ending
                        finally:
                            self.finish_scope = None
                    if wait.cancelled_caught:
                        if self.write_deadline == math.inf:  # not closing yet: now it is
                            self.close(1008, f"client too slow: a message stayed unsent for {grace} s")
                            slow_at = math.inf  # from now on, close_timeout bounds the rest
                            continue
                        self.broken = True  # the frame cut short: no close frame can follow
                        break
                    try:
                        rest = rest[write_nowait(self.socket, rest) :]
                    except OSError:  # broken: the connection is over
                        await self.ws._abort_web_socket()
                        assert self.outer is not None
                        self.outer.cancel_scope.cancel(reason="the connection closed")
                        break
        await trio.lowlevel.checkpoint_if_cancelled()  # the connection is closing: raises Cancelled

    # -- life -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with trio.open_nursery() as outer:
                self.outer = outer
                outer.start_soon(self._writer)
                async with open_api_connection(
                    self.server._service, self, role=self.role, peer=self.peer
                ) as api:
                    self.api = api
                    async with trio.open_nursery() as inner:
                        self.inner = inner
                        inner.start_soon(self._keepalive)
                        if self.stopping:  # stopped while the handshake completed
                            inner.cancel_scope.cancel()
                        await self._reader()
                        inner.cancel_scope.cancel()
                    if self.stopping:  # each execution is ending: let it queue its terminal event
                        with trio.move_on_after(self.options.close_timeout):
                            await api.wait_executions_ended()
                # The API's tasks are done or cancelled: nothing sends any more. Flush, then close.
                self._bound_writes()
                self.send_channel.close()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.options.close_timeout) as bound:
                if self.broken:
                    bound.cancel()  # a frame was cut short: no close frame can follow, drop the TCP link
                await self.ws.aclose(self.close_code, self.close_reason)

    def stop(self) -> None:
        """Server shutdown: end the executions with their ``cancelled`` events, stop reading, flush,
        close with 1001."""
        self.stopping = True
        self.close_code, self.close_reason = 1001, "server shutting down"
        if self.api is not None:
            self.api.stop()
        if self.inner is not None:
            self.inner.cancel_scope.cancel(reason="server shutting down")

    def close(self, code: int, reason: str) -> None:
        """Close the connection now (from any of its tasks): cancels every task of the connection."""
        logger.info("closing the connection from %s with %d: %s", self.peer, code, reason)
        self.close_code, self.close_reason = code, reason
        self._bound_writes()
        assert self.outer is not None
        self.outer.cancel_scope.cancel(reason=reason)

    def _bound_writes(self) -> None:
        """From now on, writing (the message in progress and any still queued) has ``close_timeout``."""
        if self.write_deadline == math.inf:
            self.write_deadline = trio.current_time() + self.options.close_timeout
        if self.write_scope is not None:
            self.write_scope.deadline = self.write_deadline
        if self.finish_scope is not None:
            self.finish_scope.deadline = min(self.finish_scope.deadline, self.write_deadline)

    async def _write(self, texts: list[str]) -> bool:
        """Write the writer's batch; False once the connection is closed.

        A message is never cut short by a cancellation (that would corrupt the stream and the close frame
        after it): the write is shielded, and bounded once the connection is closing.
        """
        with trio.CancelScope(shield=True, deadline=self.write_deadline) as scope:
            self.write_scope = scope
            try:
                await _send_texts(self.ws, texts)
            except trio_websocket.ConnectionClosed:
                assert self.outer is not None
                self.outer.cancel_scope.cancel(reason="the connection closed")
                return False
            finally:
                self.write_scope = None
        if scope.cancelled_caught:
            self.broken = True
            assert self.outer is not None
            self.outer.cancel_scope.cancel(reason="a write outlasted close_timeout")
            return False
        return True

    async def _writer(self) -> None:
        receive_nowait = self.receive_channel.receive_nowait
        async for text in self.receive_channel:
            batch = [text]  # with whatever else is queued already: one socket write for them all
            while len(batch) < MAX_WRITE_BATCH:
                try:
                    batch.append(receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            written = await self._write(batch)
            self.queued -= len(batch)
            if not written:
                return

    async def _reader(self) -> None:
        assert self.api is not None
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            self.last_heard = trio.current_time()
            if isinstance(message, bytes):
                self.close(1003, "binary frames are not supported: send JSON-RPC 2.0 as text frames")
                return
            await self.api.handle(message)

    async def _keepalive(self) -> None:
        """Ping the client every ``ping_interval``; close a dead one (no pong in ``ping_timeout``) and an
        idle one (no message for ``idle_timeout`` while nothing is in flight)."""
        assert self.api is not None
        options = self.options
        while True:
            await trio.sleep(options.ping_interval)
            if not self.api.busy and trio.current_time() - self.last_heard >= options.idle_timeout:
                self.close(1001, f"idle for {options.idle_timeout:g} s")
                return
            with trio.move_on_after(options.ping_timeout) as pong:
                try:
                    await self.ws.ping()
                except trio_websocket.ConnectionClosed:
                    return
            if pong.cancelled_caught:
                self.close(1001, f"no pong within {options.ping_timeout:g} s")
                return


async def serve_websocket(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    token: str | None = None,
    admin_token: str | None = None,
    lms: Mapping[str, NamedLM | Mapping[str, Any]] | None = None,
    options: WebsocketOptions | None = None,
    listeners: Sequence[trio.SocketListener] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    http_routes: bool = False,
    metrics_token: str | None = None,
    task_status: trio.TaskStatus[WebsocketServer] = trio.TASK_STATUS_IGNORED,
    **option_fields: Any,
) -> NoReturn:
    """Serve ``backend`` (a pool, a bridge, a fallback chain, a mock) over websockets (JSON-RPC 2.0,
    subprotocol ``dspex.v1``) until cancelled.

    ``server = await nursery.start(serve_websocket, pool, ...)`` returns once the port is bound: a
    :class:`WebsocketServer` with ``.port`` (the bound port; ``port=0`` picks a free one) and ``.url``.

    Args:
        token: when set, every handshake must carry ``Authorization: Bearer <token>`` (compared in constant
            time; HTTP 401 otherwise). Without one, only loopback ``Host`` names and loopback (or allowed)
            browser origins are accepted, and binding a non-loopback address raises ``ValueError`` before
            anything is bound.
        admin_token: a second token whose connections may also change pool-wide settings (the default LM).
        lms: the LMs clients may select by name (``lm/list``, ``lm/select``): name -> :class:`NamedLM` or
            ``{"model", "api_base"?, "api_key"?, **settings}``. Keys stay in the server.
        options: a :class:`WebsocketOptions`; or its fields as keywords (``option_fields``), not both
            (``TypeError``, as for a keyword that is none of its fields).
        listeners: TCP listeners the caller already bound (``trio.open_tcp_listeners``) to serve on
            instead of binding ``host``:``port``, which then only name the server (its URL, the token
            rule). ``dspex-trio serve`` binds first so that a port in use fails before any worker starts.
            They are closed when the server stops.
        ssl_context: serve ``wss://``: TLS in the server, with this server context (its certificate chain
            loaded: ``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)`` then ``load_cert_chain``;
            ``dspex-trio serve --certfile --keyfile``). The TLS handshake is part of the websocket
            handshake, bounded by ``handshake_timeout``. TLS does not authenticate clients: off loopback a
            token is still required.
        http_routes: also answer ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard (``/``) on
            this port, under the same token, Host and Origin rules (``_http_routes.py``,
            docs/monitoring.md).
        metrics_token: a scraper's own token, accepted for ``/metrics`` only.

    A plain HTTP request (a browser, ``curl``) is answered ``426 Upgrade Required`` with a body saying
    what the endpoint is (``_plain_http.py``).

    Cancelling it closes every connection with 1001 and cancels their executions in the workers; call
    ``server.drain()`` (bounded) then ``server.shutdown()`` first to let running executions finish and
    give the rest their terminal ``cancelled`` event.
    """
    opts = options_from(WebsocketOptions, options, option_fields)
    if token is not None and not token.strip():
        raise ValueError("token must be a non-empty string (or None on a loopback address)")
    if token is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host!r} without a token: any client that can reach it could run "
            "programs. Pass token=... (CLI: --token-file, DSPEX_TOKEN or --token auto), or bind 127.0.0.1."
        )
    policy = HandshakePolicy.build(
        tokens=[token] if token is not None else [],
        admin_tokens=[admin_token] if admin_token is not None else [],
        allowed_origins=opts.allowed_origins,
    )
    named = {
        name: lm if isinstance(lm, NamedLM) else NamedLM.from_config(lm) for name, lm in (lms or {}).items()
    }
    service = ApiService(backend, opts, named)
    server = WebsocketServer(backend, host, port, opts, service, policy, tls=ssl_context is not None)
    service.server_statistics = lambda: attrs.asdict(server.statistics())
    if http_routes:
        server.routes = HttpRoutes.build(
            backend,
            token=token,
            admin_token=admin_token,
            metrics_token=metrics_token,
            allowed_origins=opts.allowed_origins,
            server=server,
            on_refused=server._refuse,
        )
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    server.port = listeners[0].socket.getsockname()[1]
    # typed for trio's own listeners only, it uses just accept() and aclose() (and a repr for others)
    streams: list[Any] = list(listeners)
    if ssl_context is not None:  # inside the plain-HTTP check: it reads the decrypted request head
        streams = [trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in listeners]
    wrapped: list[Any] = [PlainHttpListener(listener, server._answer_plain) for listener in streams]
    ws_server = trio_websocket.WebSocketServer(
        server._handle,
        wrapped,
        max_message_size=opts.max_message_size,
        message_queue_size=MESSAGE_QUEUE_SIZE,
        connect_timeout=opts.handshake_timeout,
        disconnect_timeout=opts.close_timeout,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(ws_server.run)
        service.url = server.url
        logger.info("listening on %s (backend %s)", server.url, backend.name)
        task_status.started(server)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
