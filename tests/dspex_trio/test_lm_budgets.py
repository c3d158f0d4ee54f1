"""The host's LM budgets (``dspex_trio._lm_budgets``), in process on Trio's virtual clock: rates over
sliding windows, concurrency, tokens, pauses after ``429``/``5xx``, arrival order, cancellation, and one
worker connection's lease desk.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import trio
import trio.testing

from bridge_child import wire
from dspex_trio._lm_budgets import (
    LM_RETRY_POLICY,
    MAX_PAUSE_S,
    RATE_MARGIN_S,
    LeaseDesk,
    LMBudget,
    LMBudgets,
)

KEY = wire.lm_key("openai/fake", "http://127.0.0.1:1/v1")


def budget(**limits: Any) -> LMBudget:
    return LMBudget(model="openai/fake", api_base="http://127.0.0.1:1/v1", **limits)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


async def start_all(budgets: LMBudgets, n: int, *, tokens: int = 0, hold: float = 0.0) -> list[float]:
    """Start ``n`` requests at once, each held for ``hold`` seconds; the time each one started."""
    started: list[float] = []

    async def one() -> None:
        grant = await budgets.acquire(KEY, tokens)
        started.append(trio.current_time())
        await trio.sleep(hold)
        budgets.release(grant, status=200, sent_ago=hold)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return started


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_budget_records() -> None:
    b = budget(requests_per_minute=600, window_s=1.0, tokens_per_minute=6000)
    assert b.key == KEY == "openai/fake @ http://127.0.0.1:1/v1"
    assert b.requests_per_window() == 10 and b.tokens_per_window() == 100
    assert budget(requests_per_minute=1).requests_per_window() == 1
    assert budget(requests_per_minute=0.5, window_s=1).requests_per_window() == 1  # at least one
    assert budget().requests_per_window() is None and budget().tokens_per_window() is None
    for bad in ({"max_concurrent": 0}, {"requests_per_minute": 0}, {"tokens_per_minute": 0}, {"window_s": 0}):
        with pytest.raises(ValueError):
            budget(**bad)
    with pytest.raises(ValueError, match="two budgets"):
        LMBudgets([budget(), budget(max_concurrent=2)])


async def test_a_rate_holds_in_every_window(autojump_clock: trio.testing.MockClock) -> None:
    budgets = LMBudgets([budget(requests_per_minute=600, window_s=1.0)])
    start = trio.current_time()
    started = await start_all(budgets, 35)
    assert most_in_any_window(started, 1.0 + RATE_MARGIN_S) == 10
    # Ten at once, then ten more as soon as the first ten leave the window, and so on.
    offsets = sorted(round(t - start, 6) for t in started)
    step = round(1.0 + RATE_MARGIN_S, 6)
    assert offsets == [round(k * step, 6) for k in (0, 1, 2) for _ in range(10)] + [round(3 * step, 6)] * 5
    [stats] = budgets.statistics()
    assert (stats.granted, stats.throttled, stats.in_flight) == (35, 25, 0)
    assert stats.max_in_flight <= 10


async def test_concurrency_waits_for_a_release(autojump_clock: trio.testing.MockClock) -> None:
    budgets = LMBudgets([budget(max_concurrent=2)])
    start = trio.current_time()
    started = await start_all(budgets, 5, hold=3.0)
    assert sorted(round(t - start, 6) for t in started) == [0, 0, 3, 3, 6]
    [stats] = budgets.statistics()
    assert stats.max_in_flight == 2 and stats.throttled == 3


async def test_waiters_are_served_in_arrival_order(autojump_clock: trio.testing.MockClock) -> None:
    budgets = LMBudgets([budget(max_concurrent=1)])
    order: list[int] = []
    first = await budgets.acquire(KEY)

    async def waiter(i: int) -> None:
        grant = await budgets.acquire(KEY)
        order.append(i)
        await trio.sleep(0.1)
        budgets.release(grant, status=200)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
        budgets.release(first, status=200)
    assert order == list(range(6))


async def test_a_429_with_retry_after_pauses_the_lm_for_everyone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events = Recorder()
    budgets = LMBudgets([budget(max_concurrent=100)], publish=events)
    grant = await budgets.acquire(KEY)
    t0 = trio.current_time()
    budgets.release(grant, status=429, retry_after=2.0)
    assert budgets.try_acquire(KEY) is None  # paused: nobody starts
    started = await start_all(budgets, 4)
    assert [round(t - t0, 6) for t in started] == [2.0] * 4
    assert events.kinds() == ["lm_paused", "lm_throttled"]
    assert events.events[0][1] == {"lm": KEY, "status": 429, "pause_s": 2.0, "retry_after": 2.0}
    assert events.events[1][1]["reason"] == "paused"
    [stats] = budgets.statistics()
    assert (stats.rate_limited, stats.pauses, stats.paused_for) == (1, 1, 0.0)


async def test_failures_without_retry_after_back_off_with_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budgets = LMBudgets([], rng=random.Random(3))  # an LM without a budget: its pauses are still shared
    expected = random.Random(3)
    for failure in (1, 2, 3):
        grant = await budgets.acquire(KEY)
        t0 = trio.current_time()
        budgets.release(grant, status=503 if failure != 2 else 429)
        pause = LM_RETRY_POLICY.delay(failure, expected)
        [stats] = budgets.statistics()
        assert math.isclose(stats.paused_for, pause)
        grant = await budgets.acquire(KEY)
        assert math.isclose(trio.current_time() - t0, pause)
        budgets.release(grant, status=0)  # no answer: neither a failure nor a success
    budgets.release(await budgets.acquire(KEY), status=200)  # a success starts the backoff over
    grant = await budgets.acquire(KEY)
    budgets.release(grant, status=500)
    [stats] = budgets.statistics()
    assert stats.paused_for <= LM_RETRY_POLICY.base_delay(1)
    assert (stats.server_errors, stats.rate_limited, stats.budgeted) == (3, 1, False)


async def test_a_long_retry_after_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    budgets = LMBudgets([budget()])
    budgets.release(await budgets.acquire(KEY), status=429, retry_after=10_000)
    [stats] = budgets.statistics()
    assert stats.paused_for == MAX_PAUSE_S


async def test_tokens_per_window_use_the_reported_count(autojump_clock: trio.testing.MockClock) -> None:
    budgets = LMBudgets([budget(tokens_per_minute=600, window_s=1.0)])  # 10 tokens per window
    t0 = trio.current_time()
    a = await budgets.acquire(KEY, tokens=6)
    budgets.release(a, status=200, tokens=2)  # the answer said 2: 8 left in this window
    b = await budgets.acquire(KEY, tokens=8)
    assert trio.current_time() == t0
    c = await budgets.acquire(KEY, tokens=1)  # 2 + 8 used: waits for the first to leave the window
    assert math.isclose(trio.current_time() - t0, 1.0 + RATE_MARGIN_S)
    budgets.release(b, status=200, tokens=8)
    budgets.release(c, status=200, tokens=1)
    [stats] = budgets.statistics()
    assert stats.tokens == 11
    big = await budgets.acquire(KEY, tokens=1_000)  # larger than the window: alone, once it is empty
    budgets.release(big, status=200)


async def test_a_cancelled_wait_counts_nothing(autojump_clock: trio.testing.MockClock) -> None:
    budgets = LMBudgets([budget(max_concurrent=1)])
    held = await budgets.acquire(KEY)
    with trio.move_on_after(5):
        await budgets.acquire(KEY)
    [stats] = budgets.statistics()
    assert (stats.in_flight, stats.granted) == (1, 1)
    budgets.release(held, status=200)
    budgets.release(await budgets.acquire(KEY), status=200)


async def test_unbudgeted_lms_are_tracked_up_to_a_bound(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dspex_trio import _lm_budgets

    monkeypatch.setattr(_lm_budgets, "MAX_TRACKED_LMS", 2)
    budgets = LMBudgets([budget()])
    for model in ("a/1", "a/2", "a/3"):
        grant = budgets.try_acquire(model)
        assert grant is not None
        budgets.release(grant, status=429, retry_after=5)
    assert budgets.try_acquire("a/1") is None and budgets.try_acquire("a/2") is None
    assert budgets.try_acquire("a/3") is not None  # past the bound: not tracked, never paused
    assert [s.lm for s in budgets.statistics()] == [KEY, "a/1", "a/2"]


class Answers:
    def __init__(self) -> None:
        self.grants: list[wire.LeaseGrant] = []

    def __call__(self, grant: wire.LeaseGrant) -> None:
        self.grants.append(grant)


async def test_the_lease_desk(autojump_clock: trio.testing.MockClock) -> None:
    budgets = LMBudgets([budget(max_concurrent=1)])
    answers = Answers()
    desk = LeaseDesk(budgets, answers)
    async with trio.open_nursery() as nursery:
        await nursery.start(desk.serve)
        desk.request(wire.LeaseRequest(1, call=1, lm=KEY))
        assert answers.grants == [wire.LeaseGrant(1)]  # at once: the budget allows it
        desk.request(wire.LeaseRequest(2, call=2, lm=KEY))
        desk.request(wire.LeaseRequest(3, call=3, lm=KEY))
        await trio.testing.wait_all_tasks_blocked()
        assert desk.waiting == 2 and len(answers.grants) == 1
        desk.release(wire.LeaseRelease(2))  # call 2 stopped waiting: answered "no"
        await trio.testing.wait_all_tasks_blocked()
        assert answers.grants[-1] == wire.LeaseGrant(2, ok=False, reason="released before its grant")
        desk.release(wire.LeaseRelease(1, status=200, tokens=5))  # lease 3 gets the slot
        await trio.testing.wait_all_tasks_blocked()
        assert answers.grants[-1] == wire.LeaseGrant(3)
        assert desk.granted == 1
        desk.release(wire.LeaseRelease(99))  # unknown: nothing happens
        nursery.cancel_scope.cancel()
    # The worker is gone: what it held is given back, and new leases are refused.
    [stats] = budgets.statistics()
    assert (stats.in_flight, stats.refused, stats.tokens) == (0, 1, 5)
    desk.request(wire.LeaseRequest(4, call=4, lm=KEY))
    assert answers.grants[-1] == wire.LeaseGrant(4, ok=False, reason="the pool is closing")


async def test_a_request_counts_from_when_it_was_sent(autojump_clock: trio.testing.MockClock) -> None:
    # A busy worker may send what it was granted late: the rate counts a request while it is in
    # flight, then from when it was sent, so the provider never sees more than the budget per window.
    budgets = LMBudgets([budget(requests_per_minute=120, window_s=1.0)])  # 2 per window
    t0 = trio.current_time()
    a = await budgets.acquire(KEY)
    b = await budgets.acquire(KEY)
    budgets.release(a, status=200, sent_ago=0.0)  # a reached the provider at t0
    async with trio.open_nursery() as nursery:

        async def late_sender() -> None:
            await trio.sleep(1.5)
            budgets.release(b, status=200, sent_ago=0.0)  # b reached it only at t0 + 1.5

        nursery.start_soon(late_sender)
        c = await budgets.acquire(KEY)  # once a leaves the window
        assert math.isclose(trio.current_time() - t0, 1.0 + RATE_MARGIN_S)
        d = await budgets.acquire(KEY)  # c (in flight) and b (sent at 1.5) fill the window until b leaves
        assert math.isclose(trio.current_time() - t0, 1.5 + 1.0 + RATE_MARGIN_S)
        budgets.release(c, status=200, sent_ago=0.0)
        budgets.release(d, status=0)  # never sent: counts nothing more
    never_sent = await budgets.acquire(KEY)
    budgets.release(never_sent, status=0)
    [stats] = budgets.statistics()
    assert stats.granted == 5 and stats.in_flight == 0


def test_the_text_form_of_a_budget() -> None:
    from dspex_trio._lm_budgets import parse_lm_budget

    parsed = parse_lm_budget(
        "openai/fake@http://127.0.0.1:1/v1 concurrent=4 rpm=600 tpm=1000 window=1 margin=0.05"
    )
    assert parsed == budget(max_concurrent=4, requests_per_minute=600, tokens_per_minute=1000, window_s=1.0)
    assert parse_lm_budget("openai/x rpm=60") == LMBudget(model="openai/x", requests_per_minute=60)
    for bad, says in [
        ("", "at least the LM"),
        ("gpt4 rpm=1", "provider/name"),
        ("openai/x@ftp://h rpm=1", "http"),
        ("openai/x", "at least one limit"),
        ("openai/x window=1", "at least one limit"),
        ("openai/x rps=1", "not one of"),
        ("openai/x rpm=fast", "must be a number"),
        ("openai/x rpm=1 rpm=2", "twice"),
        ("openai/x concurrent=0", "max_concurrent"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_lm_budget(bad)


def test_lm_budgets_setting(tmp_path: Any) -> None:
    from dspex_trio._cli import _parser
    from dspex_trio._cli_settings import SettingsError, resolve_settings

    config = tmp_path / "serve.toml"
    config.write_text('lm_budgets = ["openai/a rpm=10"]\n')
    from_file = resolve_settings(file=str(config), environ={}, flags={})
    assert from_file.lm_budgets == ("openai/a rpm=10",)
    from_env = resolve_settings(
        file=None, environ={"DSPEX_LM_BUDGETS": "openai/a rpm=1, openai/b tpm=5"}, flags={}
    )
    assert from_env.lm_budgets == ("openai/a rpm=1", "openai/b tpm=5")
    args = _parser().parse_args(
        ["serve", "--lm-budget", "openai/c concurrent=2", "--lm-budget", "openai/d rpm=3"]
    )
    assert args.lm_budgets == ["openai/c concurrent=2", "openai/d rpm=3"]
    with pytest.raises(SettingsError, match="rps="):
        resolve_settings(file=None, environ={}, flags={"lm_budgets": ("openai/a rps=1",)})


def test_async_capacity_setting() -> None:
    from dspex_trio._cli import _parser
    from dspex_trio._cli_settings import SettingsError, resolve_settings

    assert resolve_settings(file=None, environ={}, flags={}).async_capacity == 0
    assert (
        resolve_settings(file=None, environ={"DSPEX_ASYNC_CAPACITY": "512"}, flags={}).async_capacity == 512
    )
    assert _parser().parse_args(["serve", "--async-capacity", "64"]).async_capacity == 64
    with pytest.raises(SettingsError, match="async_capacity"):
        resolve_settings(file=None, environ={}, flags={"async_capacity": -1})
