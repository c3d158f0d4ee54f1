"""The circuit breaker: its table, the pure breaker on a fake clock, the pool's circuit on fake workers
(exact virtual times), and a real restart storm that recovers once its cause is removed."""

from __future__ import annotations

import math
import sys
import time

import attrs
import pytest
import trio
import trio.testing

import dspex_trio
from dspex_trio import CircuitState, PoolUnavailable
from dspex_trio._breaker import TRANSITIONS, BreakerInput, CircuitBreaker, InvalidBreakerTransition
from tests.fakes import FlakyLauncher, open_fake_launcher
from tests.helpers import wait_until
from tests.tables import CASE_NAMES, every_state_and_input, path_to

# -- the table -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(CASE_NAMES, every_state_and_input(TRANSITIONS, CircuitState, BreakerInput))
def test_every_state_and_input_through_the_breaker(
    state: CircuitState, event: BreakerInput, expected: CircuitState | None
) -> None:
    changes: list[tuple[CircuitState, CircuitState, str]] = []
    breaker = CircuitBreaker(
        clock=FakeClock(), on_change=lambda old, new, why: changes.append((old, new, why))
    )
    for step in path_to(TRANSITIONS, CircuitState.CLOSED, state):
        breaker._move(step, "on the way")
    assert breaker.state is state
    changes.clear()
    if expected is None:
        with pytest.raises(InvalidBreakerTransition, match=f"{event} is not allowed in state {state}"):
            breaker._move(event, "why")
        assert breaker.state is state and changes == []
        assert breaker.reason == ("" if state is CircuitState.CLOSED else "on the way")
    else:
        breaker._move(event, "why")
        assert breaker.state is expected and changes == [(state, expected, "why")]


def test_the_table_is_the_classic_cycle() -> None:
    assert TRANSITIONS == {
        (CircuitState.CLOSED, BreakerInput.TRIP): CircuitState.OPEN,
        (CircuitState.OPEN, BreakerInput.RESET_TIMEOUT): CircuitState.HALF_OPEN,
        (CircuitState.HALF_OPEN, BreakerInput.PROBES_PASSED): CircuitState.CLOSED,
        (CircuitState.HALF_OPEN, BreakerInput.PROBE_FAILED): CircuitState.OPEN,
    }


# -- the pure breaker ----------------------------------------------------------------------------------


@attrs.define
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


Changes = list[tuple[float, str, str, str]]


def make_breaker(
    clock: FakeClock, changes: list[tuple[float, str, str, str]], **kwargs: object
) -> CircuitBreaker:
    def on_change(old: CircuitState, new: CircuitState, reason: str) -> None:
        changes.append((clock.now, str(old), str(new), reason))

    options: dict[str, object] = {
        "failure_threshold": 3,
        "window": 10.0,
        "reset_timeout": 1.0,
        "reset_timeout_max": 5.0,
        **kwargs,
    }
    return CircuitBreaker(clock=clock, on_change=on_change, **options)  # type: ignore[arg-type]


def test_opens_at_the_threshold_within_the_window_only() -> None:
    clock, changes = FakeClock(), Changes()
    breaker = make_breaker(clock, changes)
    breaker.record_failure("a")
    clock.now = 5
    breaker.record_failure("b")
    clock.now = 10.5  # "a" (t=0) fell out of the window
    breaker.record_failure("c")
    assert breaker.state is CircuitState.CLOSED and breaker.statistics().failures == 2
    clock.now = 11
    breaker.record_failure("d")
    assert breaker.state is CircuitState.OPEN and not breaker.allows_calls
    assert changes == [(11, "closed", "open", "failure threshold reached: 3 failures within 10.0 s; last: d")]
    assert breaker.retry_at == 12


