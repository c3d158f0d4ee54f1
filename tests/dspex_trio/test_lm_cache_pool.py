"""The workers' LM answer cache end to end (``open_pool(lm_cache=...)``): real workers against
``fake-lm`` (real processes, real time). What ``fake-lm`` counts is the proof: a second run of the same
executions sends no request; ``read_only`` and ``off`` per call and per session; hits in ``usage``;
the shared disk cache stays under its cap and holds no API key.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio import LMCache
from dspex_trio.testing import open_fake_lm
from dspex_trio.testing._fake_lm import FakeLM

pytestmark = pytest.mark.real_processes

RUN = 100
"""Executions per run (the issue's figure)."""
API_KEY = "sk-test-cache-key-0123456789"
DISK_CAP = 16 * 1024 * 1024


@pytest.fixture
async def fake() -> AsyncIterator[FakeLM]:
    async with open_fake_lm() as server:
        yield server


def directory_bytes(path: pathlib.Path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def files_holding(path: pathlib.Path, needle: bytes) -> list[str]:
    return [
        os.path.join(root, name)
        for root, _, files in os.walk(path)
        for name in files
        if needle in pathlib.Path(root, name).read_bytes()
    ]


async def run_all(pool: dspex_trio.Pool, pid: str, n: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{}] * n

    async def one(i: int) -> None:
        results[i] = await pool.execute(pid, {"question": f"q{i}"}, with_usage=True, timeout=60)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    return results


async def test_a_second_run_of_100_executions_sends_no_request(fake: FakeLM, tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "lm-cache"
    cache = LMCache(memory_entries=1024, directory=str(directory), disk_bytes=DISK_CAP)
    async with dspex_trio.open_pool(workers=2, lm_cache=cache) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key=API_KEY, num_retries=0)
        pid = await pool.create_program("question -> answer")
        first = await run_all(pool, pid, RUN)
        assert fake.requests == RUN
        assert all(r["usage"]["cache_hits"] == 0 and r["usage"]["total_tokens"] > 0 for r in first)
        second = await run_all(pool, pid, RUN)
        assert fake.requests == RUN  # not one more: every answer came from the cache
        assert [r["outputs"] for r in second] == [r["outputs"] for r in first]
        assert all(r["usage"]["cache_hits"] == 1 for r in second)
        assert pool.lm_usage.cache_hits == RUN  # what /metrics reports as dspex_lm_cache_hits_total
    assert 0 < directory_bytes(directory) <= DISK_CAP
    assert files_holding(directory, API_KEY.encode()) == []


async def test_modes_per_call_and_per_session(fake: FakeLM) -> None:
    async with dspex_trio.open_pool(workers=1, lm_cache=LMCache(memory_entries=64)) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key=API_KEY, num_retries=0)
        pid = await pool.create_program("question -> answer")

        async def ask(question: str, **kw: Any) -> dict[str, Any]:
            return await pool.execute(pid, {"question": question}, with_usage=True, **kw)

        assert (await ask("a", lm_cache="read_only"))["usage"]["cache_hits"] == 0
        assert (await ask("a", lm_cache="read_only"))["usage"]["cache_hits"] == 0  # never stored
        assert fake.requests == 2
        await ask("a")  # read_write (the pool's default) stores it
        assert (await ask("a", lm_cache="read_only"))["usage"]["cache_hits"] == 1
        assert (await ask("a", lm_cache="off"))["usage"]["cache_hits"] == 0
        assert fake.requests == 4
        with pytest.raises(dspex_trio.InvalidParams, match="read_write, read_only, off"):
            await ask("a", lm_cache="always")

        sid = "cache-session"
        pid_s = await pool.create_program("question -> answer", session=sid)
        await pool.set_lm_cache_mode("off", session=sid)
        out = await pool.execute(pid_s, {"question": "a"}, session=sid, with_usage=True)
        assert out["usage"]["cache_hits"] == 0 and fake.requests == 5
        out = await pool.execute(
            pid_s, {"question": "a"}, session=sid, with_usage=True, lm_cache="read_write"
        )
        assert out["usage"]["cache_hits"] == 1 and fake.requests == 5  # the call's mode wins
        await pool.set_lm_cache_mode(None, session=sid)
        out = await pool.execute(pid_s, {"question": "a"}, session=sid, with_usage=True)
        assert out["usage"]["cache_hits"] == 1 and fake.requests == 5


async def test_without_lm_cache_every_request_goes_out(fake: FakeLM) -> None:
    async with dspex_trio.open_pool(workers=1) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key=API_KEY, num_retries=0)
        pid = await pool.create_program("question -> answer")
        for _ in range(3):
            out = await pool.execute(pid, {"question": "same"}, with_usage=True)
            assert "cache_hits" not in out["usage"]
        assert fake.requests == 3


