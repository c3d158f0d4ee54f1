"""The websocket endpoint: JSON-RPC 2.0 over trio-websocket (subprotocol ``dspex.v1``), serving a pool.

One connection = one reader task (parses frames, answers quick methods inline, starts tasks for the rest),
one writer task (the only one that writes to the socket, fed by a bounded queue), one task per execution,
one per health subscription, all in the connection's nursery: when the client goes away the nursery is
cancelled, which cancels every execution of that connection in its worker.

Backpressure: execution events must be delivered; when the outbound queue stays full for longer than
``slow_consumer_grace`` the connection is closed with 1008. Health events may be dropped instead: a
subscription's pool-side buffer overflows, and the client then receives ``lagged`` and a fresh snapshot.

The JSON-RPC parsing and params validation are sans-IO, in ``_jsonrpc.py``. The method table and the
error codes are documented in ``docs/websocket-api.md``.
"""

from __future__ import annotations

import collections
import functools
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NoReturn

import attrs
import trio
import trio_websocket

from dspex_trio import _jsonrpc as rpc
from dspex_trio._errors import (
    DspexError,
    InvalidParams,
    Overloaded,
    PoolUnavailable,
    ProgramError,
    ProgramNotFound,
    WorkerClosed,
    WorkerError,
)
from dspex_trio._events import TooManySubscribers
from dspex_trio._pool import Pool

logger = logging.getLogger("dspex_trio.websocket")

SUBPROTOCOL: Final = "dspex.v1"
"""The websocket subprotocol a client must propose (``Sec-WebSocket-Protocol``)."""
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


@attrs.frozen(kw_only=True)
class WebsocketOptions:
    """Limits of the websocket server. Every count is per connection unless it says otherwise."""

    max_message_size: int = attrs.field(default=1024 * 1024, validator=_positive)
    """Largest client message, in characters for text (bytes for binary); larger: close 1009."""
    max_connections: int = attrs.field(default=1024, validator=_positive)
    """Connections served at once (server-wide); one more is refused at the handshake with HTTP 503."""
    max_executions: int = attrs.field(default=64, validator=_positive)
    """Executions in flight (``execution/submit`` + ``execution/run``); past it: ``limit_exceeded``."""
    max_subscriptions: int = attrs.field(default=4, validator=_positive)
    """Health subscriptions at once; past it: ``limit_exceeded``."""
    max_pending_requests: int = attrs.field(default=64, validator=_positive)
    """Requests waiting on a worker at once (``program/create``, ``lm/configure``); past it:
    ``limit_exceeded``."""
    outbound_queue: int = attrs.field(default=256, validator=_positive)
    """Messages queued for the client before senders wait."""
    slow_consumer_grace: float = attrs.field(default=5.0, validator=_positive)
    """Seconds a reply or an execution event may wait for room in the outbound queue before the
    connection is closed with 1008."""
    health_buffer: int = attrs.field(default=64, validator=_positive)
    """Health events buffered per subscription before they are dropped (then ``lagged`` + snapshot)."""
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    """Seconds a client has to complete the opening handshake."""
    close_timeout: float = attrs.field(default=2.0, validator=_positive)
    """Seconds allowed for the closing handshake before the TCP connection is dropped."""
    remember_finished: int = attrs.field(default=1024, validator=_positive)
    """Finished executions remembered per connection, so ``execution/cancel`` stays idempotent."""


@attrs.frozen
class WebsocketStatistics:
    """A snapshot of the websocket server."""

    connections: int
    """Connections open now."""
    connections_total: int
    """Connections accepted since the server started."""
    rejected: int
    """Handshakes refused (bad token, origin, subprotocol, or too many connections)."""
    executions: int
    """Executions in flight, all connections together."""
    closing: bool
    """True once ``drain()`` began: new executions are refused with ``unavailable``."""


