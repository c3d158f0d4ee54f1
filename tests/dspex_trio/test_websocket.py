"""The websocket endpoint against a real pool, driven by real clients.

Clients are the ``websockets`` library's sync client, run in threads (``trio.to_thread``): a third-party
implementation of the protocol, not our own code talking to itself. Real processes mean real time:
every wait is bounded.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest
import trio
import wsproto
import wsproto.events as wsevents
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

import dspex_trio
from dspex_trio.testing import open_fake_lm
from tests.helpers import wait_until

TERMINAL = {"completed", "failed", "cancelled"}
RECV_TIMEOUT_S = 20.0


class Client:
    """A JSON-RPC client over one websocket connection (sync: run it in a thread)."""

    def __init__(self, url: str, *, token: str | None = None, **kwargs: Any) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        kwargs.setdefault("subprotocols", ["dspex.v1"])
        # ``__enter__`` connects (websockets >= 17 warns on a connection used outside ``with``)
        self.ws: ClientConnection = connect(
            url, additional_headers=headers, open_timeout=10, **kwargs
        ).__enter__()
        self.next_id = 0
        self.notifications: collections.deque[dict[str, Any]] = collections.deque()

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv(self) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=RECV_TIMEOUT_S))

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.ws.send(json.dumps(message))
        return self.next_id

    def reply(self, request_id: Any) -> dict[str, Any]:
        while True:
            message = self.recv()
            if "method" in message:
                self.notifications.append(message)
            elif message.get("id") == request_id:
                return message

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole reply (``result`` or ``error``)."""
        return self.reply(self.send(method, params))

    def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        answer = self.call(method, params)
        assert "result" in answer, answer
        return answer["result"]

    def error(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = self.call(method, params)
        assert "error" in answer, answer
        return answer["error"]

    def open_session(self) -> str:
        """A new server-minted session (its id is the capability to use it)."""
        session = self.result("session/open")["session"]
        assert isinstance(session, str) and session.startswith("s_")
        return session

    def notification(self, method: str | None = None) -> dict[str, Any]:
        while True:
            message = self.notifications.popleft() if self.notifications else self.recv()
            if "method" in message and (method is None or message["method"] == method):
                return message["params"]

    def events_until_terminal(self, executions: set[str]) -> dict[str, list[dict[str, Any]]]:
        """Every ``execution/event`` of ``executions``, until each has its terminal event."""
        events: dict[str, list[dict[str, Any]]] = {e: [] for e in executions}
        open_ = set(executions)
        while open_:
            params = self.notification("execution/event")
            events[params["execution"]].append(params)
            if params["event"] in TERMINAL:
                open_.discard(params["execution"])
        return events


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with dspex_trio.open_pool(workers=2) as pool:
        yield pool


async def start_server(
    nursery: trio.Nursery, pool: dspex_trio.Pool, **kwargs: Any
) -> dspex_trio.WebsocketServer:
    return await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0, **kwargs))


def lm_options(fake: Any) -> dict[str, Any]:
    """Server options that let clients configure an LM on the (loopback) fake LM server."""
    return {"client_lm": "allowlist", "allow_lm_bases": [fake.url]}


