"""The websocket API's protocol logic, over any :class:`~dspex_trio.Backend`, with no socket in it.

:class:`ApiService` is the server-wide part (the backend, the options, the client LM policy, the operator's
named LMs, the count of executions for ``drain``); :func:`open_api_connection` gives one client's
:class:`ApiConnection`: feed it each text frame with :meth:`ApiConnection.handle`, and it answers through an
:class:`Outbox` (the transport's writer). The trio-websocket glue (``_websocket.py``) owns the socket, the
handshake, backpressure and close codes; this module owns the methods, sessions, executions and health
subscriptions. JSON-RPC parsing and params validation are sans-IO, in ``_jsonrpc.py``; what a client is
told of an error (its JSON-RPC error, a ``failed`` event's data) is ``_ws_errors.py``'s.

Tasks: quick methods are answered inline; methods that wait on a worker, each execution and each health
subscription run in the connection's nursery. Leaving the connection's block cancels them all (every
execution of a client that left is cancelled in its worker) and ends the connection's private session.
:meth:`ApiConnection.stop` (server shutdown) instead ends each execution with its terminal ``cancelled``
event first.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

import attrs
import trio

from dspex_trio import _jsonrpc as rpc
from dspex_trio import _log_context as log_context
from dspex_trio import _tracing, _ws_lm_cache
from dspex_trio._backend import Backend
from dspex_trio._client_lm import DEFAULT, ClientLMPolicy, LMPolicyRefused, NamedLM, describe_catalog
from dspex_trio._errors import (
    DspexError,
    InvalidParams,
    LimitExceeded,
    ProgramNotFound,
    SessionNotFound,
)
from dspex_trio._handshake import SUBPROTOCOL, Role
from dspex_trio._sessions import MINTED_PREFIX, public_session_id
from dspex_trio._ws_errors import failure, rpc_error_from
from dspex_trio._ws_jobs import JobTable
from dspex_trio._ws_options import WebsocketOptions

logger = logging.getLogger("dspex_trio.websocket")

_OWN_SPANS: Final = frozenset({"execution/run", "execution/submit"})
"""Methods whose websocket span lasts until the execution's outcome (opened by the method itself)."""
SERVER_SHUTDOWN: Final = "server_shutdown"
"""The ``reason`` of the ``cancelled`` event of an execution the server's shutdown stopped."""
CLIENT_CANCEL: Final = "cancelled by the client"
MAX_IDLE_RUNNERS: Final = 8
"""Tasks kept per connection, idle, to answer its next requests that wait on workers (a task is
started when none is idle; one that finds this many idle ends)."""


class Outbox(Protocol):
    """Where a connection's messages go (the transport's writer)."""

    async def send(self, message: dict[str, Any]) -> None:
        """A reply or an execution event: delivered in order, or the connection is closed (then this
        raises ``trio.Cancelled``, the connection's tasks all being cancelled)."""

    async def send_lossy(self, message: dict[str, Any]) -> None:
        """A health event: waits for room (the subscription's own buffer drops events meanwhile)."""


# -- the server-wide part -------------------------------------------------------------------------------


