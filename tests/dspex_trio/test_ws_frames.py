"""The endpoint's writer frames its messages itself (``_websocket._send_texts``, ``websockets.frames``)
on a trio-websocket connection: what the client reads is what was sent, in order, whatever the size;
a connection that is closing goes through trio-websocket as before. In-process, bounded waits."""

from __future__ import annotations

import pytest
import trio
import trio_websocket

from dspex_trio._websocket import _frames_of, _send_texts

BOUND_S = 10.0
TEXTS = ["{}", "é" * 10, "x" * 126, "y" * 70_000, '{"a":"\u2603"}']
"""Lengths on either side of the 7-bit, 16-bit and 64-bit payload-length forms, and non-ASCII text."""


async def test_messages_framed_here_arrive_whole_and_in_order() -> None:
    accepted: list[trio_websocket.WebSocketConnection] = []
    sent = trio.Event()
    done = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        accepted.append(ws)
        assert _frames_of(ws) is not None  # the fast path applies to trio-websocket as installed
        await _send_texts(ws, TEXTS[:2])
        await _send_texts(ws, TEXTS[2:])
        sent.set()
        await done.wait()

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
            async with trio_websocket.open_websocket("127.0.0.1", server.port, "/", use_ssl=False) as client:
                got = [await client.get_message() for _ in TEXTS]
                await sent.wait()
                assert got == TEXTS
                await client.send_message("still open")  # the connection's state is intact
            done.set()
            nursery.cancel_scope.cancel()


async def test_a_closed_connection_raises_connection_closed() -> None:
    outcome: list[BaseException] = []
    done = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:  # until the client's close has been read
                await ws.get_message()
        outcome.append(closed.value)
        with pytest.raises(trio_websocket.ConnectionClosed):
            await _send_texts(ws, ["too late", "and this"])
        assert _frames_of(ws) is None
        done.set()

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
            async with trio_websocket.open_websocket("127.0.0.1", server.port, "/", use_ssl=False):
                pass  # closes
            await done.wait()
            nursery.cancel_scope.cancel()
    assert len(outcome) == 1
