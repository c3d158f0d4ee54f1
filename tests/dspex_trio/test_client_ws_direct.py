"""The remote client's direct socket I/O on a plain TCP connection (``_client_ws``): a frame the socket
takes whole is written at once (no flush); one it takes only in part is finished by the
flush, and frames queued meanwhile follow it in order, intact; reads wait on the descriptor and see every
message, also many in one read; a closed block leaves nothing reading or writing the old descriptor;
TLS-less only (a TLS stream has no descriptor to use). In-process, bounded waits."""

from __future__ import annotations

import pytest
import trio
import wsproto.events as ev
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from dspex_trio._client_ws import WebsocketClosed
from tests.dspex_trio.test_client_ws import BOUND_S, Peer, peer_and_client

BIG = 8 * 1024 * 1024
"""Characters of a message larger than any loopback socket's buffers (the socket takes part of it)."""


class FrameReader:
    """The server side's frame parser (the raw bytes the client wrote, after the handshake)."""

    def __init__(self) -> None:
        self.protocol = Protocol(Side.SERVER, state=State.OPEN, max_size=None)

    def texts(self, data: bytes) -> list[str]:
        self.protocol.receive_data(data)
        events = self.protocol.events_received()
        assert self.protocol.parser_exc is None, self.protocol.parser_exc
        return [bytes(e.data).decode() for e in events if isinstance(e, Frame) and e.opcode is Opcode.TEXT]


async def test_a_frame_the_socket_takes_whole_is_written_at_once() -> None:
    got: list[str] = []
    done = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.accept()
        reader = FrameReader()
        while len(got) < 3:
            got.extend(reader.texts(await peer.stream.receive_some(65536)))
        done.set()

    async with peer_and_client(script) as ws:
        assert ws._fd is not None, "a plain TCP connection on POSIX uses its socket directly"
        assert [ws.send_text_nowait(f"m{i}") for i in range(3)] == [True, True, True]
        with trio.fail_after(BOUND_S):  # no flush: the frames are on the wire already
            await done.wait()
    assert got == ["m0", "m1", "m2"]


async def test_a_frame_taken_in_part_is_finished_by_the_flush_and_the_next_ones_follow_in_order() -> None:
    got: list[str] = []
    reading = trio.Event()
    done = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.accept()
        await reading.wait()  # the client's writes fill the socket first
        reader = FrameReader()
        while len(got) < 3:
            got.extend(reader.texts(await peer.stream.receive_some(1 << 20)))
        done.set()

    big = "x" * BIG
    async with peer_and_client(script, max_message_size=2 * BIG) as ws:
        assert ws.send_text_nowait(big) is False, "the socket took the whole 8 MiB frame at once"
        assert ws._unsent, "nothing of the frame is left to write"
        # queued behind the rest of the big frame, never before it
        assert ws.send_text_nowait("after-1") is False
        assert ws.send_text_nowait("after-2") is False
        reading.set()
        with trio.fail_after(BOUND_S):
            await ws.flush()
            await done.wait()
        assert not ws._unsent
    assert [len(t) for t in got] == [BIG, len("after-1"), len("after-2")]
    assert got[0] == big and got[1:] == ["after-1", "after-2"]


async def test_many_messages_in_one_read_are_all_delivered() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.send_all(b"".join(peer.ws.send(ev) for ev in _texts(50)))
        await trio.sleep_forever()

    async with peer_and_client(script) as ws:
        seen: list[str] = []
        with trio.fail_after(BOUND_S):
            while len(seen) < 50:
                seen += await ws.receive_messages()
    assert seen == [f"event {i}" for i in range(50)]


async def test_after_the_block_nothing_uses_the_old_descriptor() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        await trio.sleep_forever()

    async with peer_and_client(script) as ws:
        assert ws._fd is not None
    assert ws._fd is None
    with trio.fail_after(BOUND_S), pytest.raises(WebsocketClosed):
        await ws.send_text("late")  # through the closed stream, not the old descriptor's number


def _texts(n: int) -> list[ev.Event]:
    return [ev.TextMessage(data=f"event {i}") for i in range(n)]