@attrs.define(eq=False)
class ApiService:
    """What every connection of one server shares."""

    backend: Backend
    options: WebsocketOptions
    lms: Mapping[str, NamedLM] = attrs.field(factory=dict, repr=False)
    """The operator's LMs that clients may select by name (``lm/list``, ``lm/select``)."""
    url: str = ""
    closing: bool = False
    """Set by ``drain()``: new executions are refused with ``unavailable``."""
    executions: int = 0
    """Executions in flight, all connections together."""
    outcomes: collections.Counter[str] = attrs.Factory(collections.Counter)
    """Executions ended, by outcome (``completed``, ``failed``, ``cancelled``; ``/metrics``)."""
    server_statistics: Callable[[], Mapping[str, Any]] = dict
    """The transport's own figures (connections, refusals), for ``runtime/status``."""
    _idle: trio.Event = attrs.Factory(trio.Event)
    lm_policy: ClientLMPolicy = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.lm_policy = self.options.lm_policy()

    def execution_started(self) -> None:
        self.executions += 1

    def execution_ended(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.executions -= 1
        if self.executions == 0:
            self._idle.set()
            self._idle = trio.Event()

    async def drain(self) -> None:
        """Refuse new executions (``unavailable``) and wait until every running one has ended."""
        self.closing = True
        if self.executions:
            await self._idle.wait()
        else:
            await trio.lowlevel.checkpoint()


# -- one connection -------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Execution:
    id: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    seq: int = 0
    cancel_reason: str = ""
    recorded: bool = False
    """Its end was counted (``finished``, the service's count)."""


@attrs.frozen
class _Method:
    params: type[Any]
    handler: Callable[[Any], Awaitable[Any]]
    in_task: bool
    """Runs in a task of its own (it waits on a worker), under ``max_pending_requests``."""


class _AndThen:
    """A method's result plus what to do once it was queued for the client (start its stream)."""

    def __init__(self, result: Any, then: Callable[[], Awaitable[None]]) -> None:
        self.result = result
        self.then = then


class ApiConnection:
    """One client's protocol state. Made by :func:`open_api_connection`."""

    def __init__(
        self, service: ApiService, outbox: Outbox, nursery: trio.Nursery, *, role: Role, peer: str
    ) -> None:
        self.service = service
        self.backend = service.backend
        self.options = service.options
        self.outbox = outbox
        self.nursery = nursery
        self.role = role
        self.peer = peer
        self.executions: dict[str, _Execution] = {}
        self.runs = 0
        self.finished: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.subscriptions: dict[str, trio.CancelScope] = {}
        self.pending_requests = 0
        self.private_session: str | None = None
        """The session of requests that name none (opened on the first write, ended with the connection)."""
        self.opened_sessions: set[str] = set()
        self._executions_ended = trio.Event()
        self._private_lock = trio.Lock()
        self._idle_runners: list[trio.lowlevel.Task] = []
        """Tasks of this connection's nursery waiting for a request to answer (``_answer_in_task``)."""
        self._handed: dict[trio.lowlevel.Task, tuple[rpc.Request, _Method]] = {}
        """The request handed to an idle runner as it is woken."""
        self.methods: dict[str, _Method] = {
            "session/open": _Method(rpc.NoParams, self.session_open, False),
            "session/end": _Method(rpc.SessionEndParams, self.session_end, False),
            "program/create": _Method(rpc.ProgramCreateParams, self.program_create, True),
            "program/list": _Method(rpc.SessionParams, self.program_list, False),
            "program/get": _Method(rpc.ProgramRefParams, self.program_get, False),
            "program/delete": _Method(rpc.ProgramRefParams, self.program_delete, False),
            "program/available": _Method(rpc.NoParams, self.program_available, True),
            "lm/list": _Method(rpc.NoParams, self.lm_list, False),
            "lm/select": _Method(rpc.LmSelectParams, self.lm_select, True),
            "lm/configure": _Method(rpc.LmConfigureParams, self.lm_configure, True),
            "execution/submit": _Method(rpc.ExecutionParams, self.execution_submit, False),
            "execution/run": _Method(rpc.ExecutionParams, self.execution_run, True),
            "execution/cancel": _Method(rpc.ExecutionCancelParams, self.execution_cancel, False),
            "health/subscribe": _Method(rpc.NoParams, self.health_subscribe, False),
            "health/unsubscribe": _Method(rpc.SubscriptionParams, self.health_unsubscribe, False),
            "runtime/status": _Method(rpc.NoParams, self.runtime_status, False),
            "ping": _Method(rpc.NoParams, self.ping, False),
        }
        self.jobs = JobTable(self)
        self.methods.update(self.jobs.methods())
        self.methods.update(_ws_lm_cache.methods(self))

    @property
    def busy(self) -> bool:
        """Whether the connection has work in flight (an execution, a request, a subscription)."""
        return bool(
            self.executions or self.runs or self.subscriptions or self.pending_requests or self.jobs.jobs
        )

    # -- requests -------------------------------------------------------------------------------------
    async def handle(self, text: str) -> None:
        """Answer one text frame from the client (requests that wait on a worker are answered later)."""
        try:
            request = rpc.parse_message_untrusted(text)
        except rpc.RpcError as exc:
            await self.outbox.send(rpc.error_reply(getattr(exc, "request_id", None), exc))
            return
        method = self.methods.get(request.method)
        if method is None:
            if request.has_id:
                error = rpc.RpcError(rpc.METHOD_NOT_FOUND, f"unknown method {request.method!r}")
                await self.outbox.send(rpc.error_reply(request.id, error))
            return
        if not method.in_task:
            await self._answer(request, method)
            return
        if self.pending_requests >= self.options.max_pending_requests:
            if request.has_id:
                limit = self.options.max_pending_requests
                error = rpc.RpcError(
                    rpc.LIMIT_EXCEEDED,
                    f"at most {limit} requests may wait on workers at once",
                    data={"limit": "pending_requests", "max": limit},
                )
                await self.outbox.send(rpc.error_reply(request.id, error))
            return
        self.pending_requests += 1
        if self._idle_runners:  # a task that answered a request before: no task started per request
            runner = self._idle_runners.pop()
            self._handed[runner] = (request, method)
            trio.lowlevel.reschedule(runner)
        else:
            self.nursery.start_soon(self._answer_in_task, request, method)

    async def _answer_in_task(self, request: rpc.Request, method: _Method) -> None:
        """Answer a request that waits on a worker; then wait, idle, for the next one (at most
        ``MAX_IDLE_RUNNERS`` such tasks wait per connection; leaving the connection cancels them)."""
        task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._idle_runners.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            try:
                await self._answer(request, method)
            finally:
                self.pending_requests -= 1
            if len(self._idle_runners) >= MAX_IDLE_RUNNERS:
                return
            self._idle_runners.append(task)
            await trio.lowlevel.wait_task_rescheduled(abort)
            request, method = self._handed.pop(task)

    async def _answer(self, request: rpc.Request, method: _Method) -> None:
        then: Callable[[], Awaitable[None]] | None = None
        if _tracing.STATE.tracer is None or request.method in _OWN_SPANS:
            reply = await self._reply(request, method)
        else:
            with _tracing.span(f"dspex.websocket {request.method}", server=True):
                reply = await self._reply(request, method)
        if isinstance(reply, _AndThen):
            reply, then = reply.result, reply.then
        if request.has_id:
            await self.outbox.send(reply)
        if then is not None:
            await then()

    async def _reply(self, request: rpc.Request, method: _Method) -> Any:
        """The request's reply (an ``_AndThen`` holding it when the method has more to do after it)."""
        try:
            params = rpc.structure_params_untrusted(request.params, method.params)
            result = await method.handler(params)
            if isinstance(result, _AndThen):
                return _AndThen(rpc.result_reply(request.id, result.result), result.then)
            return rpc.result_reply(request.id, result)
        except Exception as exc:
            _tracing.mark_current_error(exc)  # answered as an error: its span (tracing on) failed
            return rpc.error_reply(request.id, rpc_error_from(exc))

    # -- sessions -------------------------------------------------------------------------------------
    def _named(self, session: str) -> str:
        """A session id a client sent: only server-minted ids name sessions over the websocket."""
        if not session.startswith(MINTED_PREFIX):
            raise SessionNotFound(
                f"no session {session[:64]!r}: sessions are opened with session/open and named by the id "
                "it returns"
            )
        return session

    async def _write_session(self, session: str | None) -> str:
        """The session a write goes to: the named one, or the connection's private session (opened now
        if need be)."""
        if session is not None:
            return self._named(session)
        async with self._private_lock:
            if self.private_session is None or not self.backend.has_session(self.private_session):
                self.private_session = await self.backend.open_session(
                    max_programs=self.options.session_max_programs, max_bytes=self.options.session_max_bytes
                )
            return self.private_session

    def _read_session(self, session: str | None) -> str | None:
        """The session a read looks at; None: the connection has no private session yet (nothing there)."""
        if session is not None:
            return self._named(session)
        return self.private_session

    async def session_open(self, p: rpc.NoParams) -> Any:
        limit = self.options.max_sessions_per_connection
        if len(self.opened_sessions) >= limit:
            self.opened_sessions = {s for s in self.opened_sessions if self.backend.has_session(s)}
            if len(self.opened_sessions) >= limit:
                raise LimitExceeded(
                    f"this connection holds {limit} open sessions, its maximum: end one with session/end",
                    limit="sessions_per_connection",
                    max=limit,
                )
        session = await self.backend.open_session(
            max_programs=self.options.session_max_programs, max_bytes=self.options.session_max_bytes
        )
        self.opened_sessions.add(session)
        return {"session": session}

    async def session_end(self, p: rpc.SessionEndParams) -> Any:
        session = self._named(p.session)
        self.opened_sessions.discard(session)
        ended = await self.backend.end_session(session)
        if not ended:
            raise SessionNotFound(f"no session {session[:8]!r}… (ended, expired or never opened)")
        return {"session": session, "ended": True}

    # -- programs -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.service.closing:
            raise rpc.RpcError(rpc.UNAVAILABLE, "the server is shutting down")

    async def program_create(self, p: rpc.ProgramCreateParams) -> Any:
        self._check_open()
        session = await self._write_session(p.session)
        program = await self.backend.create_program(
            p.signature,
            module=p.module,
            instructions=p.instructions,
            session=session,
            state=p.state,
            include=p.include,
            **p.options(),
        )
        return {"program": program}

    async def program_available(self, p: rpc.NoParams) -> Any:
        return await self.backend.available_programs()

    async def program_list(self, p: rpc.SessionParams) -> Any:
        session = self._read_session(p.session)
        if session is None:
            await trio.lowlevel.checkpoint()
            return {"programs": []}
        return {"programs": await self.backend.list_programs(session=session)}

    def _program_not_found(self, program: str) -> ProgramNotFound:
        return ProgramNotFound(f"no program {program!r} in this connection's session")

    async def program_get(self, p: rpc.ProgramRefParams) -> Any:
        session = self._read_session(p.session)
        if session is None:
            raise self._program_not_found(p.program)
        return await self.backend.get_program(p.program, session=session)

    async def program_delete(self, p: rpc.ProgramRefParams) -> Any:
        session = self._read_session(p.session)
        if session is None:
            raise self._program_not_found(p.program)
        await self.backend.delete_program(p.program, session=session)
        return {"program": p.program, "deleted": True}

    # -- LMs ------------------------------------------------------------------------------------------
    async def lm_list(self, p: rpc.NoParams) -> Any:
        return {"lms": describe_catalog(self.service.lms), "client_lm": self.options.client_lm}

    async def lm_select(self, p: rpc.LmSelectParams) -> Any:
        self._check_open()
        session = await self._write_session(p.session)
        if p.name == DEFAULT:
            await self.backend.configure_lm(DEFAULT, session=session)
        else:
            named = self.service.lms.get(p.name)
            if named is None and p.name != "offline":
                names = ", ".join(item["name"] for item in describe_catalog(self.service.lms))
                raise InvalidParams(f"no LM named {p.name!r} on this server; lm/list has: {names}")
            kwargs = named.configure_kwargs() if named is not None else {"model": "offline"}
            await self.backend.configure_lm(session=session, **kwargs)
        return {"name": p.name, "session": None if p.session is None else session}

    async def lm_configure(self, p: rpc.LmConfigureParams) -> Any:
        self._check_open()
        admin = self.role == "admin"
        if p.default and not admin:
            raise LMPolicyRefused("only an admin connection (--admin-token-file) may change the default LM")
        if p.default and p.session is not None:
            raise InvalidParams("default: true changes the server's default LM: it takes no session")
        config = await self.service.lm_policy.client_config(
            model=p.model, api_base=p.api_base, api_key=p.api_key, settings=p.settings, admin=admin
        )
        if p.default:
            await self.backend.configure_lm(**config)
            logger.info("the default LM was changed to %s by an admin connection from %s", p.model, self.peer)
            return {"model": p.model, "default": True}
        session = await self._write_session(p.session)
        await self.backend.configure_lm(session=session, **config)
        return {"model": p.model, "session": p.session}

    # -- executions -----------------------------------------------------------------------------------
    def _timeout(self, p: rpc.ExecutionParams) -> float:
        limit = self.options.max_execution_time
        return limit if p.timeout is None else min(p.timeout, limit)

    def _admit_execution(self, p: rpc.ExecutionParams) -> str:
        """The session the execution runs in; refuses what is known at once."""
        self._check_open()
        limit = self.options.max_executions
        if len(self.executions) + self.runs >= limit:
            raise rpc.RpcError(
                rpc.LIMIT_EXCEEDED,
                f"at most {limit} executions may be in flight on one connection",
                data={"limit": "executions", "max": limit},
            )
        session = self._read_session(p.session)
        if session is None or not self.backend.has_program(p.program, session=session):
            raise ProgramNotFound(
                f"no program {p.program!r} in "
                + ("this connection's session" if p.session is None else "that session")
            )
        _ws_lm_cache.check_call_mode(self, p)
        return session

    async def execution_submit(self, p: rpc.ExecutionParams) -> Any:
        session = self._admit_execution(p)
        execution = _Execution(f"e_{secrets.token_hex(8)}")
        self.executions[execution.id] = execution
        return _AndThen({"execution": execution.id}, functools.partial(self._start, execution, p, session))

    async def _start(self, execution: _Execution, p: rpc.ExecutionParams, session: str) -> None:
        """Once the reply is queued: ``started`` at once (the two leave in one write), then the
        execution's task."""
        try:
            await self._emit(execution, "started", {})
        except BaseException:  # the connection is closing: the execution never starts
            del self.executions[execution.id]
            if not self.executions:
                self._executions_ended.set()
                self._executions_ended = trio.Event()
            raise
        self.nursery.start_soon(self._execute, execution, p, session)

    async def execution_run(self, p: rpc.ExecutionParams) -> Any:
        session = self._admit_execution(p)
        with log_context.bound(session=public_session_id(session)):
            return await self._execution_run(p, session)

    async def _execution_run(self, p: rpc.ExecutionParams, session: str) -> Any:
        self.runs += 1
        self.service.execution_started()
        outcome = "cancelled"
        try:
            with _tracing.span("dspex.websocket execution/run", {"dspex.program": p.program}, server=True):
                answer = await self.backend.execute(
                    p.program,
                    p.inputs,
                    session=session,
                    timeout=self._timeout(p),
                    with_usage=True,
                    **_ws_lm_cache.call_mode(p),
                )
            outcome = "completed"
        except DspexError as exc:
            outcome = "failed"
            _log_failed(f"run of {p.program}", failure(exc))
            raise
        finally:
            self.runs -= 1
            self.service.execution_ended(outcome)
        return {"outputs": answer["outputs"], "usage": answer.get("usage")}

    async def execution_cancel(self, p: rpc.ExecutionCancelParams) -> Any:
        execution = self.executions.get(p.execution)
        if execution is not None:
            self._cancel(execution, CLIENT_CANCEL)
            return {"execution": p.execution, "cancelled": True}
        if p.execution in self.finished:
            return {"execution": p.execution, "cancelled": False, "state": self.finished[p.execution]}
        raise rpc.RpcError(rpc.UNKNOWN_EXECUTION, f"no execution {p.execution[:64]!r} on this connection")

    @staticmethod
    def _cancel(execution: _Execution, reason: str) -> None:
        if not execution.cancel_reason:
            execution.cancel_reason = reason
        execution.scope.cancel(reason=reason)

    async def _emit(self, execution: _Execution, event: str, data: dict[str, Any]) -> None:
        execution.seq += 1
        params = {"execution": execution.id, "seq": execution.seq, "event": event, "data": data}
        await self.outbox.send(rpc.notification("execution/event", params))

    async def wait_executions_ended(self) -> None:
        """Return once no execution of this connection is left (each queued its terminal event, or was
        cancelled with the connection)."""
        if self.executions:
            await self._executions_ended.wait()
        else:
            await trio.lowlevel.checkpoint()
        await self.jobs.wait_ended()  # and its jobs (stopped with the executions)

    def _record(self, execution: _Execution, state: str) -> None:
        execution.recorded = True
        self.service.execution_ended(state)
        self.finished[execution.id] = state
        while len(self.finished) > self.options.remember_finished:
            self.finished.popitem(last=False)

    async def _execute(self, execution: _Execution, p: rpc.ExecutionParams, session: str) -> None:
        log_context.bind(execution=execution.id, session=public_session_id(session))  # this task's own
        terminal: tuple[str, dict[str, Any]] | None = None
        self.service.execution_started()
        attributes = {"dspex.program": p.program, "dspex.execution": execution.id}
        try:
            with (
                execution.scope,
                _tracing.span("dspex.websocket execution/submit", attributes, server=True),
            ):
                try:
                    if p.stream:
                        async with self.backend.stream(
                            p.program,
                            p.inputs,
                            session=session,
                            timeout=self._timeout(p),
                            **_ws_lm_cache.call_mode(p),
                        ) as events:
                            async for event in events:
                                kind = event["event"]
                                if kind == "completed":
                                    terminal = (
                                        "completed",
                                        {"outputs": event["outputs"], "usage": event.get("usage")},
                                    )
                                else:
                                    await self._emit(
                                        execution, kind, {k: v for k, v in event.items() if k != "event"}
                                    )
                    else:
                        answer = await self.backend.execute(
                            p.program,
                            p.inputs,
                            session=session,
                            timeout=self._timeout(p),
                            with_usage=True,
                            **_ws_lm_cache.call_mode(p),
                        )
                        terminal = "completed", {"outputs": answer["outputs"], "usage": answer.get("usage")}
                except Exception as exc:
                    terminal = "failed", failure(exc)
                    _tracing.mark_current_error(exc)
                    _log_failed(execution.id, terminal[1])
            if terminal is None:
                terminal = "cancelled", {"reason": execution.cancel_reason or "cancelled"}
            self._record(execution, terminal[0])
            await self._emit(execution, *terminal)
        finally:
            if not execution.recorded:  # the connection itself was cancelled
                self._record(execution, "cancelled")
            del self.executions[execution.id]
            if not self.executions:
                self._executions_ended.set()
                self._executions_ended = trio.Event()

    def stop(self, reason: str = SERVER_SHUTDOWN) -> None:
        """End every execution now with its terminal ``cancelled`` event (``reason``), and every health
        subscription; the transport then flushes and closes."""
        for execution in list(self.executions.values()):
            self._cancel(execution, reason)
        for scope in self.subscriptions.values():
            scope.cancel(reason=reason)
        self.jobs.stop(reason)

    # -- health ---------------------------------------------------------------------------------------
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
        try:
            snapshot = await self.nursery.start(self._forward_health, subscription, scope, replied)
        except BaseException:
            self.subscriptions.pop(subscription, None)
            raise

        async def then() -> None:
            replied.set()
            await trio.lowlevel.checkpoint()

        return _AndThen({"subscription": subscription, "snapshot": snapshot}, then)

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
            await self.outbox.send_lossy(rpc.notification("health/event", params))

        try:
            with scope:
                async with self.backend.subscribe_health(buffer=self.options.health_buffer) as events:
                    snapshot = self.backend.health()
                    seen = snapshot.seq
                    task_status.started(snapshot.to_json())
                    await replied.wait()
                    # Health events may be dropped, never waited for with a grace: a subscriber too slow
                    # for them misses some (the backend-side buffer overflows) and resyncs from a snapshot.
                    async for event in events:
                        if event.kind == "lagged":
                            await notify("lagged", dict(event.data))
                            snapshot = self.backend.health()
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

    # -- the rest -------------------------------------------------------------------------------------
    async def runtime_status(self, p: rpc.NoParams) -> Any:
        from dspex_trio import __version__

        return {
            "version": __version__,
            "subprotocol": SUBPROTOCOL,
            "time": time.time(),
            "backend": self.backend.name,
            "server": {
                "url": self.service.url,
                "pid": os.getpid(),
                **self.service.server_statistics(),
                "limits": attrs.asdict(self.options),
            },
            "connection": {
                "role": self.role,
                "executions": len(self.executions) + self.runs,
                "subscriptions": len(self.subscriptions),
                "sessions": len(self.opened_sessions),
            },
            "statistics": _jsonable(self.backend.statistics()),
            "health": self.backend.health().to_json(),
        }

    async def ping(self, p: rpc.NoParams) -> Any:
        return "pong"


def _jsonable(value: Any) -> Any:
    return attrs.asdict(value) if attrs.has(type(value)) else value


def _log_failed(what: str, data: dict[str, Any]) -> None:
    """One INFO line for a failed execution: its id, the original error type and, when it differs, the
    dspex-trio error (``execution e_1f… failed: LMRateLimitError (ProgramError)``)."""
    error = f" ({data['error']})" if data["error"] != data["type"] else ""
    logger.info("execution %s failed: %s%s", what, data["type"], error)


@asynccontextmanager
async def open_api_connection(
    service: ApiService, outbox: Outbox, *, role: Role, peer: str
) -> AsyncIterator[ApiConnection]:
    """One client's connection for the block's duration. Leaving it cancels the connection's executions
    (in their workers), requests and subscriptions, and ends its private session."""
    connection: ApiConnection | None = None
    try:
        async with trio.open_nursery() as nursery:
            connection = ApiConnection(service, outbox, nursery, role=role, peer=peer)
            try:
                yield connection
            finally:
                nursery.cancel_scope.cancel(reason="the connection closed")
    finally:
        if connection is not None and connection.private_session is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(PRIVATE_SESSION_END_TIMEOUT_S):
                try:
                    await service.backend.end_session(connection.private_session)
                except DspexError:  # pragma: no cover - a backend that could not end it lets it expire
                    logger.warning("could not end a closed connection's private session", exc_info=True)


PRIVATE_SESSION_END_TIMEOUT_S: Final = 5.0
"""Bound on ending a closed connection's private session, in s (it expires with the TTL otherwise)."""
