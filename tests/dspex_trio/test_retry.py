"""The retry policy: exact delays with a seeded RNG, and the pool's retries on fake workers at exact
virtual times (only never-acked calls and idempotent ones are retried; backoff between attempts)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
import trio
import trio.testing

import dspex_trio
from dspex_trio import CallTimeout, RetryPolicy, WorkerCrashed
from tests.fakes import open_fake_launcher

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
        assert pool.statistics().retried == 0

        launcher.die_after_ack = 1
        start = trio.current_time()
        assert await pool.call("echo", {"value": 2}, idempotent=True) == 2
        assert trio.current_time() - start == expected_delays(5, 1)[0]
        assert pool.statistics().retried == 1

        launcher.die_after_ack = 2  # retried once only: the second failure is the caller's
        with pytest.raises(WorkerCrashed):
            await pool.call("echo", {"value": 3}, idempotent=True)
        assert pool.statistics().retried == 2


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
