"""The websocket server's defences, end to end: a browser-like client against ``dspex-trio serve``'s
defaults, connection caps, idle and dead connections, and the shutdown's terminal events.

Clients here send the headers a browser sends (``Host`` from the URL it was given, ``Origin`` of the page
that runs the script); a raw wsproto client lets a test choose both, as a hostile page or a DNS-rebinding
attack would. Real processes and sockets: real time, every wait bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import wsproto
import wsproto.events as wsevents

import dspex_trio
from dspex_trio.testing import open_fake_lm
from tests.helpers import kill_quietly, read_until, wait_until

CLI = [sys.executable, "-m", "dspex_trio"]


class RawClient:
    """A websocket client that sends exactly the handshake headers a test gives it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.pending: list[Any] = []

    @classmethod
    async def handshake(
        cls,
        port: int,
        *,
        host: str | None = None,
        origin: str | None = None,
        token: str | None = None,
        subprotocols: tuple[str, ...] = ("dspex.v1",),
    ) -> tuple[RawClient, int, bytes]:
        """Connect and send the opening handshake: the client, the HTTP status, and the refusal's body."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        headers = []
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        request = wsevents.Request(
            host=host or f"127.0.0.1:{port}",
            target="/",
            subprotocols=list(subprotocols),
            extra_headers=headers,
        )
        await stream.send_all(client.ws.send(request))
        body = b""
        with trio.fail_after(10):
            while True:
                for event in await client.events():
                    if isinstance(event, wsevents.AcceptConnection):
                        return client, 101, b""
                    if isinstance(event, wsevents.RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            return client, status, body
                    if isinstance(event, wsevents.RejectData):
                        body += event.data
                        if event.body_finished:
                            return client, status, body

    async def events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(wsevents.Message(data=json.dumps(message))))

    async def close_code(self) -> int | None:
        """Read until the server's close frame (its code), or None if the link just drops."""
        with trio.fail_after(20):
            while True:
                try:
                    events = await self.events()
                except (trio.BrokenResourceError, wsproto.utilities.LocalProtocolError):
                    return None
                if not events and self.ws.state == wsproto.connection.ConnectionState.CLOSED:
                    return None
                for event in events:
                    if isinstance(event, wsevents.CloseConnection):
                        return event.code

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def served_cli(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, trio.Process]]:
    """``dspex-trio serve --port 0 *args`` as a process: its URL, and the process."""
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(30):
            output = await read_until(
                process.stdout,
                lambda data: b"\n" in data,
                lambda: f"serve exited early ({process.returncode})",
            )
        yield output.decode().splitlines()[0].split()[2], process
    finally:
        kill_quietly(process.pid)
        with trio.CancelScope(shield=True):
            await process.wait()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_browser_like_clients_against_the_default_serve() -> None:
    async with served_cli() as (url, _process):
        port = port_of(url)
        # a page from another origin, on the real address: refused
        client, status, body = await RawClient.handshake(port, origin="http://evil.example")
        assert status == 403 and b"origin 'http://evil.example' is not allowed" in body
        await client.aclose()
        # DNS rebinding: the attacker's name resolves to 127.0.0.1, and the page is "same origin" with it
        client, status, body = await RawClient.handshake(
            port, host=f"evil.example:{port}", origin=f"http://evil.example:{port}"
        )
        assert status == 403 and b"host 'evil.example:" in body
        await client.aclose()
        # a page served from loopback (a local dashboard, a notebook): accepted, and it works
        for origin in (f"http://127.0.0.1:{port}", "http://localhost:3000"):
            client, status, _ = await RawClient.handshake(port, host=f"localhost:{port}", origin=origin)
            assert status == 101
            await client.send({"jsonrpc": "2.0", "id": 1, "method": "ping"})
            with trio.fail_after(10):
                replies = [e for e in await client.events() if isinstance(e, wsevents.TextMessage)]
                while not replies:
                    replies = [e for e in await client.events() if isinstance(e, wsevents.TextMessage)]
            assert json.loads(replies[0].data)["result"] == "pong"
            await client.aclose()
        # no subprotocol: the refusal says which one
        client, status, body = await RawClient.handshake(port, subprotocols=())
        assert status == 400 and b"dspex.v1" in body
        await client.aclose()


