"""The remote client (``dspex_trio.connect``) against real websocket servers in this process: the mock
backend behind ``serve_websocket``, and scripted servers that misbehave on purpose.

No worker process: real sockets and real time on loopback, every wait bounded (``fail_after``), never a
sleep-and-hope. Fault tests with real workers and a real ``dspex-trio serve`` are in
``test_client_faults.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio_websocket

import dspex_trio
from dspex_trio import ConnectionLost, HandshakeRefused, RemoteBackend, RemoteProtocolError
from dspex_trio._client_lm import LMPolicyRefused
from dspex_trio._mock import MockBackend
from tests.helpers import wait_until

BOUND_S = 10.0
"""Every test's bound on one wait (loopback answers in milliseconds)."""
FAST = {"connect_timeout": 2.0, "reconnect_timeout": 5.0}
"""Client options that keep the failure tests short."""


@asynccontextmanager
async def served(backend: Any, **options: Any) -> AsyncIterator[dspex_trio.WebsocketServer]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(dspex_trio.serve_websocket, backend, "127.0.0.1", 0, **options))
        yield server
        nursery.cancel_scope.cancel()


class Restartable:
    """A websocket server that can be stopped and started again on the same port (over a backend of
    the test's choice each time)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.port = 0
        self.scope: trio.CancelScope | None = None

    async def start(self, backend: Any, **options: Any) -> dspex_trio.WebsocketServer:
        async def run(*, task_status: trio.TaskStatus[dspex_trio.WebsocketServer]) -> None:
            with trio.CancelScope() as self.scope:
                await dspex_trio.serve_websocket(
                    backend, "127.0.0.1", self.port, task_status=task_status, **options
                )

        server: dspex_trio.WebsocketServer = await self.nursery.start(run)
        self.port = server.port
        return server

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


class BlockingMock(MockBackend):
    """A mock whose executions wait for ``gate``; it records how each one ended (``completed``,
    ``cancelled``, ``timeout``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.started = 0
        self.ended: list[str] = []

    async def _hold(self, timeout: float | None) -> None:
        self.started += 1
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                await self.gate.wait()
        except trio.TooSlowError:
            self.ended.append("timeout")
            raise dspex_trio.CallTimeout(f"the execution took more than {timeout} s") from None
        except trio.Cancelled:
            self.ended.append("cancelled")
            raise
        self.ended.append("completed")

    async def execute(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        await self._hold(timeout)
        return await super().execute(*args, **kwargs)

    @asynccontextmanager
    async def stream(
        self, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        await self._hold(timeout)
        async with super().stream(*args, **kwargs) as events:
            yield events


# -- the interface ------------------------------------------------------------------------------------------


async def test_connect_gives_the_pools_interface_and_open_backend_gives_it_too() -> None:
    backend = MockBackend()
    async with served(backend) as server, dspex_trio.open_backend(server.url) as remote:
        assert isinstance(remote, RemoteBackend) and isinstance(remote, dspex_trio.Backend)
        assert remote.name == "mock" and remote.url == server.url
        assert remote.health().backend == "mock" and remote.health().circuit == "closed"
        pid = await remote.create_program("question -> answer, n: int", session="s1")
        assert remote.has_program(pid, session="s1") and remote.has_session("s1")
        answer = await remote.execute(pid, {"question": "q"}, session="s1", with_usage=True)
        assert answer["backend"] == "mock" and isinstance(answer["outputs"]["n"], int)
        assert answer["outputs"] == await backend.execute(
            pid, {"question": "q"}, session=remote.sessions["s1"]
        )
        assert await remote.call("ping") == {"pid": os.getpid(), "worker_id": "server"}  # the server is here
        with pytest.raises(dspex_trio.UnknownMethod):
            await remote.call("echo", {"value": 1})
        stats = remote.statistics()
        assert (stats.connected, stats.connections, stats.completed, stats.sessions) == (True, 1, 1, 1)


async def test_session_names_map_to_minted_sessions_and_reads_of_unknown_names_ask_nobody() -> None:
    backend = MockBackend()
    async with served(backend) as server, dspex_trio.connect(server.url) as remote:
        a = await remote.create_program("question -> answer", session="A")
        b = await remote.create_program("question -> answer")  # session None: one of its own
        sessions = remote.sessions
        assert set(sessions) == {"A", None} and all(s.startswith("s_") for s in sessions.values())
        assert [p["id"] for p in await remote.list_programs(session="A")] == [a]
        assert [p["id"] for p in await remote.list_programs()] == [b]
        requests = remote.statistics().requests
        assert await remote.list_programs(session="B") == []
        with pytest.raises(dspex_trio.ProgramNotFound):
            await remote.execute(a, {"question": "q"}, session="B")
        with pytest.raises(dspex_trio.ProgramNotFound):
            await remote.get_program(a, session="B")
        assert remote.statistics().requests == requests  # answered here: B was never written
        with pytest.raises(dspex_trio.ProgramNotFound):
            await remote.execute(a, {"question": "q"})  # A's program is not in None's session

        shared = await remote.open_session()  # a minted id is passed through, to be shared
        c = await remote.create_program("question -> answer", session=shared)
        async with dspex_trio.connect(server.url) as other:
            assert await other.execute(c, {"question": "q"}, session=shared)
            assert await other.list_programs(session="A") == []  # names are per client
        assert await remote.end_session(shared) and not await remote.end_session(shared)
        assert not backend.has_session(shared)
    # leaving connect ended the sessions it opened for names
    assert not any(backend.has_session(s) for s in sessions.values())


async def test_errors_come_back_typed() -> None:
    async with served(MockBackend()) as server, dspex_trio.connect(server.url) as remote:
        with pytest.raises(dspex_trio.InvalidParams):
            await remote.create_program("question: MyClass -> answer", session="s")
        pid = await remote.create_program("question -> answer", session="s")
        with pytest.raises(dspex_trio.InvalidParams, match="missing input"):
            await remote.execute(pid, {}, session="s")
        with pytest.raises(dspex_trio.InvalidParams, match="not JSON"):
            await remote.execute(pid, {"question": float("nan")}, session="s")  # refused here, not sent
        with pytest.raises(dspex_trio.InvalidParams, match="at most 1,048,576"):
            await remote.execute(pid, {"question": "x" * (1 << 20)}, session="s")
        with pytest.raises(dspex_trio.InvalidParams, match="timeout"):
            await remote.execute(pid, {"question": "q"}, session="s", timeout=-1)
        with pytest.raises(dspex_trio.SessionNotFound):
            await remote.list_programs(session="s_" + "A" * 22)
        with pytest.raises(LMPolicyRefused):  # client_lm is off: lm/configure is refused ...
            await remote.configure_lm("openai/x", session="s", api_base="https://api.example.com/v1")
        with pytest.raises(LMPolicyRefused):  # ... and the default LM is the admin's
            await remote.configure_lm("offline")
        await remote.configure_lm("offline", session="s")  # ... but the server's own LMs may be chosen
        await remote.configure_lm("default", session="s")
        assert [lm["name"] for lm in await remote.list_lms()][:2] == ["default", "offline"]
        assert await remote.execute(pid, {"question": "still fine"}, session="s")
        assert remote.statistics().connections == 1  # none of it cost the connection


async def test_a_wrong_token_is_refused_at_once_and_an_absent_server_within_the_connect_timeout() -> None:
    async with served(MockBackend(), token="right-token") as server:
        with trio.fail_after(BOUND_S):
            with pytest.raises(HandshakeRefused) as refused:
                async with dspex_trio.connect(server.url, token="wrong-token"):
                    pass
        assert refused.value.status == 401 and not refused.value.transient
        async with dspex_trio.connect(server.url, token="right-token") as remote:
            assert remote.name == "mock"
        port = server.port
    with trio.fail_after(BOUND_S):  # nothing listens there any more
        with pytest.raises(dspex_trio.PoolUnavailable, match=r"within 0\.5 s"):
            async with dspex_trio.connect(f"ws://127.0.0.1:{port}", connect_timeout=0.5):
                pass
    with pytest.raises(ValueError):
        async with dspex_trio.connect("http://127.0.0.1:1"):
            pass


# -- cancellation and timeouts -------------------------------------------------------------------------------


async def test_cancelling_the_caller_cancels_the_execution_on_the_server() -> None:
    backend = BlockingMock()
    async with served(backend) as server, dspex_trio.connect(server.url) as remote:
        pid = await remote.create_program("question -> answer", session="s")
        with trio.move_on_after(0.2):
            await remote.execute(pid, {"question": "q"}, session="s")
        await wait_until(lambda: backend.ended == ["cancelled"], BOUND_S, lambda: str(backend.ended))
        await wait_until(lambda: server.statistics().executions == 0, BOUND_S)

        async with remote.stream(pid, {"question": "q"}, session="s"):  # left before any event
            await wait_until(lambda: backend.started == 2, BOUND_S)
        await wait_until(lambda: backend.ended == ["cancelled"] * 2, BOUND_S, lambda: str(backend.ended))

        async with trio.open_nursery() as nursery:  # a cancel that races the answer is harmless
            nursery.start_soon(partial(remote.execute, pid, {"question": "q"}, session="s"))
            await wait_until(lambda: backend.started == 3, BOUND_S)
            backend.gate.set()
        assert backend.ended[-1] == "completed"
        stats = remote.statistics()
        assert stats.in_flight == 0 and stats.connections == 1 and stats.protocol_errors == 0


async def test_a_timeout_is_the_servers_call_timeout() -> None:
    backend = BlockingMock()
    async with served(backend) as server, dspex_trio.connect(server.url) as remote:
        pid = await remote.create_program("question -> answer", session="s")
        with trio.fail_after(BOUND_S), pytest.raises(dspex_trio.CallTimeout):
            await remote.execute(pid, {"question": "q"}, session="s", timeout=0.2)
        assert backend.ended == ["timeout"]


async def test_a_stream_consumer_that_lags_fails_with_overloaded_and_the_rest_goes_on() -> None:
    async with served(MockBackend()) as server, dspex_trio.connect(server.url, max_stream_events=2) as remote:
        pid = await remote.create_program("question -> answer", session="s")  # the mock streams ~5 chunks
        with trio.fail_after(BOUND_S), pytest.raises(dspex_trio.Overloaded):
            async with remote.stream(pid, {"question": "q"}, session="s") as events:
                await wait_until(lambda: remote._link is not None and not remote._link.executions, BOUND_S)
                [event async for event in events]
        assert await remote.execute(pid, {"question": "q"}, session="s")


# -- reconnection -------------------------------------------------------------------------------------------


async def test_an_idle_connection_closed_by_the_server_is_reopened_by_the_next_call() -> None:
    backend = MockBackend()
    options = {"idle_timeout": 0.2, "ping_interval": 0.05}
    async with served(backend, **options) as server, dspex_trio.connect(server.url) as remote:
        pid = await remote.create_program("question -> answer", session="s")
        await wait_until(lambda: not remote.statistics().connected, BOUND_S)  # closed 1001: idle
        assert await remote.execute(pid, {"question": "q"}, session="s")  # same session, reopened
        stats = remote.statistics()
        assert stats.connections == 2 and stats.lost == 0 and stats.sessions == 1


async def test_a_restarted_server_resumes_the_sessions_it_kept_and_says_which_it_lost() -> None:
    backend = MockBackend()
    async with trio.open_nursery() as nursery:
        server = Restartable(nursery)
        await server.start(backend)
        async with dspex_trio.connect(server.url, **FAST) as remote:
            pid = await remote.create_program("question -> answer", session="s1")
            server.stop()  # the same backend behind it again: the sessions live on
            await wait_until(lambda: not remote.statistics().connected, BOUND_S)
            await server.start(backend)
            with trio.fail_after(BOUND_S):
                assert await remote.execute(pid, {"question": "q"}, session="s1")

            server.stop()  # a new backend: the server lost every session
            await server.start(MockBackend())
            with trio.fail_after(BOUND_S), pytest.raises(dspex_trio.SessionNotFound):
                await remote.execute(pid, {"question": "q"}, session="s1")
            with pytest.raises(dspex_trio.ProgramNotFound):  # said once: "s1" is a new name now
                await remote.execute(pid, {"question": "q"}, session="s1")
            again = await remote.create_program("question -> answer", session="s1")
            assert await remote.execute(again, {"question": "q"}, session="s1")
            assert remote.statistics().connections == 3
        server.stop()


async def test_a_call_waits_for_a_server_that_comes_back_and_fails_typed_when_it_does_not() -> None:
    backend = MockBackend()
    async with trio.open_nursery() as nursery:
        server = Restartable(nursery)
        await server.start(backend)
        async with dspex_trio.connect(server.url, connect_timeout=2.0, reconnect_timeout=2.0) as remote:
            pid = await remote.create_program("question -> answer", session="s")
            server.stop()
            await wait_until(lambda: not remote.statistics().connected, BOUND_S)
            answers: list[Any] = []

            async def call() -> None:
                answers.append(await remote.execute(pid, {"question": "q"}, session="s"))

            async with trio.open_nursery() as callers:
                callers.start_soon(call)
                await wait_until(lambda: remote.statistics().connect_failures >= 2, BOUND_S)  # retrying
                await server.start(backend)
            assert len(answers) == 1 and remote.statistics().circuit == "closed"

            server.stop()
            await wait_until(lambda: not remote.statistics().connected, BOUND_S)
            with trio.fail_after(BOUND_S), pytest.raises(dspex_trio.PoolUnavailable, match="cannot reach"):
                await remote.execute(pid, {"question": "q"}, session="s")
            assert remote.statistics().circuit == "open"


async def test_closing_the_client_fails_what_is_in_flight_with_worker_closed() -> None:
    backend = BlockingMock()
    failures: list[BaseException] = []
    async with served(backend) as server, trio.open_nursery() as nursery:
        async with dspex_trio.connect(server.url) as remote:
            pid = await remote.create_program("question -> answer", session="s")

            async def call() -> None:
                try:
                    await remote.execute(pid, {"question": "q"}, session="s")
                except dspex_trio.WorkerClosed as exc:
                    failures.append(exc)

            nursery.start_soon(call)
            await wait_until(lambda: backend.started == 1, BOUND_S)
        await wait_until(lambda: len(failures) == 1, BOUND_S)
        await wait_until(lambda: backend.ended == ["cancelled"], BOUND_S)  # the server cancelled it


async def test_health_events_reach_a_remote_subscriber() -> None:
    backend = MockBackend()
    async with served(backend) as server, dspex_trio.connect(server.url) as remote:
        async with remote.subscribe_health() as events:
            data = {"worker_id": "w9", "pid": 99, "from": "starting", "to": "ready", "reason": "test"}
            backend.events.publish("worker_state", data)
            with trio.fail_after(BOUND_S):
                event = await events.receive()
            assert (event.kind, event.data, event.backend) == ("worker_state", data, "mock")
            assert [(w.worker_id, w.state) for w in remote.health().workers] == [("w9", "ready")]
        await wait_until(lambda: server.statistics().connections == 1, BOUND_S)


# -- a server that misbehaves --------------------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "version": "test",
    "backend": "mock",
    "server": {"url": "", "pid": 1, "limits": {}},
    "health": MockBackend().health().to_json(),
}
Script = Callable[[trio_websocket.WebSocketConnection, dict[str, Any]], Awaitable[None]]


async def send(ws: trio_websocket.WebSocketConnection, message: Any) -> None:
    await ws.send_message(message if isinstance(message, str | bytes) else json.dumps(message))


def reply(request: dict[str, Any], result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request["id"], "result": result}


def event(execution: str, seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    params = {"execution": execution, "seq": seq, "event": kind, "data": data}
    return {"jsonrpc": "2.0", "method": "execution/event", "params": params}


async def behave(ws: trio_websocket.WebSocketConnection, request: dict[str, Any]) -> None:
    """A well-behaved answer to one request (the answer is the question)."""
    method, params = request["method"], request.get("params", {})
    if method == "runtime/status":
        await send(ws, reply(request, STATUS))
    elif method == "session/open":
        await send(ws, reply(request, {"session": "s_" + "B" * 22}))
    elif method == "program/create":
        await send(ws, reply(request, {"program": "p_1"}))
    elif method == "execution/submit":
        execution = f"e_{request['id']}"
        await send(ws, reply(request, {"execution": execution}))
        await send(ws, event(execution, 1, "started", {}))
        outputs = {"answer": params["inputs"]["question"]}
        await send(ws, event(execution, 2, "completed", {"outputs": outputs, "usage": None}))
    elif "id" in request:
        await send(ws, reply(request, {}))


class Scripted:
    """A websocket server that answers as ``behave`` does except for ``execution/submit`` on its first
    connection, where ``script`` answers instead; later connections are well behaved."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="dspex.v1")
        self.connections += 1
        first = self.connections == 1
        try:
            while True:
                message = json.loads(await ws.get_message())
                if first and message.get("method") == "execution/submit":
                    await self.script(ws, message)
                else:
                    await behave(ws, message)
        except trio_websocket.ConnectionClosed:
            pass


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[Scripted, str]]:
    fake = Scripted(script)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(trio_websocket.serve_websocket, fake.handler, "127.0.0.1", 0, ssl_context=None)
        )
        yield fake, f"ws://127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


async def malformed_json(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, "{oops")


async def unknown_event(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, reply(request, {"execution": "e_1"}))
    await send(ws, event("e_1", 1, "started", {}))
    await send(ws, event("e_1", 2, "progress", {"percent": 50}))


async def reply_to_an_id_never_sent(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, {**reply(request, {"execution": "e_1"}), "id": request["id"] + 1000})


async def error_with_id_null(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "?", "data": {}}})


async def a_gap_in_the_events(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, reply(request, {"execution": "e_1"}))
    await send(ws, event("e_1", 1, "started", {}))
    await send(ws, event("e_1", 3, "completed", {"outputs": {}, "usage": None}))


async def an_event_of_another_execution(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, reply(request, {"execution": "e_1"}))
    await send(ws, event("e_someone_else", 1, "started", {}))


async def a_binary_frame(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, json.dumps(reply(request, {"execution": "e_1"})).encode())


async def a_mistyped_outcome(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, reply(request, {"execution": "e_1"}))
    await send(ws, event("e_1", 1, "started", {}))
    await send(ws, event("e_1", 2, "completed", {"outputs": "all good", "usage": None}))


@pytest.mark.parametrize(
    "script",
    [
        malformed_json,
        unknown_event,
        reply_to_an_id_never_sent,
        error_with_id_null,
        a_gap_in_the_events,
        an_event_of_another_execution,
        a_binary_frame,
        a_mistyped_outcome,
    ],
)
async def test_a_bad_server_answer_is_a_typed_error_at_the_caller_and_the_client_recovers(
    script: Script,
) -> None:
    async with scripted(script) as (fake, url), dspex_trio.connect(url) as remote:
        pid = await remote.create_program("question -> answer", session="s")
        with trio.fail_after(BOUND_S), pytest.raises(RemoteProtocolError):
            await remote.execute(pid, {"question": "q"}, session="s")
        assert remote.statistics().protocol_errors == 1
        with trio.fail_after(BOUND_S):  # the next call reconnects (to a well-behaved connection)
            assert await remote.execute(pid, {"question": "again"}, session="s") == {"answer": "again"}
        assert fake.connections == 2


async def closed_mid_stream(ws: Any, request: dict[str, Any]) -> None:
    await send(ws, reply(request, {"execution": "e_1"}))
    await send(ws, event("e_1", 1, "started", {}))
    await send(ws, event("e_1", 2, "chunk", {"field": "answer", "chunk": "Half"}))
    await ws._stream.aclose()  # the TCP connection, without a closing handshake


async def test_a_socket_closed_mid_stream_is_connection_lost_after_the_chunks_that_came() -> None:
    async with scripted(closed_mid_stream) as (_, url), dspex_trio.connect(url) as remote:
        pid = await remote.create_program("question -> answer", session="s")
        seen: list[dict[str, Any]] = []
        with trio.fail_after(BOUND_S), pytest.raises(ConnectionLost) as lost:
            async with remote.stream(pid, {"question": "q"}, session="s") as events:
                async for item in events:
                    seen.append(item)
        assert seen == [{"event": "chunk", "field": "answer", "chunk": "Half"}]
        assert lost.value.started and isinstance(lost.value, dspex_trio.WorkerCrashed)
        assert await remote.execute(pid, {"question": "again"}, session="s") == {"answer": "again"}


async def test_concurrent_answers_in_any_order_reach_their_own_callers() -> None:
    submits: list[dict[str, Any]] = []
    both = trio.Event()

    async def hold_then_answer_in_reverse(ws: Any, request: dict[str, Any]) -> None:
        submits.append(request)
        if len(submits) < 2:
            return
        for message in reversed(submits):
            execution = f"e_{message['id']}"
            await send(ws, reply(message, {"execution": execution}))
        for message in reversed(submits):
            execution = f"e_{message['id']}"
            outputs = {"answer": message["params"]["inputs"]["question"]}
            await send(ws, event(execution, 1, "started", {}))
            await send(ws, event(execution, 2, "completed", {"outputs": outputs, "usage": None}))
        both.set()

    answers: dict[str, Any] = {}
    async with scripted(hold_then_answer_in_reverse) as (_, url), dspex_trio.connect(url) as remote:
        pid = await remote.create_program("question -> answer", session="s")

        async def ask(question: str) -> None:
            answers[question] = await remote.execute(pid, {"question": question}, session="s")

        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "first")
                nursery.start_soon(ask, "second")
        assert both.is_set() and answers == {"first": {"answer": "first"}, "second": {"answer": "second"}}


# -- the server's side of the exchange the client makes -------------------------------------------------------


async def test_the_submit_reply_and_started_leave_the_server_in_one_write() -> None:
    """The reply to ``execution/submit`` and its ``started`` event are queued together and written in one
    socket write: a client reads both at once (one system call each side, one wake-up)."""
    import wsproto
    import wsproto.events as wsevents

    backend = BlockingMock()
    async with served(backend) as server:
        pid = await backend.create_program(
            "question -> answer", session=(sid := await backend.open_session())
        )
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(wsevents.Request(host="127.0.0.1", target="/", subprotocols=["dspex.v1"]))
        )

        async def read() -> list[Any]:
            with trio.fail_after(BOUND_S):
                ws.receive_data(await stream.receive_some(65536))
            return list(ws.events())

        assert isinstance((await read())[0], wsevents.AcceptConnection)
        params = {"program": pid, "inputs": {"question": "q"}, "session": sid, "stream": False}
        request = {"jsonrpc": "2.0", "id": 1, "method": "execution/submit", "params": params}
        await stream.send_all(ws.send(wsevents.TextMessage(data=json.dumps(request))))
        first_read = [json.loads(e.data) for e in await read()]
        assert [m.get("id", m.get("method")) for m in first_read] == [1, "execution/event"]
        assert first_read[1]["params"]["event"] == "started"
        await stream.aclose()


async def test_answers_that_arrive_while_the_client_closes_are_no_protocol_error() -> None:
    """Leaving ``connect`` with a request in flight fails it (``WorkerClosed``); its answer may still
    arrive during the closing handshake (here: the server answers it right after the client's close
    frame) and is dropped, not taken for a server that broke the protocol."""
    import wsproto
    import wsproto.events as wsevents

    async def handler(stream: trio.SocketStream) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        create: dict[str, Any] | None = None
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            ws.receive_data(data)
            for item in ws.events():
                if isinstance(item, wsevents.Request):
                    await stream.send_all(ws.send(wsevents.AcceptConnection(subprotocol="dspex.v1")))
                elif isinstance(item, wsevents.TextMessage):
                    request = json.loads(item.data)
                    if request["method"] == "runtime/status":
                        await stream.send_all(
                            ws.send(wsevents.TextMessage(data=json.dumps(reply(request, STATUS))))
                        )
                    else:
                        create = request  # answered only once the client closes
                elif isinstance(item, wsevents.CloseConnection):
                    assert create is not None
                    late = json.dumps(reply(create, {"program": "p_1"})).encode()
                    await stream.send_all(b"\x81" + bytes([len(late)]) + late)  # a text frame, by hand
                    await stream.send_all(ws.send(item.response()))
                    return

    closed: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with trio.open_nursery() as callers, dspex_trio.connect(url, end_sessions=False) as remote:

            async def create() -> None:
                try:
                    await remote.create_program("question -> answer", session="s_" + "A" * 22)
                except dspex_trio.WorkerClosed as exc:
                    closed.append(exc)

            callers.start_soon(create)
            await wait_until(lambda: remote.statistics().requests == 2, BOUND_S)
        assert len(closed) == 1 and remote.statistics().protocol_errors == 0
        nursery.cancel_scope.cancel()


async def test_every_async_method_of_the_remote_client_checkpoints() -> None:
    """Trio's rule, as ``test_checkpoints.py`` checks it for the other backends (its tables, plus the
    remote client's own methods); ``get_state`` / ``load_state`` checkpoint before they refuse."""
    import contextlib

    import trio.testing

    from tests.dspex_trio.test_checkpoints import (
        CALLS,
        CONTEXTS,
        SIGNATURE,
        Scene,
        public_async_methods,
    )

    calls = {
        **CALLS,
        "select_lm": lambda b, s: b.select_lm("offline", session=s.session),
        "list_lms": lambda b, s: b.list_lms(),
        "server_status": lambda b, s: b.server_status(),
    }
    async with served(MockBackend()) as server, dspex_trio.connect(server.url) as remote:
        methods = public_async_methods(remote)
        assert methods <= set(calls), sorted(methods - set(calls))
        program = await remote.create_program(SIGNATURE, session="checkpoints")
        for name in sorted(methods):
            scene = Scene("checkpoints", program)
            if name == "delete_program":
                scene.spare_program = await remote.create_program(SIGNATURE, session="checkpoints")
            if name == "end_session":
                scene.spare_session = await remote.open_session()
            with trio.fail_after(BOUND_S), trio.testing.assert_checkpoints():
                if name in ("get_state", "load_state"):
                    with pytest.raises(dspex_trio.UnknownMethod):
                        await calls[name](remote, scene)
                else:
                    await calls[name](remote, scene)
        for name, enter in CONTEXTS.items():
            async with contextlib.AsyncExitStack() as stack:
                with trio.fail_after(BOUND_S), trio.testing.assert_checkpoints():
                    entered = await stack.enter_async_context(enter(remote, Scene("checkpoints", program)))
                if name == "stream":
                    assert [e async for e in entered][-1]["event"] == "completed"
        with trio.testing.assert_checkpoints():  # and a read of a session never written, answered here
            assert await remote.list_programs(session="never-written") == []
