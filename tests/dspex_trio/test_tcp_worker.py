"""Workers over TCP (``_tcp_worker``, ``bridge_child.tcp``) with real processes on loopback: calls, a
worker killed mid-call, a wrong secret, an unknown token, a peer that says nothing.

Real processes mean real time: waits are ``wait_until`` polls or ``trio.fail_after`` bounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections import Counter

import pytest
import trio

import dspex_trio
from bridge_child import tcp
from dspex_trio._errors import WorkerCrashed
from dspex_trio._states import WorkerState
from dspex_trio._tcp_worker import TcpLauncher, TcpWorker, WorkerListener, new_secret, open_worker_listener
from dspex_trio._worker import open_worker
from tests.helpers import pid_alive, wait_until


async def _raw_handshake(listener: WorkerListener, secret: bytes, token: str) -> bytes:
    """Connect like a worker with ``secret`` and ``token``; what the host answered (b"" = closed)."""
    stream = await trio.open_tcp_stream(*listener.address)
    async with stream:
        data = b""
        while len(data) < tcp.CHALLENGE_BYTES:
            chunk = await stream.receive_some(tcp.CHALLENGE_BYTES - len(data))
            assert chunk
            data += chunk
        nonce = tcp.parse_challenge(data)
        await stream.send_all(tcp.auth_message(secret, nonce, {"token": token, "pid": 1, "node": "n"}))
        try:
            return await stream.receive_some(1)
        except trio.BrokenResourceError:
            return b""


async def test_calls_over_tcp_and_the_worker_says_where_it_runs() -> None:
    with trio.fail_after(30):
        async with open_worker_listener() as listener:
            async with open_worker(diagnostics=True, launcher=TcpLauncher(listener)) as worker:
                assert isinstance(worker.process, TcpWorker)
                assert worker.process.node  # its hostname, claimed under the secret
                assert await worker.call("echo", {"value": [1, "two"]}) == [1, "two"]
                async with trio.open_nursery() as nursery:  # many calls in flight on one socket
                    for i in range(50):
                        nursery.start_soon(worker.call, "echo", {"value": i})
                pid = worker.pid
                assert pid_alive(pid)
            assert not pid_alive(pid)  # the teardown ladder reached it (shutdown frame)
            assert listener.refused == 0


async def test_the_lifeline_ends_a_worker_whose_starter_is_gone() -> None:
    with trio.fail_after(30):
        async with (
            open_worker_listener() as listener,
            open_worker(diagnostics=True, launcher=TcpLauncher(listener)) as worker,
        ):
            assert isinstance(worker.process, TcpWorker)
            pid = worker.pid
            with trio.CancelScope(shield=True):  # close its stdin (the lifeline) only
                await worker.process.control.stdin.aclose()  # type: ignore[attr-defined]
            await wait_until(lambda: not pid_alive(pid), 5)


async def test_a_tcp_worker_killed_mid_call_fails_typed_or_is_redispatched() -> None:
    results: dict[str, Counter[str]] = {"idem": Counter(), "non": Counter()}
    other: list[BaseException] = []

    async def call(idempotent: bool) -> None:
        kind = "idem" if idempotent else "non"
        try:
            assert await pool.call("sleep", {"seconds": 1.0}, idempotent=idempotent) == 1.0
        except WorkerCrashed as exc:
            assert exc.started is True
            results[kind]["crashed"] += 1
            return
        except BaseException as exc:  # pragma: no cover - reported below
            other.append(exc)
            return
        results[kind]["ok"] += 1

    with trio.fail_after(60):
        async with open_worker_listener() as listener:
            launcher = TcpLauncher(listener)
            async with (
                dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool,
                pool.subscribe_health() as health,
            ):
                async with trio.open_nursery() as nursery:
                    for n, idem in enumerate((True, True, False, False), 1):
                        nursery.start_soon(call, idem)
                        await wait_until(lambda n=n: pool.statistics().in_flight == n, 5)
                    victim = pool.statistics().workers[0]
                    assert victim.in_flight == 2
                    os.kill(victim.pid, signal.SIGKILL)
                stats = pool.statistics()
                assert not other, other
                assert results["idem"] == Counter(ok=2), results
                assert results["non"]["crashed"] == 1 and results["non"]["ok"] == 1, results
                await wait_until(
                    lambda: len([w for w in pool.statistics().workers if w.state is WorkerState.READY]) == 2,
                    20,
                )
                assert stats.retried >= 1
                assert victim.pid not in {w.pid for w in pool.statistics().workers}
                assert await pool.call("echo", {"value": "after"}) == "after"
                events = []
                with contextlib.suppress(trio.WouldBlock):
                    while True:
                        events.append(health.receive_nowait())
                failed = [e for e in events if e.kind == "worker_state" and e.data["to"] == "failed"]
                assert [e.data["pid"] for e in failed] == [victim.pid], events
                assert failed[0].data["node"] == socket.gethostname() == victim.node  # where it ran
                health = pool.health()
                assert {w.node for w in health.workers} == {socket.gethostname()}
                assert all(w["node"] == socket.gethostname() for w in health.to_json()["workers"])


async def test_a_wrong_secret_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dspex_trio.tcp")
    with trio.fail_after(10):
        async with open_worker_listener() as listener:
            receive = listener.expect("tok")
            assert await _raw_handshake(listener, new_secret(), "tok") == b""
            assert listener.refused == 1
            assert "wrong secret" in caplog.text
            # the launch expecting that token is still waiting: the right secret still gets in
            assert await _raw_handshake(listener, listener.secret, "tok") == tcp.ACCEPT
            stream, claims = receive.receive_nowait()
            assert claims == {"token": "tok", "pid": 1, "node": "n"}
            await stream.aclose()


async def test_an_unknown_token_and_a_second_connection_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dspex_trio.tcp")
    with trio.fail_after(10):
        async with open_worker_listener() as listener:
            assert await _raw_handshake(listener, listener.secret, "nobody") == b""
            receive = listener.expect("once")
            assert await _raw_handshake(listener, listener.secret, "once") == tcp.ACCEPT
            assert await _raw_handshake(listener, listener.secret, "once") == b""  # a token is used once
            assert listener.refused == 2
            assert caplog.text.count("unknown or already connected token") == 2
            (await receive.receive())[0].socket.close()


async def test_a_silent_peer_is_closed_after_the_handshake_timeout() -> None:
    with trio.fail_after(10):
        async with open_worker_listener(handshake_timeout=0.5) as listener:
            stream = await trio.open_tcp_stream(*listener.address)
            async with stream:
                start = trio.current_time()
                received = b""
                while True:  # the challenge, then EOF: it waits no longer than its bound
                    chunk = await stream.receive_some(1024)
                    if not chunk:
                        break
                    received += chunk
                assert received.startswith(tcp.MAGIC)
                assert 0.4 <= trio.current_time() - start < 5
            assert listener.refused == 1


async def test_a_worker_with_the_wrong_secret_cannot_start() -> None:
    with trio.fail_after(30):
        async with open_worker_listener() as listener, open_worker_listener() as other:
            # a launcher that hands its workers another pool's secret: they are refused and exit
            launcher = TcpLauncher(listener)
            launcher.listener = attrs_evolve_secret(listener, other.secret)
            with pytest.raises(dspex_trio.WorkerStartFailed, match="exited before connecting"):
                async with open_worker(launcher=launcher):
                    pass  # pragma: no cover
            assert listener.refused == 1


def attrs_evolve_secret(listener: WorkerListener, secret: bytes) -> WorkerListener:
    """A view of ``listener`` that hands out ``secret`` (the real listener still checks its own)."""

    class Lying:
        address = listener.address
        connect_to = listener.connect_to
        expect = listener.expect
        forget = listener.forget
        accept_worker = listener.accept_worker

    lying = Lying()
    lying.secret = secret  # type: ignore[attr-defined]
    return lying  # type: ignore[return-value]
