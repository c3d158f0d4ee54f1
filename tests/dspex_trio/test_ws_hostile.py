"""The websocket server under hostile input: Hypothesis-generated JSON-RPC messages and raw frames, 500
concurrent connections, slow readers, abrupt disconnects, oversized messages, and a flood of handshakes
with wrong tokens. Throughout, a separate well-behaved client must keep being served.

The oracle is ``docs/websocket-api.md``, restated here independently of the server's code: a frame that
is not JSON gets ``-32700`` (id null); JSON that is not a request object (a batch, a scalar, a bad id, a
wrong ``jsonrpc``, a missing method, params that are not an object, an unknown member) gets ``-32600``;
``NaN``/``Infinity`` are not JSON either; a valid request gets exactly one reply (result or error) if it has an ``id`` and none if it has not; every
error has ``data.kind`` naming its code from the documented table; ``-32603`` (a server bug) never comes.
Binary frames close with 1003, oversized messages with 1009, slow readers with 1008.
"""

from __future__ import annotations

import json
import math
import resource
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import trio_websocket
import wsproto
import wsproto.events as wsevents
import wsproto.utilities
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import dspex_trio
from dspex_trio.testing import open_fake_lm
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

DOCUMENTED_KINDS = {
    -32700: "parse_error",
    -32600: "invalid_request",
    -32601: "method_not_found",
    -32602: "invalid_params",
    -32603: "internal",
    -32000: "overloaded",
    -32001: "unavailable",
    -32002: "unknown_execution",
    -32003: "unknown_program",
    -32004: "limit_exceeded",
    -32005: "unauthorized",
    -32010: "execution_failed",
}
METHODS = [
    "program/create",
    "program/list",
    "program/get",
    "program/delete",
    "lm/configure",
    "session/end",
    "execution/submit",
    "execution/run",
    "execution/cancel",
    "health/subscribe",
    "health/unsubscribe",
    "runtime/status",
    "ping",
    "job/submit",
    "job/cancel",
    "job/list",
]
PARAM_NAMES = [
    "signature", "module", "instructions", "session", "state", "program", "model", "api_base", "api_key",
    "settings", "inputs", "stream", "timeout", "execution", "subscription", "extra",
    "kind", "metric", "devset", "job",
]  # fmt: skip
RECV_TIMEOUT_S = 10.0
MAX_MESSAGE = 16_384


# -- a server in a thread of its own (for the synchronous Hypothesis tests) ---------------------------------


