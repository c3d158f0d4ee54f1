"""Health: the worker state machine (its table, input by input, and a worker's life through it on fake
workers), heartbeats (exact virtual times on fake workers, and a real SIGSTOPped worker), health events
and snapshots, and a subscriber that never reads.

Fake workers (``tests/fakes.py``) run under ``autojump_clock``: times are asserted exactly. Real
processes run in real time, awaited with bounded polls.
"""

from __future__ import annotations

import os
import signal
import sys
import types
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

import dspex_trio
from dspex_trio import CircuitState, HealthEvent, WorkerState, WorkerUnresponsive
from dspex_trio._launcher import WorkerSpec
from dspex_trio._states import (
    ACCEPTING,
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    WorkerInput,
    next_state,
)
from dspex_trio._worker import TransitionCallback
from tests.fakes import open_fake_launcher
from tests.helpers import kill_quietly, pid_alive, wait_until
from tests.tables import CASE_NAMES, every_state_and_input, path_to

# -- the state machine table ---------------------------------------------------------------------------

STATE_CHANGES = {(old, new) for (old, _), new in TRANSITIONS.items()}
"""The (from, to) pairs a published ``worker_state`` event may show."""


def idle_worker(on_transition: TransitionCallback) -> dspex_trio.Worker:
    """A worker handle with no process behind it: only its state machine is used."""
    process: Any = types.SimpleNamespace(pid=0, stdin=None)
    return dspex_trio.Worker._create("w0", process, dspex_trio.WorkerOptions(), on_transition=on_transition)


@pytest.mark.parametrize(CASE_NAMES, every_state_and_input(TRANSITIONS, WorkerState, WorkerInput))
def test_every_state_and_input_through_the_worker(
    state: WorkerState, event: WorkerInput, expected: WorkerState | None
) -> None:
    published: list[tuple[WorkerState, WorkerState, str]] = []
    worker = idle_worker(lambda _, old, new, reason: published.append((old, new, reason)))
    for step in path_to(TRANSITIONS, WorkerState.STARTING, state):
        worker._change(step)
    assert worker.state is state
    published.clear()
    if expected is None:
        with pytest.raises(InvalidTransition, match=f"{event} is not allowed in state {state}"):
            worker._change(event, "why")
        assert worker.state is state and published == []
    else:
        worker._change(event, "why")
        assert worker.state is expected and published == [(state, expected, "why")]
    assert worker.accepting is (worker.state in ACCEPTING)


def test_a_change_is_published_with_the_inputs_name_by_default_and_only_change_changes() -> None:
    published: list[tuple[WorkerState, WorkerState, str]] = []
    worker = idle_worker(lambda _, old, new, reason: published.append((old, new, reason)))
    worker._change(WorkerInput.HELLO)
    worker._change(WorkerInput.AT_CAPACITY)
    assert published == [
        (WorkerState.STARTING, WorkerState.READY, "hello received"),
        (WorkerState.READY, WorkerState.BUSY, "at capacity"),
    ]
    with pytest.raises(AttributeError):
        worker.state = WorkerState.READY  # type: ignore[misc]
    assert worker.state is WorkerState.BUSY


def test_the_table_has_the_designed_shape() -> None:
    assert not any(old in TERMINAL for old, _ in TRANSITIONS)  # terminal means terminal
    assert not any(old == new for (old, _), new in TRANSITIONS.items())  # every entry is a change
    # every live state can fail (a detector, a death) and be closed, so every state reaches a terminal one
    for state in set(WorkerState) - TERMINAL:
        assert TRANSITIONS[state, WorkerInput.LOST] is WorkerState.FAILED
        assert TRANSITIONS[state, WorkerInput.DIED] is WorkerState.FAILED
        if state is not WorkerState.DRAINING:
            assert TRANSITIONS[state, WorkerInput.CLOSE] is WorkerState.DRAINING
    # a clean exit stops only a worker that was asked to close; unasked, it is a failure
    assert {old for (old, _), new in TRANSITIONS.items() if new is WorkerState.STOPPED} == {
        WorkerState.DRAINING
    }
    assert {new for (_, event), new in TRANSITIONS.items() if event is WorkerInput.EXITED_CLEAN} == TERMINAL
    assert {new for _, new in TRANSITIONS.items()} == set(WorkerState) - {WorkerState.STARTING}
    assert {event for _, event in TRANSITIONS} == set(WorkerInput)  # no input is unused


def test_next_state_looks_up_the_table_or_raises_the_given_error() -> None:
    table = {("a", "go"): "b"}
    assert next_state(table, "a", "go", KeyError) == "b"
    with pytest.raises(ValueError, match="stop is not allowed in state a"):
        next_state(table, "a", "stop", ValueError)


