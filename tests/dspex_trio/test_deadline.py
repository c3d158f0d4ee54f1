"""``_deadline.current_effective_deadline`` answers as ``trio.current_effective_deadline()`` does, in every
arrangement of scopes a caller of the pool can be in (it reads Trio's private cancel status chain: these
tests are what notices when a Trio release changes it).

The scopes here are entered to be read, not to time anything out: no ``await`` inside them (ASYNC100).
"""
# ruff: noqa: ASYNC100

from __future__ import annotations

import math

import pytest
import trio

from dspex_trio import _deadline
from dspex_trio._deadline import current_effective_deadline


def _same() -> float:
    mine, trios = current_effective_deadline(), trio.current_effective_deadline()
    assert mine == trios, f"_deadline says {mine}, Trio says {trios}"
    assert _deadline._fast, "the fast path fell back: Trio's private chain is not where _deadline reads it"
    return mine


async def test_no_scope_with_a_deadline_is_inf() -> None:
    assert _same() == math.inf
    with trio.CancelScope():
        assert _same() == math.inf


async def test_the_earliest_deadline_of_nested_scopes(autojump_clock: trio.abc.Clock) -> None:
    now = trio.current_time()
    with trio.move_on_after(5):
        assert _same() == now + 5
        with trio.move_on_after(10):
            assert _same() == now + 5
            with trio.move_on_after(2), trio.CancelScope():
                assert _same() == now + 2
            assert _same() == now + 5


async def test_a_shield_hides_the_outer_deadlines_and_cancellation(autojump_clock: trio.abc.Clock) -> None:
    now = trio.current_time()
    with trio.move_on_after(1) as outer:
        with trio.CancelScope(shield=True) as shielded:
            assert _same() == math.inf
            shielded.deadline = now + 7
            assert _same() == now + 7
            outer.cancel()
            assert _same() == now + 7
            with trio.CancelScope():
                assert _same() == now + 7
        assert _same() == -math.inf


async def test_a_cancelled_scope_is_minus_inf() -> None:
    with trio.CancelScope() as scope, trio.CancelScope():
        scope.cancel()
        assert _same() == -math.inf


async def test_a_deadline_moved_after_entering(autojump_clock: trio.abc.Clock) -> None:
    now = trio.current_time()
    with trio.CancelScope() as scope, trio.CancelScope():
        scope.deadline = now + 3
        assert _same() == now + 3
        scope.deadline = math.inf
        assert _same() == math.inf


async def test_across_nurseries_and_tasks(autojump_clock: trio.abc.Clock) -> None:
    """A task's chain goes through the nursery that started it, and the scopes around that nursery."""
    now = trio.current_time()
    seen: dict[str, tuple[float, float]] = {}

    async def child(name: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        outside = _same()
        with trio.move_on_after(1):
            seen[name] = (outside, _same())
        task_status.started()

    with trio.move_on_after(4):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child, "soon")
            await nursery.start(child, "started")
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as inner:
                    inner.start_soon(child, "shielded")
    assert seen == {
        "soon": (now + 4, now + 1),
        "started": (now + 4, now + 1),
        "shielded": (math.inf, now + 1),
    }


@pytest.mark.parametrize("depth", [0, 1, 8, 40])
async def test_deep_chains(depth: int, autojump_clock: trio.abc.Clock) -> None:
    now = trio.current_time()

    async def nest(n: int) -> None:
        if n == 0:
            assert _same() == now + 9
            return
        with trio.CancelScope(deadline=now + 9 + n):
            await nest(n - 1)

    with trio.move_on_after(9):
        await nest(depth)


def test_it_falls_back_to_trio_when_the_chain_is_not_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Trio without the private attributes: the first call notices, every call answers as Trio does."""

    def broken(task: object) -> float:
        raise AttributeError("_cancel_status")

    monkeypatch.setattr(_deadline, "_walk", broken)
    monkeypatch.setattr(_deadline, "_fast", True)

    async def main() -> None:
        with trio.move_on_after(5):
            assert current_effective_deadline() == trio.current_effective_deadline()
            assert _deadline._fast is False
            assert current_effective_deadline() == trio.current_effective_deadline()

    trio.run(main)