class ServerHost:
    """A pool and its websocket server in a ``trio.run`` of their own thread."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.url = ""
        self.server: dspex_trio.WebsocketServer | None = None
        self.pool: dspex_trio.Pool | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="ws-host", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with (
            dspex_trio.open_pool(workers=2, launcher="subprocess") as pool,
            trio.open_nursery() as nursery,
        ):
            self.pool = pool
            self.server = await nursery.start(
                lambda task_status: dspex_trio.serve_websocket(
                    pool, port=0, task_status=task_status, **self.options
                )
            )
            self.url = self.server.url
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run_sync(self, fn: Any) -> Any:
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def __enter__(self) -> ServerHost:
        self.thread.start()
        assert self._started.wait(60), "the server did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self.thread.is_alive():
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self._error is not None:
            raise self._error


@contextmanager
def client(url: str) -> Iterator[ClientConnection]:
    with connect(url, subprotocols=["dspex.v1"], open_timeout=10, max_size=None) as ws:  # type: ignore[list-item]
        yield ws


def recv(ws: ClientConnection) -> dict[str, Any]:
    message = json.loads(ws.recv(timeout=RECV_TIMEOUT_S))
    assert isinstance(message, dict), message
    return message


def assert_well_formed_reply(reply: dict[str, Any]) -> None:
    assert reply.get("jsonrpc") == "2.0", reply
    assert "id" in reply and (("result" in reply) != ("error" in reply)), reply
    if "error" in reply:
        error = reply["error"]
        assert isinstance(error["code"], int) and isinstance(error["message"], str), reply
        assert error["code"] in DOCUMENTED_KINDS, reply
        assert error["data"]["kind"] == DOCUMENTED_KINDS[error["code"]], reply
        assert error["code"] != -32603, f"an internal error (a server bug): {reply}"


def valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return len(value) <= 128
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def expected_reply(text: str) -> tuple[str, Any]:
    """What the docs promise for one text frame: ("error", (code, id)), ("reply", id), or ("none", None)."""
    try:
        message = json.loads(text, parse_constant=not_json)  # NaN and Infinity are not JSON
    except ValueError:
        return "error", (-32700, None)
    if not isinstance(message, dict):
        return "error", (-32600, None)
    if "id" in message and not valid_id(message["id"]):
        return "error", (-32600, None)
    request_id = message.get("id")
    params = message.get("params", {})
    if (
        message.get("jsonrpc") != "2.0"
        or not isinstance(message.get("method"), str)
        or not message["method"]
        or not (params is None or isinstance(params, dict))
        or set(message) - {"jsonrpc", "method", "params", "id"}
    ):
        return "error", (-32600, request_id)
    if "id" not in message:
        return "none", None
    if message["method"] not in METHODS:
        return "error", (-32601, request_id)
    return "reply", request_id


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.one_of(
    st.integers(-(2**63), 2**63),
    st.text(max_size=140),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
params = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(PARAM_NAMES), json_values, max_size=4),
    st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    json_values,
)


@st.composite
def requests(draw: st.DrawFn) -> str:
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["jsonrpc"] = draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2.0]))
    if draw(st.integers(0, 9)):
        message["method"] = draw(st.sampled_from(METHODS) | st.text(max_size=15) | json_values)
    if draw(st.booleans()):
        message["params"] = draw(params)
    if draw(st.integers(0, 4)):
        message["id"] = draw(ids)
    if not draw(st.integers(0, 9)):
        message[draw(st.text(max_size=6))] = draw(json_values)
    return json.dumps(message)


frames = st.one_of(
    requests(),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.sampled_from(["{", "[", '{"jsonrpc": "2.0", "method": "ping", "id": 1', "\x00", "null", "[]"]),
)


def exchange(ws: ClientConnection, text: str, sync_id: str) -> list[dict[str, Any]]:
    """Send ``text`` then a ping with ``sync_id``; the replies (not notifications) that came before the
    ping's, and, when the frame expects a reply that is still out (a method that waits on a worker), it."""
    ws.send(text)
    ws.send(json.dumps({"jsonrpc": "2.0", "id": sync_id, "method": "ping"}))
    replies: list[dict[str, Any]] = []
    kind, _expected = expected_reply(text)
    synced = False
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while not synced or (kind == "reply" and not replies):
        assert time.monotonic() < deadline, f"no reply to {text!r}"
        message = recv(ws)
        if "method" in message:
            continue  # a notification (health events of a subscription made by an earlier frame)
        if message.get("id") == sync_id and message.get("result") == "pong":
            synced = True
            continue
        replies.append(message)
    return replies


def test_hypothesis_jsonrpc_frames_always_get_their_documented_answer() -> None:
    with (
        ServerHost(max_message_size=MAX_MESSAGE) as host,
        client(host.url) as ws,
        client(host.url) as bystander,
    ):
        counter = iter(range(10**9))

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(text=frames)
        def check(text: str) -> None:
            replies = exchange(ws, text, f"sync-{next(counter)}")
            kind, expected = expected_reply(text)
            for reply in replies:
                assert_well_formed_reply(reply)
            if kind == "none":
                assert replies == [], (text, replies)
            elif kind == "error":
                code, request_id = expected
                assert len(replies) == 1, (text, replies)
                assert replies[0]["id"] == request_id and replies[0]["error"]["code"] == code, (text, replies)
            else:
                assert len(replies) == 1 and replies[0]["id"] == expected, (text, replies)
            bystander.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            while (message := recv(bystander)).get("id") != 1:
                pass
            assert message["result"] == "pong"

        check()
        stats = host.run_sync(host.server.statistics)  # type: ignore[union-attr]
        assert stats.connections == 2
        assert next(counter) >= 250  # every example ran (each used one sync id)