def test_half_open_exactly_at_the_reset_timeout_with_doubling_backoff_up_to_the_max() -> None:
    clock, changes = FakeClock(), Changes()
    breaker = make_breaker(clock, changes, failure_threshold=1)
    breaker.record_failure("boom")
    probes_at = []
    for _ in range(5):
        assert not breaker.try_probe()
        clock.now = math.nextafter(breaker.retry_at, -math.inf)
        assert not breaker.try_probe()  # not a moment early
        clock.now = breaker.retry_at
        assert breaker.try_probe() and breaker.state is CircuitState.HALF_OPEN
        assert not breaker.try_probe()  # one probe at a time
        probes_at.append(clock.now)
        breaker.probe_failed("still broken")
        assert breaker.reason == "probe failed: still broken"
    assert probes_at == [1, 3, 7, 12, 17]  # waits 1, 2, 4, then capped at 5
    clock.now = breaker.retry_at
    assert breaker.try_probe()
    breaker.probe_succeeded()
    assert breaker.state is CircuitState.CLOSED and breaker.reason == "" and breaker.retry_at == math.inf
    assert breaker.statistics().opened == 6
    # a fresh trip starts from the initial reset timeout again
    breaker.record_failure("again")
    assert breaker.retry_at == clock.now + 1
    kinds = [(old, new) for _, old, new, _ in changes]
    assert kinds[:3] == [("closed", "open"), ("open", "half-open"), ("half-open", "open")]
    assert ("half-open", "closed") in kinds


def test_closing_needs_the_configured_number_of_probes() -> None:
    clock, changes = FakeClock(), Changes()
    breaker = make_breaker(clock, changes, failure_threshold=1, half_open_probes=3)
    breaker.record_failure("x")
    clock.now = 1
    for n in range(3):
        assert breaker.state is (CircuitState.HALF_OPEN if n else CircuitState.OPEN)
        assert breaker.try_probe()
        breaker.probe_succeeded()
    assert breaker.state is CircuitState.CLOSED
    assert [new for _, _, new, _ in changes] == ["open", "half-open", "closed"]


def test_a_failure_while_half_open_reopens_and_stale_probe_results_are_ignored() -> None:
    clock, changes = FakeClock(), Changes()
    breaker = make_breaker(clock, changes, failure_threshold=1, half_open_probes=2)
    breaker.record_failure("x")
    clock.now = 1
    assert breaker.try_probe()
    breaker.record_failure("a worker died young")
    assert breaker.state is CircuitState.OPEN and "half-open" in breaker.reason
    assert breaker.retry_at == 3  # doubled
    breaker.probe_succeeded()  # the probe that was running: too late to count
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(InvalidBreakerTransition):
        breaker.probe_succeeded()  # no probe runs


def test_probes_exhausted_closes_only_after_a_passed_probe() -> None:
    clock, changes = FakeClock(), Changes()
    breaker = make_breaker(clock, changes, failure_threshold=1, half_open_probes=2)
    breaker.record_failure("x")
    breaker.probes_exhausted()
    assert breaker.state is CircuitState.OPEN
    clock.now = 1
    assert breaker.try_probe()
    breaker.probe_succeeded()
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.probes_exhausted()
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize(
    "bad",
    [{"failure_threshold": 0}, {"window": -1}, {"reset_timeout": -0.1}, {"half_open_probes": 0}],
)
def test_bad_options_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(clock=time.monotonic, **bad)  # type: ignore[arg-type]


# -- the pool's circuit on fake workers (exact virtual times) --------------------------------------------


