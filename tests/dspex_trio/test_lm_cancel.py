"""A cancel stops the LM request: the worker closes its HTTP connection, ``fake-lm`` sees the client
go away (as a provider would, and stops generating), and no worker thread stays busy. Real processes,
real time.

The issue's figure is 1,000 executions in flight; on the thread-per-call path a worker runs at most
``capacity`` (64) at once, so this test runs 2 workers x 50 = 100 in flight (the benchmark, family 12,
measures the full size).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator

import pytest
import trio

import dspex_trio
from dspex_trio.testing import open_fake_lm
from dspex_trio.testing._fake_lm import FakeLM
from tests.helpers import wait_until

pytestmark = pytest.mark.real_processes

IN_FLIGHT = 100
"""Executions in flight when they are cancelled (2 workers x 50)."""
P99_LIMIT_S = 0.1
"""Cancel to connection closed, as fake-lm sees it, at p99."""


@pytest.fixture
async def fake() -> AsyncIterator[FakeLM]:
    async with open_fake_lm(latency_s=30.0) as server:
        yield server


async def worker_stats(pool: dspex_trio.Pool) -> list[dict]:
    return [await worker.call("stats") for worker in pool.workers()]


@pytest.mark.parametrize("budgets", [None, []], ids=["plain", "leasing"])
async def test_cancelled_executions_close_their_connections_at_once(
    fake: FakeLM, budgets: list | None
) -> None:
    async with dspex_trio.open_pool(workers=2, lm_budgets=budgets) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        pid = await pool.create_program("question -> answer")
        async with trio.open_nursery() as nursery:
            for i in range(IN_FLIGHT):
                nursery.start_soon(pool.execute, pid, {"question": f"q{i}"})
            await wait_until(
                lambda: fake.statistics.completions_in_flight == IN_FLIGHT,
                30,
                lambda: f"{fake.statistics.completions_in_flight} in flight",
            )
            cancelled_at = time.monotonic()
            nursery.cancel_scope.cancel()
        await wait_until(
            lambda: fake.statistics.client_disconnects == IN_FLIGHT,
            10,
            lambda: f"{fake.statistics.client_disconnects} disconnects",
        )
        delays = sorted(t - cancelled_at for t in fake.disconnect_times)
        p99 = delays[int(0.99 * (len(delays) - 1))]
        assert p99 <= P99_LIMIT_S, (
            f"p99 {p99 * 1000:.0f} ms, median {statistics.median(delays) * 1000:.0f} ms"
        )
        assert fake.statistics.completions_in_flight == 0

        async def no_thread_busy() -> bool:
            return all(not s["executing"] and not s["pending"] for s in await worker_stats(pool))

        await wait_until(no_thread_busy, 5, "worker threads still busy after the cancel")
        assert fake.statistics.completions == IN_FLIGHT  # nothing was sent again


async def test_a_timeout_also_closes_the_connection(fake: FakeLM) -> None:
    async with dspex_trio.open_pool(workers=1) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        pid = await pool.create_program("question -> answer")
        with pytest.raises(dspex_trio.CallTimeout):
            await pool.execute(pid, {"question": "slow"}, timeout=1.0)
        await wait_until(lambda: fake.statistics.client_disconnects == 1, 10)
        assert fake.disconnect_times[0] - fake.arrival_times[0] < 2.0