class Transitions:
    def __init__(self) -> None:
        self.seen: list[tuple[WorkerState, WorkerState, str, float]] = []

    def __call__(self, worker: dspex_trio.Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        assert (old, new) in STATE_CHANGES
        self.seen.append((old, new, reason, trio.current_time()))


# -- the worker's life through the table, on fake workers (exact virtual times) --------------------------


@attrs.define(eq=False)
class MuteProcess:
    """A worker process that never writes a frame (no hello): it only exits when signalled."""

    pid: int = 49_999_999
    stdin: trio.testing.MemorySendStream = attrs.Factory(trio.testing.MemorySendStream)
    frames: trio.testing.MemoryReceiveStream = attrs.Factory(trio.testing.MemoryReceiveStream)
    stderr: trio.testing.MemoryReceiveStream = attrs.Factory(trio.testing.MemoryReceiveStream)
    signals: list[int] = attrs.Factory(list)
    _status: dspex_trio.ExitStatus | None = None
    _exited: trio.Event = attrs.Factory(trio.Event)

    def exit_status(self) -> dspex_trio.ExitStatus | None:
        return self._status

    async def wait(self) -> dspex_trio.ExitStatus:
        await self._exited.wait()
        assert self._status is not None
        return self._status

    def signal_group(self, signum: int) -> None:
        self.signals.append(signum)
        if signum in (signal.SIGTERM, signal.SIGKILL) and self._status is None:
            self._status = dspex_trio.ExitStatus(code=None, signal=signum)
            self.frames.put_eof()
            self.stderr.put_eof()
            self._exited.set()

    async def aclose(self) -> None:
        pass


@attrs.define
class MuteLauncher:
    name: str = "mute"
    processes: list[MuteProcess] = attrs.Factory(list)

    async def launch(self, spec: WorkerSpec) -> MuteProcess:
        self.processes.append(MuteProcess())
        return self.processes[-1]


async def test_a_worker_without_a_hello_is_lost_at_the_start_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transitions, launcher = Transitions(), MuteLauncher()
    with pytest.raises(dspex_trio.WorkerStartFailed, match="no hello within 2"):
        async with dspex_trio.open_worker(launcher=launcher, start_timeout=2, on_transition=transitions):
            pytest.fail("started without a hello")  # pragma: no cover
    assert transitions.seen == [(WorkerState.STARTING, WorkerState.FAILED, "no hello within 2 s", 2.0)]
    assert launcher.processes[0].signals[0] == signal.SIGKILL


async def test_a_worker_closed_before_its_hello_drains_then_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transitions, launcher = Transitions(), MuteLauncher()
    with trio.move_on_after(1):
        async with dspex_trio.open_worker(
            launcher=launcher, start_timeout=10, term_grace=0.5, on_transition=transitions
        ):
            pytest.fail("started without a hello")  # pragma: no cover
    # No hello, so no shutdown frame: SIGTERM at once; its exit ends the drain (it used to stay draining).
    assert transitions.seen == [
        (WorkerState.STARTING, WorkerState.DRAINING, "close requested", 1.0),
        (WorkerState.DRAINING, WorkerState.FAILED, "killed by SIGTERM", 1.0),
    ]
    process = launcher.processes[0]
    assert process.signals[0] == signal.SIGTERM
    with pytest.raises(trio.WouldBlock):
        process.stdin.get_data_nowait()  # nothing was ever written to it


async def test_a_worker_that_exits_before_its_hello_failed_to_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transitions = Transitions()
    async with open_fake_launcher(fail_at_start=3) as launcher:
        with pytest.raises(dspex_trio.WorkerStartFailed, match=r"exited before its hello \(exit code 3\)"):
            async with dspex_trio.open_worker(launcher=launcher, on_transition=transitions):
                pytest.fail("started")  # pragma: no cover
    assert [(old, new, why) for old, new, why, _ in transitions.seen] == [
        (WorkerState.STARTING, WorkerState.FAILED, "exit code 3")
    ]


@pytest.mark.parametrize("code", [0, 1])
async def test_an_unasked_exit_fails_the_worker_even_with_code_0(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    transitions = Transitions()
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_worker(launcher=launcher, on_transition=transitions) as worker,
    ):
        launcher.processes[0].die(code)
        await wait_until(lambda: worker.state is WorkerState.FAILED, 5)
        with pytest.raises(dspex_trio.WorkerClosed, match="is failed"):  # it takes no call any more
            await worker.call("echo", {"value": 1})
    assert [(old, new, why) for old, new, why, _ in transitions.seen] == [
        (WorkerState.STARTING, WorkerState.READY, "hello received"),
        (WorkerState.READY, WorkerState.FAILED, f"exit code {code}"),
    ]


async def test_a_lost_worker_fails_at_detection_and_its_calls_when_it_is_reaped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    at_failure: list[tuple[bool, int, float]] = []

    def watch(worker: dspex_trio.Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        if new is WorkerState.FAILED:
            at_failure.append((worker.accepting, worker.in_flight, trio.current_time()))

    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_worker(
            launcher=launcher, ack_timeout=2, heartbeat_interval=100, on_transition=watch
        ) as worker,
    ):
        launcher.processes[0].go_silent()
        with pytest.raises(WorkerUnresponsive, match="not acked within 2") as info:
            await worker.call("echo", {"value": 1})
        assert info.value.started is False and trio.current_time() == 2.0
        assert worker.state is WorkerState.FAILED
    # Failed (and no longer accepting) when the ack timeout fired, with its call still in flight: the call
    # failed once the watcher saw the process reaped.
    assert at_failure == [(False, 1, 2.0)]


# -- heartbeats on fake workers (exact virtual times) ---------------------------------------------------


async def test_a_silent_worker_is_unresponsive_at_exactly_interval_times_missed_plus_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # _heartbeat: every `interval` it checks the silence, then pings. Silent since the hello (t=0):
    # at t=1, 2, 3 the silence is 1, 2, 3 s, not more than the 3 s limit; at t=4 it is: killed.
    transitions = Transitions()
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_worker(
            launcher=launcher, heartbeat_interval=1, heartbeat_missed=3, on_transition=transitions
        ) as worker,
    ):
        assert trio.current_time() == 0
        process = launcher.processes[0]
        process.go_silent()
        with pytest.raises(WorkerUnresponsive) as info:
            await worker.call("hang")
        assert trio.current_time() == 4.0
        assert "heartbeats" in str(info.value) and info.value.started is False
        assert process.exit_status() == dspex_trio.ExitStatus(code=None, signal=signal.SIGKILL)
        assert worker.state is WorkerState.FAILED
    assert [(o, n) for o, n, _, _ in transitions.seen] == [
        (WorkerState.STARTING, WorkerState.READY),
        (WorkerState.READY, WorkerState.FAILED),
    ]
    assert transitions.seen[-1][3] == 4.0 and "no answer to heartbeats" in transitions.seen[-1][2]


