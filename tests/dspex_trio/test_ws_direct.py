"""The endpoint's direct write (``_ws_direct.py``): a message the socket takes at once is written by the
sending task; one it takes in part is finished before anything else reaches the socket (a pong, the next
message); one it does not take goes through the writer. In-process (the mock backend), bounded waits."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio_websocket

import dspex_trio
from dspex_trio import _websocket
from dspex_trio._mock import MockBackend
from dspex_trio._plain_http import _HeadFirstStream
from dspex_trio._ws_direct import direct_socket, write_nowait

BOUND_S = 20.0
REQUESTS = 40
"""Requests a client sends before it reads any reply."""


def _request(rid: int) -> str:
    method = "runtime/status" if rid % 3 == 0 else "ping"  # replies of a few kB, and short ones
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method})


async def _exchange(writes: list[int]) -> list[dict[str, Any]]:
    """Serve the mock; one client sends ``REQUESTS`` requests, pings the server's pong path in the middle,
    then reads every reply; the replies, in the order read. ``writes`` gets each direct write's size."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(dspex_trio.serve_websocket, MockBackend(), "127.0.0.1", 0)
        async with trio_websocket.open_websocket_url(
            server.url, subprotocols=["dspex.v1"], message_queue_size=REQUESTS + 2
        ) as client:
            for rid in range(1, REQUESTS + 1):
                await client.send_message(_request(rid))
                if rid == REQUESTS // 2:
                    await client.ping(b"mid")  # its pong is read, between two messages, never inside one
            replies = [json.loads(await client.get_message()) for _ in range(REQUESTS)]
            await client.ping(b"end")
        nursery.cancel_scope.cancel()
    return replies


def _patched_write(monkeypatch: pytest.MonkeyPatch, take: Callable[[int], int], writes: list[int]) -> None:
    """``write_nowait`` taking ``take(len(data))`` bytes of what it is given (the kernel's choice, forced)."""

    def write(sock: Any, data: bytes | memoryview) -> int:
        writes.append(len(data))
        return write_nowait(sock, memoryview(data)[: take(len(data))])

    monkeypatch.setattr(_websocket, "write_nowait", write)


def _check(replies: list[dict[str, Any]]) -> None:
    assert [r.get("id") for r in replies] == list(range(1, REQUESTS + 1)), replies
    assert all("result" in r for r in replies), [r for r in replies if "result" not in r]
    assert replies[0]["result"] == "pong"


async def test_replies_written_directly_arrive_whole_and_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    _patched_write(monkeypatch, lambda n: n, writes)
    with trio.fail_after(BOUND_S):
        _check(await _exchange(writes))
    assert writes, "no message was written directly"


async def test_a_frame_written_in_part_is_finished_before_anything_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every direct write takes only a few bytes: the sending task finishes each frame itself, under the
    stream lock, and the pongs and the next replies come after it (a client would fail on a torn frame)."""
    writes: list[int] = []
    _patched_write(monkeypatch, lambda n: min(n, 7), writes)
    with trio.fail_after(BOUND_S):
        _check(await _exchange(writes))
    assert any(n > 7 for n in writes), f"no frame was begun in part: {writes[:20]}"


async def test_a_socket_that_takes_nothing_sends_through_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    _patched_write(monkeypatch, lambda n: 0, writes)
    with trio.fail_after(BOUND_S):
        _check(await _exchange(writes))
    assert writes, "the direct write was never tried"


async def test_direct_socket_is_the_tcp_one_and_none_under_tls() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(BOUND_S):
        async with listeners[0], await trio.open_tcp_stream("127.0.0.1", port) as stream:
            assert direct_socket(stream) is stream.socket
            wrapped = _HeadFirstStream(stream, lambda peer, head: b"")
            assert direct_socket(wrapped) is stream.socket
            tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname="x")
            assert direct_socket(tls) is None
            assert direct_socket(_HeadFirstStream(tls, lambda peer, head: b"")) is None
            assert direct_socket(None) is None


async def test_write_nowait_reports_a_full_and_a_closed_socket() -> None:
    a, b = trio.socket.socketpair()
    with b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        chunk = b"x" * 65536
        for _ in range(10_000):  # bounded: until the buffers are full
            if not write_nowait(a, chunk):
                break
        assert write_nowait(a, chunk) == 0
        a.close()
        with pytest.raises(OSError):
            write_nowait(a, b"more")
