"""``RayControl`` (a Ray worker's process seen through its node's agent) and the launcher's view of an
agent (``_Agent``: its news routed to the workers' controls), with a fake agent actor, in-process and on
the autojump clock: the exit its agent reports, an agent that is gone (status unknown), an agent that
no longer answers (the worker counts as exited ``KILL_CONFIRM_S`` after a SIGKILL), stderr relayed and
bounded. Real Ray: ``test_ray.py``; the agent itself: ``test_ray_agent.py``."""

from __future__ import annotations

import concurrent.futures
import signal
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from dspex_trio._errors import ExitStatus
from dspex_trio._ray_launcher import KILL_CONFIRM_S, STDERR_CHUNKS, RayControl, _Agent, await_ref


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


def make(pid: int = 4242, *, fail: bool = False) -> tuple[_Agent, RayControl]:
    agent = _Agent(FakeActor(fail=fail), "node-a", ())
    control = RayControl(agent, pid)
    agent.register(control)
    return agent, control


async def test_the_exit_its_agent_reports(autojump_clock: trio.testing.MockClock) -> None:
    agent, control = make()
    assert control.exit_status() is None and control.pid == 4242
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.wait)
        await trio.sleep(1)
        agent._news(4242, "exit", -signal.SIGTERM)
    assert control.exit_status() == ExitStatus(code=None, signal=signal.SIGTERM)
    assert await control.wait() == ExitStatus(code=None, signal=signal.SIGTERM)
    assert 4242 in agent.controls  # its stderr has not ended yet
    agent._news(4242, "eof", None)
    assert not agent.controls


async def test_an_agent_gone_means_its_workers_exited_status_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent, control = make()
    _, other = make(7)
    agent.register(other)
    agent.gone("the agent is gone (ActorDiedError)")
    assert await control.wait() == ExitStatus(code=None, signal=None)
    assert await other.wait() == ExitStatus(code=None, signal=None)
    assert await control.stderr.receive_some() == b""  # its stderr ended too
    late = RayControl(agent, 9)  # registered after the agent was lost: exited at once
    agent.register(late)
    assert late.exited.is_set()


async def test_news_that_beat_the_spawns_answer_is_kept_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = _Agent(FakeActor(), "node-a", ())
    agent._news(5, "stderr", b"early line\n")
    agent._news(5, "exit", 3)
    control = RayControl(agent, 5)
    agent.register(control)
    assert control.exit_status() == ExitStatus(code=3, signal=None)
    assert await control.stderr.receive_some() == b"early line\n"
    assert not agent.early


async def test_an_unanswering_agent_counts_as_exited_after_a_sigkill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent, control = make(7)
    control.signal_group(signal.SIGTERM)
    assert agent.actor.calls == [("signal", 7, signal.SIGTERM)]
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


async def test_a_signal_to_a_gone_agent_is_dropped_not_raised(autojump_clock: trio.testing.MockClock) -> None:
    _, control = make(7, fail=True)
    control.signal_group(signal.SIGKILL)  # logged, and the SIGKILL still bounds the wait
    with trio.fail_after(KILL_CONFIRM_S + 1):
        assert await control.wait() == ExitStatus(code=None, signal=None)


async def test_stderr_is_relayed_in_order_bounded_then_ends(autojump_clock: trio.testing.MockClock) -> None:
    agent, control = make()
    for i in range(STDERR_CHUNKS + 5):  # nobody reads meanwhile: the excess is dropped and counted
        agent._news(4242, "stderr", b"line %d\n" % i)
    agent._news(4242, "eof", None)
    assert control.stderr_dropped == 5
    received = b""
    while chunk := await control.stderr.receive_some(4):  # smaller reads than the chunks: split
        assert len(chunk) <= 4
        received += chunk
    assert received == b"".join(b"line %d\n" % i for i in range(STDERR_CHUNKS))


async def test_closing_releases_the_placement_once_and_kills_a_running_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    released: list[int] = []
    agent = _Agent(FakeActor(), "node-a", ())
    control = RayControl(agent, 11, on_close=lambda: released.append(11))
    agent.register(control)
    await control.aclose()
    await control.aclose()
    assert released == [11]
    assert agent.actor.calls == [("signal", 11, signal.SIGKILL)]
    assert await control.stderr.receive_some() == b""


async def test_await_ref_wakes_on_the_futures_result() -> None:
    ref = FakeRef()
    ref.f.set_result(3)
    assert await await_ref(ref) == 3
    failing = FakeRef()
    failing.f.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await await_ref(failing)


class ScriptedPolls:
    """``actor.poll.remote(timeout)``: each call answers with the next of ``answers`` (an exception is
    raised, as Ray does for a dead actor)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    def remote(self, timeout: float) -> FakeRef:
        ref = FakeRef()
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            ref.f.set_exception(answer)
        else:
            ref.f.set_result(answer)
        return ref


def news(**fields: Any) -> dict[str, Any]:
    return {"exits": {}, "stderr": {}, "eof": [], "dead": None, **fields}


async def test_the_pump_relays_news_until_the_template_dies(autojump_clock: trio.testing.MockClock) -> None:
    actor = FakeActor()
    actor.poll = ScriptedPolls(  # type: ignore[attr-defined]
        [
            news(stderr={5: b"last words\n", 6: b"bye\n"}),
            news(exits={6: 0}, eof=[6]),
            news(dead="exited (-9)"),
        ]
    )
    agent = _Agent(actor, "node-a", ())
    five, six = RayControl(agent, 5), RayControl(agent, 6)
    agent.register(five)
    agent.register(six)
    await agent.pump()
    assert agent.lost is not None and "exited (-9)" in agent.lost
    assert await six.wait() == ExitStatus(code=0, signal=None)  # reported before the end
    assert await five.wait() == ExitStatus(code=None, signal=None)  # lost with its agent
    assert await five.stderr.receive_some() == b"last words\n"
    assert await five.stderr.receive_some() == b""
    assert not agent.controls


async def test_a_poll_that_fails_means_the_agent_is_gone(autojump_clock: trio.testing.MockClock) -> None:
    actor = FakeActor()
    actor.poll = ScriptedPolls([news(), RuntimeError("ActorDiedError")])  # type: ignore[attr-defined]
    agent = _Agent(actor, "node-a", ())
    control = RayControl(agent, 5)
    agent.register(control)
    await agent.pump()
    assert agent.lost == "the agent is gone (RuntimeError)"
    assert await control.wait() == ExitStatus(code=None, signal=None)