@pytest.mark.parametrize(("interval", "missed", "detected_at"), [(0.5, 2, 1.5), (2.0, 1, 4.0), (1.0, 5, 6.0)])
async def test_heartbeat_detection_time_follows_the_options(
    autojump_clock: trio.testing.MockClock, interval: float, missed: int, detected_at: float
) -> None:
    transitions = Transitions()
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_worker(
            launcher=launcher,
            heartbeat_interval=interval,
            heartbeat_missed=missed,
            on_transition=transitions,
        ) as worker,
    ):
        launcher.processes[0].go_silent()
        await wait_until(lambda: worker.state is WorkerState.FAILED, 100)
    # the first check past interval x missed of silence: at interval x (missed + 1)
    (failed_at,) = [t for _, new, _, t in transitions.seen if new is WorkerState.FAILED]
    assert failed_at == detected_at == interval * (missed + 1)


async def test_a_stopped_worker_is_detected_like_a_silent_one(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_worker(launcher=launcher, heartbeat_interval=1, heartbeat_missed=3) as worker,
    ):
        await trio.sleep(10.5)  # answered heartbeats meanwhile
        assert worker.state is WorkerState.READY and launcher.processes[0].pings == 10
        assert worker.last_seen == 10.0
        launcher.processes[0].signal_group(signal.SIGSTOP)
        with pytest.raises(WorkerUnresponsive):
            await worker.call("echo", {"value": 1})
        # the last pong came at t=10 (the ping sent at t=10); silent > 3 s first at t=14
        assert trio.current_time() == 14.0


async def test_a_busy_worker_is_never_mistaken_for_a_hung_one(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        open_fake_launcher(capacity=2) as launcher,
        dspex_trio.open_worker(
            launcher=launcher, heartbeat_interval=1, heartbeat_missed=2, capacity=2
        ) as worker,
    ):
        async with trio.open_nursery() as nursery:
            for _ in range(5):  # more than its capacity: every call is acked, none answers
                nursery.start_soon(worker.call, "hang")
            await trio.sleep(1000.5)
            assert worker.state is WorkerState.BUSY and worker.in_flight == 5
            assert launcher.processes[0].pings == 1000
            assert trio.current_time() - worker.last_seen <= 1
            nursery.cancel_scope.cancel()
        assert worker.state is WorkerState.READY


# -- the pool's health on fake workers -----------------------------------------------------------------


async def collect(subscription: dspex_trio.Subscription, into: list[HealthEvent]) -> None:
    async for event in subscription:
        into.append(event)


