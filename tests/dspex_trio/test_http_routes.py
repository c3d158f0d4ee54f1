"""The monitoring routes (``_http_routes.py``): ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard's
files, on the websocket's port and on a port of their own (``serve_http``), under the websocket's token,
Host and Origin rules. In-process: fake workers, real loopback sockets, real time (short)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import dspex_trio
from dspex_trio._handshake import BEARER_SUBPROTOCOL_PREFIX, HandshakePolicy, check_handshake_untrusted
from dspex_trio._http_routes import DASHBOARD_FILES, HttpRoutes, parse_request_head_untrusted, serve_http
from tests.fakes import open_fake_launcher
from tests.helpers import wait_until

TOKEN = "s3cret-token"
HEAD_PIECES = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"/metrics",
    b"/readyz",
    b"/",
    b"?a=b",
    b" HTTP/1.1",
    b"\r\n",
    b"Host: 127.0.0.1",
    b"Authorization: Bearer " + TOKEN.encode(),
    b"Origin: https://evil.example",
    b":",
    b"\xff",
]
"""Pieces of request heads, to build plausible and broken ones."""


class FakeBackend:
    """Just enough of a backend for the routes: an idle mock's health and statistics."""

    name = "mock"

    def health(self) -> Any:
        from dspex_trio._health import HealthSnapshot

        return HealthSnapshot("mock", (), 0, 0, dspex_trio.CircuitState.CLOSED, "", "in-process", 0)

    def statistics(self) -> Any:
        return None


METRICS_TOKEN = "scraper-token"


async def get(port: int, path: str, *headers: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers by lower-case name, body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        with trio.fail_after(10):
            while data := await stream.receive_some():
                answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    assert int(fields["content-length"]) == (len(body) if method != "HEAD" else int(fields["content-length"]))
    return int(status_line.split(" ")[1]), fields, body


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=2, launcher=launcher) as pool:
        pool.launcher_for_test = launcher  # type: ignore[attr-defined]
        yield pool


async def serve(pool: Any, nursery: trio.Nursery, **kwargs: Any) -> dspex_trio.WebsocketServer:
    server: dspex_trio.WebsocketServer = await nursery.start(
        partial(dspex_trio.serve_websocket, pool, port=0, http_routes=True, **kwargs)
    )
    return server


async def test_routes_on_the_websocket_port(pool: dspex_trio.Pool) -> None:
    async with trio.open_nursery() as nursery:
        server = await serve(pool, nursery)
        status, headers, body = await get(server.port, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, _, body = await get(server.port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True and json.loads(body)["ready_workers"] == 2
        await pool.call("echo", {"value": 1})
        status, headers, body = await get(server.port, "/metrics?x=1")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["dspex_websocket_connections"].type == "gauge"
        assert families["dspex_websocket_refusals"].type == "counter"
        calls = {(s.labels["method"], s.labels["outcome"]): s.value for s in families["dspex_calls"].samples}
        assert calls[("echo", "ok")] == 1
        status, headers, body = await get(server.port, "/metrics", method="HEAD")
        assert status == 200 and body == b""
        status, _, _ = await get(server.port, "/metrics", method="POST")
        assert status == 405
        status, _, body = await get(server.port, "/other")  # no route: what the endpoint is, as before
        assert status == 426 and b"websocket endpoint" in body
        nursery.cancel_scope.cancel()


async def test_without_http_routes_every_plain_request_gets_426(pool: dspex_trio.Pool) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0))
        for path in ("/metrics", "/healthz", "/"):
            assert (await get(server.port, path))[0] == 426
        nursery.cancel_scope.cancel()