async def test_tokens_from_a_file_and_the_auto_token(tmp_path: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  file-t0ken\n")
    async with served_cli("--token-file", str(token_file)) as (url, _):
        port = port_of(url)
        for token, expected in ((None, 401), ("wrong", 401), ("file-t0ken", 101)):
            client, status, _ = await RawClient.handshake(port, token=token)
            assert status == expected, token
            await client.aclose()
        # with a token the Host is not checked (a proxy's name), the loopback/allowed Origin rule is gone
        client, status, _ = await RawClient.handshake(port, host="dspex.example.com", token="file-t0ken")
        assert status == 101
        await client.aclose()
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", "0", "--token", "auto"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(30):
            while output.count(b"\n") < 2:
                output += await process.stdout.receive_some(4096)
        first, second = output.decode().splitlines()[:2]
        token = second.rsplit(" ", 1)[1]
        assert second.startswith("token") and len(token) >= 40
        client, status, _ = await RawClient.handshake(port_of(first.split()[2]), token=token)
        assert status == 101
        await client.aclose()
    finally:
        kill_quietly(process.pid)
        await process.wait()


async def test_a_token_on_the_command_line_is_warned_about() -> None:
    async with served_cli("--token", "visible") as (_url, process):
        assert process.stderr is not None
        with trio.fail_after(10):
            err = b""
            while b"process list" not in err:
                err += await process.stderr.receive_some(4096)


@pytest.fixture
async def mock_backend() -> AsyncIterator[dspex_trio.Backend]:
    async with dspex_trio.open_backend("mock") as backend:
        yield backend


async def start(
    nursery: trio.Nursery, backend: dspex_trio.Backend, **options: Any
) -> dspex_trio.WebsocketServer:
    return await nursery.start(partial(dspex_trio.serve_websocket, backend, port=0, **options))


async def test_connection_caps_are_reserved_before_the_handshake_completes(mock_backend: Any) -> None:
    async with trio.open_nursery() as nursery:
        server = await start(nursery, mock_backend, max_connections=3)
        statuses: list[int] = []
        clients: list[RawClient] = []

        async def one() -> None:
            client, status, _ = await RawClient.handshake(server.port)
            statuses.append(status)
            clients.append(client)

        async with trio.open_nursery() as handshakes:
            for _ in range(12):
                handshakes.start_soon(one)
        assert sorted(statuses) == [101] * 3 + [503] * 9
        assert server.statistics().connections == 3 and server.statistics().refusals == {"capacity": 9}
        for client in clients:
            await client.aclose()
        await wait_until(lambda: server.statistics().connections == 0, 5)
        nursery.cancel_scope.cancel()


async def test_a_peer_address_has_its_own_cap(mock_backend: Any) -> None:
    async with trio.open_nursery() as nursery:
        server = await start(nursery, mock_backend, max_connections_per_peer=2)
        first = [await RawClient.handshake(server.port) for _ in range(2)]
        assert [status for _, status, _ in first] == [101, 101]
        client, status, body = await RawClient.handshake(server.port)
        assert status == 429 and b"too many connections from 127.0.0.1" in body
        await client.aclose()
        await first[0][0].aclose()
        await wait_until(lambda: server.statistics().connections == 1, 5)
        client, status, _ = await RawClient.handshake(server.port)  # a place is free again
        assert status == 101
        for c in (client, first[1][0]):
            await c.aclose()
        nursery.cancel_scope.cancel()


async def test_idle_and_dead_connections_are_closed(mock_backend: Any) -> None:
    async with trio.open_nursery() as nursery:
        server = await start(nursery, mock_backend, idle_timeout=0.3, ping_interval=0.1, ping_timeout=0.5)
        # idle: it answers pings (wsproto queues the pong for us to send) but says nothing
        idle, status, _ = await RawClient.handshake(server.port)
        assert status == 101
        with trio.fail_after(10):
            code = None
            while code is None:
                for event in await idle.events():
                    if isinstance(event, wsevents.Ping):
                        await idle.stream.send_all(idle.ws.send(event.response()))
                    elif isinstance(event, wsevents.CloseConnection):
                        code = event.code
        assert code == 1001
        await idle.aclose()
        # busy: a health subscription keeps a quiet connection open past the idle timeout
        busy, _, _ = await RawClient.handshake(server.port)
        await busy.send({"jsonrpc": "2.0", "id": 1, "method": "health/subscribe"})
        with trio.move_on_after(1.0):  # three idle timeouts
            while True:
                for event in await busy.events():
                    assert not isinstance(event, wsevents.CloseConnection), "a busy connection was closed"
                    if isinstance(event, wsevents.Ping):
                        await busy.stream.send_all(busy.ws.send(event.response()))
        assert server.statistics().connections == 1
        await busy.aclose()
        # dead: it never answers a ping (a peer that vanished without a FIN)
        dead, _, _ = await RawClient.handshake(server.port)
        await wait_until(lambda: server.statistics().connections == 1, 5)
        await wait_until(lambda: server.statistics().connections == 0, 10)  # closed by the server
        await dead.aclose()
        nursery.cancel_scope.cancel()


# -- shutdown ----------------------------------------------------------------------------------------------


async def test_shutdown_sends_one_terminal_event_per_execution_then_closes() -> None:
    async with (
        open_fake_lm(latency_s=30) as fake,
        dspex_trio.open_pool(workers=2) as pool,
        trio.open_nursery() as nursery,
    ):
        server = await start(nursery, pool, client_lm="allowlist", allow_lm_bases=[fake.url])
        client, status, _ = await RawClient.handshake(server.port)
        assert status == 101
        idle, _, _ = await RawClient.handshake(server.port)
        replies: dict[int, dict[str, Any]] = {}
        notifications: list[dict[str, Any]] = []

        async def request(request_id: int, method: str, **params: Any) -> dict[str, Any]:
            await client.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            with trio.fail_after(10):
                while request_id not in replies:
                    for event in await client.events():
                        if isinstance(event, wsevents.TextMessage):
                            message = json.loads(event.data)
                            if "id" in message:
                                replies[message["id"]] = message
                            else:
                                notifications.append(message["params"])
            return replies[request_id]["result"]

        await request(1, "lm/configure", model="openai/fake", api_base=fake.url, api_key="x")
        program = (await request(2, "program/create", signature="question -> answer"))["program"]
        executions = {
            (await request(10 + i, "execution/submit", program=program, inputs={"question": str(i)}))[
                "execution"
            ]
            for i in range(4)
        }
        await wait_until(lambda: pool.statistics().in_flight == 4, 10)
        with trio.move_on_after(0.2):  # the grace expires
            await server.drain()
        with trio.fail_after(10):
            await server.shutdown()
        # the idle client was closed at once, the busy one after its terminal events
        assert await idle.close_code() == 1001
        close_code = None
        with trio.fail_after(10):
            while close_code is None:
                for event in await client.events():
                    if isinstance(event, wsevents.TextMessage):
                        notifications.append(json.loads(event.data)["params"])
                    elif isinstance(event, wsevents.CloseConnection):
                        close_code = event.code
        assert close_code == 1001
        terminal = [n for n in notifications if n["event"] in ("completed", "failed", "cancelled")]
        assert sorted(n["execution"] for n in terminal) == sorted(executions)  # exactly one each
        assert all(n["event"] == "cancelled" and n["data"] == {"reason": "server_shutdown"} for n in terminal)
        await wait_until(lambda: pool.statistics().in_flight == 0, 5)
        for c in (client, idle):
            await c.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["grace_expires", "second_signal"])