def assert_in_order(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    assert events[0]["event"] == "started"
    assert events[-1]["event"] in TERMINAL
    assert all(e["event"] not in TERMINAL for e in events[:-1])


async def test_started_server_exposes_port_and_url(pool):
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        assert isinstance(server, dspex_trio.WebsocketServer)
        assert server.port > 0 and server.url == f"ws://127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


async def test_full_flow_create_submit_stream_complete(pool):
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)

        def client() -> None:
            with Client(server.url) as c:
                assert c.ws.subprotocol == "dspex.v1"
                assert c.result("ping") == "pong"
                s = c.open_session()
                program = c.result(
                    "program/create",
                    {"signature": "question -> answer", "module": "chain_of_thought", "session": s},
                )["program"]
                assert program in {p["id"] for p in c.result("program/list", {"session": s})["programs"]}
                info = c.result("program/get", {"program": program, "session": s})
                assert info["id"] == program and info["module"] == "chain_of_thought"

                execution = c.result(
                    "execution/submit",
                    {
                        "program": program,
                        "inputs": {"question": "What is DSPy?"},
                        "session": s,
                        "stream": True,
                    },
                )["execution"]
                events = c.events_until_terminal({execution})[execution]
                assert_in_order(events)
                assert events[-1]["event"] == "completed"
                chunks = [e["data"] for e in events if e["event"] == "chunk"]
                assert chunks and {ch["field"] for ch in chunks} <= {"reasoning", "answer"}
                outputs = events[-1]["data"]["outputs"]
                assert set(outputs) == {"reasoning", "answer"}
                answer_text = "".join(ch["chunk"] for ch in chunks if ch["field"] == "answer")
                assert answer_text.strip() == outputs["answer"].strip()
                # cancelling a finished execution is fine (idempotent) and says so
                assert c.result("execution/cancel", {"execution": execution}) == {
                    "execution": execution,
                    "cancelled": False,
                    "state": "completed",
                }

                # not streamed: started, then completed, no chunks
                execution = c.result(
                    "execution/submit",
                    {"program": program, "inputs": {"question": "x"}, "session": s, "stream": False},
                )["execution"]
                events = c.events_until_terminal({execution})[execution]
                assert [e["event"] for e in events] == ["started", "completed"]

                run = c.result(
                    "execution/run", {"program": program, "inputs": {"question": "x"}, "session": s}
                )
                assert run["outputs"] == events[-1]["data"]["outputs"]  # the offline LM is deterministic

                status = c.result("runtime/status")
                assert status["subprotocol"] == "dspex.v1" and len(status["health"]["workers"]) == 2
                assert status["backend"] == "pool" and status["statistics"]["size"] == 2
                assert status["server"]["connections"] == 1 and status["connection"]["sessions"] == 1

                assert c.result("program/delete", {"program": program, "session": s})["deleted"] is True
                error = c.error("program/get", {"program": program, "session": s})
                assert error["data"]["kind"] == "unknown_program" and error["code"] == -32003
                assert c.result("session/end", {"session": s}) == {"session": s, "ended": True}

        await in_thread(client)
        assert pool.statistics().in_flight == 0
        nursery.cancel_scope.cancel()


async def test_program_failures_are_failed_events(pool):
    async with open_fake_lm(fail_status=429) as fake, trio.open_nursery() as nursery:
        server = await start_server(nursery, pool, **lm_options(fake))

        def client() -> None:
            with Client(server.url) as c:
                rl = c.open_session()
                lm = {"model": "openai/fake", "api_base": fake.url, "api_key": "x", "session": rl}
                lm["settings"] = {"num_retries": 0}
                c.result("lm/configure", lm)
                program = c.result("program/create", {"signature": "q -> a", "session": rl})["program"]
                execution = c.result(
                    "execution/submit", {"program": program, "inputs": {"q": "x"}, "session": rl}
                )["execution"]
                events = c.events_until_terminal({execution})[execution]
                assert_in_order(events)
                failed = events[-1]
                assert failed["event"] == "failed", failed
                assert "RateLimit" in failed["data"]["type"] and failed["data"]["message"]
                # execution/run: the same failure as an error reply
                error = c.error("execution/run", {"program": program, "inputs": {"q": "x"}, "session": rl})
                assert error["code"] == -32010 and error["data"]["kind"] == "execution_failed"
                assert "RateLimit" in error["data"]["type"]
                # bad inputs are the worker's InvalidParams: a failed event with kind invalid_params
                execution = c.result(
                    "execution/submit", {"program": program, "inputs": {"nope": 1}, "session": rl}
                )["execution"]
                failed = c.events_until_terminal({execution})[execution][-1]
                assert failed["event"] == "failed" and failed["data"]["kind"] == "invalid_params"

        await in_thread(client)
        nursery.cancel_scope.cancel()


def configure_slow(c: Client, fake: Any) -> tuple[str, str]:
    """A new session and a program in it whose executions stream slowly from the fake LM."""
    session = c.open_session()
    c.result(
        "lm/configure", {"model": "openai/fake", "api_base": fake.url, "api_key": "x", "session": session}
    )
    program = c.result("program/create", {"signature": "question -> answer", "session": session})["program"]
    return program, session


def workers_idle(pool: dspex_trio.Pool) -> bool:
    stats = pool.statistics()
    return stats.in_flight == 0 and all(w.in_flight == 0 for w in stats.workers)