async def test_the_dashboard_files_are_served_with_a_strict_csp(pool: dspex_trio.Pool) -> None:
    async with trio.open_nursery() as nursery:
        server = await serve(pool, nursery, token=TOKEN)
        for path, (_, content_type) in DASHBOARD_FILES.items():
            status, headers, body = await get(server.port, path)  # no token needed: no data in them
            assert status == 200 and headers["content-type"] == content_type and body
            csp = headers["content-security-policy"]
            assert (
                "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            )
            assert "unsafe-inline" not in csp and "http" not in csp  # nothing from elsewhere
        _, _, page = await get(server.port, "/")
        assert b"dashboard.js" in page and b"<script>" not in page  # no inline script (the CSP forbids it)
        nursery.cancel_scope.cancel()


async def test_tokens_host_and_origin_guard_the_data_routes(pool: dspex_trio.Pool) -> None:
    async with trio.open_nursery() as nursery:
        server = await serve(pool, nursery, token=TOKEN, metrics_token=METRICS_TOKEN)
        port = server.port
        for path in ("/healthz", "/readyz", "/metrics"):
            status, headers, _ = await get(port, path)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer")
            assert (await get(port, path, "Authorization: Bearer wrong"))[0] == 401
            assert (await get(port, path, f"Authorization: Bearer {TOKEN}"))[0] == 200
        # the scraper's token opens /metrics only
        assert (await get(port, "/metrics", f"Authorization: Bearer {METRICS_TOKEN}"))[0] == 200
        assert (await get(port, "/healthz", f"Authorization: Bearer {METRICS_TOKEN}"))[0] == 401
        assert server.statistics().refusals["token"] >= 7
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        server = await serve(pool, nursery)  # no token: loopback Host and Origin only
        port = server.port
        assert (await get(port, "/metrics", "Origin: http://127.0.0.1:9999"))[0] == 200
        assert (await get(port, "/metrics", "Origin: https://evil.example"))[0] == 403
        status, _, _ = await get_with_host(port, "/readyz", "evil.example:8765")
        assert status == 403  # a DNS-rebinding page
        nursery.cancel_scope.cancel()


async def get_with_host(port: int, path: str, host: str) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = b""
        with trio.fail_after(10):
            while data := await stream.receive_some():
                answer += data
    return int(answer.split(b" ")[1]), {}, answer


async def test_readyz_is_unready_while_the_circuit_is_open_and_ready_after_it_closes() -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(
            workers=1,
            launcher=launcher,
            restart_intensity=0,
            min_healthy_uptime=10,
            probe_backoff=0.3,
            probe_backoff_max=0.3,
        ) as pool,
        trio.open_nursery() as nursery,
    ):
        server = await serve(pool, nursery)
        assert (await get(server.port, "/readyz"))[0] == 200
        launcher.fail_at_start = 3  # the replacement fails too: the circuit opens
        launcher.live[0].die(code=1)
        await wait_until(lambda: pool.circuit is dspex_trio.CircuitState.OPEN, 10)
        status, _, body = await get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body)["ready"] is False and json.loads(body)["circuit"] == "open"
        assert (await get(server.port, "/healthz"))[0] == 200  # alive all the same
        _, _, body = await get(server.port, "/metrics")  # the first scrape, after the exits
        exits = {
            s.labels["cause"]: s.value
            for f in text_string_to_metric_families(body.decode())
            if f.name == "dspex_worker_exits"
            for s in f.samples
        }
        assert exits["exited"] == 1  # the worker that died before any scrape: counted from the server's start
        launcher.fail_at_start = None  # the next probe succeeds: the circuit closes
        await wait_until(lambda: pool.circuit is dspex_trio.CircuitState.CLOSED, 10)
        await wait_until(lambda: pool.statistics().ready == 1, 10)
        status, _, body = await get(server.port, "/readyz")
        assert status == 200 and json.loads(body) == {
            "ready": True,
            "ready_workers": 1,
            "circuit": "closed",
            "circuit_reason": json.loads(body)["circuit_reason"],
        }
        nursery.cancel_scope.cancel()


async def test_serve_http_serves_the_routes_on_a_port_of_its_own(pool: dspex_trio.Pool) -> None:
    async with trio.open_nursery() as nursery:
        http = await nursery.start(partial(serve_http, pool, websocket_url="ws://127.0.0.1:8765"))
        assert http.url == f"http://127.0.0.1:{http.port}"
        assert (await get(http.port, "/healthz"))[0] == 200
        assert (await get(http.port, "/metrics"))[0] == 200
        assert (await get(http.port, "/nothing"))[0] == 404
        _, headers, _ = await get(http.port, "/")
        assert "connect-src 'self' ws://127.0.0.1:8765;" in headers["content-security-policy"]
        _, _, page = await get(http.port, "/")
        assert b'<meta name="dspex-websocket" content="ws://127.0.0.1:8765">' in page
        with pytest.raises(ValueError, match="websocket_url"):
            await nursery.start(partial(serve_http, pool, websocket_url="ws://x; script-src *"))
        with pytest.raises(ValueError, match="without a token"):
            await nursery.start(partial(serve_http, pool, host="0.0.0.0"))
        nursery.cancel_scope.cancel()


