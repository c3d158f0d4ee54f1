"""The dispatch decisions and the loop that acts on them.

- pure, without I/O: the retry policy's delays (seeded RNG), what follows a failed attempt
  (``Attempts.after``), the time left, and which worker takes an attempt (``place``);
- the pool's and the bridge's retries on fake workers, at exact virtual times (only never-acked calls
  and idempotent ones are retried; backoff between attempts);
- the caller's deadline on the wire (fake workers record the ``timeout`` of each call they receive).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import dspex_trio
from dspex_trio import (
    CallTimeout,
    InvalidParams,
    ProgramError,
    ProtocolError,
    RetryPolicy,
    WorkerClosed,
    WorkerCrashed,
    WorkerUnresponsive,
)
from dspex_trio._errors import CacheMiss
from dspex_trio._retry import Attempts, Step, place
from tests.fakes import FakeLauncher, FakeProcess, open_fake_launcher

# -- the pure policy -----------------------------------------------------------------------------------


def test_base_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial=0.1, multiplier=3, cap=2.0, jitter=0, max_attempts=6)
    assert [policy.base_delay(n) for n in range(1, 6)] == pytest.approx([0.1, 0.3, 0.9, 2.0, 2.0])
    assert list(policy.delays()) == [policy.base_delay(n) for n in range(1, 6)]  # no jitter: exact


def test_jitter_is_drawn_from_the_injected_rng() -> None:
    policy = RetryPolicy(initial=0.1, multiplier=2, cap=1.0, jitter=0.5, max_attempts=5)
    draws = random.Random(42)
    expected = [base * (1 - 0.5 * draws.random()) for base in (0.1, 0.2, 0.4, 0.8)]
    assert list(policy.delays(random.Random(42))) == expected
    assert list(policy.delays(random.Random(42))) == list(policy.delays(random.Random(42)))


class Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("jitter", "u", "expected"), [(0, 0.9, 0.4), (1, 0.0, 0.4), (1, 0.75, 0.1), (0.5, 0.5, 0.3)]
)
def test_jitter_bounds(jitter: float, u: float, expected: float) -> None:
    policy = RetryPolicy(initial=0.1, multiplier=2, cap=10, jitter=jitter)
    assert policy.delay(3, Fixed(u)) == pytest.approx(expected)  # base 0.4


def test_jittered_delays_stay_within_base_times_one_minus_jitter_and_base() -> None:
    policy = RetryPolicy(initial=0.05, multiplier=2, cap=0.5, jitter=0.3, max_attempts=10)
    rng = random.Random(1)
    for n, _ in itertools.product(range(1, 10), range(50)):
        delay = policy.delay(n, rng)
        assert policy.base_delay(n) * 0.7 <= delay <= policy.base_delay(n)


def test_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.allows(n) for n in (1, 2, 3)] == [True, True, False]
    assert len(list(policy.delays())) == 2
    assert list(RetryPolicy(max_attempts=1).delays()) == []


@pytest.mark.parametrize(
    "bad", [{"initial": -1}, {"multiplier": 0.5}, {"cap": -0.1}, {"jitter": 1.5}, {"max_attempts": 0}]
)
def test_bad_options_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RetryPolicy().base_delay(0)


# -- what follows a failed attempt (pure) -------------------------------------------------------------


def attempts(*, max_attempts: int = 4, idempotent: bool = False, timeout: float | None = None) -> Attempts:
    return Attempts(RetryPolicy(max_attempts=max_attempts), now=100.0, timeout=timeout, idempotent=idempotent)


def never_started() -> WorkerCrashed:
    return WorkerCrashed("died before the ack", started=False)


def started() -> WorkerCrashed:
    return WorkerCrashed("died after the ack", started=True)


def test_a_call_never_acked_is_redispatched_until_the_attempts_run_out() -> None:
    a = attempts(max_attempts=3)
    steps = [a.after(error, worker="w1", closing=False) for error in (never_started(), never_started())]
    assert steps == [Step.REDISPATCH, Step.REDISPATCH] and a.made == 3
    assert a.after(never_started(), worker="w1", closing=False) is Step.FAIL
    assert a.made == 3 and a.avoid is None


@pytest.mark.parametrize(
    "error",
    [
        ProtocolError("corrupt frame", started=False),
        WorkerUnresponsive("no ack in time", started=False),
    ],
)
def test_every_loss_before_the_ack_is_a_redispatch(error: Exception) -> None:
    assert attempts().after(error, worker="w1", closing=False) is Step.REDISPATCH


def test_a_started_call_is_retried_once_elsewhere_only_when_idempotent() -> None:
    a = attempts()
    assert a.after(started(), worker="w1", closing=False) is Step.FAIL
    assert a.made == 1

    a = attempts(idempotent=True)
    assert a.after(started(), worker="w1", closing=False) is Step.RETRY_ELSEWHERE
    assert a.retried and a.avoid == "w1" and a.made == 2
    assert a.after(never_started(), worker="w2", closing=False) is Step.REDISPATCH  # still re-dispatched
    assert a.after(ProtocolError("bad", started=True), worker="w3", closing=False) is Step.FAIL  # once
    assert a.avoid == "w1" and a.made == 3


def test_a_cache_miss_is_resent_with_the_spec_once_and_costs_no_attempt() -> None:
    a = attempts(max_attempts=1)
    assert not a.with_spec
    assert a.after(CacheMiss("no such program"), worker="w1", closing=False) is Step.RESEND_SPEC
    assert a.with_spec and a.made == 1
    assert a.after(CacheMiss("again"), worker="w1", closing=False) is Step.FAIL


def test_a_closing_worker_refusal_is_redispatched_at_once_unless_the_backend_closes() -> None:
    a = attempts(max_attempts=2)
    assert a.after(WorkerClosed("recycled"), worker="w1", closing=True) is Step.FAIL
    assert a.after(WorkerClosed("recycled"), worker="w1", closing=False) is Step.REDISPATCH_NOW
    assert a.made == 2
    assert a.after(WorkerClosed("recycled"), worker="w2", closing=False) is Step.FAIL  # attempts spent


@pytest.mark.parametrize(
    "error",
    [ProgramError("the LM failed"), InvalidParams("bad input"), CallTimeout("too late"), KeyError("x")],
)
def test_every_other_error_is_the_outcome(error: BaseException) -> None:
    a = attempts(idempotent=True)
    assert a.after(error, worker="w1", closing=False) is Step.FAIL
    assert a.made == 1 and not a.retried and not a.with_spec


@pytest.mark.parametrize("error", [never_started(), started(), CacheMiss("evicted"), WorkerClosed("x")])
def test_a_stream_whose_consumer_saw_an_event_is_never_sent_again(error: BaseException) -> None:
    a = attempts(idempotent=True)
    a.delivered = True
    assert a.after(error, worker="w1", closing=False) is Step.FAIL


def test_time_left_and_the_deadline() -> None:
    assert attempts().time_left(1e9, "echo") is None  # no timeout: the caller's own deadline only
    a = attempts(timeout=2.0)  # now=100
    assert a.deadline == 102.0
    assert a.time_left(100.5, "echo") == 1.5
    with pytest.raises(CallTimeout, match=r"echo timed out after 2\.0 s"):
        a.time_left(102.0, "echo")
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="timeout must be > 0"):
            attempts(timeout=bad)


def test_the_backoff_follows_the_policy_and_stops_at_the_deadline() -> None:
    policy = RetryPolicy(initial=0.1, multiplier=2, cap=1.0, jitter=0, max_attempts=5)
    a = Attempts(policy, now=0.0, timeout=None, idempotent=False)
    waits = []
    for _ in range(3):
        assert a.after(never_started(), worker="w1", closing=False) is Step.REDISPATCH
        waits.append(a.resume_at(10.0, random.Random(0)) - 10.0)
    assert waits == pytest.approx([0.1, 0.2, 0.4])  # retry n waits base_delay(n)
    b = Attempts(policy, now=0.0, timeout=0.25, idempotent=False)
    b.after(never_started(), worker="w1", closing=False)
    assert b.resume_at(0.2, random.Random(0)) == 0.25  # never past the deadline


# -- which worker takes an attempt (pure) ------------------------------------------------------------


@attrs.define
class Load:
    worker_id: str
    in_flight: int = 0
    capacity: int = 4
    accepting: bool = True


@attrs.define
class Slot:
    worker: Load
    retiring: bool = False
    programs: set[tuple[str, int]] = attrs.Factory(set)


def slots(*loads: int) -> list[Slot]:
    return [Slot(Load(f"w{i}", in_flight=n)) for i, n in enumerate(loads, 1)]


def test_place_takes_the_least_loaded_worker_with_free_capacity() -> None:
    assert place([], None, None) is None
    pool = slots(2, 1, 3)
    assert place(pool, None, None) is pool[1]
    pool[1].worker.in_flight = 4  # full
    assert place(pool, None, None) is pool[0]
    pool[0].retiring = True
    pool[2].worker.accepting = False
    assert place(pool, None, None) is None  # full, retiring, not taking calls


def test_place_prefers_a_worker_holding_the_program_only_among_equals() -> None:
    program = ("p1", 3)
    pool = slots(1, 1, 0)
    pool[1].programs.add(program)
    assert place(pool, program, None) is pool[2]  # less loaded wins over affinity
    pool[2].worker.in_flight = 1
    assert place(pool, program, None) is pool[1]  # among equals, the one that holds it
    assert place(pool, ("p1", 4), None) is pool[0]  # another version is another program: the first
    assert place(pool, None, None) is pool[0]


def test_place_avoids_the_worker_of_a_failed_idempotent_attempt_while_another_fits() -> None:
    pool = slots(0, 3)
    assert place(pool, None, "w1") is pool[1]  # busier, but not where the call failed
    pool[1].worker.in_flight = 4
    assert place(pool, None, "w1") is pool[0]  # the only one left: "elsewhere" when there is one
    assert place(slots(0), None, "w1") is not None


# -- the pool's retries on fake workers (exact virtual times) --------------------------------------------

RETRY: dict[str, Any] = {
    "retry_backoff": 0.1,
    "retry_backoff_multiplier": 2.0,
    "retry_backoff_max": 1.0,
    "retry_jitter": 0.5,
}


def expected_delays(seed: int, count: int, max_attempts: int = 4) -> list[float]:
    policy = RetryPolicy(initial=0.1, multiplier=2.0, cap=1.0, jitter=0.5, max_attempts=max_attempts)
    return list(itertools.islice(policy.delays(random.Random(seed)), count))


async def test_never_acked_calls_are_redispatched_after_exact_backoffs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher, rng=random.Random(7), **RETRY) as pool,
    ):
        launcher.die_before_ack = 3  # three workers in a row die before acking the call
        start = trio.current_time()
        assert await pool.call("echo", {"value": "hi"}) == "hi"
        delays = expected_delays(7, 3)
        assert trio.current_time() - start == sum(delays)
        stats = pool.statistics()
        assert stats.redispatched == 3 and stats.retried == 0 and stats.backoffs == 3
        assert stats.backoff_seconds == pytest.approx(sum(delays))
        assert stats.completed == 1 and stats.failed == 0


async def test_attempts_are_capped(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(
            workers=1,
            launcher=launcher,
            rng=random.Random(3),
            retry_max_attempts=3,
            restart_intensity=10,
            **RETRY,
        ) as pool,
    ):
        launcher.die_before_ack = 10
        start = trio.current_time()
        with pytest.raises(WorkerCrashed) as info:
            await pool.call("echo", {"value": 1})
        assert info.value.started is False
        assert trio.current_time() - start == sum(expected_delays(3, 2, max_attempts=3))
        assert pool.statistics().redispatched == 2 and pool.statistics().failed == 1


async def test_started_calls_are_retried_only_when_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=2, launcher=launcher, rng=random.Random(5), **RETRY) as pool,
    ):
        launcher.die_after_ack = 1
        start = trio.current_time()
        with pytest.raises(WorkerCrashed) as info:
            await pool.call("echo", {"value": 1})
        assert info.value.started is True and trio.current_time() == start  # no retry, no wait
        assert pool.statistics().retried == 0 and info.value.attempts == 1

        launcher.die_after_ack = 1
        start = trio.current_time()
        assert await pool.call("echo", {"value": 2}, idempotent=True) == 2
        assert trio.current_time() - start == expected_delays(5, 1)[0]
        assert pool.statistics().retried == 1

        launcher.die_after_ack = 2  # retried once only: the second failure is the caller's
        with pytest.raises(WorkerCrashed) as info:
            await pool.call("echo", {"value": 3}, idempotent=True)
        assert pool.statistics().retried == 2 and info.value.attempts == 2  # the error says it was retried


async def test_the_backoff_never_outlives_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(
            workers=1, launcher=launcher, retry_backoff=1.0, retry_jitter=0, retry_max_attempts=5
        ) as pool,
    ):
        launcher.die_before_ack = 5
        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await pool.call("echo", {"value": 1}, timeout=0.25)
        assert trio.current_time() - start == 0.25


# -- the bridge's retries on fake workers: the same rules, "elsewhere" is the replacement worker -------


def bridge_on(launcher: FakeLauncher, **options: Any) -> AbstractAsyncContextManager[dspex_trio.Backend]:
    policy = RetryPolicy(initial=0.1, multiplier=2.0, cap=1.0, jitter=0, max_attempts=4)
    return dspex_trio.open_backend("bridge", launcher=launcher, retry=policy, **options)


async def test_the_bridge_redispatches_never_acked_calls_on_a_replacement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_launcher() as launcher, bridge_on(launcher) as bridge:
        launcher.die_before_ack = 3  # three workers in a row die before acking the call
        start = trio.current_time()
        assert await bridge.call("echo", {"value": "hi"}) == "hi"
        assert trio.current_time() - start == pytest.approx(0.1 + 0.2 + 0.4)
        stats = bridge.statistics()
        assert stats.retried == 3 and stats.restarts == 3 and stats.completed == 1 and stats.failed == 0
        assert len(launcher.live) == 1

        launcher.die_before_ack = 10
        with pytest.raises(WorkerCrashed) as info:  # the policy's 4 attempts, then the caller's
            await bridge.call("echo", {"value": 1})
        assert info.value.started is False and bridge.statistics().retried == 6 and info.value.attempts == 4


async def test_the_bridge_retries_a_started_idempotent_call_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_launcher() as launcher, bridge_on(launcher) as bridge:
        launcher.die_after_ack = 1
        with pytest.raises(WorkerCrashed) as info:
            await bridge.call("echo", {"value": 1})
        assert info.value.started is True and bridge.statistics().retried == 0

        launcher.die_after_ack = 1
        start = trio.current_time()
        assert await bridge.call("echo", {"value": 2}, idempotent=True) == 2
        assert trio.current_time() - start == pytest.approx(0.1)
        assert bridge.statistics().retried == 1

        launcher.die_after_ack = (
            2  # once only (it was up to max_attempts): the second failure is the caller's
        )
        with pytest.raises(WorkerCrashed):
            await bridge.call("echo", {"value": 3}, idempotent=True)
        assert bridge.statistics().retried == 2 and bridge.statistics().failed == 2


# -- the caller's deadline reaches the worker, however it was set ---------------------------------------

Caller = Any
"""A bound ``call(method, params, **kwargs)``."""


@asynccontextmanager
async def on_fake(kind: str) -> AsyncIterator[tuple[Caller, FakeLauncher]]:
    """``call(method, params, **kwargs)`` through a pool, a bridge or a bare worker handle on a fake."""
    async with open_fake_launcher() as launcher:
        if kind == "worker":
            async with dspex_trio.open_worker(launcher=launcher) as worker:
                yield worker.call, launcher
        elif kind == "pool":
            async with dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
                yield pool.call, launcher
        else:
            async with dspex_trio.open_backend("bridge", launcher=launcher) as bridge:
                yield bridge.call, launcher


def process(launcher: FakeLauncher) -> FakeProcess:
    (only,) = launcher.live
    return only


@pytest.mark.parametrize("kind", ["worker", "pool", "bridge"])
async def test_a_callers_move_on_after_reaches_the_worker_as_timeout_does(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with on_fake(kind) as (call, launcher):
        fake = process(launcher)

        start = trio.current_time()
        with trio.move_on_after(0.5) as scope:
            await call("sleep", {"seconds": 10})
        assert scope.cancelled_caught and trio.current_time() - start == 0.5  # plain cancellation
        assert fake.timeouts[-1] == pytest.approx(0.5)  # the worker was told the caller's deadline
        await trio.testing.wait_all_tasks_blocked()
        assert fake.cancels == 1  # and the call was cancelled there at 0.5 s

        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await call("sleep", {"seconds": 10}, timeout=0.5)
        assert trio.current_time() - start == 0.5
        assert fake.timeouts[-1] == pytest.approx(0.5)  # the same deadline on the wire
        await trio.testing.wait_all_tasks_blocked()
        assert fake.cancels == 2  # the same cancellation in the worker

        with trio.move_on_after(0.5) as scope:  # the earlier of the two wins, whichever it is
            await call("sleep", {"seconds": 10}, timeout=2)
        assert scope.cancelled_caught and fake.timeouts[-1] == pytest.approx(0.5)
        with trio.move_on_after(2), pytest.raises(CallTimeout):
            await call("sleep", {"seconds": 10}, timeout=0.25)
        assert fake.timeouts[-1] == pytest.approx(0.25)

        assert await call("echo", {"value": 1}) == 1
        assert fake.timeouts[-1] is None  # no deadline at all
        with trio.CancelScope(deadline=math.inf):
            assert await call("echo", {"value": 2}) == 2
        assert fake.timeouts[-1] is None