async def test_serve_shutdown_gives_in_flight_executions_their_terminal_event(how: str) -> None:
    async with open_fake_lm(latency_s=30) as fake:
        grace = "0.5" if how == "grace_expires" else "30"
        args = ["--drain-grace", grace, "--client-lm", "allowlist", "--allow-lm-base", fake.url]
        async with served_cli(*args) as (url, process):
            client, status, _ = await RawClient.handshake(port_of(url))
            assert status == 101
            messages: list[dict[str, Any]] = []

            async def receive_until(predicate: Any) -> None:
                with trio.fail_after(20):
                    while not predicate():
                        for event in await client.events():
                            if isinstance(event, wsevents.TextMessage):
                                messages.append(json.loads(event.data))

            lm = {"model": "openai/fake", "api_base": fake.url, "api_key": "x"}
            await client.send({"jsonrpc": "2.0", "id": 1, "method": "lm/configure", "params": lm})
            await client.send(
                {"jsonrpc": "2.0", "id": 2, "method": "program/create", "params": {"signature": "q -> a"}}
            )
            await receive_until(lambda: any(m.get("id") == 2 for m in messages))
            program = next(m for m in messages if m.get("id") == 2)["result"]["program"]
            for i in range(3):
                params = {"program": program, "inputs": {"q": str(i)}}
                await client.send(
                    {"jsonrpc": "2.0", "id": 10 + i, "method": "execution/submit", "params": params}
                )
            await receive_until(
                lambda: sum(m.get("params", {}).get("event") == "started" for m in messages) == 3
            )
            start = trio.current_time()
            if how == "grace_expires":
                process.send_signal(signal.SIGTERM)
            else:
                process.send_signal(signal.SIGINT)
                await trio.sleep(0.3)  # the first one was seen and the drain began
                process.send_signal(signal.SIGINT)
            code = None
            with trio.fail_after(20):
                while code is None:
                    for event in await client.events():
                        if isinstance(event, wsevents.TextMessage):
                            messages.append(json.loads(event.data))
                        elif isinstance(event, wsevents.CloseConnection):
                            code = event.code
            assert code == 1001
            terminal = [
                m["params"]
                for m in messages
                if m.get("params", {}).get("event") in ("completed", "failed", "cancelled")
            ]
            assert len(terminal) == 3 and len({t["execution"] for t in terminal}) == 3
            assert all(t["data"] == {"reason": "server_shutdown"} for t in terminal), terminal
            with trio.fail_after(20):
                returncode = await process.wait()
            assert returncode == (0 if how == "grace_expires" else 130)
            assert trio.current_time() - start < 15
            assert process.stderr is not None
            err = (await process.stderr.receive_some(65536)).decode()
            if how == "grace_expires":
                assert "SIGTERM: draining" in err and "Ctrl-C" not in err
            await client.aclose()


