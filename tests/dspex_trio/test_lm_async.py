"""The worker's asynchronous lane (``WorkerOptions.async_capacity``): executions with a network LM run
through DSPy's async API on an event loop of the worker's own, hundreds at once per worker without a
thread each. Real processes against ``fake-lm``, real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio.testing import open_fake_lm
from dspex_trio.testing._fake_lm import FakeLM

pytestmark = pytest.mark.real_processes

IN_FLIGHT = 400
"""Executions at once on 2 workers (200 each, with 64 threads each)."""


@pytest.fixture
async def fake() -> AsyncIterator[FakeLM]:
    async with open_fake_lm(latency_s=1.0, max_connections=2 * IN_FLIGHT) as server:
        yield server


async def worker_stats(pool: dspex_trio.Pool) -> list[dict[str, Any]]:
    return [await worker.call("stats") for worker in pool.workers()]


async def test_hundreds_of_lm_calls_in_flight_without_a_thread_each(fake: FakeLM) -> None:
    async with dspex_trio.open_pool(workers=2, async_capacity=IN_FLIGHT, max_queue=IN_FLIGHT) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        pid = await pool.create_program("question -> answer, confidence: float", module="chain_of_thought")
        results: dict[int, dict[str, Any]] = {}

        async def one(i: int) -> None:
            results[i] = await pool.execute(pid, {"question": f"q{i}"}, with_usage=True)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(IN_FLIGHT):
                    nursery.start_soon(one, i)
        stats = await worker_stats(pool)
    assert fake.statistics.max_completions_in_flight == IN_FLIGHT  # all waited on the LM at once
    assert len(results) == IN_FLIGHT
    for i, result in results.items():
        outputs = result["outputs"]
        assert str(i) in outputs["answer"] or outputs["answer"]
        assert isinstance(outputs["reasoning"], str) and isinstance(outputs["confidence"], float)
        assert result["usage"]["total_tokens"] > 0
    assert sum(s["aio_calls"] for s in stats) == IN_FLIGHT
    assert all(s["threads"] < 40 for s in stats)  # not a thread per execution


async def test_an_lm_error_on_the_lane_is_a_program_error(fake: FakeLM) -> None:
    async with dspex_trio.open_pool(workers=1, async_capacity=8) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        pid = await pool.create_program("question -> answer")
        fake.configure(fail_status=429, fail_count=1, latency_s=0.0)
        with pytest.raises(dspex_trio.ProgramError) as caught:
            await pool.execute(pid, {"question": "x"})
        assert caught.value.error_type == "LMRateLimitError"
        assert "test-key" not in str(caught.value)
        assert (await pool.execute(pid, {"question": "y"}))["answer"]
        [stats] = await worker_stats(pool)
        assert stats["aio_calls"] == 2


async def test_the_offline_lm_and_streams_keep_their_paths(fake: FakeLM) -> None:
    async with dspex_trio.open_pool(workers=1, async_capacity=8) as pool:
        pid = await pool.create_program("question -> answer")
        assert (await pool.execute(pid, {"question": "offline"}))["answer"]
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        fake.configure(latency_s=0.0)
        async with pool.stream(pid, {"question": "streamed"}) as events:
            seen = [event async for event in events]
        assert seen[-1]["event"] == "completed"
        [stats] = await worker_stats(pool)
        assert stats["aio_calls"] == 0 and stats["lane_calls"] == 1


async def test_the_lane_leases_from_the_pools_budget(fake: FakeLM) -> None:
    # With budgets the lane's requests wait for the host's lease on the event loop (no thread each):
    # at most 5 in flight at once, pool-wide, and a 429's pause holds for everyone.
    budget = dspex_trio.LMBudget(model="openai/fake", api_base=fake.url, max_concurrent=5)
    async with dspex_trio.open_pool(workers=2, async_capacity=64, lm_budgets=[budget]) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
        pid = await pool.create_program("question -> answer")
        fake.configure(latency_s=0.2)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(pool.execute, pid, {"question": f"q{i}"})
        stats = await worker_stats(pool)
        [lm] = pool.statistics().lm
    assert fake.statistics.max_completions_in_flight == 5
    assert lm.granted == 40 and lm.max_in_flight == 5 and lm.throttled > 0 and lm.in_flight == 0
    assert sum(s["aio_calls"] for s in stats) == 40
    assert sum(s["leases"]["leases"] for s in stats) == 40
    assert all(s["threads"] < 40 for s in stats)