async def test_pool_circuit_opens_probes_with_backoff_and_closes_at_exact_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    changes: list[tuple[float, str, str]] = []
    async with (
        open_fake_launcher(fail_at_start=3) as launcher,
        dspex_trio.open_pool(
            workers=1,
            launcher=launcher,
            restart_intensity=2,  # the 3rd failed start within the period trips it
            restart_period=10,
            probe_backoff=1,
            probe_backoff_max=4,
        ) as pool,
        pool.subscribe_health() as health,
    ):
        assert trio.current_time() == 0
        assert pool.circuit is CircuitState.OPEN and len(launcher.processes) == 3
        assert "restart budget spent: 3 failures" in pool.statistics().circuit_reason
        assert "exit code 3" in pool.statistics().circuit_reason
        with pytest.raises(PoolUnavailable, match="budget"):
            await pool.call("echo", {"value": 1})

        async def watch() -> None:
            async for event in health:
                if event.kind == "circuit":
                    changes.append((trio.current_time(), event.data["from"], event.data["to"]))
                    assert event.backend == "pool" and "reason" in event.data

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(8)  # probes at 1, 3 (+2), 7 (+4) fail; the next is due at 11 (+4, capped)
            assert len(launcher.processes) == 6
            launcher.fail_at_start = None  # the cause is removed
            await wait_until(lambda: pool.circuit is CircuitState.CLOSED, 60)
            assert await pool.call("echo", {"value": 7}) == 7
            nursery.cancel_scope.cancel()
    assert changes == [
        (1, "open", "half-open"),
        (1, "half-open", "open"),
        (3, "open", "half-open"),
        (3, "half-open", "open"),
        (7, "open", "half-open"),
        (7, "half-open", "open"),
        (11, "open", "half-open"),
        (11, "half-open", "closed"),
    ]


async def test_pool_needs_half_open_probes_successful_starts(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        open_fake_launcher(fail_at_start=1) as launcher,
        dspex_trio.open_pool(
            workers=3, launcher=launcher, restart_intensity=0, probe_backoff=2, half_open_probes=2
        ) as pool,
        pool.subscribe_health() as health,
    ):
        assert pool.circuit is CircuitState.OPEN
        launcher.fail_at_start = None
        seen = []
        async for event in health:
            if event.kind == "circuit":
                seen.append((trio.current_time(), event.data["to"]))
                if event.data["to"] == "closed":
                    break
        assert seen == [(2, "half-open"), (2, "closed")]
        await wait_until(lambda: len([w for w in pool.workers() if w.accepting]) == 3, 10)
        stats = pool.statistics()
        assert stats.circuit is CircuitState.CLOSED and stats.circuit_opened == 1


async def test_young_worker_deaths_trip_the_circuit(autojump_clock: trio.testing.MockClock) -> None:
    circuit: list[tuple[float, str]] = []
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(
            workers=1, launcher=launcher, restart_intensity=1, min_healthy_uptime=5, probe_backoff=3
        ) as pool,
        pool.subscribe_health() as health,
    ):
        await trio.sleep(1)
        launcher.live[0].die(1)  # dies young (before min_healthy_uptime), having served nothing
        await trio.sleep(1)
        assert pool.circuit is CircuitState.CLOSED and len(launcher.live) == 1  # replaced at once
        launcher.live[0].die(1)  # the 2nd young failure: more than restart_intensity=1
        async for event in health:
            if event.kind == "circuit":
                circuit.append((trio.current_time(), event.data["to"]))
                if event.data["to"] == "open":
                    assert "without serving a call" in event.data["reason"]
                if event.data["to"] == "closed":
                    break
        assert pool.statistics().circuit_opened == 1
    assert circuit == [(2, "open"), (5, "half-open"), (5, "closed")]


# -- a real restart storm ------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses real processes and signals")
async def test_a_real_restart_storm_opens_the_circuit_and_half_open_recovers() -> None:
    launcher = FlakyLauncher()
    with trio.fail_after(30):
        async with (
            dspex_trio.open_pool(
                workers=2, launcher=launcher, restart_intensity=3, restart_period=10, probe_backoff=0.2
            ) as pool,
            pool.subscribe_health() as health,
        ):
            assert pool.circuit is CircuitState.OPEN
            assert "exit code 3" in pool.statistics().circuit_reason
            cpu = time.process_time()
            with pytest.raises(PoolUnavailable):
                await pool.call("ping")
            await trio.sleep(0.5)
            assert time.process_time() - cpu < 0.4  # no spin while open
            launcher.failing = False
            states = []
            async for event in health:
                if event.kind == "circuit":
                    states.append(event.data["to"])
                    if event.data["to"] == "closed":
                        break
            assert states[-2:] == ["half-open", "closed"]
            assert (await pool.call("ping"))["pid"] > 0
            await wait_until(lambda: len([w for w in pool.workers() if w.accepting]) == 2, 10)