# -- over other backends -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bridge", "fallback"])
async def test_the_endpoint_serves_any_backend(kind: str) -> None:
    from websockets.sync.client import connect

    async with dspex_trio.open_backend(kind) as backend, trio.open_nursery() as nursery:  # type: ignore[arg-type]
        server = await start(nursery, backend)

        def client() -> dict[str, Any]:
            with connect(server.url, subprotocols=["dspex.v1"], open_timeout=10) as ws:  # type: ignore[list-item]

                def call(request_id: int, method: str, **params: Any) -> Any:
                    ws.send(
                        json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
                    )
                    while True:
                        message = json.loads(ws.recv(timeout=30))
                        if message.get("id") == request_id:
                            assert "result" in message, message
                            return message["result"]

                session = call(1, "session/open")["session"]
                program = call(2, "program/create", signature="question -> answer", session=session)[
                    "program"
                ]
                run = call(3, "execution/run", program=program, inputs={"question": "q"}, session=session)
                execution = call(
                    4, "execution/submit", program=program, inputs={"question": "q"}, session=session
                )
                events = []
                while not events or events[-1]["event"] not in ("completed", "failed", "cancelled"):
                    message = json.loads(ws.recv(timeout=30))
                    if message.get("method") == "execution/event":
                        assert message["params"]["execution"] == execution["execution"]
                        events.append(message["params"])
                status = call(5, "runtime/status")
                assert call(6, "session/end", session=session)["ended"] is True
                return {"run": run, "events": events, "status": status}

        got = await trio.to_thread.run_sync(client)
        assert set(got["run"]["outputs"]) == {"answer"}
        assert got["events"][0]["event"] == "started"
        assert got["events"][-1]["event"] == "completed" and got["events"][-1]["data"]["outputs"]["answer"]
        assert got["status"]["backend"] == kind
        nursery.cancel_scope.cancel()


# -- the server's keys never leave ---------------------------------------------------------------------


