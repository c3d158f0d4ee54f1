"""The remote client under real faults: a ``dspex-trio serve`` killed and restarted under it, a worker
killed under a remote caller, a remote caller's cancellation reaching the worker, health over the
websocket. Real processes, real time: every wait is bounded.

The servers get an admin token (and the client holds it): the tests point the workers at the fake LM
server on loopback, which only the operator may do (docs/security.md).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio.testing import FakeLM, open_fake_lm
from tests.helpers import kill_quietly, pid_alive, read_until, wait_until

CLI = [sys.executable, "-m", "dspex_trio"]
BOUND_S = 30.0
"""Bound on one wait (a server starting its pool takes ~1-2 s, more on a busy machine)."""


@asynccontextmanager
async def serve_process(tmp_path: Path, token: str, port: int = 0) -> AsyncIterator[tuple[trio.Process, str]]:
    """``dspex-trio serve`` with one worker, the admin token ``token``; its URL. SIGKILLed at the end if
    it still runs."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(token)
    log = tmp_path / f"serve-{port}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        process = await trio.lowlevel.open_process(
            [*CLI, "serve", "--port", str(port), "--workers", "1", "--admin-token-file", str(token_file)],
            stdout=subprocess.PIPE,
            stderr=fd,
        )
    finally:
        os.close(fd)
    try:
        assert process.stdout is not None
        with trio.fail_after(BOUND_S):
            output = await read_until(
                process.stdout,
                lambda data: b"\n" in data,
                lambda: f"serve exited early ({process.returncode}); see {log}",
            )
        url = output.decode().split()[2]
        yield process, url
    finally:
        kill_quietly(process.pid)
        with trio.move_on_after(BOUND_S):
            await process.wait()


async def test_a_server_killed_and_restarted_under_a_client(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(16)
    async with open_fake_lm() as fake, serve_process(tmp_path, token) as (first, url):
        port = urllib.parse.urlsplit(url).port
        async with dspex_trio.connect(
            url, token=token, connect_timeout=BOUND_S, reconnect_timeout=BOUND_S
        ) as remote:
            status = await remote.server_status()
            workers = [w["pid"] for w in status["health"]["workers"]]
            await remote.configure_lm(
                "openai/fake", api_base=fake.url, api_key="k", num_retries=0, session="s1"
            )
            pid = await remote.create_program("question -> answer", session="s1")
            assert await remote.execute(pid, {"question": "q"}, session="s1")
            fake.configure(latency_s=60.0)
            outcome: list[BaseException] = []

            async def in_flight() -> None:
                try:
                    await remote.execute(pid, {"question": "slow"}, session="s1")
                except dspex_trio.ConnectionLost as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await wait_until(lambda: fake.requests >= 2, BOUND_S)  # it reached the LM
                first.send_signal(signal.SIGKILL)
            with trio.fail_after(BOUND_S):
                await first.wait()
            assert len(outcome) == 1 and outcome[0].started  # typed, not a hang
            assert isinstance(outcome[0], dspex_trio.WorkerCrashed)
            # the workers of the killed server exit on their own (stdin closed)
            await wait_until(lambda: not any(pid_alive(p) for p in workers), BOUND_S, "orphaned workers")
            fake.configure(latency_s=0.0)

            async with serve_process(tmp_path, token, port):  # the same port: a restart
                with trio.fail_after(BOUND_S), pytest.raises(dspex_trio.SessionNotFound):
                    await remote.execute(pid, {"question": "q"}, session="s1")  # it lost the session
                again = await remote.create_program("question -> answer", session="s1")
                assert await remote.execute(again, {"question": "q"}, session="s1")
                stats = remote.statistics()
                assert stats.connections == 2 and stats.lost == 1 and stats.protocol_errors == 0


@asynccontextmanager
async def served_pool(**pool_options: Any) -> AsyncIterator[tuple[dspex_trio.Pool, dspex_trio.RemoteBackend]]:
    """A pool served on loopback (admin token) and a remote client of it."""
    token = secrets.token_urlsafe(16)
    async with dspex_trio.open_pool(**pool_options) as pool, trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(dspex_trio.serve_websocket, pool, "127.0.0.1", 0, admin_token=token)
        )
        async with dspex_trio.connect(server.url, token=token) as remote:
            yield pool, remote
        nursery.cancel_scope.cancel()


async def slow_program(remote: dspex_trio.RemoteBackend, fake: FakeLM) -> str:
    await remote.configure_lm("openai/fake", api_base=fake.url, api_key="k", num_retries=0, session="s")
    pid = await remote.create_program("question -> answer", session="s")
    assert await remote.execute(pid, {"question": "warm"}, session="s")
    fake.configure(latency_s=60.0)
    return pid


async def test_a_worker_killed_under_a_remote_caller_is_worker_crashed_and_loses_no_program() -> None:
    async with open_fake_lm() as fake, served_pool(workers=2) as (pool, remote):
        pid = await slow_program(remote, fake)
        outcome: list[BaseException] = []

        async def execute() -> None:
            try:
                await remote.execute(pid, {"question": "slow"}, session="s")
            except dspex_trio.WorkerCrashed as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(execute)
            await wait_until(lambda: fake.requests >= 2, BOUND_S)
            busy = [w for w in pool.statistics().workers if w.in_flight]
            assert len(busy) == 1
            os.kill(busy[0].pid, signal.SIGKILL)
        assert (
            len(outcome) == 1 and type(outcome[0]) is dspex_trio.WorkerCrashed
        )  # the worker's, not the link's
        assert outcome[0].started
        fake.configure(latency_s=0.0)
        assert await remote.execute(pid, {"question": "again"}, session="s")
        assert remote.statistics().connections == 1


async def test_a_remote_callers_cancellation_reaches_the_worker() -> None:
    async with open_fake_lm() as fake, served_pool(workers=1) as (pool, remote):
        pid = await slow_program(remote, fake)
        with trio.move_on_after(BOUND_S) as waited:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(remote.execute, pid, {"question": "slow"}, session="s"))
                await wait_until(lambda: fake.requests >= 2 and pool.statistics().in_flight == 1, BOUND_S)
                nursery.cancel_scope.cancel()  # the caller is cancelled ...
        assert not waited.cancelled_caught
        await wait_until(lambda: pool.statistics().in_flight == 0, BOUND_S)  # ... and so is the worker's call
        fake.configure(latency_s=0.0)
        assert await remote.execute(pid, {"question": "fine"}, session="s")


async def test_health_over_the_websocket_follows_a_worker_replaced() -> None:
    async with served_pool(workers=1) as (pool, remote):
        assert [w.pid for w in remote.health().workers] == [w.pid for w in pool.statistics().workers]
        async with remote.subscribe_health() as events:
            victim = pool.statistics().workers[0].pid
            os.kill(victim, signal.SIGKILL)
            seen: list[tuple[str, str]] = []
            with trio.fail_after(BOUND_S):
                async for event in events:
                    if event.kind == "worker_state":
                        seen.append((event.data["to"], event.data["pid"]))
                        if event.data["to"] == "ready":
                            break
            assert ("failed", victim) in seen and event.backend == "pool"
            assert [w.state for w in remote.health().workers] == ["ready"]
            assert remote.health().workers[0].pid not in (victim,)
        # the pool's answer to ping names the new worker
        assert (await remote.call("ping"))["pid"] == pool.statistics().workers[0].pid
