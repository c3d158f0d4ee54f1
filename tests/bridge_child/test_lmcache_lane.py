"""Coalescing on the asynchronous lane (``WorkerLMCache.coordinate``), in-process on an asyncio loop
as the worker's lane runs it: identical executions started together elect one leader before any of
them reads the cache, followers wait on the loop (a cancel ends the wait), a failed leader hands over
to one follower, ``read_only`` never leads. (Real workers: ``test_lm_cache_pool.py``.)"""

from __future__ import annotations

import asyncio
from typing import Any

from bridge_child import _lmcache
from tests.bridge_child.test_lmcache import FakeCall, request, restore_dspy_cache

__all__ = ["restore_dspy_cache"]  # the fixture, used here by name

WAIT_S = 30.0
"""Failure bound for each run (a hang fails the test instead of holding the suite)."""


async def execution(
    cache: Any, question: str, answer: Any, sent: list[int], i: int, *, store: bool = True
) -> Any:
    """One lane execution: coordinate, read; on a miss send (here: wait a little) and store."""
    with _lmcache.scope(None, FakeCall(), coalesce=True, on_loop=True) as counter:  # type: ignore[arg-type]
        await cache.coordinate(request(question), counter)
        got = cache.get(request(question))
        if got is not None:
            return got, counter.hits
        sent.append(i)
        await asyncio.sleep(0.05)  # the request in flight
        if store:
            cache.put(request(question), answer)
        return None, counter.hits


def test_identical_executions_on_the_loop_send_one_request(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    sent: list[int] = []

    async def main() -> list[Any]:
        return await asyncio.wait_for(
            asyncio.gather(*(execution(cache, "same", {"a": 1}, sent, i) for i in range(20))), WAIT_S
        )

    results = asyncio.run(main())
    assert len(sent) == 1
    assert results.count((None, 0)) == 1 and results.count(({"a": 1}, 1)) == 19
    assert not _lmcache._flights


def test_a_failed_leader_hands_over_to_one_follower(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    sent: list[int] = []

    async def main() -> list[Any]:
        failing = asyncio.create_task(execution(cache, "flaky", None, sent, 0, store=False))
        await asyncio.sleep(0)  # it leads
        others = [execution(cache, "flaky", {"a": 2}, sent, i) for i in range(1, 11)]
        return await asyncio.wait_for(asyncio.gather(failing, *others), WAIT_S)

    results = asyncio.run(main())
    assert sent[0] == 0 and len(sent) == 2  # the failed leader, then exactly one follower
    assert results[1:].count(({"a": 2}, 1)) == 9
    assert not _lmcache._flights


def test_a_cancelled_follower_stops_waiting_at_once(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)

    async def main() -> None:
        with _lmcache.scope(None, FakeCall(), coalesce=True, on_loop=True) as leader:  # type: ignore[arg-type]
            await cache.coordinate(request("slow"), leader)
            assert leader.led  # it leads (and never answers here)

            async def follow() -> None:
                with _lmcache.scope(None, FakeCall(), coalesce=True, on_loop=True) as counter:  # type: ignore[arg-type]
                    await cache.coordinate(request("slow"), counter)

            follower = asyncio.create_task(follow())
            await asyncio.sleep(0.2)  # it waits for the leader
            assert not follower.done()
            follower.cancel()
            try:
                await asyncio.wait_for(follower, 1.0)  # the cancel ends the wait within 1 s
            except asyncio.CancelledError:
                pass
            assert follower.cancelled()

    asyncio.run(main())
    assert not _lmcache._flights  # the leader's claim went with its execution


def test_read_only_and_off_never_lead(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)

    async def main() -> None:
        for mode in ("read_only", "off"):
            with _lmcache.scope(mode, FakeCall(), coalesce=True, on_loop=True) as counter:  # type: ignore[arg-type]
                await asyncio.wait_for(cache.coordinate(request("ro"), counter), 1.0)
                assert not counter.led and not _lmcache._flights

    asyncio.run(main())