def test_hypothesis_raw_frames_binary_closes_1003_oversized_closes_1009() -> None:
    with ServerHost(max_message_size=MAX_MESSAGE) as host, client(host.url) as bystander:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            frame=st.one_of(
                st.binary(min_size=0, max_size=2000).map(lambda b: ("binary", b)),
                st.integers(MAX_MESSAGE - 64, MAX_MESSAGE + 5000).map(lambda n: ("text", n)),
            )
        )
        def check(frame: tuple[str, Any]) -> None:
            kind, value = frame
            with client(host.url) as ws:
                if kind == "binary":
                    ws.send(value)
                    expected: int | None = 1003
                else:  # a valid request padded to n characters: over the limit it closes 1009
                    head = '{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"p": "'
                    text = head + "x" * max(0, value - len(head) - 3) + '"}}'
                    ws.send(text)
                    expected = 1009 if len(text) > MAX_MESSAGE else None
                if expected is None:
                    reply = recv(ws)
                    assert reply["id"] == 1 and reply["error"]["code"] == -32602, reply  # unknown "p"
                else:
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            recv(ws)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == expected
            bystander.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}))
            assert recv(bystander) == {"jsonrpc": "2.0", "id": 2, "result": "pong"}

        check()
        wait = time.monotonic() + 5
        while host.run_sync(host.server.statistics).connections != 1:  # type: ignore[union-attr]
            assert time.monotonic() < wait
            time.sleep(0.01)


# -- async tests: the server in the test's own loop ---------------------------------------------------------


async def start(nursery: trio.Nursery, pool: dspex_trio.Pool, **options: Any) -> dspex_trio.WebsocketServer:
    server: dspex_trio.WebsocketServer = await nursery.start(
        lambda task_status: dspex_trio.serve_websocket(pool, port=0, task_status=task_status, **options)
    )
    return server


async def ping(ws: trio_websocket.WebSocketConnection, request_id: int = 1) -> float:
    start = time.monotonic()
    await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "ping"}))
    while True:
        reply = json.loads(await ws.get_message())
        if reply.get("id") == request_id:
            assert reply["result"] == "pong"
            return time.monotonic() - start


async def test_five_hundred_concurrent_connections() -> None:
    n = 500
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n + 256:  # a client and a server socket per connection, plus the runtime's own
        pytest.skip(f"ulimit -n is {soft}: too low for {n} connections")
    connected = 0
    all_in = trio.Event()
    done = trio.Event()
    with trio.fail_after(60):
        async with (
            dspex_trio.open_pool(workers=1, launcher="subprocess") as pool,
            trio.open_nursery() as nursery,
        ):
            server = await start(nursery, pool, max_connections=n + 10, max_connections_per_peer=n + 10)
            start_time = time.monotonic()

            async def one(i: int) -> None:
                nonlocal connected
                async with trio_websocket.open_websocket_url(server.url, subprotocols=["dspex.v1"]) as ws:
                    connected += 1
                    if connected == n:
                        all_in.set()
                    await all_in.wait()
                    await ping(ws, i)
                    await done.wait()

            async with trio.open_nursery() as clients:
                for i in range(n):
                    clients.start_soon(one, i)
                await all_in.wait()
                assert server.statistics().connections == n
                opened = time.monotonic() - start_time
                await wait_until(lambda: server.statistics().connections == n, 5)
                done.set()
            elapsed = time.monotonic() - start_time
            await wait_until(lambda: server.statistics().connections == 0, 10)
            assert opened < 30 and elapsed < 45, (opened, elapsed)
            assert server.statistics().connections_total == n
            nursery.cancel_scope.cancel()