async def test_cancel_mid_stream_stops_the_work_in_the_worker(pool):
    async with (
        open_fake_lm(stream_chunk_delay_s=0.1, stream_chunk_chars=4) as fake,
        trio.open_nursery() as nursery,
    ):
        server = await start_server(nursery, pool, **lm_options(fake))
        mid_stream = threading.Event()
        checked = threading.Event()
        result: dict[str, Any] = {}

        def client() -> None:
            with Client(server.url) as c:
                program, slow = configure_slow(c, fake)
                execution = c.result(
                    "execution/submit",
                    {"program": program, "inputs": {"question": "long"}, "session": slow},
                )["execution"]
                while c.notification("execution/event")["event"] != "chunk":
                    pass
                mid_stream.set()
                checked.wait(10)
                answer = c.result("execution/cancel", {"execution": execution})
                assert answer == {"execution": execution, "cancelled": True}
                events = c.events_until_terminal({execution})[execution]
                result["terminal"] = events[-1]
                # idempotent: a second cancel answers, and says it is over
                again = c.result("execution/cancel", {"execution": execution})
                assert again["cancelled"] is False and again["state"] == "cancelled"

        async with trio.open_nursery() as inner:
            inner.start_soon(in_thread, client)
            await trio.to_thread.run_sync(mid_stream.wait, 20.0)
            in_flight = pool.statistics().in_flight
            checked.set()
        assert in_flight == 1
        assert result["terminal"]["event"] == "cancelled"
        assert result["terminal"]["data"]["reason"] == "cancelled by the client"
        await wait_until(lambda: workers_idle(pool), 5, lambda: repr(pool.statistics()))
        assert server.statistics().executions == 0
        nursery.cancel_scope.cancel()


async def test_disconnect_mid_stream_cancels_the_connections_executions(pool):
    async with (
        open_fake_lm(stream_chunk_delay_s=0.1, stream_chunk_chars=4) as fake,
        trio.open_nursery() as nursery,
    ):
        server = await start_server(nursery, pool, **lm_options(fake))

        def client() -> None:
            c = Client(server.url)
            program, gone = configure_slow(c, fake)
            for _ in range(3):
                c.send("execution/submit", {"program": program, "inputs": {"question": "q"}, "session": gone})
            chunks = 0
            while chunks < 3:
                chunks += c.notification("execution/event")["event"] == "chunk"
            c.ws.socket.close()  # abrupt: no closing handshake

        await in_thread(client)
        await wait_until(lambda: workers_idle(pool), 5, lambda: repr(pool.statistics()))
        await wait_until(lambda: server.statistics().connections == 0, 5)
        assert server.statistics().executions == 0
        nursery.cancel_scope.cancel()


async def test_many_clients_all_complete_with_events_in_order(pool):
    clients, per_client = 50, 20
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        many = await pool.open_session()  # the capability the clients share
        program = await pool.create_program("question -> answer", session=many)
        done: list[int] = []

        def client(i: int) -> None:
            with Client(server.url) as c:
                ids = []
                for j in range(per_client):
                    ids.append(
                        c.send(
                            "execution/submit",
                            {"program": program, "inputs": {"question": f"q{i}-{j}"}, "session": many},
                        )
                    )
                executions = {c.reply(rid)["result"]["execution"] for rid in ids}
                assert len(executions) == per_client
                events = c.events_until_terminal(executions)
                for execution_events in events.values():
                    assert_in_order(execution_events)
                    assert execution_events[-1]["event"] == "completed", execution_events[-1]
                done.append(i)

        with trio.fail_after(40):
            async with trio.open_nursery() as inner:
                for i in range(clients):
                    inner.start_soon(
                        partial(trio.to_thread.run_sync, partial(client, i), abandon_on_cancel=True)
                    )
        assert sorted(done) == list(range(clients))
        await wait_until(lambda: workers_idle(pool), 5)
        nursery.cancel_scope.cancel()


async def test_health_subscription_sees_a_worker_restart(pool):
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        victim = pool.statistics().workers[0]
        subscribed = threading.Event()
        seen: list[dict[str, Any]] = []

        def client() -> None:
            with Client(server.url) as c:
                answer = c.result("health/subscribe")
                subscription = answer["subscription"]
                assert {w["pid"] for w in answer["snapshot"]["workers"]} == {
                    w.pid for w in pool.statistics().workers
                }
                subscribed.set()
                failed = False
                while True:
                    params = c.notification("health/event")
                    assert params["subscription"] == subscription
                    seen.append(params)
                    if params["event"] != "worker_state":
                        continue
                    data = params["data"]
                    if data["worker_id"] == victim.worker_id and data["to"] == "failed":
                        failed = True
                    elif failed and data["to"] == "ready" and data["pid"] != victim.pid:
                        break
                assert c.result("health/unsubscribe", {"subscription": subscription})["unsubscribed"] is True

        async with trio.open_nursery() as inner:
            inner.start_soon(in_thread, client)
            await trio.to_thread.run_sync(subscribed.wait, 10.0)
            os.kill(victim.pid, signal.SIGKILL)
        assert [p["seq"] for p in seen] == list(range(1, len(seen) + 1))
        nursery.cancel_scope.cancel()


