"""The one dispatch loop with real workers, on the pool and on the bridge alike: a stream survives a cache
miss and a worker that never acked it, and a caller's own deadline (``move_on_after``) cancels the work in
the worker as ``timeout=`` does, for ``call``, ``execute`` and ``stream``.

What the worker did is read from the worker itself (its ``stats``: ``cancelled``, ``failed``, ``pending``,
``cached_programs``), not only from what the caller saw. Real processes run in real time: every wait is
bounded, conditions are awaited (``wait_until``), and no test asserts a duration.

The pure decisions (``Attempts.after``, ``place``) and the exact-time retries on fake workers are in
``test_retry.py``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio import CallTimeout, RetryPolicy, WorkerUnresponsive
from tests.helpers import kill_quietly, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="starts real workers")

KINDS = ["pool", "bridge"]
QUESTION = {"question": "What is Trio?"}


@asynccontextmanager
async def open_kind(kind: str, **options: Any) -> AsyncIterator[Any]:
    """A pool of one worker, or the bridge: either way one real worker process."""
    if kind == "pool":
        async with dspex_trio.open_pool(workers=1, **options) as pool:
            yield pool
    else:
        async with dspex_trio.open_backend("bridge", **options) as bridge:
            yield bridge


def the_worker(backend: Any) -> dspex_trio.Worker:
    if isinstance(backend, dspex_trio.Pool):
        (worker,) = backend.workers()
        return worker
    assert backend.worker is not None
    return backend.worker


async def worker_stats(backend: Any) -> dict[str, Any]:
    """The worker's own account (its ``stats`` method)."""
    stats: dict[str, Any] = await the_worker(backend).call("stats")
    return stats


async def stream_all(backend: Any, pid: str, **kwargs: Any) -> list[dict[str, Any]]:
    async with backend.stream(pid, QUESTION, **kwargs) as events:
        return [event async for event in events]


def assert_one_complete_stream(events: list[dict[str, Any]], backend_name: str) -> None:
    chunks = [e for e in events if e["event"] == "chunk"]
    assert chunks and all(set(e) == {"event", "predictor", "field", "chunk"} for e in chunks)
    assert [e["event"] for e in events].count("completed") == 1 and events[-1]["event"] == "completed"
    assert events[-1]["backend"] == backend_name
    assert "".join(c["chunk"] for c in chunks) == events[-1]["outputs"]["answer"]


# -- a stream whose program the worker no longer holds ----------------------------------------------------


