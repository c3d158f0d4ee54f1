"""``pool.resize(n)`` on fake workers (autojump clock): growing starts new slots, shrinking retires the
newest slots' workers, which finish their calls first; the size shows in statistics and health."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import dspex_trio
from tests.fakes import open_fake_launcher
from tests.helpers import wait_until


def ready(pool: dspex_trio.Pool) -> int:
    return pool.statistics().ready


async def test_grow_then_shrink(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=2, launcher=launcher) as pool:
        assert pool.size == 2 and ready(pool) == 2
        await pool.resize(4)
        assert pool.size == 4 and ready(pool) == 4 and len(launcher.live) == 4
        assert pool.statistics().size == 4 and pool.health().size == 4
        first = {w.worker_id for w in pool.workers()}
        async with trio.open_nursery() as nursery:  # calls land on all four
            for i in range(40):
                nursery.start_soon(pool.call, "echo", {"value": i})
        await pool.resize(1)
        assert pool.size == 1
        await wait_until(lambda: len(pool.workers()) == 1 and len(launcher.live) == 1, 10)
        assert pool.workers()[0].worker_id in first  # the oldest slot stays; nothing was replaced
        assert pool.statistics().restarts == 0
        assert await pool.call("echo", {"value": "still"}) == "still"
        await pool.resize(3)  # new slots, not the removed ones
        assert ready(pool) == 3 and pool.statistics().restarts == 0


async def test_a_removed_worker_finishes_its_calls_first(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=2, launcher=launcher) as pool:
        results: list[float] = []

        async def long_call() -> None:
            results.append(await pool.call("sleep", {"seconds": 5.0}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_call)
            nursery.start_soon(long_call)
            await wait_until(lambda: pool.statistics().in_flight == 2, 1)
            await pool.resize(1)  # one of the busy workers is retired: it drains, it is not killed
            assert pool.size == 1
        assert results == [5.0, 5.0]
        await wait_until(lambda: len(launcher.live) == 1, 10)
        assert pool.statistics().restarts == 0


async def test_bad_sizes_and_a_closed_pool(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_launcher() as launcher:
        async with dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
            for bad in (0, -1, 1.5, True, "2"):
                with pytest.raises(ValueError, match="workers must be an int"):
                    await pool.resize(bad)  # type: ignore[arg-type]
        with pytest.raises(dspex_trio.WorkerClosed):
            await pool.resize(2)
