"""Many calls cancelled at once (issue 17: 1,000 LM executions cancelled together): their ``cancel``
frames are queued by the cancel scope's abort hook, inside ``CancelScope.cancel()``, before any of
the cancelled tasks runs, and leave in one write per worker, not one write per task as it unwinds.
In-process fake workers on Trio's virtual clock (the real-process figures: family 12 of the
benchmarks, ``12_lm_cancel``, and ``test_lm_cancel.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import dspex_trio
from bridge_child import wire
from tests.fakes import open_fake_launcher
from tests.helpers import wait_until

CALLS = 16
"""Calls cancelled together."""


def cancel_ids(data: bytes) -> list[int]:
    return [m.id for m in wire.decode_frames_untrusted(data, wire.Role.CHILD) if isinstance(m, wire.Cancel)]


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["no-deadline", "deadline"])
async def test_calls_cancelled_together_send_their_cancels_in_one_write(
    autojump_clock: trio.testing.MockClock, timeout: float | None
) -> None:
    async with (
        open_fake_launcher(capacity=CALLS) as launcher,
        dspex_trio.open_worker(launcher=launcher) as worker,
    ):
        fake = launcher.processes[0]
        writes: list[bytes] = []
        send_all = fake.stdin.send_all

        async def recording_send_all(data: Any) -> None:
            writes.append(bytes(data))
            await send_all(data)

        fake.stdin.send_all = recording_send_all  # type: ignore[method-assign]
        queued: list[int] = []
        async with trio.open_nursery() as nursery:
            for _ in range(CALLS):
                nursery.start_soon(lambda: worker.call("sleep", {"seconds": 3600}, timeout=timeout))
            await wait_until(lambda: fake.calls.count("sleep") == CALLS, 10)
            writes.clear()
            nursery.cancel_scope.cancel()
            queued = cancel_ids(b"".join(worker._outbox))  # before any cancelled task ran
        await wait_until(lambda: fake.cancels == CALLS, 10, lambda: f"{fake.cancels} cancels arrived")
        assert len(queued) == CALLS, queued
        assert [cancel_ids(w) for w in writes if cancel_ids(w)] == [queued]  # one write, all of them
        assert worker.in_flight == 0
        assert await worker.call("echo", {"value": 1}) == 1  # the worker serves on


async def test_a_caller_deadline_racing_the_answer_sends_at_most_one_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The caller's deadline and the worker's answer fall on the same virtual instant: the caller sees
    its cancellation, at most one ``cancel`` frame is sent (by the abort hook, not again by the
    unwinding task), and the worker serves on."""
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_worker(launcher=launcher) as worker,
    ):
        fake = launcher.processes[0]
        with trio.move_on_after(1.0) as scope:
            await worker.call("sleep", {"seconds": 1.0})
        assert scope.cancelled_caught
        await trio.sleep(1.0)
        assert fake.cancels <= 1
        assert worker.in_flight == 0
        assert await worker.call("echo", {"value": 2}) == 2
