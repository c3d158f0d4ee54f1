"""Calls on several workers cancelled together (issue 17, 12c): the first cancelled task to unwind
writes every worker's queued ``cancel`` frames, not only its own worker's, so no worker's frames wait
until one of its own callers' tasks comes up in Trio's batch (with 1,000 calls cancelled at once, that
was up to 20 ms after the first write). In-process fake workers on Trio's virtual clock."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

import dspex_trio
from dspex_trio._worker import Worker
from tests.fakes import open_fake_launcher
from tests.helpers import wait_until

CALLS_PER_WORKER = 8
"""Calls cancelled together on each of the two workers."""


async def test_the_first_unwinding_task_writes_every_workers_cancels(
    autojump_clock: trio.testing.MockClock, monkeypatch: Any
) -> None:
    writes: list[tuple[trio.lowlevel.Task, int]] = []
    """(the task that wrote, the worker it wrote to), for each write of a non-empty outbox."""
    write_outbox_nowait = Worker._write_outbox_nowait

    def recording(self: Worker) -> None:
        if self._outbox:
            writes.append((trio.lowlevel.current_task(), self.worker_id))
        write_outbox_nowait(self)

    monkeypatch.setattr(Worker, "_write_outbox_nowait", recording)
    async with (
        open_fake_launcher(capacity=CALLS_PER_WORKER) as launcher,
        dspex_trio.open_worker(launcher=launcher) as first,
        dspex_trio.open_worker(launcher=launcher) as second,
    ):
        workers = [first, second]
        async with trio.open_nursery() as nursery:
            for worker in workers:
                for _ in range(CALLS_PER_WORKER):
                    nursery.start_soon(lambda w=worker: w.call("sleep", {"seconds": 3600}))
            await wait_until(
                lambda: [p.calls.count("sleep") for p in launcher.processes] == [CALLS_PER_WORKER] * 2,
                10,
                lambda: f"calls seen: {[p.calls for p in launcher.processes]}",
            )
            writes.clear()
            nursery.cancel_scope.cancel()
        await wait_until(
            lambda: [p.cancels for p in launcher.processes] == [CALLS_PER_WORKER] * 2,
            10,
            lambda: f"cancels arrived: {[p.cancels for p in launcher.processes]}",
        )
        # One task wrote both workers' frames, before any other task wrote anything.
        assert len(writes) >= 2, writes
        (task_a, worker_a), (task_b, worker_b) = writes[:2]
        assert task_a is task_b, writes
        assert {worker_a, worker_b} == {first.worker_id, second.worker_id}, writes
        assert [w.in_flight for w in workers] == [0, 0]
        assert [await w.call("echo", {"value": i}) for i, w in enumerate(workers)] == [0, 1]