def test_request_heads_are_parsed_strictly() -> None:
    request = parse_request_head_untrusted(b"GET /metrics?a=b HTTP/1.1\r\nHost: x\r\nX-A:  b ")
    assert (
        request is not None
        and request.path == "/metrics"
        and request.headers == ((b"host", b"x"), (b"x-a", b"b"))
    )
    for bad in (
        b"GET /x",
        b"GET x HTTP/1.1",
        b"GET /x SPDY/3",
        b"\xff /x HTTP/1.1",
        b"GET /x HTTP/1.1\r\nNoColon",
    ):
        assert parse_request_head_untrusted(bad) is None


def test_a_browser_sends_its_token_as_a_proposed_subprotocol() -> None:
    policy = HandshakePolicy.build(tokens=[TOKEN])
    host = [(b"host", b"server.example:8765")]
    accepted = check_handshake_untrusted(policy, host, ["dspex.v1", BEARER_SUBPROTOCOL_PREFIX + TOKEN])
    assert isinstance(accepted, dspex_trio._handshake.Accepted) and accepted.authenticated
    refused = check_handshake_untrusted(policy, host, ["dspex.v1", BEARER_SUBPROTOCOL_PREFIX + "nope"])
    assert isinstance(refused, dspex_trio._handshake.Refused) and refused.status == 401
    # the header wins when both are sent
    both = [*host, (b"authorization", b"Bearer nope")]
    refused = check_handshake_untrusted(policy, both, ["dspex.v1", BEARER_SUBPROTOCOL_PREFIX + TOKEN])
    assert isinstance(refused, dspex_trio._handshake.Refused)


async def test_a_mock_backend_is_scraped_too_and_websocket_executions_count_by_outcome() -> None:
    from websockets.sync.client import connect

    def run_two(url: str) -> None:
        with connect(url, subprotocols=["dspex.v1"], open_timeout=10) as ws:
            messages = [
                {"id": 1, "method": "program/create", "params": {"signature": "question -> answer"}},
            ]
            ws.send(json.dumps({"jsonrpc": "2.0", **messages[0]}))
            program = json.loads(ws.recv(timeout=10))["result"]["program"]
            good = {"program": program, "inputs": {"question": "q"}}
            bad = {"program": program, "inputs": {"nope": 1}}
            for i, params in enumerate((good, bad), 2):
                ws.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "execution/run", "params": params}))
                ws.recv(timeout=10)

    async with dspex_trio.open_backend("mock") as backend, trio.open_nursery() as nursery:
        server = await serve(backend, nursery)
        await trio.to_thread.run_sync(run_two, server.url)
        status, _, body = await get(server.port, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        ended = {s.labels["outcome"]: s.value for s in families["dspex_websocket_executions_ended"].samples}
        assert ended == {"completed": 1, "failed": 1, "cancelled": 0}
        assert families["dspex_info"].samples[0].labels["backend"] == "mock"
        assert (await get(server.port, "/readyz"))[0] == 200
        nursery.cancel_scope.cancel()


@settings(max_examples=200, deadline=None)
@given(head=st.binary(max_size=300) | st.lists(st.sampled_from(HEAD_PIECES), max_size=8).map(b"".join))
def test_any_request_head_is_answered_or_passed_on_never_raises(head: bytes) -> None:
    """Peer bytes: parsed or refused (None), and the routes answer them (bytes) or pass them on (None)."""
    request = parse_request_head_untrusted(head)
    assert request is None or request.path.startswith("/")
    routes = HttpRoutes.build(FakeBackend(), token=TOKEN)
    answer = routes.answer("127.0.0.1", head)
    assert answer is None or answer.startswith(b"HTTP/1.1 ")
