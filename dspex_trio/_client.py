"""The remote client: the pool's own API over a ``dspex-trio serve`` endpoint (``dspex_trio.connect``).

``async with dspex_trio.connect("ws://host:8765", token=...) as remote:`` gives a :class:`RemoteBackend`: a
:class:`~dspex_trio.Backend` like the pool (``create_program``, ``execute``, ``stream``, ``list_programs``,
``get_program``, ``delete_program``, ``configure_lm``, ``open_session`` / ``end_session``,
``subscribe_health``, ``health``, ``statistics``), raising the same typed errors, so moving from an
embedded pool to a shared server is a one-line change. It speaks the websocket API of
``docs/websocket-api.md`` (JSON-RPC 2.0, subprotocol ``dspex.v1``); what the server sends is checked by the
sans-IO layer :mod:`dspex_trio._client_protocol`. ``docs/client.md`` is the user's page.

How the pool's API maps onto the websocket's:

- **Sessions.** Over the websocket a session is a server-minted capability. The client keeps a map from
  the names its caller uses (``session="s1"``, and ``None``) to sessions it opened (``session/open``), lazily,
  on the first write to a name; every request carries the minted id, so the sessions outlive a dropped
  connection and resume on the next one. A read of a name never written is answered here (no programs),
  as the pool answers it. A minted id (``s_…``, e.g. from :meth:`RemoteBackend.open_session`) is passed
  through as it is. A session the server no longer has (restarted, expired) fails with
  ``SessionNotFound``, once: the name then maps to nothing, and the next write opens a fresh session.
  Leaving ``connect`` ends the sessions it opened for names (bounded); those from ``open_session`` are the
  caller's to end (or they expire with the server's TTL).
- **Executions.** ``execute`` and ``stream`` submit (``execution/submit``) and follow the execution's events:
  cancelling the caller (or leaving the stream's block early) sends ``execution/cancel``, so the
  execution stops in its worker. ``timeout`` is the server's deadline for it (``CallTimeout``); the
  client gives the server ``TIMEOUT_GRACE_S`` more before it gives up itself.
- **Connections.** One websocket at a time. When it drops, every call in flight on it fails with
  :class:`ConnectionLost` (a ``WorkerCrashed``: the server cancels a gone connection's executions), or is
  sent again when that is safe: a request that never left, a read, an ``execute(..., idempotent=True)``.
  The next call reconnects, retrying with backoff (``ClientOptions.backoff``) for up to
  ``reconnect_timeout`` (then ``PoolUnavailable``); a handshake the server refuses for good (a wrong
  token: HTTP 401) fails at once with :class:`HandshakeRefused`. Health subscribers keep the client
  connected. A server that breaks the protocol gets its connection closed (1002) and the calls on it fail
  with :class:`RemoteProtocolError`: never a hang, never an answer delivered to the wrong caller.

Tasks: a connector task makes a connection when a call or a health subscriber needs one; each
connection runs in a task of its own, which reads every message from the socket (``_client_ws``:
wsproto over one trio stream) and delivers it to the caller waiting for it, and pings the server; the
connector makes the next connection as soon as one is over, without waiting for its closing handshake.
Callers write their own requests (one shielded, bounded write each) and wait for their answer. Every buffer is bounded: executions in flight (``max_executions``),
events a stream's consumer has not read (``max_stream_events``, then ``Overloaded``), health events
(the subscribers' own buffers).
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import logging
import math
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import attrs
import trio

from dspex_trio._breaker import CircuitState
from dspex_trio._client_jobs import RemoteJob, open_remote_job
from dspex_trio._client_protocol import (
    ConnectionLost,
    ExecutionTrack,
    HandshakeRefused,
    Notification,
    RemoteProtocolError,
    Reply,
    apply_health_event,
    error_from_failure_untrusted,
    error_from_reply_untrusted,
    health_snapshot_untrusted,
    parse_server_message_untrusted,
    positive_timeout,
)
from dspex_trio._client_ws import ClientWebsocket, WebsocketClosed, open_client_websocket
from dspex_trio._errors import (
    CallTimeout,
    DspexError,
    InvalidParams,
    Overloaded,
    PoolUnavailable,
    ProgramNotFound,
    SessionNotFound,
    UnknownMethod,
    WorkerClosed,
)
from dspex_trio._events import EventBus, Subscription
from dspex_trio._exports import NoPublicConstructor
from dspex_trio._handshake import SUBPROTOCOL
from dspex_trio._health import HealthSnapshot
from dspex_trio._retry import RetryPolicy
from dspex_trio._sessions import MINTED_PREFIX
from dspex_trio._util import open_service_nursery
from dspex_trio._validators import positive

logger = logging.getLogger("dspex_trio.client")

__all__ = [
    "ClientOptions",
    "ConnectionLost",
    "HandshakeRefused",
    "RemoteBackend",
    "RemoteProtocolError",
    "RemoteStatistics",
    "connect",
]

TIMEOUT_GRACE_S: Final = 2.0
"""How long past a call's ``timeout`` the client waits for the server's own ``CallTimeout``, in s."""
DEFAULT_SERVER_MAX_MESSAGE: Final = 1024 * 1024
"""The server's message limit (characters) assumed until ``runtime/status`` tells the real one."""
READS: Final = frozenset(
    {"program/list", "program/get", "program/available", "lm/list", "runtime/status", "ping"}
)
"""Methods that change nothing: sent again on the next connection when the one they were on dropped."""
MIN_CONNECTION_S: Final = 1.0
"""A connection that ends sooner than this after it was established counts as a failed attempt (backoff)."""
DEFAULT_BACKOFF: Final = RetryPolicy(initial=0.05, multiplier=2.0, cap=5.0, jitter=0.5, max_attempts=1)
"""Waits between connection attempts (``max_attempts`` is not used: the client tries while a call waits)."""


@attrs.frozen(kw_only=True)
class ClientOptions:
    """Limits and timing of the remote client. Every duration is in seconds."""

    connect_timeout: float = attrs.field(default=10.0, validator=positive)
    """One connection attempt (TCP, TLS, the websocket handshake and the first ``runtime/status``); at
    ``connect()``, also how long the first connection may take in all, retries included."""
    reconnect_timeout: float = attrs.field(default=30.0, validator=positive)
    """How long a call waits for a connection while the client reconnects; then ``PoolUnavailable``."""
    backoff: RetryPolicy = attrs.field(
        default=DEFAULT_BACKOFF, validator=attrs.validators.instance_of(RetryPolicy)
    )
    """Waits between connection attempts: exponential with jitter, capped (``initial``, ``multiplier``,
    ``cap``, ``jitter`` of a :class:`~dspex_trio.RetryPolicy`)."""
    ping_interval: float = attrs.field(default=20.0, validator=positive)
    """Between two websocket pings the client sends to check that the server is there."""
    ping_timeout: float = attrs.field(default=20.0, validator=positive)
    """A ping may go unanswered this long; then the connection counts as lost."""
    write_timeout: float = attrs.field(default=10.0, validator=positive)
    """One message may take this long to write (the server is not reading); then the connection counts
    as lost. A write is never cut short by a caller's cancellation (that would corrupt the stream)."""
    close_timeout: float = attrs.field(default=2.0, validator=positive)
    """Leaving ``connect``: ending the client's sessions, and the closing handshake, each bounded by it."""
    max_message_size: int = attrs.field(default=16 * 1024 * 1024, validator=positive)
    """Largest message accepted from the server, in characters; a larger one closes the connection (1009)."""
    max_executions: int = attrs.field(default=64, validator=positive)
    """Executions in flight at once; more callers wait for a slot (the server's own default per
    connection is 64: past its limit it would refuse them with ``LimitExceeded``)."""
    max_stream_events: int = attrs.field(default=1024, validator=positive)
    """Events a stream's consumer may leave unread; past it the stream fails with ``Overloaded`` (and is
    cancelled on the server)."""
    end_sessions: bool = True
    """Leaving ``connect`` ends the sessions the client opened for session names (not ``open_session``'s)."""