class _AndThen:
    """A method's result plus what to do once it was queued for the client (start its stream)."""

    def __init__(self, result: Any, then: Callable[[], None]) -> None:
        self.result = result
        self.then = then


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.define(eq=False)
class WebsocketServer:
    """A running websocket endpoint, as given by ``await nursery.start(serve_websocket, pool, ...)``."""

    pool: Pool
    host: str
    port: int
    """The bound port (the one the kernel chose when asked for port 0)."""
    options: WebsocketOptions
    _token: bytes | None = attrs.field(default=None, repr=False)
    _allowed_origins: frozenset[str] | None = None
    _connections: int = 0
    _connections_total: int = 0
    _rejected: int = 0
    _executions: int = 0
    _closing: bool = False
    _idle: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def statistics(self) -> WebsocketStatistics:
        return WebsocketStatistics(
            connections=self._connections,
            connections_total=self._connections_total,
            rejected=self._rejected,
            executions=self._executions,
            closing=self._closing,
        )

    async def drain(self) -> None:
        """Refuse new executions (``unavailable``) and wait until every running one has ended.

        Bound it with a timeout; then cancel the scope running ``serve_websocket``: the remaining
        executions are cancelled in their workers and each connection is closed with 1001.
        """
        self._closing = True
        if self._executions:
            await self._idle.wait()

    def _execution_started(self) -> None:
        self._executions += 1

    def _execution_ended(self) -> None:
        self._executions -= 1
        if self._executions == 0:
            self._idle.set()
            self._idle = trio.Event()

    # -- handshake -------------------------------------------------------------------------------------
    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        headers = {name.lower(): value for name, value in request.headers}
        refusal = self._refusal(headers, request.proposed_subprotocols)
        if refusal is not None:
            status, body, extra = refusal
            self._rejected += 1
            logger.info("websocket handshake refused (%d) from %s: %s", status, request.remote, body)
            await request.reject(status, extra_headers=extra, body=body.encode() + b"\n")
            # trio-websocket (0.12) leaves the TCP connection open after a rejected handshake until the
            # client closes it: a client that never does (a flood of bad tokens) would hold a socket and
            # a reader task here indefinitely. Close it now.
            stream = getattr(getattr(request, "_connection", None), "_stream", None)
            if stream is not None:
                await stream.aclose()
            return
        websocket = await request.accept(subprotocol=SUBPROTOCOL)
        self._connections += 1
        self._connections_total += 1
        try:
            await _Connection(self, websocket).run()
        finally:
            self._connections -= 1

    def _refusal(
        self, headers: dict[bytes, bytes], subprotocols: Sequence[str]
    ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        if self._token is not None:
            scheme, _, credentials = headers.get(b"authorization", b"").strip().partition(b" ")
            ok = hmac.compare_digest(credentials.strip(), self._token)
            if scheme.lower() != b"bearer" or not ok:
                return (
                    401,
                    "unauthorized: a valid 'Authorization: Bearer <token>' header is required",
                    [(b"www-authenticate", b'Bearer realm="dspex-trio"')],
                )
        if self._allowed_origins is not None and b"origin" in headers:
            origin = headers[b"origin"].decode("latin-1")
            if origin not in self._allowed_origins:
                return 403, f"origin {origin!r} is not allowed", []
        if SUBPROTOCOL not in subprotocols:
            return 400, f"the websocket subprotocol {SUBPROTOCOL!r} is required", []
        if self._connections >= self.options.max_connections:
            return 503, f"too many connections (at most {self.options.max_connections})", []
        return None


async def serve_websocket(
    pool: Pool,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    token: str | None = None,
    allowed_origins: Sequence[str] | None = None,
    task_status: trio.TaskStatus[WebsocketServer] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> NoReturn:
    """Serve ``pool`` over websockets (JSON-RPC 2.0, subprotocol ``dspex.v1``) until cancelled.

    ``server = await nursery.start(serve_websocket, pool, ...)`` returns once the port is bound: a
    :class:`WebsocketServer` with ``.port`` (the bound port; ``port=0`` picks a free one) and ``.url``.

    ``token``: when set, every handshake must carry ``Authorization: Bearer <token>`` (compared in
    constant time); a missing or wrong one is refused with HTTP 401. Binding any address other than a
    loopback one without a token raises ``ValueError`` before anything is bound. ``allowed_origins``:
    None checks nothing; a list refuses (HTTP 403) a handshake whose ``Origin`` header, when present, is
    not in it. ``options`` are the fields of :class:`WebsocketOptions`.

    Cancelling it closes every connection with 1001 and cancels their executions in the workers; call
    ``server.drain()`` first (bounded) to let running executions finish.
    """
    opts = WebsocketOptions(**options)
    if token is not None and not token:
        raise ValueError("token must be a non-empty string (or None on a loopback address)")
    if token is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host!r} without a token: any client that can reach it could run "
            "programs. Pass token=... (CLI: --token or DSPEX_TOKEN), or bind 127.0.0.1."
        )
    server = WebsocketServer(
        pool,
        host,
        port,
        opts,
        token=token.encode() if token is not None else None,
        allowed_origins=frozenset(allowed_origins) if allowed_origins is not None else None,
    )
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket,
                server._handle,
                host,
                port,
                None,
                max_message_size=opts.max_message_size,
                message_queue_size=4,
                connect_timeout=opts.handshake_timeout,
                disconnect_timeout=opts.close_timeout,
            )
        )
        endpoint = ws_server.listeners[0]
        server.port = endpoint.port if isinstance(endpoint, trio_websocket.Endpoint) else port
        logger.info("websocket server listening on %s", server.url)
        task_status.started(server)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