class RawClient:
    """A raw wsproto client over TCP: it reads only when told to, and can vanish without a close."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> RawClient:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        self = cls(trio.SocketStream(sock))
        await self.stream.send_all(
            self.ws.send(wsevents.Request(host="127.0.0.1", target="/", subprotocols=["dspex.v1"]))
        )
        with trio.fail_after(10):
            while not any(isinstance(e, wsevents.AcceptConnection) for e in await self.events()):
                pass
        return self

    async def events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(wsevents.Message(data=json.dumps(message))))

    def abort(self) -> None:
        """Vanish: RST, no close frame."""
        self.stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        self.stream.socket.close()


async def test_slow_readers_are_closed_1008_while_others_are_served() -> None:
    with trio.fail_after(60):
        async with (
            dspex_trio.open_pool(workers=1, launcher="subprocess") as pool,
            trio.open_nursery() as nursery,
        ):
            server = await start(nursery, pool, outbound_queue=4, slow_consumer_grace=0.5, close_timeout=1)
            slow = [await RawClient.connect(server.port, rcvbuf=4096) for _ in range(5)]

            async def flood(c: RawClient) -> None:
                with trio.move_on_after(2):
                    try:
                        for i in range(3000):
                            await c.send({"jsonrpc": "2.0", "id": i, "method": "runtime/status"})
                    except trio.BrokenResourceError:
                        pass  # the server closed it (1008) and dropped the link: what we wait for

            latencies: list[float] = []
            async with trio_websocket.open_websocket_url(server.url, subprotocols=["dspex.v1"]) as ws:
                async with trio.open_nursery() as floods:
                    for c in slow:
                        floods.start_soon(flood, c)
                    for i in range(50):
                        latencies.append(await ping(ws, i))
                        await trio.sleep(0.02)
                await wait_until(lambda: server.statistics().connections == 1, 15)
                assert await ping(ws, 999) < 1
            assert max(latencies) < 1.0, sorted(latencies)[-5:]
            for c in slow:
                codes: list[int] = []
                with trio.move_on_after(5):
                    try:
                        while not codes:
                            for event in await c.events():
                                if isinstance(event, wsevents.CloseConnection):
                                    codes.append(event.code)
                    except (trio.BrokenResourceError, wsproto.utilities.LocalProtocolError):
                        pass  # the link was dropped after close_timeout: no close frame to read
                # 1008; or, when the server dropped the link after close_timeout, no close frame (1006)
                assert codes in ([1008], [1006], []), codes
                await c.stream.aclose()
            nursery.cancel_scope.cancel()


async def test_abrupt_disconnects_leave_no_execution_running() -> None:
    # Every LM request waits 60 s: the 30 executions are all in flight when the clients go, however
    # long a loaded machine takes to send them (with short answers, the first ones used to complete
    # before the last were sent). The workers fork from the warm template: dspy is imported already.
    with trio.fail_after(90):
        async with (
            open_fake_lm(latency_s=60.0) as fake,
            dspex_trio.open_pool(workers=2) as pool,
            trio.open_nursery() as nursery,
        ):
            server = await start(nursery, pool)
            slow = await pool.open_session()  # a minted session: the clients hold its id
            await pool.configure_lm("openai/fake", session=slow, api_base=fake.url, api_key="x")
            program = await pool.create_program("question -> answer", session=slow)
            completed = pool.statistics().completed
            clients = [await RawClient.connect(server.port) for _ in range(10)]
            for i, c in enumerate(clients):
                for j in range(3):
                    await c.send(
                        {
                            "jsonrpc": "2.0",
                            "id": j,
                            "method": "execution/submit" if j else "execution/run",
                            "params": {
                                "program": program,
                                "inputs": {"question": f"q{i}{j}"},
                                "session": slow,
                            },
                        }
                    )
            await wait_until(lambda: pool.statistics().in_flight == 30, 30, lambda: repr(pool.statistics()))
            for c in clients:
                c.abort()
            await wait_until(  # typically ~10 ms
                lambda: pool.statistics().in_flight == 0 and server.statistics().executions == 0,
                30,
                lambda: f"{pool.statistics()} {server.statistics()}",
            )
            await wait_until(lambda: server.statistics().connections == 0, 30)

            async def workers_idle() -> bool:
                infos = [await w.call("stats") for w in pool.workers()]
                return all(info["executing"] == [] and info["pending"] == [] for info in infos)

            await wait_until(workers_idle, 30)  # cancelled in the workers too
            assert pool.statistics().restarts == 0
            assert pool.statistics().completed == completed  # no execution ended but by its cancel
            # and their LM requests were closed (the fake sees its clients leave)
            await wait_until(
                lambda: fake.statistics.completions_in_flight == 0, 30, lambda: repr(fake.statistics)
            )
            nursery.cancel_scope.cancel()


FLOOD_SCRIPT = textwrap.dedent(
    """
    import base64, os, socket, sys, threading

    PORT, ATTACKERS = int(sys.argv[1]), int(sys.argv[2])
    MAX_ATTEMPTS = 20_000  # bounded even if the test never closes our stdin
    PAUSE_S = 0.1  # per attacker between attempts: up to ~200 handshakes/s from 20 attackers
    stop = threading.Event()
    lock = threading.Lock()
    attempts = [0]
    wrong = []

    def attacker(k):
        while not stop.wait(PAUSE_S):
            with lock:
                if attempts[0] >= MAX_ATTEMPTS:
                    return
                attempts[0] += 1
                n = attempts[0]
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET / HTTP/1.1\\r\\nHost: 127.0.0.1:{PORT}\\r\\nUpgrade: websocket\\r\\n"
                f"Connection: Upgrade\\r\\nSec-WebSocket-Key: {key}\\r\\nSec-WebSocket-Version: 13\\r\\n"
                f"Sec-WebSocket-Protocol: dspex.v1\\r\\nAuthorization: Bearer wrong-{k}-{n}\\r\\n\\r\\n"
            )
            with socket.create_connection(("127.0.0.1", PORT), timeout=30) as sock:
                sock.sendall(request.encode())
                head = b""
                while b"\\r\\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            status = head.split(b" ", 2)[1:2]
            if status != [b"401"]:
                wrong.append(head[:200])
                stop.set()

    threads = [threading.Thread(target=attacker, args=(k,), daemon=True) for k in range(ATTACKERS)]
    for t in threads:
        t.start()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    for t in threads:
        t.join()
    print(f"{attempts[0]} attempts; not refused with 401: {wrong}", flush=True)
    sys.exit(1 if wrong else 0)
    """
)
"""A flood of handshakes with wrong tokens, from its own process (as an attacker's would be): ``ATTACKERS``
threads connect, send a websocket upgrade with a wrong bearer token and read the status line, until
stdin closes. Exits 1 (and says what came) if any answer is not ``401``. Each attacker pauses 50 ms
between attempts: hundreds of handshakes a second, a flood for one server, while the attackers' own CPU
(which on a loaded 2-core machine would be taken from the server, whatever the server does) stays small.
What is measured is the server's cost of refusing them."""


async def test_a_flood_of_bad_tokens_does_not_slow_authorised_clients() -> None:
    """Authorised pings keep their latency while a flood of wrong-token handshakes is refused. The
    attackers run in a process of their own: in this process (as they used to) their client-side work
    shared the event loop with the server and the good client, and a loaded machine then slowed the
    pings by the attackers' own cost, not the server's."""
    token = "s3cret-token"
    with trio.fail_after(120):
        async with (
            dspex_trio.open_pool(workers=1, launcher="subprocess") as pool,
            trio.open_nursery() as nursery,
        ):
            server = await start(nursery, pool, token=token)
            good = [(b"Authorization", f"Bearer {token}".encode())]
            async with trio_websocket.open_websocket_url(
                server.url, subprotocols=["dspex.v1"], extra_headers=good
            ) as ws:
                for i in range(20):
                    await ping(ws, i)  # warm
                before = [await ping(ws, i) for i in range(100)]
                rejected = server.statistics().rejected
                flood = await trio.lowlevel.open_process(
                    [sys.executable, "-c", FLOOD_SCRIPT, str(server.port), "20"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                report: bytes | bytearray = b""
                try:
                    await wait_until(lambda: server.statistics().rejected >= rejected + 50, 60)
                    during = [await ping(ws, 1000 + i) for i in range(100)]
                    await wait_until(lambda: server.statistics().rejected >= rejected + 300, 60)
                    assert flood.returncode is None, "the flood ended before the pings did"
                finally:
                    assert flood.stdin is not None and flood.stdout is not None
                    with trio.CancelScope(shield=True), trio.move_on_after(30):
                        await flood.stdin.aclose()  # the attackers stop
                        report = await flood.stdout.receive_some(65536)
                        await flood.wait()
                    if flood.returncode is None:
                        flood.kill()
                        with trio.CancelScope(shield=True):
                            await flood.wait()
                    await flood.stdout.aclose()
                assert flood.returncode == 0, report
            median_before, median_during = statistics.median(before), statistics.median(during)
            assert median_during < 5 * median_before + 0.05, (median_before, median_during, report)
            print(f"ping median {median_before * 1e3:.2f} ms before, {median_during * 1e3:.2f} ms during "
                  f"{server.statistics().rejected - rejected} refused handshakes")  # fmt: skip
            nursery.cancel_scope.cancel()
