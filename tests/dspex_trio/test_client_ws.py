"""The remote client's websocket (``_client_ws.py``) against a raw wsproto server on loopback: fragments,
limits, pings both ways, the closing handshake, refused handshakes. In-process, bounded waits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import wsproto
import wsproto.events as ev

from dspex_trio._client_protocol import HandshakeRefused, RemoteProtocolError
from dspex_trio._client_ws import ClientWebsocket, WebsocketClosed, open_client_websocket

BOUND_S = 10.0


class Peer:
    """The server side of one connection: wsproto over the accepted stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)

    async def events(self) -> list[ev.Event]:
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def send(self, *events: ev.Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(e) for e in events))

    async def accept(self) -> None:
        while not any(isinstance(e, ev.Request) for e in await self.events()):
            pass
        await self.send(ev.AcceptConnection(subprotocol="dspex.v1"))

    async def next_event(self, kind: type) -> ev.Event:
        while True:
            for event in await self.events():
                if isinstance(event, kind):
                    return event


Script = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def peer_and_client(script: Script, **options: int) -> AsyncIterator[ClientWebsocket]:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await script(Peer(stream))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(BOUND_S):
            async with open_client_websocket(
                f"ws://127.0.0.1:{port}/",
                ssl_context=None,
                subprotocols=["dspex.v1"],
                headers=[],
                max_message_size=options.get("max_message_size", 1 << 20),
                close_timeout=1.0,
            ) as ws:
                yield ws
        nursery.cancel_scope.cancel()


async def test_fragments_are_reassembled_and_pings_answered() -> None:
    pong = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.send(
            ev.TextMessage(data='{"a":', message_finished=False),
            ev.Ping(payload=b"are you there"),
            ev.TextMessage(data=' "é"}', message_finished=True),
            ev.TextMessage(data="second"),
        )
        answer = await peer.next_event(ev.Pong)
        assert isinstance(answer, ev.Pong) and bytes(answer.payload) == b"are you there"
        pong.set()
        await trio.sleep_forever()

    async with peer_and_client(script) as ws:
        messages: list[str] = []
        while len(messages) < 2:
            messages += await ws.receive_messages()
        assert messages == ['{"a": "é"}', "second"]
        with trio.fail_after(BOUND_S):
            await pong.wait()


async def test_the_clients_ping_gets_its_pong() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        ping = await peer.next_event(ev.Ping)
        assert isinstance(ping, ev.Ping)
        await peer.send(ev.Pong(payload=b"unrelated"), ping.response())
        await trio.sleep_forever()

    async with peer_and_client(script) as ws, trio.open_nursery() as nursery:
        nursery.start_soon(ws.receive_messages)  # the reader takes the pong
        with trio.fail_after(BOUND_S):
            await ws.ping()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("split", [False, True])
async def test_a_message_over_the_limit_is_refused_before_it_is_kept(split: bool) -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        if split:
            await peer.send(ev.TextMessage(data="x" * 60, message_finished=False))
            await peer.send(ev.TextMessage(data="x" * 60, message_finished=True))
        else:
            await peer.send(ev.TextMessage(data="x" * 200))
        await trio.sleep_forever()

    async with peer_and_client(script, max_message_size=100) as ws:
        with trio.fail_after(BOUND_S), pytest.raises(RemoteProtocolError, match="at most 100"):
            while True:
                await ws.receive_messages()


async def test_binary_frames_and_bad_frames_are_protocol_errors() -> None:
    async def binary(peer: Peer) -> None:
        await peer.accept()
        await peer.send(ev.BytesMessage(data=b"\x00\x01"))
        await trio.sleep_forever()

    async with peer_and_client(binary) as ws:
        with trio.fail_after(BOUND_S), pytest.raises(RemoteProtocolError, match="binary"):
            while True:
                await ws.receive_messages()

    async def masked(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.send_all(b"\x81\x82abcd\x00\x00")  # a masked frame: only clients mask
        await trio.sleep_forever()

    async with peer_and_client(masked) as ws:
        with trio.fail_after(BOUND_S), pytest.raises(RemoteProtocolError, match="websocket protocol"):
            while True:
                await ws.receive_messages()


async def test_the_servers_close_is_answered_and_ends_the_connection() -> None:
    answered = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.send(ev.TextMessage(data="last"), ev.CloseConnection(code=1001, reason="bye"))
        close = await peer.next_event(ev.CloseConnection)
        assert isinstance(close, ev.CloseConnection) and close.code == 1001
        answered.set()

    async with peer_and_client(script) as ws:
        with trio.fail_after(BOUND_S):
            assert await ws.receive_messages() == ["last"]  # what came before the close first
            with pytest.raises(WebsocketClosed) as closed:
                await ws.receive_messages()
            await answered.wait()
        assert (closed.value.code, closed.value.reason) == (1001, "bye")
        assert ws.closed is closed.value
        with pytest.raises(WebsocketClosed):
            await ws.send_text("too late")


async def test_a_dropped_tcp_connection_is_1006() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.aclose()

    async with peer_and_client(script) as ws:
        with trio.fail_after(BOUND_S), pytest.raises(WebsocketClosed) as closed:
            while True:
                await ws.receive_messages()
        assert closed.value.code == 1006


async def test_the_clients_close_waits_for_the_answer() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        close = await peer.next_event(ev.CloseConnection)
        assert isinstance(close, ev.CloseConnection)
        await peer.send(close.response())

    async with peer_and_client(script) as ws, trio.open_nursery() as nursery:

        async def read() -> None:
            with pytest.raises(WebsocketClosed):
                while True:
                    await ws.receive_messages()

        nursery.start_soon(read)
        with trio.fail_after(BOUND_S):
            await ws.aclose(1000, "done")


@pytest.mark.parametrize(("status", "body"), [(403, b"origin not allowed\n"), (503, b"")])
async def test_a_refused_handshake_says_its_status_and_reason(status: int, body: bytes) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        while not any(isinstance(e, ev.Request) for e in await peer.events()):
            pass
        refusal = [ev.RejectConnection(status_code=status, has_body=bool(body))]
        if body:
            refusal.append(ev.RejectData(data=body))
        await peer.send(*refusal)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(BOUND_S), pytest.raises(HandshakeRefused) as refused:
            async with open_client_websocket(
                f"ws://127.0.0.1:{port}",
                ssl_context=None,
                subprotocols=["dspex.v1"],
                headers=[],
                max_message_size=1000,
                close_timeout=1.0,
            ):
                pass
        assert (refused.value.status, refused.value.body) == (status, body.decode().strip())
        assert refused.value.transient is (status == 503)
        nursery.cancel_scope.cancel()
