"""``fake-lm``'s close watcher (``dspex_trio.testing._close_watch``): one ``epoll`` set over the
connections whose completions wait for their answer; each client's close (end of stream or reset) is
counted and stamped once, by the watcher; what a waiting client sends is dropped, not taken for a close.
In-process, over loopback sockets."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio

from dspex_trio.testing import _close_watch
from dspex_trio.testing._fake_lm import open_fake_lm
from dspex_trio.testing._http import HttpConnection
from tests.dspex_trio.test_fake_lm import CALL_DEADLINE_S, HttpClient
from tests.dspex_trio.test_fake_lm_observing import send_completion
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not _close_watch.available(), reason="the close watcher needs epoll")


class Closes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(client, server) ends of one loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    try:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    finally:
        await listener.aclose()
    return client, server


@pytest.fixture
async def watcher() -> AsyncIterator[tuple[_close_watch.CloseWatcher, Closes]]:
    closes = Closes()
    watcher = _close_watch.CloseWatcher(closes)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.serve)
        yield watcher, closes
        nursery.cancel_scope.cancel()


async def test_a_close_is_counted_once_and_what_the_client_sends_first_is_dropped(
    watcher: tuple[_close_watch.CloseWatcher, Closes],
) -> None:
    watch_set, closes = watcher
    client, server = await tcp_pair()
    http = HttpConnection(server)
    watch = watch_set.watch(server, http)
    await client.send_all(b"x" * 100)
    await wait_until(lambda: http.bytes_received == 100, CALL_DEADLINE_S, lambda: f"{http.bytes_received=}")
    # Data is not a close: the connection is still watched, nothing counted.
    assert (closes.count, watch.gone.is_set(), watch_set.watching) == (0, False, 1)
    await client.aclose()
    with trio.fail_after(CALL_DEADLINE_S):
        await watch.gone.wait()
    assert (closes.count, watch_set.watching) == (1, 0)
    watch_set.unwatch(watch)  # after the watcher saw the close: nothing to do
    await server.aclose()


async def test_a_reset_is_a_close(watcher: tuple[_close_watch.CloseWatcher, Closes]) -> None:
    watch_set, closes = watcher
    client, server = await tcp_pair()
    watch = watch_set.watch(server, HttpConnection(server))
    # SO_LINGER 0: the close sends a reset, not a FIN.
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()
    with trio.fail_after(CALL_DEADLINE_S):
        await watch.gone.wait()
    assert closes.count == 1
    await server.aclose()


async def test_an_unwatched_connection_is_not_counted(
    watcher: tuple[_close_watch.CloseWatcher, Closes],
) -> None:
    watch_set, closes = watcher
    pairs = [await tcp_pair() for _ in range(2)]
    watches = [watch_set.watch(server, HttpConnection(server)) for _, server in pairs]
    watch_set.unwatch(watches[0])
    assert watch_set.watching == 1
    for client, _ in pairs:  # the unwatched one first
        await client.aclose()
    with trio.fail_after(CALL_DEADLINE_S):
        await watches[1].gone.wait()
    assert closes.count == 1 and not watches[0].gone.is_set()
    for _, server in pairs:
        await server.aclose()


async def test_fake_lm_counts_each_disconnect_once_with_and_without_the_watcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for with_watcher in (True, False):
        monkeypatch.setattr(_close_watch, "available", lambda w=with_watcher: w)
        async with open_fake_lm(latency_s=30.0) as fake:
            assert (fake._close_watcher is not None) is with_watcher
            clients = [await HttpClient.connect(fake) for _ in range(20)]
            for client in clients:
                await send_completion(client)
            await wait_until(lambda: fake.statistics.completions_in_flight == 20, CALL_DEADLINE_S)
            for client in clients:
                await client.aclose()
            await wait_until(
                lambda: fake.statistics.connections_open == 0,
                CALL_DEADLINE_S,
                lambda: f"{fake.statistics}",
            )
            assert fake.statistics.client_disconnects == 20, fake.statistics
            assert len(fake.disconnect_times) == 20
            assert fake.statistics.completions_in_flight == 0
            if fake._close_watcher is not None:
                assert fake._close_watcher.watching == 0