# -- errors -----------------------------------------------------------------------------------------------


def rpc_error_from(exc: Exception) -> rpc.RpcError:
    """The JSON-RPC error for an exception of the pool."""
    if isinstance(exc, rpc.RpcError):
        return exc
    if isinstance(exc, Overloaded):
        return rpc.RpcError(rpc.OVERLOADED, str(exc))
    if isinstance(exc, PoolUnavailable):
        return rpc.RpcError(rpc.UNAVAILABLE, str(exc), data={"reason": exc.reason})
    if isinstance(exc, WorkerClosed):
        return rpc.RpcError(rpc.UNAVAILABLE, str(exc))
    if isinstance(exc, ProgramNotFound):
        return rpc.RpcError(rpc.UNKNOWN_PROGRAM, str(exc))
    if isinstance(exc, InvalidParams):
        return rpc.RpcError(rpc.INVALID_PARAMS, str(exc), data={"errors": [str(exc)]})
    if isinstance(exc, TooManySubscribers):
        return rpc.RpcError(rpc.LIMIT_EXCEEDED, str(exc), data={"limit": "subscribers"})
    if isinstance(exc, DspexError):
        return rpc.RpcError(rpc.EXECUTION_FAILED, str(exc), data=_failure(exc))
    return rpc.RpcError(rpc.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")


def _failure(exc: Exception) -> dict[str, Any]:
    """The ``data`` of a ``failed`` event: ``type`` (the original error type, e.g. ``LMRateLimitError``),
    ``error`` (the dspex-trio exception), ``message``, and ``kind`` when one of the stable kinds fits."""
    error_type = type(exc).__name__
    if isinstance(exc, ProgramError | WorkerError) and exc.error_type:
        error_type = exc.error_type
    data: dict[str, Any] = {"type": error_type, "error": type(exc).__name__, "message": str(exc)}
    if not isinstance(exc, DspexError) or isinstance(exc, ProgramError | WorkerError):
        return data
    kind = rpc_error_from(exc).data["kind"]
    if kind != "execution_failed":
        data["kind"] = kind
    return data


# -- one connection ---------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Execution:
    id: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    seq: int = 0
    cancel_reason: str = ""


Handler = Callable[[Any], Awaitable[Any]]


class _Connection:
    def __init__(self, server: WebsocketServer, websocket: trio_websocket.WebSocketConnection) -> None:
        self.server = server
        self.pool = server.pool
        self.options = server.options
        self.ws = websocket
        self.send_channel, self.receive_channel = trio.open_memory_channel[str](self.options.outbound_queue)
        self.executions: dict[str, _Execution] = {}
        self.runs = 0
        self.finished: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.subscriptions: dict[str, trio.CancelScope] = {}
        self.pending_requests = 0
        self.close_code = 1001
        self.close_reason = "server shutting down"
        self.nursery: trio.Nursery | None = None
        self.write_scope: trio.CancelScope | None = None
        self.write_deadline = math.inf
        self.broken = False
        self.methods: dict[str, tuple[type[Any], Handler, bool]] = {
            # name: (params class, handler, runs in its own task)
            "program/create": (rpc.ProgramCreateParams, self.program_create, True),
            "program/list": (rpc.SessionParams, self.program_list, False),
            "program/get": (rpc.ProgramRefParams, self.program_get, False),
            "program/delete": (rpc.ProgramRefParams, self.program_delete, False),
            "lm/configure": (rpc.LmConfigureParams, self.lm_configure, True),
            "session/end": (rpc.SessionEndParams, self.session_end, False),
            "execution/submit": (rpc.ExecutionParams, self.execution_submit, False),
            "execution/run": (rpc.ExecutionParams, self.execution_run, True),
            "execution/cancel": (rpc.ExecutionCancelParams, self.execution_cancel, False),
            "health/subscribe": (rpc.NoParams, self.health_subscribe, False),
            "health/unsubscribe": (rpc.SubscriptionParams, self.health_unsubscribe, False),
            "runtime/status": (rpc.NoParams, self.runtime_status, False),
            "ping": (rpc.NoParams, self.ping, False),
        }

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                try:
                    await self._reader()
                finally:
                    self._bound_writes()  # the client left, or the server is shutting down
                nursery.cancel_scope.cancel(reason="the client closed the connection")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.options.close_timeout) as bound:
                if self.broken:
                    bound.cancel()  # a frame was cut short: no close frame can follow, drop the TCP link
                await self.ws.aclose(self.close_code, self.close_reason)

    def close(self, code: int, reason: str) -> None:
        """Close the connection (from any of its tasks): cancels every task of the connection."""
        logger.info("closing websocket connection with %d: %s", code, reason)
        self.close_code, self.close_reason = code, reason
        self._bound_writes()
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel(reason=reason)

    def _bound_writes(self) -> None:
        """From now on, a write still in progress gets ``close_timeout`` seconds to finish."""
        if self.write_deadline == math.inf:
            self.write_deadline = trio.current_time() + self.options.close_timeout
        if self.write_scope is not None:
            self.write_scope.deadline = self.write_deadline

    async def _writer(self) -> None:
        # A message is never cut short by a cancellation (that would corrupt the stream and the close
        # frame after it): each write is shielded, and bounded once the connection is closing.
        async for text in self.receive_channel:
            with trio.CancelScope(shield=True, deadline=self.write_deadline) as scope:
                self.write_scope = scope
                try:
                    await self.ws.send_message(text)
                except trio_websocket.ConnectionClosed:
                    assert self.nursery is not None
                    self.nursery.cancel_scope.cancel(reason="the connection closed")
                    return
            self.write_scope = None
            if scope.cancelled_caught:
                self.broken = True
                return

    async def send(self, message: dict[str, Any]) -> None:
        """Queue a message for the client; closes the connection (1008) if it stays too slow to read."""
        text = rpc.encode(message)
        try:
            self.send_channel.send_nowait(text)
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self.options.slow_consumer_grace):
            await self.send_channel.send(text)
            return
        self.close(
            1008, f"client too slow: its outbound queue stayed full for {self.options.slow_consumer_grace} s"
        )
        await trio.lowlevel.checkpoint()  # raises Cancelled: the connection is closing

    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            if isinstance(message, bytes):
                self.close(1003, "binary frames are not supported: send JSON-RPC 2.0 as text frames")
                return
            try:
                request = rpc.parse_message_untrusted(message)
            except rpc.RpcError as exc:
                await self.send(rpc.error_reply(getattr(exc, "request_id", None), exc))
                continue
            await self._dispatch(request)

    async def _dispatch(self, request: rpc.Request) -> None:
        entry = self.methods.get(request.method)
        if entry is None:
            error = rpc.RpcError(rpc.METHOD_NOT_FOUND, f"unknown method {request.method!r}")
            if request.has_id:
                await self.send(rpc.error_reply(request.id, error))
            return
        params_cls, handler, in_task = entry
        if not in_task:
            await self._answer(request, params_cls, handler)
            return
        if self.pending_requests >= self.options.max_pending_requests:
            error = rpc.RpcError(
                rpc.LIMIT_EXCEEDED,
                f"at most {self.options.max_pending_requests} requests may wait on workers at once",
                data={"limit": "pending_requests", "max": self.options.max_pending_requests},
            )
            if request.has_id:
                await self.send(rpc.error_reply(request.id, error))
            return
        self.pending_requests += 1
        assert self.nursery is not None
        self.nursery.start_soon(self._answer_in_task, request, params_cls, handler)

    async def _answer_in_task(self, request: rpc.Request, params_cls: type[Any], handler: Handler) -> None:
        try:
            await self._answer(request, params_cls, handler)
        finally:
            self.pending_requests -= 1

    async def _answer(self, request: rpc.Request, params_cls: type[Any], handler: Handler) -> None:
        then: Callable[[], None] | None = None
        try:
            params = rpc.structure_params_untrusted(request.params, params_cls)
            result = await handler(params)
            if isinstance(result, _AndThen):
                result, then = result.result, result.then
            reply = rpc.result_reply(request.id, result)
        except Exception as exc:
            if not isinstance(exc, rpc.RpcError | DspexError | TooManySubscribers):
                logger.exception("websocket method %s failed", request.method)
            reply = rpc.error_reply(request.id, rpc_error_from(exc))
        if request.has_id:
            await self.send(reply)
        if then is not None:
            then()

    # -- methods ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.server._closing:
            raise rpc.RpcError(rpc.UNAVAILABLE, "the server is shutting down")

    async def program_create(self, p: rpc.ProgramCreateParams) -> Any:
        self._check_open()
        program = await self.pool.create_program(
            p.signature, module=p.module, instructions=p.instructions, session=p.session, state=p.state
        )
        return {"program": program}

    async def program_list(self, p: rpc.SessionParams) -> Any:
        return {"programs": await self.pool.list_programs(session=p.session)}

    async def program_get(self, p: rpc.ProgramRefParams) -> Any:
        return await self.pool.get_program(p.program, session=p.session)

    async def program_delete(self, p: rpc.ProgramRefParams) -> Any:
        await self.pool.delete_program(p.program, session=p.session)
        return {"program": p.program, "deleted": True}

    async def lm_configure(self, p: rpc.LmConfigureParams) -> Any:
        self._check_open()
        await self.pool.configure_lm(
            p.model, session=p.session, api_base=p.api_base, api_key=p.api_key, **p.settings
        )
        return {"model": p.model, "session": p.session}

    async def session_end(self, p: rpc.SessionEndParams) -> Any:
        return {"session": p.session, "ended": self.pool.sessions.end(p.session)}

    def _admit_execution(self, p: rpc.ExecutionParams) -> None:
        self._check_open()
        limit = self.options.max_executions
        if len(self.executions) + self.runs >= limit:
            raise rpc.RpcError(
                rpc.LIMIT_EXCEEDED,
                f"at most {limit} executions may be in flight on one connection",
                data={"limit": "executions", "max": limit},
            )
        self.pool.sessions.program(p.session, p.program)  # ProgramNotFound -> unknown_program, now

    async def execution_submit(self, p: rpc.ExecutionParams) -> Any:
        self._admit_execution(p)
        execution = _Execution(f"e_{secrets.token_hex(8)}")
        self.executions[execution.id] = execution
        assert self.nursery is not None
        nursery = self.nursery
        return _AndThen(
            {"execution": execution.id},
            lambda: nursery.start_soon(self._execute, execution, p),
        )

    async def execution_run(self, p: rpc.ExecutionParams) -> Any:
        self._admit_execution(p)
        self.runs += 1
        self.server._execution_started()
        try:
            answer = await self.pool.execute(
                p.program, p.inputs, session=p.session, timeout=p.timeout, with_usage=True
            )
        finally:
            self.runs -= 1
            self.server._execution_ended()
        return {"outputs": answer["outputs"], "usage": answer.get("usage")}

    async def execution_cancel(self, p: rpc.ExecutionCancelParams) -> Any:
        execution = self.executions.get(p.execution)
        if execution is not None:
            execution.cancel_reason = "cancelled by the client"
            execution.scope.cancel(reason="execution/cancel")
            return {"execution": p.execution, "cancelled": True}
        if p.execution in self.finished:
            return {"execution": p.execution, "cancelled": False, "state": self.finished[p.execution]}
        raise rpc.RpcError(rpc.UNKNOWN_EXECUTION, f"no execution {p.execution!r} on this connection")

    async def _emit(self, execution: _Execution, event: str, data: dict[str, Any]) -> None:
        execution.seq += 1
        await self.send(
            rpc.notification(
                "execution/event",
                {"execution": execution.id, "seq": execution.seq, "event": event, "data": data},
            )
        )

    async def _execute(self, execution: _Execution, p: rpc.ExecutionParams) -> None:
        terminal: tuple[str, dict[str, Any]] | None = None
        self.server._execution_started()
        try:
            with execution.scope:
                try:
                    await self._emit(execution, "started", {})
                    if p.stream:
                        async with self.pool.stream(
                            p.program, p.inputs, session=p.session, timeout=p.timeout
                        ) as events:
                            async for event in events:
                                if event["event"] == "chunk":
                                    data = {"field": event.get("field"), "chunk": event.get("chunk")}
                                    await self._emit(execution, "chunk", data)
                                elif event["event"] == "completed":
                                    terminal = (
                                        "completed",
                                        {
                                            "outputs": event["outputs"],
                                            "usage": event.get("usage"),
                                        },
                                    )
                    else:
                        answer = await self.pool.execute(
                            p.program, p.inputs, session=p.session, timeout=p.timeout, with_usage=True
                        )
                        terminal = "completed", {"outputs": answer["outputs"], "usage": answer.get("usage")}
                except Exception as exc:
                    if not isinstance(exc, DspexError):
                        logger.exception("execution %s failed unexpectedly", execution.id)
                    terminal = "failed", _failure(exc)
            if terminal is None:
                terminal = "cancelled", {"reason": execution.cancel_reason or "cancelled"}
        finally:
            del self.executions[execution.id]
            self.server._execution_ended()
            self.finished[execution.id] = terminal[0] if terminal is not None else "cancelled"
            while len(self.finished) > self.options.remember_finished:
                self.finished.popitem(last=False)
        await self._emit(execution, *terminal)

    async def health_subscribe(self, p: rpc.NoParams) -> Any:
        limit = self.options.max_subscriptions
        if len(self.subscriptions) >= limit:
            raise rpc.RpcError(
                rpc.LIMIT_EXCEEDED,
                f"at most {limit} health subscriptions per connection",
                data={"limit": "subscriptions", "max": limit},
            )
        subscription = f"h_{secrets.token_hex(4)}"
        scope = trio.CancelScope()
        replied = trio.Event()
        self.subscriptions[subscription] = scope
        assert self.nursery is not None
        try:
            snapshot = await self.nursery.start(self._forward_health, subscription, scope, replied)
        except BaseException:
            self.subscriptions.pop(subscription, None)
            raise
        return _AndThen({"subscription": subscription, "snapshot": snapshot}, replied.set)

    async def _forward_health(
        self,
        subscription: str,
        scope: trio.CancelScope,
        replied: trio.Event,
        *,
        task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        seq = 0

        async def notify(event: str, data: dict[str, Any]) -> None:
            nonlocal seq
            seq += 1
            params = {"subscription": subscription, "seq": seq, "event": event, "data": data}
            await self.send_channel.send(rpc.encode(rpc.notification("health/event", params)))

        try:
            with scope:
                async with self.pool.subscribe_health(buffer=self.options.health_buffer) as events:
                    snapshot = self.pool.health()
                    seen = snapshot.seq
                    task_status.started(snapshot.to_json())
                    await replied.wait()
                    # Health events may be dropped, never waited for with a grace: a subscriber too slow
                    # for them misses some (the pool-side buffer overflows) and resyncs from a snapshot.
                    async for event in events:
                        if event.kind == "lagged":
                            await notify("lagged", dict(event.data))
                            snapshot = self.pool.health()
                            seen = snapshot.seq
                            await notify("snapshot", snapshot.to_json())
                            continue
                        if event.seq <= seen:
                            continue  # already in the snapshot the client holds
                        await notify(event.kind, {**event.data, "backend": event.backend, "time": event.time})
        finally:
            self.subscriptions.pop(subscription, None)

    async def health_unsubscribe(self, p: rpc.SubscriptionParams) -> Any:
        scope = self.subscriptions.pop(p.subscription, None)
        if scope is not None:
            scope.cancel(reason="health/unsubscribe")
        return {"subscription": p.subscription, "unsubscribed": scope is not None}

    async def runtime_status(self, p: rpc.NoParams) -> Any:
        from dspex_trio import __version__

        return {
            "version": __version__,
            "subprotocol": SUBPROTOCOL,
            "time": time.time(),
            "server": {
                "url": self.server.url,
                **attrs.asdict(self.server.statistics()),
                "limits": attrs.asdict(self.options),
            },
            "connection": {
                "executions": len(self.executions) + self.runs,
                "subscriptions": len(self.subscriptions),
            },
            "pool": attrs.asdict(self.pool.statistics()),
            "health": self.pool.health().to_json(),
        }

    async def ping(self, p: rpc.NoParams) -> Any:
        return "pong"
