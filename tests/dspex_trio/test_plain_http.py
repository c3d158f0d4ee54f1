"""A plain HTTP request at the websocket endpoint gets ``426`` and a body saying what the endpoint is;
websocket handshakes pass untouched, however they arrive. In-process: a mock backend, real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio._plain_http import MAX_HEAD_BYTES, is_websocket_upgrade_untrusted, upgrade_required
from tests.helpers import wait_until

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: dspex.v1\r\n\r\n"
)


@pytest.fixture
async def server() -> AsyncIterator[dspex_trio.WebsocketServer]:
    async with dspex_trio.open_backend("mock") as backend, trio.open_nursery() as nursery:
        yield await nursery.start(partial(dspex_trio.serve_websocket, backend, port=0))
        nursery.cancel_scope.cancel()


async def exchange(port: int, *pieces: bytes, until_closed: bool = True) -> bytes:
    """Send ``pieces`` one by one; everything the server answers (until it closes, or its head ends)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for piece in pieces:
            await stream.send_all(piece)
        answer = b""
        with trio.fail_after(10):
            while until_closed or b"\r\n\r\n" not in answer:
                data = await stream.receive_some()
                if not data:
                    break
                answer += data
        return answer


def test_what_counts_as_a_websocket_upgrade() -> None:
    assert is_websocket_upgrade_untrusted(b"GET / HTTP/1.1\r\nupgrade: h2c, WebSocket")
    assert not is_websocket_upgrade_untrusted(b"GET / HTTP/1.1\r\nHost: x\r\nX-Upgrade: websocket")
    assert not is_websocket_upgrade_untrusted(b"GET / HTTP/1.1\r\nUpgrade: websockets")
    assert not is_websocket_upgrade_untrusted(b"\xff\x00garbage")
    response = upgrade_required(b"HEAD / HTTP/1.1", "text")
    assert response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n") and response.endswith(b"\r\n\r\n")
    assert b"Content-Length: 4\r\n" in response  # the length of the body a GET would get


async def test_a_plain_get_is_told_this_is_a_websocket_endpoint(server: dspex_trio.WebsocketServer) -> None:
    answer = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 426 Upgrade Required"
    assert b"Upgrade: websocket" in lines and b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert body == (
        b"This is a dspex-trio websocket endpoint: connect with a websocket client (a ws:// or wss:// "
        b"URL; JSON-RPC 2.0, subprotocol dspex.v1).\n"
    )
    head_only = await exchange(server.port, b"HEAD /favicon.ico HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert head_only.startswith(b"HTTP/1.1 426 ") and head_only.endswith(b"\r\n\r\n")
    assert server.statistics().refusals == {"not_websocket": 2}
    assert server.statistics().connections_total == 0


async def test_handshakes_pass_untouched_whole_or_byte_by_byte(server: dspex_trio.WebsocketServer) -> None:
    whole = await exchange(server.port, HANDSHAKE, until_closed=False)
    assert whole.startswith(b"HTTP/1.1 101 ")
    pieces = [HANDSHAKE[i : i + 1] for i in range(len(HANDSHAKE))]
    split = await exchange(server.port, *pieces, until_closed=False)
    assert split.startswith(b"HTTP/1.1 101 ")
    # a handshake without the subprotocol is still the handshake's refusal, with its body
    refused = await exchange(server.port, HANDSHAKE.replace(b"Sec-WebSocket-Protocol: dspex.v1\r\n", b""))
    assert refused.startswith(b"HTTP/1.1 400 ") and b"dspex.v1" in refused.partition(b"\r\n\r\n")[2]
    await wait_until(lambda: server.statistics().connections == 0, 5)
    assert server.statistics().connections_total == 2
    assert server.statistics().refusals == {"subprotocol": 1}


async def test_a_head_too_long_to_read_is_left_to_the_websocket_layer(
    server: dspex_trio.WebsocketServer,
) -> None:
    filler = b"X-Filler: " + b"a" * MAX_HEAD_BYTES + b"\r\n"
    answer = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + filler + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")  # wsproto's own refusal, not a 426
    assert "not_websocket" not in server.statistics().refusals


async def test_a_client_talks_through_the_wrapped_connection(server: dspex_trio.WebsocketServer) -> None:
    from websockets.sync.client import connect

    def ping() -> Any:
        with connect(server.url, subprotocols=["dspex.v1"], open_timeout=10) as ws:  # type: ignore[list-item]
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
            return json.loads(ws.recv(timeout=10))["result"]

    assert await trio.to_thread.run_sync(ping) == "pong"