@pytest.mark.parametrize("evict", ["reset", "forget"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_whose_program_the_worker_evicted_completes(kind: str, evict: str) -> None:
    with trio.fail_after(60):
        async with open_kind(kind) as backend:
            pid = await backend.create_program("question -> answer", session="s")
            first = await stream_all(backend, pid, session="s")
            assert_one_complete_stream(first, backend.name)
            held = (await worker_stats(backend))["cached_programs"]
            assert pid in repr(held)  # the worker holds it, and the backend knows it does

            worker = the_worker(backend)
            if evict == "reset":
                assert (await worker.call("reset"))["programs_dropped"] >= 1
            else:
                assert (await worker.call("forget", {"program_id": pid}))["forgotten"]
            assert pid not in repr((await worker_stats(backend))["cached_programs"])
            before = await worker_stats(backend)

            again = await stream_all(backend, pid, session="s")  # sent by reference: a cache miss
            assert_one_complete_stream(again, backend.name)
            assert again[-1]["outputs"] == first[-1]["outputs"]  # the offline LM is deterministic

            after = await worker_stats(backend)
            assert after["failed"] == before["failed"] + 1  # the worker did answer "cache miss" once
            assert pid in repr(after["cached_programs"])  # and holds the program again
            assert the_worker(backend) is worker  # the same worker: resent, not re-dispatched
            stats = backend.statistics()
            assert stats.failed == 0 and stats.completed == stats.calls


# -- a stream whose worker never acked it ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_never_acked_is_redispatched_to_a_new_worker(kind: str) -> None:
    options = {"ack_timeout": 0.5, "heartbeat_interval": 60}
    stopped: int | None = None
    with trio.fail_after(60):
        async with open_kind(kind, **options) as backend:
            pid = await backend.create_program("question -> answer")
            try:
                stopped = the_worker(backend).pid
                os.kill(stopped, signal.SIGSTOP)  # it reads nothing: the stream is never acked
                events = await stream_all(backend, pid)
                assert_one_complete_stream(events, backend.name)
                assert the_worker(backend).pid != stopped  # served by the replacement
                stats = backend.statistics()
                assert stats.failed == 0 and stats.completed == stats.calls
                if kind == "pool":
                    assert stats.redispatched == 1 and stats.retried == 0 and stats.backoffs == 1
                else:
                    assert stats.retried == 1  # the bridge counts every re-sent call here
                assert stats.restarts == 1
            finally:
                if stopped is not None:
                    kill_quietly(stopped, signal.SIGCONT)


async def test_the_bridge_stream_follows_its_retry_policy() -> None:
    """With one attempt allowed, the never-acked stream is not sent again: the block sees the loss."""
    stopped: int | None = None
    with trio.fail_after(60):
        async with open_kind(
            "bridge", ack_timeout=0.5, heartbeat_interval=60, retry=RetryPolicy(max_attempts=1)
        ) as bridge:
            pid = await bridge.create_program("question -> answer")
            try:
                stopped = the_worker(bridge).pid
                os.kill(stopped, signal.SIGSTOP)
                with pytest.raises(WorkerUnresponsive) as info:
                    await stream_all(bridge, pid)
                assert info.value.started is False
                stats = bridge.statistics()
                assert stats.retried == 0 and stats.failed == 1
                # the next stream gets a new worker
                assert_one_complete_stream(await stream_all(bridge, pid), "bridge")
            finally:
                if stopped is not None:
                    kill_quietly(stopped, signal.SIGCONT)


# -- the caller's deadline cancels the work in the worker -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_callers_move_on_after_cancels_the_call_in_the_worker(kind: str, dspex_fake_lm: Any) -> None:
    """``call``, ``execute`` and ``stream`` under ``trio.move_on_after(0.5)``: the caller gets plain
    cancellation, and the worker reports each call cancelled (nothing left pending in it); ``timeout=``
    does the same with ``CallTimeout``."""
    with trio.fail_after(60):
        # The worker's counters are the evidence: a stall of this (noisy, 2-core) machine must not get it
        # replaced by the heartbeat or ack detectors (they have tests of their own), so both are generous.
        async with open_kind(kind, diagnostics=True, heartbeat_missed=30, ack_timeout=30) as backend:
            await backend.configure_lm(
                "openai/fake", api_base=dspex_fake_lm.url, api_key="k", num_retries=0, session="s"
            )
            pid = await backend.create_program("question -> answer", session="s")
            assert await backend.execute(pid, QUESTION, session="s")  # the worker's LM client is built
            dspex_fake_lm.configure(latency_s=10.0)  # from now on every LM request takes 10 s

            async def execute() -> None:
                await backend.execute(pid, QUESTION, session="s")

            async def stream() -> None:
                async with backend.stream(pid, QUESTION, session="s") as events:
                    async for event in events:  # "predictor started" comes at once; a chunk never
                        if event["event"] != "status":
                            raise AssertionError("no chunk can come before the LM answers")

            async def call() -> None:
                await backend.call("sleep", {"seconds": 30})

            before = await worker_stats(backend)
            cancelled = before["cancelled"] + before["timed_out"]
            for run in (call, execute, stream):
                with trio.move_on_after(0.5) as scope:
                    await run()
                assert scope.cancelled_caught, run.__name__
                cancelled += 1
                await until_cancelled_in_worker(backend, cancelled)

            for method, params in [("sleep", {"seconds": 30}), ("execute", None)]:
                with pytest.raises(CallTimeout):
                    if params is None:
                        await backend.execute(pid, QUESTION, session="s", timeout=0.5)
                    else:
                        await backend.call(method, params, timeout=0.5)
                cancelled += 1
                await until_cancelled_in_worker(backend, cancelled)
            with pytest.raises(CallTimeout):  # a stream's timeout holds while it waits for events
                await stream_all(backend, pid, session="s", timeout=0.5)
            cancelled += 1
            await until_cancelled_in_worker(backend, cancelled)

            stats = backend.statistics()
            assert stats.failed == 6 and stats.completed == stats.calls - 6


async def until_cancelled_in_worker(backend: Any, count: int) -> None:
    """Wait until the worker stopped ``count`` calls: cancelled by the host, or at the deadline the call
    carried (the caller's deadline reaches the worker, so the two race: either way the work stopped
    there), with nothing left pending in it. A failure shows the worker's last account."""
    seen: dict[str, Any] = {}
    pid = the_worker(backend).pid

    async def cancelled_in_worker() -> bool:
        assert the_worker(backend).pid == pid, "the worker was replaced: its counters started again"
        seen.update(await worker_stats(backend))
        return bool(seen["cancelled"] + seen["timed_out"] == count and seen["pending"] == [])

    await wait_until(cancelled_in_worker, 10, lambda: f"expected {count} stopped calls; the worker: {seen}")