async def test_bad_inputs_get_their_documented_answers_while_others_are_served(pool):
    async with (
        open_fake_lm(latency_s=2.0) as fake,
        trio.open_nursery() as nursery,
    ):
        server = await start_server(
            nursery, pool, max_message_size=4096, max_executions=1, max_subscriptions=1, **lm_options(fake)
        )

        def client() -> None:
            with Client(server.url) as bystander, Client(server.url) as c:

                def still_served() -> None:
                    assert bystander.result("ping") == "pong"

                # invalid JSON: -32700, and the connection stays open
                c.ws.send("{not json")
                error = c.recv()["error"]
                assert error["code"] == -32700 and error["data"]["kind"] == "parse_error"
                assert c.result("ping") == "pong"
                # not a request / batches
                c.ws.send(json.dumps({"jsonrpc": "1.0", "id": 7, "method": "ping"}))
                reply = c.recv()
                assert reply["id"] == 7 and reply["error"]["code"] == -32600
                c.ws.send(json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]))
                assert c.recv()["error"]["code"] == -32600
                # unknown method
                error = c.error("no/such")
                assert error["code"] == -32601 and error["data"]["kind"] == "method_not_found"
                # bad params, with details naming each parameter
                error = c.error("execution/submit", {"program": 5, "stream": "yes", "extra": 1})
                assert error["code"] == -32602 and error["data"]["kind"] == "invalid_params"
                assert set(error["data"]["errors"]) == {
                    "program: expected a string, got int",
                    "inputs: required",
                    "stream: expected a boolean, got str",
                    "unknown parameter: extra",
                }
                error = c.error("execution/submit", {"program": "p", "inputs": {}, "timeout": -1})
                assert error["code"] == -32602 and "timeout" in error["data"]["errors"][0]
                # unknown program / execution
                error = c.error("execution/submit", {"program": "p_nope", "inputs": {}})
                assert error["code"] == -32003 and error["data"]["kind"] == "unknown_program"
                error = c.error("execution/cancel", {"execution": "e_nope"})
                assert error["code"] == -32002 and error["data"]["kind"] == "unknown_execution"
                error = c.error("program/create", {"signature": "not a signature ->"})
                assert error["code"] == -32602
                still_served()
                # per-connection caps: limit_exceeded
                c.result("health/subscribe")
                error = c.error("health/subscribe")
                assert error["code"] == -32004 and error["data"]["kind"] == "limit_exceeded"
                program, caps = configure_slow(c, fake)
                first = c.result(
                    "execution/submit", {"program": program, "inputs": {"question": "q"}, "session": caps}
                )
                error = c.error(
                    "execution/submit", {"program": program, "inputs": {"question": "q"}, "session": caps}
                )
                assert error["code"] == -32004 and error["data"] == {
                    "kind": "limit_exceeded",
                    "limit": "executions",
                    "max": 1,
                }
                c.result("execution/cancel", first)
                still_served()
                # too big: 1009
                c.ws.send(
                    json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "y" * 5000}})
                )
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        c.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
                still_served()
            # a binary frame: 1003
            with Client(server.url) as c, Client(server.url) as bystander:
                c.ws.send(b"\x00\x01")
                with pytest.raises(ConnectionClosed) as closed:
                    c.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
                assert bystander.result("ping") == "pong"
            # no subprotocol: refused at the handshake
            with pytest.raises(InvalidStatus) as refused:
                Client(server.url, subprotocols=None)
            assert refused.value.response.status_code == 400

        await in_thread(client)
        await wait_until(lambda: workers_idle(pool), 5)
        nursery.cancel_scope.cancel()


async def test_slow_consumer_is_closed_with_1008(pool):
    """A client that sends requests but never reads its replies: once the server's outbound queue has
    stayed full for the grace, the connection is closed with 1008 (the client sees it when it reads)."""
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool, outbound_queue=1, slow_consumer_grace=0.3, close_timeout=5)
        # A raw wsproto client: unlike a library client, it reads nothing unless told to.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", server.port))
        stream = trio.SocketStream(sock)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(wsevents.Request(host="127.0.0.1", target="/", subprotocols=["dspex.v1"]))
        )

        async def next_events() -> list[Any]:
            data = await stream.receive_some(65536)
            ws.receive_data(data or None)
            return list(ws.events())

        with trio.fail_after(5):
            while not any(isinstance(e, wsevents.AcceptConnection) for e in await next_events()):
                pass

        async def flood() -> None:
            request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "runtime/status"})
            for _ in range(5000):  # replies of a few kB each, far more than the socket buffers hold
                await stream.send_all(ws.send(wsevents.Message(data=request)))

        with trio.move_on_after(1.5):
            await flood()
        await wait_until(lambda: server.statistics().connections == 0 or pool.statistics().in_flight == 0, 1)
        close_code = None
        with trio.fail_after(10):
            while close_code is None:
                for event in await next_events():
                    if isinstance(event, wsevents.CloseConnection):
                        close_code = event.code
        assert close_code == 1008
        await stream.aclose()
        await wait_until(lambda: server.statistics().connections == 0, 5)
        nursery.cancel_scope.cancel()