def _client_paths(
    url: str, base: str, port: int, *, policy: str, token: str, before_retries: Callable[[], None]
) -> list[str]:
    """Every way a client can make a worker call an LM; what happened on each (for the assertion text)."""
    from websockets.sync.client import connect

    seen: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    with connect(url, subprotocols=["dspex.v1"], open_timeout=10, additional_headers=headers) as ws:  # type: ignore[list-item]
        counter = iter(range(1, 10_000))

        def call(method: str, **params: Any) -> dict[str, Any]:
            request_id = next(counter)
            ws.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
            while True:
                message = json.loads(ws.recv(timeout=60))
                if message.get("id") == request_id:
                    return message

        def run_both_ways(session: str) -> None:
            program = call("program/create", signature="question -> answer", session=session)["result"][
                "program"
            ]
            run = call("execution/run", program=program, inputs={"question": "q"}, session=session)
            seen.append(f"run: {run.get('error', {}).get('data', {}).get('type') or 'ok'}")
            execution = call("execution/submit", program=program, inputs={"question": "q"}, session=session)
            execution_id = execution["result"]["execution"]
            while True:
                message = json.loads(ws.recv(timeout=60))
                params = message.get("params", {})
                if params.get("execution") == execution_id and params["event"] in (
                    "completed",
                    "failed",
                    "cancelled",
                ):
                    seen.append(f"stream: {params['event']}")
                    break

        def configure(session: str, **lm: Any) -> dict[str, Any]:
            return call("lm/configure", model="openai/x", session=session, **lm)

        # its own key, streamed and not, and with retries through server errors
        own = call("session/open")["result"]["session"]
        assert "result" in configure(own, api_base=base, api_key="sk-client-own", settings={"num_retries": 0})
        run_both_ways(own)
        before_retries()  # the next requests meet two server errors before their answer
        retries = call("session/open")["result"]["session"]
        assert "result" in configure(
            retries, api_base=base, api_key="sk-client-own", settings={"num_retries": 2}
        )
        run_both_ways(retries)
        # no key at all: none is sent (allowlist refuses it: a client must bring its own)
        keyless = call("session/open")["result"]["session"]
        reply = configure(keyless, api_base=base, settings={"num_retries": 0})
        if policy == "allowlist":
            assert reply["error"]["data"]["kind"] == "unauthorized", reply
        else:
            assert "result" in reply, reply
            run_both_ways(keyless)
        # the provider's default base (no api_base): refused under allowlist; under any it goes to the
        # public provider, which this machine cannot reach: the point is that no key goes with it
        # a base that is not allow-listed and resolves to this machine: refused, nothing sent
        other = port + 1  # the listed base is the recorder's port only
        for inside in (f"http://localhost:{port}/v1", f"http://[::1]:{port}/v1", f"http://0x7f.1:{other}/v1"):
            reply = configure(keyless, api_base=inside, api_key="sk-client-own")
            assert reply["error"]["data"]["kind"] in ("invalid_params", "unauthorized"), reply
        # the operator's LMs by name
        assert "result" in call("lm/select", name="offline", session=own)
        run_both_ways(own)
    return seen


@pytest.mark.parametrize("policy", ["any", "allowlist"])
async def test_the_servers_key_never_leaves_through_any_client_path(policy: str) -> None:
    from tests.recording_lm import Reply, recording_lm

    canary = "sk-canary-" + os.urandom(8).hex()
    with recording_lm() as recorder:
        # the worst case: the operator passes the variable to the workers on purpose (for its own LMs)
        args = ["--client-lm", policy, "--allow-lm-base", recorder.url, "--worker-env", "OPENAI_API_KEY"]
        env = {"OPENAI_API_KEY": canary, "OPENAI_API_BASE": recorder.url, "DSPEX_TOKEN": canary + "-token"}
        async with served_cli(*args, env=env) as (url, _process):

            def before_retries() -> None:
                recorder.script.extend([Reply(status=500), Reply(status=500)])

            seen = await trio.to_thread.run_sync(
                partial(
                    _client_paths,
                    url,
                    recorder.url,
                    recorder.port,
                    policy=policy,
                    token=env["DSPEX_TOKEN"],
                    before_retries=before_retries,
                ),
                abandon_on_cancel=True,
            )
        sent = recorder.everything_sent()
        # the paths did reach the LM: own key 2, retries 2 + 2 errors, keyless 2 (any only)
        assert recorder.count() == (8 if policy == "any" else 6), (seen, recorder.count())
        assert "failed" not in " ".join(seen), seen
        assert canary not in sent, seen
        keys = {r.headers.get("authorization") for r in recorder.requests}
        assert keys <= {"Bearer sk-client-own", None}, keys
        assert any(r.headers.get("authorization") is None for r in recorder.requests) == (policy == "any")


async def test_refusals_are_logged_at_most_once_per_peer_per_interval(mock_backend: Any, caplog: Any) -> None:
    caplog.set_level("INFO", logger="dspex_trio.websocket")
    async with trio.open_nursery() as nursery:
        server = await start(nursery, mock_backend, refusal_log_interval=3600)
        for _ in range(5):
            client, status, _ = await RawClient.handshake(server.port, origin="http://evil.example")
            assert status == 403
            await client.aclose()
        assert server.statistics().refusals == {"origin": 5}
        nursery.cancel_scope.cancel()
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "origin 'http://evil.example' is not allowed" in refused[0], refused
