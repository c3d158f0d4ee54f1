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
        # the worker's counters are the evidence: it must not be replaced by a machine stall
        async with open_kind(kind, heartbeat_missed=30, ack_timeout=30) as backend:
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


# The stopped worker is found by the ack timeout; its replacement must ack within the same limit, so
# the limit is not tight: at 0.5 s a loaded machine could leave the fresh replacement unscheduled that
# long, and it would be replaced too (two re-dispatches and two restarts where the test counts one).
ACK_TIMEOUT_S = 2.0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_never_acked_is_redispatched_to_a_new_worker(kind: str) -> None:
    options = {"ack_timeout": ACK_TIMEOUT_S, "heartbeat_interval": 60}
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
            "bridge", ack_timeout=ACK_TIMEOUT_S, heartbeat_interval=60, retry=RetryPolicy(max_attempts=1)
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
    cancellation, and the worker reports each call it received stopped (nothing left pending in it);
    ``timeout=`` does the same with ``CallTimeout``. The backend counts each call once, failed."""
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

            account = await WorkerAccount.open(backend)
            for run in (call, execute, stream):
                with trio.move_on_after(0.5) as scope:
                    await run()
                assert scope.cancelled_caught, run.__name__
                # ``call`` and ``execute`` send their call before their first checkpoint, so it always
                # reaches the worker; a stream checkpoints first, and sends nothing if the caller's
                # deadline passed already (a stall of the host: seen in CI).
                await account.until_all_stopped(sent_for_sure=run is not stream)

            for method, params in [("sleep", {"seconds": 30}), ("execute", None)]:
                with pytest.raises(CallTimeout):
                    if params is None:
                        await backend.execute(pid, QUESTION, session="s", timeout=0.5)
                    else:
                        await backend.call(method, params, timeout=0.5)
                await account.until_all_stopped()
            with pytest.raises(CallTimeout):  # a stream's timeout holds while it waits for events
                await stream_all(backend, pid, session="s", timeout=0.5)
            await account.until_all_stopped()

            stats = backend.statistics()
            assert stats.failed == 6 and stats.completed == stats.calls - 6


class WorkerAccount:
    """The worker's own account of the calls sent to it since :meth:`open`: each call it received (its
    ``calls`` counter, less this account's own ``stats`` calls) was stopped there, cancelled by the host
    or at the deadline the call carried (the caller's deadline reaches the worker, so the two race:
    either way the work stopped there), with nothing left pending in it.

    A call the host never sent (the caller's deadline passed before it could be, on a stalled host) has
    no work in the worker to stop; the account counts what the worker received, not what the test hoped
    to send. Frames reach the worker in the order they were sent, so a ``stats`` call sees every call
    and cancel sent before it."""

    def __init__(self, backend: Any, pid: int, first: dict[str, Any]) -> None:
        self.backend = backend
        self.pid = pid
        self.calls = first["calls"]
        """The worker's ``calls`` counter at the last ``stats`` call (that call included)."""
        self.received = 0
        """Calls the worker received since the account opened, its own ``stats`` calls left out."""
        self.stopped_before = first["cancelled"] + first["timed_out"]
        self.seen = first

    @classmethod
    async def open(cls, backend: Any) -> WorkerAccount:
        return cls(backend, the_worker(backend).pid, await worker_stats(backend))

    async def _read(self) -> dict[str, Any]:
        assert the_worker(self.backend).pid == self.pid, "the worker was replaced: its counters started again"
        stats = await worker_stats(self.backend)
        self.received += stats["calls"] - self.calls - 1  # less this stats call itself
        self.calls = stats["calls"]
        self.seen = stats
        return stats

    async def until_all_stopped(self, *, sent_for_sure: bool = False) -> None:
        """Wait until every call the worker received since the last wait was stopped there (one at most:
        the call the test made; exactly one if ``sent_for_sure``). A failure shows the worker's account."""
        received_before = self.received
        await self._read()
        new = self.received - received_before
        assert new == 1 if sent_for_sure else new in (0, 1), f"{new} new calls in the worker: {self.seen}"

        async def stopped_in_worker() -> bool:
            stats = await self._read()
            stopped = stats["cancelled"] + stats["timed_out"] - self.stopped_before
            return bool(stopped == self.received and stats["pending"] == [])

        await wait_until(
            stopped_in_worker,
            10,
            lambda: f"expected {self.received} stopped calls since the start; the worker: {self.seen}",
        )


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_whose_caller_is_already_cancelled_sends_nothing_and_counts_once(kind: str) -> None:
    """The stream's first checkpoint comes before anything is sent: a caller whose deadline passed
    already (as on a stalled host) sends nothing to the worker, and the backend still counts the call
    once, failed (cancelled): ``calls == completed + failed``."""
    with trio.fail_after(60):
        async with open_kind(kind, diagnostics=True) as backend:
            pid = await backend.create_program("question -> answer", session="s")
            account = await WorkerAccount.open(backend)
            before = backend.statistics()
            with trio.CancelScope() as scope:
                scope.cancel()
                async with backend.stream(pid, QUESTION, session="s"):
                    raise AssertionError("a cancelled caller cannot enter the stream")
            assert scope.cancelled_caught
            await account.until_all_stopped()
            assert account.received == 0, account.seen
            stats = backend.statistics()
            assert (stats.calls, stats.failed, stats.completed) == (
                before.calls + 1,
                before.failed + 1,
                before.completed,
            ), stats