async def test_pool_publishes_every_transition_and_replaces_an_unresponsive_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[HealthEvent] = []
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=2, launcher=launcher, heartbeat_interval=1, heartbeat_missed=3) as pool,
        pool.subscribe_health() as health,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect, health, events)
        await trio.sleep(5)
        snapshot = pool.health()
        assert snapshot.backend == "pool" and snapshot.circuit is CircuitState.CLOSED
        assert [w.state for w in snapshot.workers] == [WorkerState.READY] * 2
        assert all(w.last_heartbeat_age <= 1 and w.restarts == 0 for w in snapshot.workers)
        victim = launcher.processes[0]
        victim.go_silent()
        silenced_at = trio.current_time()
        await wait_until(lambda: len(pool.workers()) == 2 and victim.exited, 10)
        await wait_until(lambda: all(w.state is WorkerState.READY for w in pool.workers()), 10)
        snapshot = pool.health()
        assert victim.pid not in {w.pid for w in snapshot.workers}
        assert snapshot.restarts == 1 and sorted(w.restarts for w in snapshot.workers) == [0, 1]
        assert pool.statistics().circuit is CircuitState.CLOSED
        await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    states = [e for e in events if e.kind == "worker_state"]
    assert all(e.backend == "pool" and e.seq > 0 and e.time > 0 for e in states)
    assert all((WorkerState(e.data["from"]), WorkerState(e.data["to"])) in STATE_CHANGES for e in states)
    failed = [e for e in states if e.data["pid"] == victim.pid and e.data["to"] == "failed"]
    assert len(failed) == 1 and "heartbeats" in failed[0].data["reason"]
    assert victim.exit_status() is not None and silenced_at + 3 < 10  # killed within interval x (missed+1)
    assert [e.seq for e in events] == sorted(e.seq for e in events)


async def test_health_snapshot_json_has_every_field(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
        await trio.sleep(2.5)
        data = pool.health().to_json()
        assert data["backend"] == "pool" and data["circuit"] == "closed" and data["launcher"] == "fake"
        (worker,) = data["workers"]
        assert worker["state"] == "ready" and worker["restarts"] == 0
        assert 0 <= worker["last_heartbeat_age"] <= 1


# -- subscribers -------------------------------------------------------------------------------------------


async def test_a_subscriber_that_never_reads_stays_bounded_then_gets_lagged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher) as pool,
        pool.subscribe_health(buffer=64) as slow,
        pool.subscribe_health() as fast,
    ):
        for i in range(10_000):
            pool.events.publish("test", {"i": i})
            assert slow.buffered <= 64
        assert slow.buffered == 64 and slow.missed == 10_000 - 64
        received = [slow.receive_nowait() for _ in range(64)]
        assert [e.data["i"] for e in received] == list(range(64))
        lagged = await slow.receive()
        assert lagged.kind == "lagged" and lagged.data == {"missed": 10_000 - 64}
        assert lagged.backend == "pool"
        # it resyncs from a snapshot, and events flow again
        assert pool.health().seq == pool.events.published
        pool.events.publish("test", {"i": "after"})
        assert (await slow.receive()).data == {"i": "after"}
        assert fast.missed == 10_000 + 1 - fast.buffered


# -- real processes ------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and signals")
async def test_a_sigstopped_real_worker_is_detected_and_replaced() -> None:
    interval, missed = 0.2, 2
    stopped: int | None = None
    with trio.fail_after(30):
        async with (
            dspex_trio.open_pool(workers=2, heartbeat_interval=interval, heartbeat_missed=missed) as pool,
            pool.subscribe_health() as health,
        ):
            try:
                stopped = pool.workers()[0].pid
                os.kill(stopped, signal.SIGSTOP)
                start = trio.current_time()
                async for event in health:
                    if event.kind == "worker_state" and (event.data["pid"], event.data["to"]) == (
                        stopped,
                        "failed",
                    ):
                        break
                detected = trio.current_time() - start
                # within interval x (missed + 1), plus scheduling slack on a loaded machine
                assert detected <= interval * (missed + 1) + 0.3, detected
                assert "heartbeats" in event.data["reason"]
                await wait_until(lambda: not pid_alive(stopped), 5)
                await wait_until(
                    lambda: len([w for w in pool.workers() if w.accepting]) == 2,
                    10,
                    lambda: repr(pool.health()),
                )
                assert stopped not in {w.pid for w in pool.workers()}
                assert pool.health().restarts == 1
                assert (await pool.call("ping"))["pid"] != stopped
            finally:
                if stopped is not None:
                    kill_quietly(stopped, signal.SIGCONT)
                    kill_quietly(stopped, signal.SIGKILL)
