"""A cancel stops the LM request: the worker closes its HTTP connection, ``fake-lm`` sees the client
go away (as a provider would, and stops generating), and no worker thread stays busy. Real processes,
real time.

The issue's figure, 1,000 executions in flight, runs on the asynchronous lane
(``WorkerOptions.async_capacity``: no thread per execution). On the thread-per-call path a worker runs
at most ``capacity`` (64) at once, so there the test runs 2 workers x 50 = 100 in flight.

``fake-lm`` runs in a process of its own (``dspex-trio fake-lm``), as a provider would: in this
process it would share the event loop of the pool's host, which is busy cancelling the executions,
and stamp the disconnects late. Its times are ``time.monotonic()``, the same clock as this process's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

import dspex_trio
from tests.helpers import wait_until

pytestmark = pytest.mark.real_processes

THREADED_IN_FLIGHT = 100
"""Executions in flight when they are cancelled on the thread path (2 workers x 50)."""
ASYNC_IN_FLIGHT = 1_000
"""Executions in flight when they are cancelled on the asynchronous lane (the issue's figure)."""
CLOSED_WITHIN_S = 5.0
"""Cancel to connection closed, as fake-lm sees it, for every request: far below fake-lm's 30 s latency, so
a request that ran to its end (the cancel did not close it) fails the test, while a stall of a loaded CI
machine does not. How fast it is (the issue's 100 ms at p99) is measured by benchmark target 12c (family
12, ``12_lm_cancel``), never asserted here: see docs/lm.md and docs/testing.md."""


@attrs.define
class RemoteFakeLM:
    url: str

    def _stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as reply:
            return json.loads(reply.read())  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, Any]:
        return await trio.to_thread.run_sync(self._stats)


@pytest.fixture
async def fake() -> AsyncIterator[RemoteFakeLM]:
    command = [sys.executable, "-m", "dspex_trio", "fake-lm", "--port", "0", "--latency", "30"]
    proc = subprocess.Popen(  # noqa: ASYNC220 - a fixture's start-up, once
        [*command, "--max-connections", str(2 * ASYNC_IN_FLIGHT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        url = await trio.to_thread.run_sync(proc.stdout.readline)
        assert url.startswith("http://127.0.0.1:"), url
        yield RemoteFakeLM(url.strip())
    finally:
        proc.terminate()
        try:
            await trio.to_thread.run_sync(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def worker_stats(pool: dspex_trio.Pool) -> list[dict[str, Any]]:
    return [await worker.call("stats") for worker in pool.workers()]


@pytest.mark.parametrize(
    ("budgets", "async_capacity"),
    [(None, 0), ([], 0), (None, ASYNC_IN_FLIGHT)],
    ids=["threads", "threads-leasing", "async-1000"],
)
async def test_cancelled_executions_close_their_connections_at_once(
    fake: RemoteFakeLM, budgets: list[Any] | None, async_capacity: int
) -> None:
    in_flight = ASYNC_IN_FLIGHT if async_capacity else THREADED_IN_FLIGHT
    async with dspex_trio.open_pool(
        workers=2, lm_budgets=budgets, async_capacity=async_capacity, max_queue=in_flight
    ) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        pid = await pool.create_program("question -> answer")
        seen: dict[str, Any] = {}

        async def all_in_flight() -> bool:
            seen.update(await fake.stats())
            return bool(seen["completions_in_flight"] == in_flight)

        async with trio.open_nursery() as nursery:
            for i in range(in_flight):
                nursery.start_soon(pool.execute, pid, {"question": f"q{i}"})
            await wait_until(all_in_flight, 60, lambda: f"{seen.get('completions_in_flight')} in flight")
            cancelled_at = time.monotonic()
            nursery.cancel_scope.cancel()

        async def all_gone() -> bool:
            seen.update(await fake.stats())
            return bool(seen["client_disconnects"] == in_flight)

        await wait_until(all_gone, 10, lambda: f"{seen.get('client_disconnects')} disconnects")

        async def none_in_flight() -> bool:  # the gauge follows the disconnects it stamped
            seen.update(await fake.stats())
            return bool(seen["completions_in_flight"] == 0)

        await wait_until(none_in_flight, 10, lambda: f"{seen.get('completions_in_flight')} in flight")
        delays = sorted(t - cancelled_at for t in seen["disconnect_times"])
        p99 = delays[int(0.99 * (len(delays) - 1))]
        what = f"first {delays[0] * 1000:.0f} ms, median {statistics.median(delays) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
        assert delays[-1] <= CLOSED_WITHIN_S, what
        print(f"{in_flight} cancelled: {what}")

        async def no_thread_busy() -> bool:
            return all(not s["executing"] and not s["pending"] for s in await worker_stats(pool))

        await wait_until(no_thread_busy, 5, "worker calls still running after the cancel")
        assert seen["completions"] == in_flight  # nothing was sent again
        if async_capacity:  # no thread per execution: the lane's loop, not the pool's threads
            assert all(s["aio_calls"] > 0 and s["threads"] < 40 for s in await worker_stats(pool))


@pytest.mark.parametrize("async_capacity", [0, 64], ids=["threads", "async"])
async def test_a_timeout_also_closes_the_connection(fake: RemoteFakeLM, async_capacity: int) -> None:
    async with dspex_trio.open_pool(workers=1, async_capacity=async_capacity) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        pid = await pool.create_program("question -> answer")
        with pytest.raises(dspex_trio.CallTimeout):
            await pool.execute(pid, {"question": "slow"}, timeout=1.0)

        async def gone() -> bool:
            return bool((await fake.stats())["client_disconnects"] == 1)

        await wait_until(gone, 10)
        stats = await fake.stats()
        # closed at the call's 1 s deadline, not when fake-lm would answer (30 s)
        assert stats["disconnect_times"][0] - stats["arrival_times"][0] < 1.0 + CLOSED_WITHIN_S