@attrs.frozen
class RemoteStatistics:
    """A snapshot of a remote client."""

    backend: str
    """The backend the server serves (``pool``, ``bridge``, ``mock``, ``fallback``)."""
    url: str
    connected: bool
    """Whether a connection is open now."""
    connections: int
    """Connections opened so far (the first included)."""
    connect_failures: int
    """Connection attempts that failed."""
    requests: int
    """Requests sent (executions included)."""
    executions: int
    """Executions submitted."""
    in_flight: int
    """Executions in flight now."""
    completed: int
    failed: int
    """Executions that ended in an error (``failed``, ``cancelled`` by the server, a lost connection)."""
    lost: int
    """Calls failed with ``ConnectionLost``."""
    resent: int
    """Calls sent again on a new connection (never sent, reads, idempotent executions)."""
    protocol_errors: int
    """Connections closed because the server broke the protocol."""
    late_replies: int
    """Replies that came after their caller had left (dropped)."""
    sessions: int
    """Session names mapped to server sessions."""
    circuit: CircuitState
    """``closed`` while the server can be reached, ``open`` after a failed connection attempt."""


@attrs.define(eq=False)
class _Counts:
    connections: int = 0
    connect_failures: int = 0
    requests: int = 0
    executions: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    resent: int = 0
    protocol_errors: int = 0
    late_replies: int = 0


class _Slots:
    """Executions in flight (at most ``limit``; more callers wait, in order). Taking a free slot makes no
    extra yield to the scheduler (the request's write is the call's checkpoint)."""

    def __init__(self, limit: int) -> None:
        self._semaphore = trio.Semaphore(limit)

    async def __aenter__(self) -> None:
        try:
            self._semaphore.acquire_nowait()
        except trio.WouldBlock:
            await self._semaphore.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._semaphore.release()


class _Pending:
    """A request waiting for its reply."""

    __slots__ = ("done", "error", "execution", "id", "job", "method", "result")

    def __init__(
        self, request_id: int, method: str, execution: _Execution | None, job: RemoteJob | None = None
    ) -> None:
        self.id = request_id
        self.method = method
        self.execution = execution
        """For ``execution/submit``: the execution, registered on the connection with the reply."""
        self.job = job
        """For ``job/submit``: the job, registered on the connection with the reply."""
        self.done = trio.Event()
        self.result: Any = None
        self.error: DspexError | None = None


