"""``RayControl`` (a Ray worker's process seen through its actor) with a fake actor, in-process and on
the autojump clock: the exit its actor reports, an actor that died (status unknown), and an actor that
no longer answers (the worker counts as exited ``KILL_CONFIRM_S`` after a SIGKILL). Real Ray:
``test_ray.py``."""

from __future__ import annotations

import concurrent.futures
import signal
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from dspex_trio._errors import ExitStatus
from dspex_trio._ray_launcher import KILL_CONFIRM_S, RayControl, await_ref


class FakeRef:
    def __init__(self) -> None:
        self.f: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def future(self) -> concurrent.futures.Future[Any]:
        return self.f


class FakeMethod:
    def __init__(self, log: list[Any], name: str, fail: bool) -> None:
        self.log, self.name, self.fail = log, name, fail

    def remote(self, *args: Any) -> FakeRef:
        if self.fail:
            raise RuntimeError("actor unreachable")
        self.log.append((self.name, *args))
        return FakeRef()


class FakeActor:
    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[Any] = []
        self.signal = FakeMethod(self.calls, "signal", fail)


async def test_the_exit_its_actor_reports(autojump_clock: trio.testing.MockClock) -> None:
    exit_ref = FakeRef()
    control = RayControl(FakeActor(), 4242, exit_ref)
    assert control.exit_status() is None and control.pid == 4242
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.wait)
        await trio.sleep(1)
        exit_ref.f.set_result(-signal.SIGTERM)
    assert control.exit_status() == ExitStatus(code=None, signal=signal.SIGTERM)
    assert await control.wait() == ExitStatus(code=None, signal=signal.SIGTERM)


async def test_an_actor_that_died_means_status_unknown(autojump_clock: trio.testing.MockClock) -> None:
    exit_ref = FakeRef()
    control = RayControl(FakeActor(), 1, exit_ref)
    exit_ref.f.set_exception(RuntimeError("ActorDiedError"))
    assert await control.wait() == ExitStatus(code=None, signal=None)


async def test_an_unanswering_actor_counts_as_exited_after_a_sigkill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actor = FakeActor()
    control = RayControl(actor, 7, FakeRef())  # its exit report never comes
    control.signal_group(signal.SIGTERM)
    assert actor.calls == [("signal", signal.SIGTERM)]
    with trio.move_on_after(60):  # a SIGTERM alone does not end the wait
        await control.wait()
        pytest.fail("wait returned without an exit or a SIGKILL")  # pragma: no cover
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.wait)
        await trio.lowlevel.checkpoint()
        control.signal_group(signal.SIGKILL)
    assert trio.current_time() - start == pytest.approx(KILL_CONFIRM_S)
    assert control.exit_status() == ExitStatus(code=None, signal=None)


async def test_a_signal_to_a_gone_actor_is_dropped_not_raised(autojump_clock: trio.testing.MockClock) -> None:
    control = RayControl(FakeActor(fail=True), 7, FakeRef())
    control.signal_group(signal.SIGKILL)  # logged, and the SIGKILL still bounds the wait
    with trio.fail_after(KILL_CONFIRM_S + 1):
        assert await control.wait() == ExitStatus(code=None, signal=None)
    assert await control.stderr.receive_some() == b""  # a node's workers log on their node


async def test_await_ref_wakes_on_the_futures_result() -> None:
    ref = FakeRef()
    ref.f.set_result(3)
    assert await await_ref(ref) == 3
    failing = FakeRef()
    failing.f.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await await_ref(failing)
