"""The endpoint's read path (``_ws_reader.py``): simple text frames parsed by the endpoint, everything else
by wsproto as before. A raw client sends hand-made frames (split anyhow across writes) to a served mock
backend, and reads the answers with wsproto. In-process, bounded waits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import wsproto
import wsproto.events as wsevents
from websockets.frames import Frame, Opcode

import dspex_trio
from dspex_trio import _ws_reader
from dspex_trio._mock import MockBackend
from dspex_trio._ws_reader import FastReadStream
from tests.helpers import wait_until

BOUND_S = 20.0
MAX_MESSAGE = 4096


def _ping(rid: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "ping"}).encode()


def frame(opcode: Opcode, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


class RawClient:
    """A websocket client that sends the bytes it is given and reads with wsproto."""

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[Any] = []

    async def events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        try:
            self.ws.receive_data(data or None)
        except wsproto.utilities.RemoteProtocolError:
            pass
        return list(self.ws.events())

    async def next_of(self, kind: type) -> Any:
        """The next event of ``kind`` (others skipped); a closed stream fails the test."""
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, kind):
                    return event
            self.pending = await self.events()
            assert self.pending, f"the stream ended before a {kind.__name__}"

    async def reply(self) -> dict[str, Any]:
        return json.loads((await self.next_of(wsevents.TextMessage)).data)


@asynccontextmanager
async def served() -> AsyncIterator[tuple[RawClient, Any]]:
    """A served mock backend, a raw client connected to it, and the server's side of that connection."""
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            serve = partial(dspex_trio.serve_websocket, max_message_size=MAX_MESSAGE)
            server = await nursery.start(serve, MockBackend(), "127.0.0.1", 0)
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send_all(
                ws.send(wsevents.Request(host="127.0.0.1", target="/", subprotocols=["dspex.v1"]))
            )
            client = RawClient(stream, ws)
            await client.next_of(wsevents.AcceptConnection)
            await wait_until(lambda: bool(server._connections), BOUND_S)
            (connection,) = server._connections
            for rid in (-1, -2):  # trio-websocket's first read may be under way before the wrapping
                await client.stream.send_all(frame(Opcode.TEXT, _ping(rid)))
                assert (await client.reply())["id"] == rid
            fast_of(connection).fast_messages = 0
            yield client, connection
            await stream.aclose()
            nursery.cancel_scope.cancel()


def fast_of(connection: Any) -> FastReadStream:
    stream = connection.ws._stream
    assert isinstance(stream, FastReadStream), type(stream)
    return stream


async def test_simple_text_frames_are_parsed_by_the_endpoint_even_split_byte_by_byte() -> None:
    async with served() as (client, connection):
        data = b"".join(frame(Opcode.TEXT, _ping(rid)) for rid in (1, 2, 3))
        await client.stream.send_all(data)  # three in one write
        assert [(await client.reply())["id"] for _ in range(3)] == [1, 2, 3]
        big = frame(
            Opcode.TEXT, json.dumps({"jsonrpc": "2.0", "id": 4, "method": "ping", "x": None}).encode()
        )
        for i in range(len(big)):  # one byte at a time
            await client.stream.send_all(big[i : i + 1])
        assert (await client.reply())["error"]["data"]["kind"] == "invalid_request"  # the unknown member
        assert fast_of(connection).fast_messages == 4
        assert fast_of(connection)._state == "fast"


async def test_ping_and_pong_go_to_wsproto_and_the_fast_path_stays() -> None:
    async with served() as (client, connection):
        await client.stream.send_all(frame(Opcode.TEXT, _ping(1)))
        assert (await client.reply())["id"] == 1
        await client.stream.send_all(frame(Opcode.PING, b"hi") + frame(Opcode.TEXT, _ping(2)))
        pong = await client.next_of(wsevents.Pong)
        assert pong.payload == b"hi"
        assert (await client.reply())["id"] == 2
        await client.stream.send_all(frame(Opcode.PONG, b"unasked") + frame(Opcode.TEXT, _ping(3)))
        assert (await client.reply())["id"] == 3
        assert fast_of(connection).fast_messages == 3
        assert fast_of(connection)._state == "fast"


async def test_a_fragmented_message_is_wsproto_s_and_still_answered() -> None:
    async with served() as (client, connection):
        await client.stream.send_all(frame(Opcode.TEXT, _ping(1)))
        assert (await client.reply())["id"] == 1
        text = _ping(2)
        await client.stream.send_all(
            frame(Opcode.TEXT, text[:5], fin=False)
            + frame(Opcode.PING, b"between")
            + frame(Opcode.CONT, text[5:])
        )
        assert (await client.next_of(wsevents.Pong)).payload == b"between"
        assert (await client.reply())["id"] == 2
        await client.stream.send_all(frame(Opcode.TEXT, _ping(3)))
        assert (await client.reply())["id"] == 3
        assert fast_of(connection)._state == "raw"  # wsproto's from the first fragment on
        assert fast_of(connection).fast_messages == 1


async def _close_code(client: RawClient) -> int:
    return int((await client.next_of(wsevents.CloseConnection)).code)


HOSTILE = {
    "over_the_size_limit": frame(Opcode.TEXT, b"x" * (MAX_MESSAGE + 1)),
    "unmasked": frame(Opcode.TEXT, _ping(2), mask=False),  # RFC 6455 5.1: the server must close
    "non_minimal_length": bytes([0x81, 0x80 | 126])
    + len(_ping(2)).to_bytes(2, "big")
    + b"\0\0\0\0"
    + _ping(2),
    "rsv1": bytes([0xC1]) + frame(Opcode.TEXT, _ping(2))[1:],
    "invalid_utf8": frame(Opcode.TEXT, b'{"a":"\xff"}'),
    "close": frame(Opcode.CLOSE, (1000).to_bytes(2, "big") + b"bye"),
    "binary": frame(Opcode.BINARY, b"\x00\x01"),
    "unknown_opcode": bytes([0x83]) + frame(Opcode.TEXT, _ping(2))[1:],
    "fragmented_control": bytes([0x09]) + frame(Opcode.PING, b"x")[1:],
    "continuation_first": frame(Opcode.CONT, _ping(2)),
}


async def _outcome(data: bytes) -> tuple[int, str]:
    """The close code ``data`` gets, and the read path's state when it was sent."""
    async with served() as (client, connection):
        state = fast_of(connection)._state
        await client.stream.send_all(data)
        return await _close_code(client), state


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_what_wsproto_refuses_is_refused_the_same(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each frame the fast path does not take closes the connection with the code wsproto alone gives
    (the reference: the fast path never starts)."""
    fast, state = await _outcome(HOSTILE[case])
    assert state == "fast"
    monkeypatch.setattr(_ws_reader, "wsproto_idle", lambda ws: False)
    reference, state = await _outcome(HOSTILE[case])
    assert state == "waiting"
    assert fast == reference, f"{case}: closed with {fast}, wsproto alone with {reference}"


async def test_the_size_limit_and_the_client_s_close_give_their_codes() -> None:
    assert await _outcome(HOSTILE["over_the_size_limit"]) == (1009, "fast")
    assert await _outcome(HOSTILE["close"]) == (1000, "fast")
    assert await _outcome(HOSTILE["binary"]) == (1003, "fast")