class _Execution:
    """One submitted execution, as its caller sees it: the events it has not read, its end."""

    __slots__ = (
        "abandoned",
        "arrived",
        "end",
        "error",
        "events",
        "id",
        "limit",
        "link",
        "program",
        "session",
        "stream",
        "track",
    )

    def __init__(self, *, stream: bool, limit: int, program: str = "", session: str = "") -> None:
        self.id = ""
        """The server's id of it, once its submit was answered."""
        self.program = program
        self.session = session
        self.stream = stream
        self.limit = limit
        self.link: _Link | None = None
        self.track: ExecutionTrack | None = None
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self.arrived = trio.Event()
        self.end: tuple[str, dict[str, Any]] | None = None
        """The terminal event (``completed`` / ``failed`` / ``cancelled``, its data)."""
        self.error: DspexError | None = None
        """Set when it cannot end normally (the connection dropped, its consumer lagged)."""
        self.abandoned = False
        """Its caller left: its remaining events are checked and dropped."""

    @property
    def over(self) -> bool:
        return self.end is not None or self.error is not None

    def offer(self, event: str, data: dict[str, Any], terminal: bool) -> None:
        """An event of it arrived (checked by its track)."""
        if self.abandoned:
            return
        if terminal:
            self.end = (event, data)
            self.arrived.set()
        elif self.stream and event != "started":
            if len(self.events) >= self.limit:
                self.fail(
                    Overloaded(f"the consumer of stream {self.id} lagged {len(self.events)} events behind")
                )
                if self.link is not None:
                    self.link.cancel_soon(self.id)
                return
            self.events.append({"event": event, **data})
            self.arrived.set()

    def fail(self, error: DspexError) -> None:
        if not self.over:
            self.error = error
            self.arrived.set()


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""Compact JSON, no NaN; made once (``json.dumps`` with keywords makes an encoder per call)."""


def _encode(message: dict[str, Any]) -> str:
    try:
        return _ENCODER.encode(message)
    except (TypeError, ValueError) as exc:
        raise InvalidParams(f"not JSON: {exc}") from None


class _Link:
    """One websocket connection: the requests and executions in flight on it, and its reader."""

    def __init__(self, client: RemoteBackend, ws: ClientWebsocket, nursery: trio.Nursery) -> None:
        self.client = client
        self.ws = ws
        self.nursery = nursery
        self.pending: dict[int, _Pending] = {}
        self.abandoned: dict[int, _Pending] = {}
        """Requests whose caller left before the reply (their reply is dropped)."""
        self.executions: dict[str, _Execution] = {}
        self.jobs: dict[str, RemoteJob] = {}
        self.failure: Callable[[], DspexError] | None = None
        """Makes the error of what was in flight once the connection ended (one exception per caller)."""
        self.health_subscription: str | None = None
        self.installed = False
        """Callers were given it (the server answered ``runtime/status``)."""
        self.installed_at = math.inf

    @property
    def open(self) -> bool:
        return self.failure is None

    # -- writing ----------------------------------------------------------------------------------------
    async def write(self, text: str) -> bool:
        """Write one message; False if the connection was already closed (nothing was sent).

        Shielded (a message is never cut short) and bounded by ``write_timeout``: past it the connection
        counts as lost. Raises ``ConnectionLost`` if it broke during the write. A frame the socket takes
        whole at once is written without a checkpoint (the callers then wait for their answer, which is
        one); only a write that has to wait gets the shielded, bounded scope.
        """
        if not self.open or self.ws.closed is not None:
            await trio.lowlevel.checkpoint()
            return False
        try:
            if self.ws.send_text_nowait(text):
                return True  # written whole at once: nothing to shield, and the caller's wait checkpoints
        except WebsocketClosed as exc:
            raise self.client._lost(exc) from None
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.client.options.write_timeout
            try:
                await self.ws.flush()
            except WebsocketClosed as exc:
                raise self.client._lost(exc) from None
        if scope.cancelled_caught:
            timeout = self.client.options.write_timeout
            self.ws.abort()
            self.fail(lambda: ConnectionLost(f"writing to {self.client.url} took longer than {timeout:g} s"))
            self.nursery.cancel_scope.cancel()  # the reader too: the stream may hold half a frame
            raise ConnectionLost(f"writing to {self.client.url} took longer than {timeout:g} s")
        return True

    def cancel_soon(self, execution: str) -> None:
        """Send ``execution/cancel`` (a notification: no reply) without waiting."""
        if self.open:
            self.nursery.start_soon(self._send_cancel, execution)

    async def _send_cancel(self, execution: str) -> None:
        message = {"jsonrpc": "2.0", "method": "execution/cancel", "params": {"execution": execution}}
        try:
            await self.write(_encode(message))
        except DspexError:
            pass  # the connection is gone: the server cancelled the execution with it

    def close_soon(self, code: int, reason: str) -> None:
        """Start the closing handshake (its answer reaches the reader, which then ends)."""
        self.nursery.start_soon(self._close, code, reason)

    async def _close(self, code: int, reason: str) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.client.options.close_timeout):
            await self.ws.aclose(code, reason)

    # -- reading --------------------------------------------------------------------------------------
    def dispatch(self, text: str | bytes) -> None:
        """Deliver one message from the server. Raises ``RemoteProtocolError`` (see the module doc)."""
        if self.failure is not None:
            return  # the connection is over (the client is closing it): its callers have their errors
        message = parse_server_message_untrusted(text)
        if type(message) is Reply:
            self._on_reply(message)
            return
        assert isinstance(message, Notification)
        params = message.params
        if message.method == "execution/event":
            execution_id = params.get("execution")
            execution = self.executions.get(execution_id) if isinstance(execution_id, str) else None
            if execution is None or execution.track is None:
                raise RemoteProtocolError(
                    f"the server sent an event of execution {str(execution_id)[:32]!r}, which this client never submitted"
                )
            event, data = params.get("event"), params.get("data")
            terminal = execution.track.advance_untrusted(params.get("seq"), event, data)
            if terminal:
                del self.executions[execution.id]
            execution.offer(event, data, terminal)  # type: ignore[arg-type]
        elif message.method == "job/event":
            job = self.jobs.get(params.get("job"))  # type: ignore[arg-type]
            if job is None:
                return  # a job this client cancelled (its last events cross the cancel)
            if job.offer_untrusted(params):
                del self.jobs[job.id]
        elif message.method == "health/event":
            if params.get("subscription") != self.health_subscription or self.health_subscription is None:
                return  # a subscription this client just ended
            self.client._on_health_event(params)
        else:
            raise RemoteProtocolError(f"the server sent an unknown notification {message.method[:64]!r}")

    def _on_reply(self, reply: Reply) -> None:
        pending = self.pending.pop(reply.id, None)
        if pending is None:
            late = self.abandoned.pop(reply.id, None)
            if late is None:
                raise RemoteProtocolError(
                    f"the server replied to request {reply.id}, which this client never sent on it"
                )
            self.client._counts.late_replies += 1
            return
        execution = pending.execution
        if execution is not None:  # a submit: its caller waits on the execution, not on the reply
            if reply.error is not None:
                execution.fail(error_from_reply_untrusted(reply.error))
            else:
                self._register(execution, reply.result)
                if execution.abandoned:  # its caller left before the reply
                    self.cancel_soon(execution.id)
                elif execution.stream:  # the stream's block waits for its reply before it starts
                    execution.arrived.set()
            return
        if reply.error is not None:
            pending.error = error_from_reply_untrusted(reply.error)
        elif pending.job is not None:  # before any of its events is read
            self._register_job(pending.job, reply.result)
        pending.result = reply.result
        pending.done.set()

    def _register_job(self, job: RemoteJob, result: Any) -> None:
        job_id = result.get("job") if isinstance(result, dict) else None
        if not isinstance(job_id, str) or not job_id or job_id in self.jobs:
            raise RemoteProtocolError(f"job/submit was answered with {str(result)[:64]!r}, not a new job id")
        job.id, job.link = job_id, self
        self.jobs[job_id] = job

    def _register(self, execution: _Execution, result: Any) -> _Execution:
        execution_id = result.get("execution") if isinstance(result, dict) else None
        if not isinstance(execution_id, str) or not execution_id or execution_id in self.executions:
            raise RemoteProtocolError(
                f"execution/submit was answered with {str(result)[:64]!r}, not a new execution id"
            )
        execution.id = execution_id
        execution.track = ExecutionTrack(execution_id)
        execution.link = self
        self.executions[execution_id] = execution
        return execution

    def fail(self, failure: Callable[[], DspexError]) -> None:
        """The connection ended: everything in flight on it fails (each with its own exception)."""
        if self.failure is not None:
            return
        self.failure = failure
        for pending in self.pending.values():
            pending.error = failure()
            pending.done.set()
            if pending.execution is not None:
                pending.execution.fail(failure())
        self.pending.clear()
        self.abandoned.clear()
        for execution in self.executions.values():
            execution.fail(failure())
        self.executions.clear()
        for job in self.jobs.values():
            job.fail(failure())
        self.jobs.clear()


class RemoteBackend(metaclass=NoPublicConstructor):
    """A :class:`~dspex_trio.Backend` served by a remote ``dspex-trio serve``. Made by :func:`connect`.

    ``name`` is the backend the server serves (``pool`` for ``dspex-trio serve``), as the answers say
    (``execute(..., with_usage=True)["backend"]``, a stream's ``completed`` event); ``url`` is the
    server's. See the module doc for sessions, cancellation and reconnection.
    """

    def __init__(
        self, url: str, *, token: str | None, ssl_context: ssl.SSLContext | None, options: ClientOptions
    ) -> None:
        self.url = url
        self.name = "remote"
        """The server's backend (``pool``, ``bridge``, ``mock``, ``fallback``), known once connected."""
        self.options = options
        self.server_version = ""
        self._token = token
        self._ssl_context = ssl_context
        self._nursery: trio.Nursery | None = None
        self._link: _Link | None = None
        self._link_changed = trio.Event()
        self._demand_changed = trio.Event()
        self._waiters = 0
        self._attempts = 0
        """Connection attempts made (each one's outcome is ``_last_failure`` / a link)."""
        self._last_failure: tuple[int, DspexError, bool] | None = None
        """The latest failed attempt: its number, its error, whether it is permanent."""
        self._closing = False
        self._ids = 0
        self._counts = _Counts()
        self._slots = _Slots(options.max_executions)
        self._in_flight = 0
        self._server_max_message = DEFAULT_SERVER_MAX_MESSAGE
        self._health: HealthSnapshot | None = None
        self.events = EventBus(backend=self.name)
        self._health_subscribers = 0
        self._sessions: dict[str | None, str] = {}
        """Session names (``None`` included) -> the minted ids the client opened for them."""
        self._explicit_sessions: set[str] = set()
        """Sessions opened by ``open_session`` and not ended."""
        self._session_lock = trio.Lock()
        self._programs: dict[str, set[str]] = {}
        """Programs this client knows of, per minted session (for the synchronous ``has_program``)."""
        self._rng = random.Random()

    # -- the connection -------------------------------------------------------------------------------
    def _lost(self, reason: WebsocketClosed | None, *, started: bool = True) -> ConnectionLost:
        code = reason.code if reason is not None else None
        why = reason.reason if reason is not None and reason.reason else "the connection broke"
        return ConnectionLost(
            f"the connection to {self.url} closed ({code} {why})"
            if code is not None
            else f"{why} ({self.url})",
            started=started,
            close_code=code,
            close_reason=why,
        )

    def _poke(self) -> None:
        self._demand_changed.set()
        self._demand_changed = trio.Event()

    def _set_link(self, link: _Link | None) -> None:
        self._link = link
        self._link_changed.set()
        self._link_changed = trio.Event()

    async def _wait_link(self) -> _Link:
        """The open connection, or wait for the connector to make one (up to ``reconnect_timeout``)."""
        link = self._link
        if link is not None and link.open:
            return link
        if self._closing:
            raise WorkerClosed(f"the remote client of {self.url} is closed")
        since = self._attempts
        self._waiters += 1
        self._poke()
        try:
            with trio.move_on_after(self.options.reconnect_timeout):
                while True:
                    link = self._link
                    if link is not None and link.open:
                        return link
                    if self._closing:
                        raise WorkerClosed(f"the remote client of {self.url} is closed")
                    failed = self._last_failure
                    if failed is not None and failed[0] > since and failed[2]:
                        raise copy.copy(failed[1])
                    await self._link_changed.wait()
        finally:
            self._waiters -= 1
        failed = self._last_failure
        why = f": {failed[1]}" if failed is not None else ""
        raise PoolUnavailable(
            f"cannot reach {self.url} (tried for {self.options.reconnect_timeout:g} s){why}",
            reason=f"unreachable{why}",
        )

    def _demand(self) -> bool:
        return not self._closing and (self._waiters > 0 or self._health_subscribers > 0)

    async def _connector(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect whenever a call or a health subscriber needs a connection; own it while it lasts."""
        task_status.started()
        failures = 0
        while True:
            while not self._demand():
                await self._demand_changed.wait()
            self._attempts += 1
            attempt = _Attempt(self._attempts)
            # Its own task: a connection's closing handshake (bounded by close_timeout) never delays
            # the next connection; the attempt says when the connection is over.
            assert self._nursery is not None
            self._nursery.start_soon(self._attempt, attempt)
            await attempt.over.wait()
            if attempt.error is None:
                # A connection that ended at once (a server that accepts, then drops) counts as a
                # failure for the backoff, so that a client with demand never loops hot.
                failures = 0 if attempt.lasted >= MIN_CONNECTION_S else failures + 1
                if failures:
                    await trio.sleep(self.options.backoff.delay(min(failures, 64), self._rng))
                continue
            error, permanent = attempt.error, attempt.permanent
            failures += 1
            self._counts.connect_failures += 1
            self._last_failure = (attempt.number, error, permanent)
            self._link_changed.set()
            self._link_changed = trio.Event()
            logger.info("connecting to %s failed (attempt %d): %s", self.url, failures, error)
            await trio.sleep(self.options.backoff.delay(min(failures, 64), self._rng))

    def _headers(self) -> list[tuple[bytes, bytes]]:
        if self._token is None:
            return []
        return [(b"authorization", f"Bearer {self._token}".encode())]

    async def _attempt(self, attempt: _Attempt) -> None:
        try:
            await self._connect_and_run(attempt)
        except _ConnectFailed as exc:
            attempt.error, attempt.permanent = exc.error, exc.permanent
        finally:
            attempt.over.set()

    async def _connect_and_run(self, attempt: _Attempt) -> None:
        """One connection: open it, check the server, serve the callers until it ends (then set
        ``attempt.over`` before the closing handshake). ``_ConnectFailed`` if it could not be opened, or
        ended before it was served."""
        options = self.options
        opening = trio.CancelScope(deadline=trio.current_time() + options.connect_timeout)
        link: _Link | None = None
        try:
            with opening:
                async with (
                    open_client_websocket(
                        self.url,
                        ssl_context=self._ssl_context,
                        subprotocols=[SUBPROTOCOL],
                        headers=self._headers(),
                        max_message_size=options.max_message_size,
                        close_timeout=options.close_timeout,
                    ) as ws,
                    trio.open_nursery() as nursery,
                ):
                    opening.deadline = math.inf
                    if ws.subprotocol != SUBPROTOCOL:
                        mismatch = RemoteProtocolError(
                            f"{self.url} did not accept the {SUBPROTOCOL} subprotocol"
                        )
                        raise _ConnectFailed(mismatch, permanent=True)
                    link = _Link(self, ws, nursery)
                    opening.deadline = trio.current_time() + options.connect_timeout  # until it is served
                    await self._run_link(link, opening)
                    if link.installed:
                        attempt.lasted = trio.current_time() - link.installed_at
                        attempt.over.set()
                    nursery.cancel_scope.cancel()
        except HandshakeRefused as exc:
            raise _ConnectFailed(exc, permanent=not exc.transient) from None
        except RemoteProtocolError as exc:
            raise _ConnectFailed(exc, permanent=True) from None
        except (OSError, trio.BrokenResourceError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            permanent = isinstance(cause, ssl.SSLCertVerificationError)
            why = str(cause or exc) or type(exc).__name__
            raise _ConnectFailed(
                PoolUnavailable(f"cannot connect to {self.url}: {why}", reason=why), permanent
            ) from None
        if link is None or not link.installed:
            if opening.cancelled_caught:
                why = f"no answer within {options.connect_timeout:g} s"
                raise _ConnectFailed(
                    PoolUnavailable(f"cannot connect to {self.url}: {why}", reason=why), False
                )
            error = (
                link.failure()
                if link is not None and link.failure is not None
                else ConnectionLost(f"{self.url}: no status")
            )
            raise _ConnectFailed(error, permanent=False)

    async def _run_link(self, link: _Link, opening: trio.CancelScope) -> None:
        """Read the connection until it ends; meanwhile check the server and hand the link to callers
        (``opening`` bounds the time until then)."""
        failure: Callable[[], DspexError] = functools.partial(self._lost, None)
        link.nursery.start_soon(self._greet, link, opening)
        try:
            while True:
                try:
                    messages = await link.ws.receive_messages()
                except WebsocketClosed as exc:
                    failure = functools.partial(self._lost, exc)
                    break
                for text in messages:
                    link.dispatch(text)
        except RemoteProtocolError as exc:
            self._counts.protocol_errors += 1
            logger.warning("closing the connection to %s: %s", self.url, exc)
            message = str(exc)
            failure = lambda: RemoteProtocolError(message)  # noqa: E731
            link.fail(failure)
            with trio.CancelScope(shield=True), trio.move_on_after(self.options.close_timeout):
                await link.ws.aclose(1002, "protocol error", wait=False)
        finally:
            if self._link is link:
                self._set_link(None)
            self._fail_link(link, failure)
            if link.health_subscription is not None and not self._closing:
                self.events.publish("connection", {"state": "lost", "url": self.url})

    def _fail_link(self, link: _Link, failure: Callable[[], DspexError]) -> None:
        lost = len(link.pending) + sum(1 for e in link.executions.values() if not e.abandoned)
        if lost and not self._closing:
            logger.info("the connection to %s ended with %d call(s) in flight", self.url, lost)
        link.fail(failure)

    async def _greet(self, link: _Link, opening: trio.CancelScope) -> None:
        """A new connection: read the server's status (backend, limits, health), then serve calls."""
        try:
            status = await self._request_on(link, "runtime/status", {})
            self._take_status(status)
        except (DspexError, _NotSent) as exc:
            logger.warning("the server at %s did not answer runtime/status: %s", self.url, exc)
            link.close_soon(1002 if isinstance(exc, RemoteProtocolError) else 1001, "no status")
            return
        opening.deadline = math.inf
        self._counts.connections += 1
        link.installed, link.installed_at = True, trio.current_time()
        self._set_link(link)
        link.nursery.start_soon(self._keepalive, link)
        if self._health_subscribers:
            link.nursery.start_soon(self._subscribe_health_on, link, True)

    def _take_status(self, status: Any) -> None:
        if not isinstance(status, dict) or not isinstance(status.get("backend"), str):
            raise RemoteProtocolError("runtime/status did not answer with a status object")
        self.name = status["backend"]
        self.events.backend = self.name
        self.server_version = str(status.get("version", ""))
        limits = (status.get("server") or {}).get("limits") or {}
        size = limits.get("max_message_size") if isinstance(limits, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            self._server_max_message = size
        if "health" in status:
            self._health = health_snapshot_untrusted(status["health"])

    async def _keepalive(self, link: _Link) -> None:
        options = self.options
        while True:
            await trio.sleep(options.ping_interval)
            with trio.move_on_after(options.ping_timeout) as pong:
                try:
                    await link.ws.ping()
                except WebsocketClosed:
                    return
            if pong.cancelled_caught:
                logger.info("no pong from %s within %g s: closing", self.url, options.ping_timeout)
                link.fail(
                    lambda: ConnectionLost(
                        f"{self.url} did not answer a ping within {options.ping_timeout:g} s"
                    )
                )
                await link._close(1001, "no pong")
                return

    # -- requests ---------------------------------------------------------------------------------------
    def _message(self, method: str, params: dict[str, Any]) -> tuple[int, str]:
        self._ids += 1
        text = _encode({"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params})
        if len(text) > self._server_max_message:
            raise InvalidParams(
                f"the request is {len(text):,} characters; the server takes at most {self._server_max_message:,}"
            )
        return self._ids, text

    async def _request_on(
        self,
        link: _Link,
        method: str,
        params: dict[str, Any],
        execution: _Execution | None = None,
        job: RemoteJob | None = None,
    ) -> Any:
        """One request on ``link``; its result. Raises the mapped error reply, ``ConnectionLost``, or
        ``_NotSent`` when the connection had closed before it was written."""
        request_id, text = self._message(method, params)
        pending = _Pending(request_id, method, execution, job)
        link.pending[request_id] = pending
        try:
            sent = await link.write(text)
        except BaseException:
            link.pending.pop(request_id, None)
            raise
        if not sent:
            link.pending.pop(request_id, None)
            raise _NotSent
        self._counts.requests += 1
        try:
            await pending.done.wait()
        except BaseException:
            if link.pending.pop(request_id, None) is not None:
                link.abandoned[request_id] = pending
            raise
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def _request(
        self,
        method: str,
        params: dict[str, Any],
        *,
        execution: _Execution | None = None,
        resend: bool | None = None,
        job: RemoteJob | None = None,
    ) -> Any:
        """One request on the current connection (connecting first if need be). A request that could not
        be written is sent on the next connection; one in flight when its connection dropped is sent
        again if it is a read (``resend``), else it fails with ``ConnectionLost``."""
        again = method in READS if resend is None else resend
        while True:
            link = await self._wait_link()
            try:
                return await self._request_on(link, method, params, execution, job)
            except _NotSent:
                self._counts.resent += 1
                continue
            except ConnectionLost:
                if again:
                    again = False
                    self._counts.resent += 1
                    continue
                self._counts.lost += 1
                raise

    # -- sessions ---------------------------------------------------------------------------------------
    def _session_for_read(self, session: str | None) -> str | None:
        """The minted id a read goes to; None: a name never written (nothing there)."""
        if session is not None and session.startswith(MINTED_PREFIX):
            return session
        return self._sessions.get(session)

    async def _session_for_write(self, session: str | None) -> str:
        """The minted id a write goes to: opened now for a name that has none."""
        sid = self._session_for_read(session)
        if sid is not None:
            return sid
        async with self._session_lock:
            sid = self._sessions.get(session)
            if sid is None:
                sid = await self._open_session()
                self._sessions[session] = sid
        return sid

    async def _open_session(self) -> str:
        result = await self._request("session/open", {})
        sid = result.get("session") if isinstance(result, dict) else None
        if not isinstance(sid, str) or not sid.startswith(MINTED_PREFIX):
            raise RemoteProtocolError(
                f"session/open was answered with {str(result)[:64]!r}, not a session id"
            )
        return sid

    def _forget_session(self, sid: str) -> None:
        """The server no longer has ``sid``: names that map to it map to nothing now."""
        for name in [name for name, mapped in self._sessions.items() if mapped == sid]:
            del self._sessions[name]
        self._programs.pop(sid, None)
        self._explicit_sessions.discard(sid)

    async def _in_session(self, sid: str, method: str, params: dict[str, Any], **kwargs: Any) -> Any:
        """A request in session ``sid``: a ``SessionNotFound`` forgets it (see the module doc)."""
        try:
            return await self._request(method, {**params, "session": sid}, **kwargs)
        except SessionNotFound:
            self._forget_session(sid)
            raise

    @staticmethod
    def _not_found(program: str, session: str | None) -> ProgramNotFound:
        return ProgramNotFound(
            f"no program {program!r} in session {session if session is not None else 'default'!r}"
        )

    async def open_session(self, *, max_programs: int | None = None, max_bytes: int | None = None) -> str:
        """A new server session (``session/open``): pass its id as ``session=`` here or from another
        client to share it, keep it to resume after a restart of this process. The server sets its
        bounds (``max_programs`` / ``max_bytes`` are the in-process API's and are not sent)."""
        sid = await self._open_session()
        self._explicit_sessions.add(sid)
        return sid

    async def end_session(self, session: str) -> bool:
        """End a session (a name this client mapped, or a minted id) now; False if there was none."""
        sid = self._session_for_read(session)
        if sid is None:
            await trio.lowlevel.checkpoint()
            return False
        try:
            await self._request("session/end", {"session": sid})
        except SessionNotFound:
            return False
        finally:
            self._forget_session(sid)
        return True

    def has_session(self, session: str) -> bool:
        """Whether this client holds the session (a name it wrote to, or an id from ``open_session``), as
        far as it knows: the server may have dropped it since (the next call then says so)."""
        sid = self._session_for_read(session)
        return sid is not None and (sid in self._explicit_sessions or sid in self._sessions.values())

    @property
    def sessions(self) -> dict[str | None, str]:
        """Session names -> the server sessions the client opened for them (a copy)."""
        return dict(self._sessions)

    # -- programs ---------------------------------------------------------------------------------------
    async def create_program(
        self,
        signature: str | dict[str, Any] | None = None,
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
        include: list[str] | None = None,
        **options: Any,
    ) -> str:
        """Create a program (``program/create``); its id. ``InvalidParams`` for a bad signature, module
        or option (``options``: ``tools``, ``max_iters``, ``n``, ``reward``, ``threshold``, ``base``)."""
        sid = await self._session_for_write(session)
        params: dict[str, Any] = {"module": module, **options}
        if signature is not None:
            params["signature"] = signature
        if instructions is not None:
            params["instructions"] = instructions
        if include is not None:
            params["include"] = include
        if state is not None:
            params["state"] = state
        result = await self._in_session(sid, "program/create", params)
        program = result.get("program") if isinstance(result, dict) else None
        if not isinstance(program, str) or not program:
            raise RemoteProtocolError(
                f"program/create was answered with {str(result)[:64]!r}, not a program id"
            )
        self._programs.setdefault(sid, set()).add(program)
        return program

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]:
        sid = self._session_for_read(session)
        if sid is None:
            await trio.lowlevel.checkpoint()
            return []
        result = await self._in_session(sid, "program/list", {})
        programs = result.get("programs") if isinstance(result, dict) else None
        if not isinstance(programs, list) or not all(
            isinstance(p, dict) and isinstance(p.get("id"), str) for p in programs
        ):
            raise RemoteProtocolError("program/list did not answer with a list of programs")
        self._programs[sid] = {p["id"] for p in programs}
        return programs

    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        sid = self._session_for_read(session)
        if sid is None:
            await trio.lowlevel.checkpoint()
            raise self._not_found(program, session)
        try:
            info = await self._in_session(sid, "program/get", {"program": program})
        except ProgramNotFound:
            self._programs.get(sid, set()).discard(program)
            raise
        if not isinstance(info, dict):
            raise RemoteProtocolError("program/get did not answer with an object")
        return info

    async def delete_program(self, program: str, *, session: str | None = None) -> None:
        sid = self._session_for_read(session)
        if sid is None:
            await trio.lowlevel.checkpoint()
            raise self._not_found(program, session)
        try:
            await self._in_session(sid, "program/delete", {"program": program})
        finally:
            self._programs.get(sid, set()).discard(program)

    def has_program(self, program: str, *, session: str | None = None) -> bool:
        """Whether the session holds the program, as far as this client knows (it created or listed it,
        and has not seen it deleted)."""
        sid = self._session_for_read(session)
        return sid is not None and program in self._programs.get(sid, ())

    async def available_programs(self) -> dict[str, Any]:
        """What the server's program modules registered (``program/available``)."""
        result = await self._request("program/available", {})
        if not isinstance(result, dict):
            raise RemoteProtocolError("program/available did not answer with an object")
        return result

    async def get_state(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        """Not available remotely: the websocket API (``dspex.v1``) has no method for a program's DSPy state
        (create a program with ``state=`` instead)."""
        await trio.lowlevel.checkpoint()
        raise UnknownMethod(
            "the websocket API has no method for a program's state; create it with state= instead"
        )

    async def load_state(self, program: str, state: dict[str, Any], *, session: str | None = None) -> None:
        """Not available remotely (see :meth:`get_state`): ``create_program(..., state=state)`` instead."""
        await trio.lowlevel.checkpoint()
        raise UnknownMethod(
            "the websocket API has no method to load a program's state; create it with state= instead"
        )

    # -- LMs --------------------------------------------------------------------------------------------
    async def configure_lm(
        self,
        model: str,
        *,
        session: str | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        **settings: Any,
    ) -> None:
        """Set the LM of ``session``, or without one the server's default LM (the admin role only).

        ``"offline"`` (no base, key or settings) and ``"default"`` select the server's LMs of those names
        (``lm/select``), which every client may do; any other model is ``lm/configure``, which the
        server's ``client_lm`` policy governs (``LMPolicyRefused``, an ``InvalidParams``, when it does not
        allow it). Settings are sent as the LM's ``settings``.
        """
        plain = api_base is None and api_key is None and not settings
        if session is None:
            if model == "default":
                await trio.lowlevel.checkpoint()
                raise InvalidParams("'default' selects the server's default LM for a session: name one")
            params: dict[str, Any] = {"model": model, "default": True}
        else:
            sid = await self._session_for_write(session)
            if model == "default" or (model == "offline" and plain):
                await self._in_session(sid, "lm/select", {"name": model})
                return
            params = {"model": model, "session": sid}
        if api_base is not None:
            params["api_base"] = api_base
        if api_key is not None:
            params["api_key"] = api_key
        if settings:
            params["settings"] = settings
        if session is None:
            await self._request("lm/configure", params)
        else:
            await self._in_session(params.pop("session"), "lm/configure", params)

    async def select_lm(self, name: str, *, session: str | None = None) -> None:
        """Use one of the server's LMs by name (``list_lms``) in ``session`` (``lm/select``)."""
        sid = await self._session_for_write(session)
        await self._in_session(sid, "lm/select", {"name": name})

    async def list_lms(self) -> list[dict[str, Any]]:
        """The LMs the server offers by name (``lm/list``): ``name``, ``model``, ``api_base``,
        ``has_api_key`` each (never a key)."""
        result = await self._request("lm/list", {})
        lms = result.get("lms") if isinstance(result, dict) else None
        if not isinstance(lms, list):
            raise RemoteProtocolError("lm/list did not answer with a list")
        return lms

    # -- executions -------------------------------------------------------------------------------------
    async def _submit(
        self,
        program: str,
        inputs: dict[str, Any],
        sid: str,
        timeout: float | None,
        *,
        stream: bool,
        lm_cache: str | None = None,
    ) -> _Execution:
        """Send ``execution/submit``; the execution, whose reply, events and end reach it from the reader
        (the caller waits once, for its end; a refused submit ends it with the error)."""
        params: dict[str, Any] = {"program": program, "inputs": inputs, "session": sid, "stream": stream}
        if timeout is not None:
            params["timeout"] = timeout
        if lm_cache is not None:  # the server checks it (one of the three modes)
            params["lm_cache"] = lm_cache
        execution = _Execution(
            stream=stream, limit=self.options.max_stream_events, program=program, session=sid
        )
        while True:
            link = await self._wait_link()
            request_id, text = self._message("execution/submit", params)
            link.pending[request_id] = _Pending(request_id, "execution/submit", execution)
            try:
                sent = await link.write(text)
            except BaseException:
                link.pending.pop(request_id, None)
                raise
            if sent:
                break
            link.pending.pop(request_id, None)  # the connection had closed: on the next one
            self._counts.resent += 1
        self._counts.requests += 1
        self._counts.executions += 1
        return execution

    def _abandon(self, execution: _Execution) -> None:
        """Its caller left before its end: cancel it on the server (its remaining events are dropped;
        before its reply came, the reader cancels it when it comes)."""
        if execution.over:
            return
        execution.abandoned = True
        if execution.link is not None:
            execution.link.cancel_soon(execution.id)

    def _outcome(self, execution: _Execution) -> dict[str, Any]:
        """A finished execution's ``completed`` data, or its error raised."""
        error = execution.error
        if error is not None:
            self._counts.failed += 1
            if isinstance(error, ConnectionLost):
                self._counts.lost += 1
            elif isinstance(error, SessionNotFound):
                self._forget_session(execution.session)
            elif isinstance(error, ProgramNotFound):
                self._programs.get(execution.session, set()).discard(execution.program)
            raise error
        assert execution.end is not None
        event, data = execution.end
        if event == "completed":
            self._counts.completed += 1
            return data
        self._counts.failed += 1
        if event == "failed":
            raise error_from_failure_untrusted(data)
        raise WorkerClosed(f"the server cancelled the execution ({str(data.get('reason'))[:200]})")

    async def execute(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        with_usage: bool = False,
        idempotent: bool = False,
        lm_cache: str | None = None,
    ) -> dict[str, Any]:
        """Run a program; its output fields (with ``with_usage``: ``{"outputs", "usage", "backend"}``).

        Cancelling the caller cancels the execution on the server. ``idempotent=True``: an execution in
        flight when the connection dropped is run again once on the next connection (else
        ``ConnectionLost``). ``lm_cache``: this execution's LM cache mode (``read_write``,
        ``read_only``, ``off``; None: its session's); ``InvalidParams`` for another, or from a server
        that caches no LM answers.
        """
        timeout = positive_timeout(timeout)
        sid = self._session_for_read(session)
        if sid is None:
            await trio.lowlevel.checkpoint()
            raise self._not_found(program, session)
        again = idempotent
        async with self._slots:
            self._in_flight += 1
            try:
                while True:
                    try:
                        execution = await self._submit(
                            program, inputs, sid, timeout, stream=False, lm_cache=lm_cache
                        )
                        data = await self._wait_end(execution, timeout)
                    except ConnectionLost:
                        if again:
                            again = False
                            self._counts.resent += 1
                            continue
                        raise
                    break
            finally:
                self._in_flight -= 1
        if with_usage:
            return {"outputs": data["outputs"], "usage": data.get("usage"), "backend": self.name}
        outputs: dict[str, Any] = data["outputs"]
        return outputs

    async def _wait_end(self, execution: _Execution, timeout: float | None) -> dict[str, Any]:
        try:
            if timeout is None:  # no cancel scope to enter and leave per execution
                await self._wait_over(execution)
            else:
                with trio.move_on_after(timeout + TIMEOUT_GRACE_S):
                    await self._wait_over(execution)
        finally:
            if not execution.over:
                self._abandon(execution)
        if not execution.over:
            self._counts.failed += 1
            raise CallTimeout(f"no answer from {self.url} within {timeout:g} s (+{TIMEOUT_GRACE_S:g} s)")
        return self._outcome(execution)

    @staticmethod
    async def _wait_over(execution: _Execution) -> None:
        while not execution.over:
            await execution.arrived.wait()
            execution.arrived = trio.Event()

    @asynccontextmanager
    async def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        lm_cache: str | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Run a program streamed: ``{"event": "chunk", "predictor", "field", "chunk"}`` and
        ``{"event": "status", ...}`` events ..., then one ``{"event": "completed", "outputs", "usage",
        "backend"}``; a failure raises from the iteration (a refused
        submit, e.g. ``ProgramNotFound``, from entering the block). Leaving the block early (or cancelling
        it) cancels the execution on the server. ``lm_cache``: as :meth:`execute`'s."""
        timeout = positive_timeout(timeout)
        sid = self._session_for_read(session)
        if sid is None:
            await trio.lowlevel.checkpoint()
            raise self._not_found(program, session)
        async with self._slots:
            self._in_flight += 1
            try:
                execution = await self._submit(program, inputs, sid, timeout, stream=True, lm_cache=lm_cache)
                deadline = trio.current_time() + (math.inf if timeout is None else timeout + TIMEOUT_GRACE_S)
                try:
                    with trio.move_on_at(deadline):
                        while not execution.id and not execution.over:  # its reply
                            await execution.arrived.wait()
                            execution.arrived = trio.Event()
                    if execution.error is not None:
                        self._outcome(execution)
                    yield _StreamEvents(self, execution, deadline, timeout)
                finally:
                    self._abandon(execution)
            finally:
                self._in_flight -= 1

    # -- jobs (dspex_trio._client_jobs) ----------------------------------------------------------------
    def evaluate(
        self,
        program: str,
        devset: list[dict[str, Any]],
        *,
        metric: str,
        session: str | None = None,
        max_errors: int | None = None,
        concurrency: int | None = None,
    ) -> AbstractAsyncContextManager[RemoteJob]:
        """``pool.evaluate`` on the server (``job/submit``): the same progress and result objects."""
        params = {
            "program": program,
            "devset": devset,
            "metric": metric,
            "session": self._job_session(session),
        }
        return open_remote_job(
            self, "evaluate", _given(params, max_errors=max_errors, concurrency=concurrency)
        )

    def compile(
        self,
        program: str,
        *,
        optimizer: str,
        trainset: list[dict[str, Any]],
        valset: list[dict[str, Any]] | None = None,
        metric: str,
        options: dict[str, Any] | None = None,
        session: str | None = None,
        max_errors: int | None = None,
        concurrency: int | None = None,
    ) -> AbstractAsyncContextManager[RemoteJob]:
        """``pool.compile`` on the server (``job/submit``): the new program is in ``session``."""
        params = {
            "program": program,
            "optimizer": optimizer,
            "trainset": trainset,
            "metric": metric,
            "session": self._job_session(session),
        }
        extra = {"valset": valset, "options": options, "max_errors": max_errors, "concurrency": concurrency}
        return open_remote_job(self, "compile", _given(params, **extra))

    def _job_session(self, session: str | None) -> str:
        sid = self._session_for_read(session)
        if sid is None:
            raise ProgramNotFound(f"no program in session {session if session is not None else 'default'!r}")
        return sid

    # -- the rest of the interface ----------------------------------------------------------------------
    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Only ``ping``: the websocket API runs no worker method (``UnknownMethod`` for the others).

        ``ping`` is a round trip to the server (``runtime/status``), answered as a worker's ``ping`` is:
        ``{"pid", "worker_id"}`` of the server's worker with the freshest heartbeat, or of the server
        process itself (``worker_id`` ``"server"``) when its backend has no worker (``mock``).
        """
        if method != "ping":
            await trio.lowlevel.checkpoint()
            raise UnknownMethod(
                f"the websocket API runs no worker method ({method!r}); only 'ping' is answered"
            )
        with trio.fail_after(timeout) if timeout is not None else trio.CancelScope():
            status = await self._request("runtime/status", {})
        self._take_status(status)
        live = [w for w in (self._health.workers if self._health else ()) if w.state in ("ready", "busy")]
        if live:
            worker = min(live, key=lambda w: w.last_heartbeat_age)
            return {"pid": worker.pid, "worker_id": worker.worker_id}
        pid = (status.get("server") or {}).get("pid")
        return {"pid": pid if isinstance(pid, int) else None, "worker_id": "server"}

    async def server_status(self) -> dict[str, Any]:
        """The server's ``runtime/status`` (version, limits, connections, the backend's statistics and
        health); it also refreshes :meth:`health`."""
        status = await self._request("runtime/status", {})
        self._take_status(status)
        result: dict[str, Any] = status
        return result

    def health(self) -> HealthSnapshot:
        """The server's health as last reported: at each connection, by ``call("ping")`` and
        ``server_status()``, and kept current by the events while a health subscription is open."""
        if self._health is not None:
            return self._health
        return HealthSnapshot(
            backend=self.name,
            workers=(),
            size=0,
            restarts=0,
            circuit=CircuitState.OPEN,
            circuit_reason="not connected yet",
            launcher="remote",
            seq=0,
        )

    @asynccontextmanager
    async def subscribe_health(self, *, buffer: int | None = None) -> AsyncIterator[Subscription]:
        """The server's health events (``worker_state``, ``circuit``, ...; ``lagged`` then ``snapshot`` when
        this client missed some), and ``connection`` events of this client (``{"state": "lost" |
        "restored"}``): while a subscription is open the client stays connected, reconnecting as needed,
        and resubscribes on each new connection."""
        async with self.events.subscribe(buffer=buffer) as subscription:
            self._health_subscribers += 1
            self._poke()
            try:
                link = self._link
                if link is not None and link.open and link.health_subscription is None:
                    await self._subscribe_health_on(link, False)
                yield subscription
            finally:
                self._health_subscribers -= 1
                if not self._health_subscribers:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.options.close_timeout):
                        await self._unsubscribe_health()

    async def _subscribe_health_on(self, link: _Link, reconnected: bool) -> None:
        if link.health_subscription is not None:
            return
        link.health_subscription = "(subscribing)"
        try:
            result = await self._request_on(link, "health/subscribe", {})
            subscription = result.get("subscription") if isinstance(result, dict) else None
            if not isinstance(subscription, str):
                raise RemoteProtocolError("health/subscribe did not answer with a subscription")
            self._health = health_snapshot_untrusted(result.get("snapshot"))
        except (DspexError, _NotSent) as exc:
            link.health_subscription = None
            logger.info("health/subscribe on %s failed: %s", self.url, exc)
            return
        link.health_subscription = subscription
        if reconnected:
            self.events.publish("connection", {"state": "restored", "url": self.url})
            self.events.publish("snapshot", self._health.to_json())

    async def _unsubscribe_health(self) -> None:
        link = self._link
        if link is None or link.health_subscription is None or not link.open:
            await trio.lowlevel.checkpoint()
            return
        subscription, link.health_subscription = link.health_subscription, None
        try:
            await self._request_on(link, "health/unsubscribe", {"subscription": subscription})
        except (DspexError, _NotSent):
            pass

    def _on_health_event(self, params: dict[str, Any]) -> None:
        event, data = params.get("event"), params.get("data")
        if not isinstance(event, str) or not isinstance(data, dict):
            raise RemoteProtocolError("a health event without an event name or data")
        if event == "snapshot":
            self._health = health_snapshot_untrusted(data)
        elif self._health is not None:
            self._health = apply_health_event(self._health, event, data)
        backend = data.get("backend")
        fields = {k: v for k, v in data.items() if k not in ("backend", "time")}
        self.events.publish(event, fields, backend=backend if isinstance(backend, str) else self.name)

    def statistics(self) -> RemoteStatistics:
        counts = self._counts
        link = self._link
        failed = self._last_failure
        down = link is None and failed is not None and failed[0] == self._attempts
        return RemoteStatistics(
            backend=self.name,
            url=self.url,
            connected=link is not None and link.open,
            connections=counts.connections,
            connect_failures=counts.connect_failures,
            requests=counts.requests,
            executions=counts.executions,
            in_flight=self._in_flight,
            completed=counts.completed,
            failed=counts.failed,
            lost=counts.lost,
            resent=counts.resent,
            protocol_errors=counts.protocol_errors,
            late_replies=counts.late_replies,
            sessions=len(self._sessions),
            circuit=CircuitState.OPEN if down else CircuitState.CLOSED,
        )

    # -- closing --------------------------------------------------------------------------------------
    async def _close(self) -> None:
        """End the sessions the client opened for names (bounded), close the connection, fail the rest."""
        options = self.options
        with trio.CancelScope(shield=True):
            link = self._link
            if options.end_sessions and self._sessions and link is not None and link.open:
                with trio.move_on_after(options.close_timeout):
                    async with trio.open_nursery() as nursery:
                        for sid in set(self._sessions.values()):
                            nursery.start_soon(self._end_quietly, link, sid)
            self._closing = True
            self._poke()
            self._set_link(None)
            if link is not None:
                link.fail(lambda: WorkerClosed(f"the remote client of {self.url} was closed"))
                with trio.move_on_after(options.close_timeout):
                    await link.ws.aclose(1000, "the client closed")

    async def _end_quietly(self, link: _Link, sid: str) -> None:
        try:
            await self._request_on(link, "session/end", {"session": sid})
        except (DspexError, _NotSent):
            pass


class _StreamEvents:
    """The events of a streamed execution, read by ``async for``."""

    def __init__(
        self, client: RemoteBackend, execution: _Execution, deadline: float, timeout: float | None
    ) -> None:
        self._client = client
        self._execution = execution
        self._deadline = deadline
        self._timeout = timeout
        self._done = False

    def __aiter__(self) -> _StreamEvents:
        return self

    async def __anext__(self) -> dict[str, Any]:
        execution = self._execution
        if self._done:
            raise StopAsyncIteration
        with trio.move_on_at(self._deadline):
            while not execution.events and not execution.over:
                execution.arrived = trio.Event()
                await execution.arrived.wait()
        if execution.events:
            await trio.lowlevel.checkpoint()
            return execution.events.popleft()
        self._done = True
        if not execution.over:
            self._client._abandon(execution)
            raise CallTimeout(
                f"no answer from {self._client.url} within {self._timeout:g} s (+{TIMEOUT_GRACE_S:g} s)"
            )
        data = self._client._outcome(execution)
        return {
            "event": "completed",
            "outputs": data["outputs"],
            "usage": data.get("usage"),
            "backend": self._client.name,
        }


class _Attempt:
    """One connection attempt, as the connector follows it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.over = trio.Event()
        """Set when the connection failed to open, or ended (before its closing handshake)."""
        self.error: DspexError | None = None
        self.permanent = False
        self.lasted = 0.0
        """Seconds it served callers."""


def _given(params: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """``params`` with the ``optional`` ones that are not None."""
    return {**params, **{k: v for k, v in optional.items() if v is not None}}


class _NotSent(Exception):
    """The connection had closed before the request was written (it is sent on the next one)."""


class _ConnectFailed(Exception):
    def __init__(self, error: DspexError, permanent: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.permanent = permanent


def _check_url(url: str, ssl_context: ssl.SSLContext | None) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"the URL must be ws://host:port or wss://host:port, not {url!r}")
    if ssl_context is not None and parts.scheme != "wss":
        raise ValueError("ssl_context is for wss:// URLs")
    if parts.username or parts.password:
        raise ValueError("put the token in token=, not in the URL")


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    options: ClientOptions | None = None,
    **option_fields: Any,
) -> AsyncIterator[RemoteBackend]:
    """``async with connect("ws://host:8765") as remote``: a :class:`RemoteBackend` (the pool's API) on a
    served endpoint, connected.

    Args:
        url: ``ws://host:port`` or ``wss://host:port`` (TLS: with ``ssl_context``, or the system's
            default certificates).
        token: the server's bearer token (``--token-file``), sent in the handshake's ``Authorization``
            header; the admin token gives the admin role.
        ssl_context: for ``wss://``, e.g. ``ssl.create_default_context(cafile=...)``.
        options: a :class:`ClientOptions`, or its fields as keywords (not both).

    Raises:
        HandshakeRefused: the server refused the handshake for good (a wrong token, a ``Host`` or ``Origin``
            it does not allow).
        PoolUnavailable: no connection within ``connect_timeout`` (refused, unreachable, TLS failed).

    Leaving the block ends the sessions the client opened for session names (bounded by
    ``close_timeout``), closes the connection and fails calls still in flight with ``WorkerClosed``.
    """
    if options is not None and option_fields:
        raise TypeError("pass options=ClientOptions(...) or option keywords, not both")
    opts = options if options is not None else ClientOptions(**option_fields)
    _check_url(url, ssl_context)
    if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
        raise ValueError("token must be a non-empty string on one line")
    client = RemoteBackend._create(url, token=token, ssl_context=ssl_context, options=opts)
    async with open_service_nursery() as nursery:
        client._nursery = nursery
        await nursery.start(client._connector)
        try:
            with trio.move_on_after(opts.connect_timeout) as first:
                client._waiters += 1
                client._poke()
                try:
                    while client._link is None:
                        failed = client._last_failure
                        if failed is not None and failed[2]:
                            raise copy.copy(failed[1])
                        await client._link_changed.wait()
                finally:
                    client._waiters -= 1
            if first.cancelled_caught:
                failed = client._last_failure
                why = f": {failed[1]}" if failed is not None else ""
                raise PoolUnavailable(
                    f"could not connect to {url} within {opts.connect_timeout:g} s{why}", reason=why
                )
            yield client
        finally:
            await client._close()
            nursery.cancel_scope.cancel()


def open_remote(url: str, **options: Any) -> AbstractAsyncContextManager[RemoteBackend]:
    """``open_backend("ws://...")``'s opener: :func:`connect` with its keywords."""
    return connect(url, **options)