@pytest.mark.parametrize(
    ("async_capacity", "disk"),
    [(0, True), (RUN, True), (RUN, False)],
    ids=["threads", "lane", "lane-memory-only"],
)
async def test_100_identical_concurrent_executions_send_one_request(
    fake: FakeLM, tmp_path: pathlib.Path, async_capacity: int, disk: bool
) -> None:
    """On the threads, and on the asynchronous lane (followers wait on its event loop): pool-wide
    through the shared directory, or per worker without one (then 1 worker, so still 1 request)."""
    if disk:
        cache = LMCache(directory=str(tmp_path / "lm-cache"), disk_bytes=DISK_CAP)
    else:
        cache = LMCache(memory_entries=64)
    workers = 2 if disk else 1
    async with dspex_trio.open_pool(
        workers=workers, lm_cache=cache, async_capacity=async_capacity, max_queue=RUN
    ) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key=API_KEY, num_retries=0)
        pid = await pool.create_program("question -> answer")
        fake.configure(latency_s=0.5)  # the leader's request is in flight while the others arrive
        results: list[dict[str, Any]] = []

        async def one() -> None:
            results.append(await pool.execute(pid, {"question": "the same"}, with_usage=True, timeout=60))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(RUN):
                    nursery.start_soon(one)
        stats = [await worker.call("stats") for worker in pool.workers()]
    assert sum(s["aio_calls"] for s in stats) == (RUN if async_capacity else 0)  # the path asked for
    assert fake.requests == 1
    assert len(results) == RUN and len({r["outputs"]["answer"] for r in results}) == 1
    assert sorted(r["usage"]["cache_hits"] for r in results) == [0] + [1] * (RUN - 1)


async def test_the_asynchronous_lane_reads_and_stores_too(fake: FakeLM) -> None:
    async with dspex_trio.open_pool(workers=1, async_capacity=8, lm_cache=LMCache(memory_entries=64)) as pool:
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key=API_KEY, num_retries=0)
        pid = await pool.create_program("question -> answer")
        first = await pool.execute(pid, {"question": "lane"}, with_usage=True)
        second = await pool.execute(pid, {"question": "lane"}, with_usage=True)
        off = await pool.execute(pid, {"question": "lane"}, with_usage=True, lm_cache="off")
        [stats] = [await worker.call("stats") for worker in pool.workers()]
    assert stats["aio_calls"] == 3  # all three ran on the lane
    assert (first["usage"]["cache_hits"], second["usage"]["cache_hits"], off["usage"]["cache_hits"]) == (
        0,
        1,
        0,
    )
    assert second["outputs"] == first["outputs"]
    assert fake.requests == 2


async def test_a_websocket_client_sets_one_executions_mode(fake: FakeLM) -> None:
    """``execution/submit``'s ``lm_cache`` through the remote client (``dspex_trio.connect``), on real
    workers: the mode holds for that execution alone, streamed or not; another mode is refused."""
    with trio.fail_after(120):
        async with (
            dspex_trio.open_pool(workers=1, lm_cache=LMCache(memory_entries=64)) as pool,
            trio.open_nursery() as nursery,
        ):
            await pool.configure_lm("openai/fake", api_base=fake.url, api_key=API_KEY, num_retries=0)
            server = await nursery.start(partial(dspex_trio.serve_websocket, pool, "127.0.0.1", 0))
            async with dspex_trio.connect(server.url) as remote:
                pid = await remote.create_program("question -> answer")

                async def hits(question: str, **kw: Any) -> int:
                    out = await remote.execute(pid, {"question": question}, with_usage=True, **kw)
                    return int(out["usage"]["cache_hits"])

                assert await hits("w", lm_cache="read_only") == 0  # not stored
                assert await hits("w", lm_cache="off") == 0
                assert fake.requests == 2
                assert await hits("w") == 0  # the session's mode (the pool's: read_write) stores it
                assert await hits("w", lm_cache="read_only") == 1
                assert await hits("w", lm_cache="off") == 0
                assert fake.requests == 4
                async with remote.stream(pid, {"question": "w"}, lm_cache="read_only") as events:
                    last = [event async for event in events][-1]
                assert last["event"] == "completed" and last["usage"]["cache_hits"] == 1
                assert fake.requests == 4
                with pytest.raises(dspex_trio.InvalidParams, match="read_write, read_only, off"):
                    await hits("w", lm_cache="always")
            nursery.cancel_scope.cancel()