async def test_non_loopback_bind_needs_a_token_checked_at_the_handshake(pool):
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match="without a token"):
            await start_server(nursery, pool, host="0.0.0.0")
        server = await start_server(nursery, pool, host="0.0.0.0", token="s3cret")
        url = f"ws://127.0.0.1:{server.port}"

        def client() -> None:
            for token in (None, "wrong", "s3cret-but-longer"):
                with pytest.raises(InvalidStatus) as refused:
                    Client(url, token=token)
                assert refused.value.response.status_code == 401
            with Client(url, token="s3cret") as c:
                assert c.result("ping") == "pong"

        await in_thread(client)
        assert server.statistics().rejected == 3
        nursery.cancel_scope.cancel()


async def test_origin_check(pool):
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool, allowed_origins=["http://app.example"])

        def client() -> None:
            with pytest.raises(InvalidStatus) as refused:
                Client(server.url, origin="http://evil.example")
            assert refused.value.response.status_code == 403
            with Client(server.url, origin="http://app.example") as c:
                assert c.result("ping") == "pong"
            with Client(server.url) as c:  # no Origin header: not a browser
                assert c.result("ping") == "pong"

        await in_thread(client)
        nursery.cancel_scope.cancel()


async def test_drain_lets_running_executions_finish_and_refuses_new_ones(pool):
    async with (
        open_fake_lm(latency_s=0.5) as fake,
        trio.open_nursery() as nursery,
    ):
        server = await start_server(nursery, pool, **lm_options(fake))
        submitted = threading.Event()
        go_on = threading.Event()
        result: dict[str, Any] = {}

        def client() -> None:
            with Client(server.url) as c:
                program, drain = configure_slow(c, fake)
                execution = c.result(
                    "execution/submit", {"program": program, "inputs": {"question": "q"}, "session": drain}
                )["execution"]
                submitted.set()
                go_on.wait(10)
                error = c.error(
                    "execution/submit", {"program": program, "inputs": {"question": "q"}, "session": drain}
                )
                result["error"] = error
                result["events"] = c.events_until_terminal({execution})[execution]

        async with trio.open_nursery() as inner:
            inner.start_soon(in_thread, client)
            await trio.to_thread.run_sync(submitted.wait, 10.0)
            with trio.fail_after(10):
                async with trio.open_nursery() as draining:
                    draining.start_soon(server.drain)
                    await wait_until(lambda: server.statistics().closing, 1)
                    go_on.set()
        assert result["error"]["data"]["kind"] == "unavailable"
        assert result["events"][-1]["event"] == "completed"
        nursery.cancel_scope.cancel()


async def test_a_lagging_health_subscriber_gets_lagged_then_a_fresh_snapshot(pool):
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        subscribed = threading.Event()
        published = threading.Event()
        seen: list[dict[str, Any]] = []

        def client() -> None:
            with Client(server.url) as c:
                subscription = c.result("health/subscribe")["subscription"]
                subscribed.set()
                assert published.wait(10.0)  # not reading while the burst passes
                while True:
                    params = c.notification("health/event")
                    assert params["subscription"] == subscription
                    seen.append(params)
                    if params["event"] == "snapshot":
                        break

        async with trio.open_nursery() as inner:
            inner.start_soon(in_thread, client)
            await trio.to_thread.run_sync(subscribed.wait, 10.0)
            for i in range(10_000):  # far more than the subscription's buffer, in one go
                pool.events.publish("test", {"i": i})
            published.set()
        kinds = [p["event"] for p in seen]
        assert kinds[-2:] == ["lagged", "snapshot"], kinds[-5:]
        lagged = seen[-2]["data"]
        assert lagged["missed"] > 0 and len(seen) - 2 + lagged["missed"] == 10_000
        assert {w["pid"] for w in seen[-1]["data"]["workers"]} == {w.pid for w in pool.statistics().workers}
        assert [p["seq"] for p in seen] == list(range(1, len(seen) + 1))
        nursery.cancel_scope.cancel()
