"""A Hypothesis stateful model of the pool against real worker processes.

The pool runs in its own ``trio.run`` in a background thread (:class:`PoolHost`) for the whole example;
each rule is a short coroutine run in that loop with ``trio.from_thread.run`` (bounded by
``fail_after``), so calls submitted by one rule keep running while later rules kill, stop or corrupt
workers. Rules: submit calls (echo of a unique value, short sleeps; idempotent or not), cancel one,
SIGKILL a worker, SIGSTOP one (detected by heartbeats, killed, replaced), corrupt a frame (``garbage``),
spew on stdout, exit mid-call (``crash``), and shut down (the last rule when it is drawn; teardown does it
otherwise).

Invariants, after every step: no call ever has more than one outcome and none has an unexpected one (every
failure is a ``DspexError`` subclass or a cancellation); no reply reaches another caller (each echo comes
back with its own value, each sleep with its own duration); never more live worker processes than slots;
the circuit stays closed and ``restarts`` equals the workers the rules destroyed, exactly (each victim is
first made to serve a call, so no death counts against the restart budget); the health events, replayed,
give the states that ``health()`` reports. At the end: every call ended exactly once, nothing is left.

CI runs a few short examples (``test_pool_model``); ``--run-slow`` runs many long ones.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dspex_trio
from dspex_trio import CircuitState, DspexError, ProtocolError, WorkerCrashed, WorkerState
from tests.dspex_trio.test_faults import live_worker_processes, ready_pids
from tests.helpers import child_processes, kill_quietly, pid_alive, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and signals")

SLOTS = 2
RULE_TIMEOUT_S = 20.0
"""Bound of one rule's work in the pool's loop."""
CALL_TIMEOUT_S = 15.0
"""Every call has a deadline: a hang is a failure, never a stuck test."""
HEARTBEAT: dict[str, Any] = {"heartbeat_interval": 0.1, "heartbeat_missed": 3}
TERMINAL = {WorkerState.STOPPED, WorkerState.FAILED}
T = TypeVar("T")


class PoolHost:
    """One pool, opened in a ``trio.run`` of its own thread, driven from the test's thread."""

    def __init__(self, launcher: str) -> None:
        self.launcher = launcher
        self.pool: dspex_trio.Pool
        self.nursery: trio.Nursery
        self.token: trio.lowlevel.TrioToken
        self.subscription: Any = None
        self.snapshot: Any = None
        self._stop: trio.Event
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.outcomes: dict[int, list[tuple[str, Any]]] = {}
        self.expected: dict[int, Any] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.ids = itertools.count(1)
        self.thread = threading.Thread(target=self._thread, name="pool-host", daemon=True)
        self.thread.start()
        if not self._started.wait(60):
            raise AssertionError("the pool did not open within 60 s")
        if self._error is not None:
            raise self._error

    def _thread(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with (
            trio.open_nursery() as calls,  # outlives the pool: calls in flight see its shutdown
            dspex_trio.open_pool(
                workers=SLOTS,
                diagnostics=True,
                launcher=self.launcher,
                drain_grace=1.0,
                shutdown_grace=0.5,
                ack_timeout=2.0,
                **HEARTBEAT,
            ) as pool,
            pool.subscribe_health(buffer=1_000_000) as subscription,
        ):
            self.pool, self.nursery, self.subscription = pool, calls, subscription
            self.snapshot = pool.health()  # what the events start from (subscribed first)
            self.token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            with trio.fail_after(RULE_TIMEOUT_S):
                return await fn(*args)

        return trio.from_thread.run(bounded, trio_token=self.token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def close(self) -> None:
        if self.thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            self.thread.join(RULE_TIMEOUT_S + 10)
        assert not self.thread.is_alive(), "the pool did not close"
        if self._error is not None:
            raise self._error

    # -- calls (in the pool's loop) --------------------------------------------------------------------
    def submit(self, call_id: int, method: str, params: Any, expected: Any, *, idempotent: bool) -> None:
        self.expected[call_id] = expected
        self.outcomes[call_id] = []
        scope = self.scopes[call_id] = trio.CancelScope()

        async def call() -> None:
            outcome: tuple[str, Any] | None = None
            with scope:
                try:
                    value = await self.pool.call(
                        method, params, timeout=CALL_TIMEOUT_S, idempotent=idempotent
                    )
                    outcome = ("ok", value)
                except DspexError as exc:
                    outcome = ("error", exc)
                except Exception as exc:
                    outcome = ("unexpected", exc)
            self.outcomes[call_id].append(outcome or ("cancelled", None))
            del self.scopes[call_id]

        self.nursery.start_soon(call)

    async def warm(self) -> None:
        """Make every ready worker serve a call, so that its death counts no restart-budget failure."""
        for worker in self.pool.workers():
            if worker.accepting:
                await worker.call("ping", timeout=5)

    async def settled(self, victim: int | None = None) -> None:
        """Wait until the victim (if any) is gone and every slot has a ready worker again."""
        pool = self.pool

        def full() -> bool:
            pids = ready_pids(pool)
            return len(pids) == SLOTS and victim not in pids

        await wait_until(full, 10, lambda: f"{pool.statistics()}")
        if victim is not None:
            await wait_until(lambda: not pid_alive(victim), 5)


class PoolModel(RuleBasedStateMachine):
    host: PoolHost | None = None

    def __init__(self) -> None:
        super().__init__()
        self.host = None
        self.deaths = 0
        self.closed = False
        self.replayed: dict[str, WorkerState] = {}
        self.failed_events = 0
        self.failures: list[str] = []
        """Why each worker failed (from the health events), for the messages."""
        self.last_seq = 0

    # -- set-up -----------------------------------------------------------------------------------------
    @initialize(launcher=st.sampled_from(["subprocess", "zygote"]))
    def open(self, launcher: str) -> None:
        self.host = PoolHost(launcher)
        self.replayed = {w.worker_id: w.state for w in self.host.snapshot.workers}
        self.last_seq = self.host.snapshot.seq

    @property
    def h(self) -> PoolHost:
        assert self.host is not None
        return self.host

    def open_and_running(self) -> bool:
        return self.host is not None and not self.closed

    # -- rules ------------------------------------------------------------------------------------------
    @precondition(lambda self: self.open_and_running())
    @rule(
        count=st.integers(1, 8),
        method=st.sampled_from(["echo", "sleep"]),
        idempotent=st.booleans(),
        size=st.integers(0, 3000),
    )
    def submit(self, count: int, method: str, idempotent: bool, size: int) -> None:
        host = self.h

        def start() -> None:
            for _ in range(count):
                call_id = next(host.ids)
                if method == "echo":
                    value = {"id": call_id, "pad": "v" * size}
                    host.submit(call_id, "echo", {"value": value}, value, idempotent=idempotent)
                else:  # a duration unique to the call: its reply names it
                    seconds = round(0.05 + (call_id % 50) * 0.004 + call_id * 1e-7, 7)
                    host.submit(call_id, "sleep", {"seconds": seconds}, seconds, idempotent=idempotent)

        host.run_sync(start)

    @precondition(lambda self: self.open_and_running() and bool(self.h.scopes))
    @rule(index=st.integers(0, 1000))
    def cancel(self, index: int) -> None:
        host = self.h

        def cancel_one() -> None:
            pending = sorted(host.scopes)
            if pending:
                host.scopes[pending[index % len(pending)]].cancel()

        host.run_sync(cancel_one)

    def _signal_a_worker(self, index: int, signum: int) -> None:
        host = self.h

        async def go() -> None:
            await host.warm()
            victims = sorted(ready_pids(host.pool))
            victim = victims[index % len(victims)]
            try:
                os.kill(victim, signum)
                await host.settled(victim)
            finally:
                kill_quietly(victim, signal.SIGCONT)

        host.run(go)
        self.deaths += 1

    @precondition(lambda self: self.open_and_running())
    @rule(index=st.integers(0, 1000))
    def sigkill(self, index: int) -> None:
        self._signal_a_worker(index, signal.SIGKILL)

    @precondition(lambda self: self.open_and_running())
    @rule(index=st.integers(0, 1000))
    def sigstop(self, index: int) -> None:
        self._signal_a_worker(index, signal.SIGSTOP)  # unresponsive after ~0.3-0.4 s: killed, replaced

    def _destroy_by_call(self, method: str, params: Any, error: type[DspexError]) -> None:
        host = self.h

        async def go() -> None:
            await host.warm()
            try:
                await host.pool.call(method, params, timeout=CALL_TIMEOUT_S)  # not idempotent
            except error:
                pass
            else:
                raise AssertionError(f"{method} returned")
            await host.settled()

        host.run(go)
        self.deaths += 1

    @precondition(lambda self: self.open_and_running())
    @rule(size=st.integers(1, 5000))
    def corrupt(self, size: int) -> None:
        self._destroy_by_call("garbage", {"bytes": size}, ProtocolError)

    @precondition(lambda self: self.open_and_running())
    @rule(code=st.integers(0, 120))
    def crash(self, code: int) -> None:
        self._destroy_by_call("crash", {"exit_code": code}, WorkerCrashed)

    @precondition(lambda self: self.open_and_running())
    @rule(size=st.integers(0, 300_000))
    def spew_stdout(self, size: int) -> None:
        host = self.h

        async def go() -> None:
            assert await host.pool.call("spew_stdout", {"bytes": size}, timeout=CALL_TIMEOUT_S) == size

        host.run(go)

    @precondition(lambda self: self.open_and_running())
    @rule()
    def shutdown(self) -> None:
        self._check_health_events()
        self.h.close()
        self.closed = True
        self._check_final()

    @precondition(lambda self: self.closed)
    @rule()
    def closed_pool_stays_closed(self) -> None:
        """After ``shutdown`` (Hypothesis needs one rule that can always run)."""
        assert not self.h.thread.is_alive() and not child_processes()

    # -- invariants -------------------------------------------------------------------------------------
    @invariant()
    def every_call_has_at_most_one_outcome_and_its_own_reply(self) -> None:
        if self.host is None:
            return
        host = self.host

        def check() -> None:
            for call_id, outcomes in host.outcomes.items():
                assert len(outcomes) <= 1, (call_id, outcomes)
                if not outcomes:
                    continue
                kind, value = outcomes[0]
                assert kind != "unexpected", (call_id, value)
                if kind == "ok":
                    assert value == host.expected[call_id], f"call {call_id} got another caller's reply"

        if self.closed:
            check()
        else:
            host.run_sync(check)

    @invariant()
    def never_more_live_workers_than_slots(self) -> None:
        if not self.open_and_running():
            return
        live = live_worker_processes(self.h.pool)
        assert len(live) <= SLOTS, live

    @invariant()
    def the_restart_budget_is_accounted_for_exactly(self) -> None:
        if not self.open_and_running():
            return
        self.h.run_sync(self._replay_events)
        stats = self.h.run_sync(self.h.pool.statistics)
        assert stats.circuit == CircuitState.CLOSED, stats.circuit_reason
        assert stats.restarts == self.deaths, (stats.restarts, self.deaths, self.failures)
        assert stats.unavailable == 0

    @invariant()
    def health_events_match_the_transitions(self) -> None:
        if self.open_and_running():
            self._check_health_events()

    def _check_health_events(self) -> None:
        host = self.h

        def check() -> None:
            self._replay_events()
            health = host.pool.health()
            assert health.seq == self.last_seq
            for worker in health.workers:
                assert self.replayed.get(worker.worker_id, WorkerState.STARTING) == worker.state, worker
            live = {w.worker_id for w in health.workers}
            assert {wid for wid, state in self.replayed.items() if state not in TERMINAL} <= live
            restarts = host.pool.statistics().restarts
            assert self.failed_events == restarts == health.restarts, (restarts, self.failures)

        host.run_sync(check)

    def _replay_events(self) -> None:
        """Apply the health events received since the last call (run it in the pool's loop)."""
        while True:
            try:
                event = self.h.subscription.receive_nowait()
            except trio.WouldBlock:
                return
            assert event.kind == "worker_state", event  # no lag, no circuit change
            assert event.seq == self.last_seq + 1, (event.seq, self.last_seq)
            self.last_seq = event.seq
            wid, old, new = event.data["worker_id"], event.data["from"], event.data["to"]
            assert self.replayed.get(wid, WorkerState.STARTING) == old, (wid, old, new)
            self.replayed[wid] = WorkerState(new)
            if new == WorkerState.FAILED:
                self.failed_events += 1
                self.failures.append(f"{wid}: {event.data['reason']}")

    def _check_final(self) -> None:
        host = self.h
        for call_id, outcomes in host.outcomes.items():
            assert len(outcomes) == 1, f"call {call_id} ended {len(outcomes)} times: {outcomes}"
        assert not host.scopes
        stats = host.pool.statistics()
        assert stats.in_flight == 0 and stats.queued == 0 and stats.workers == ()
        assert stats.restarts == self.deaths and stats.circuit == CircuitState.CLOSED
        assert not child_processes(), child_processes()

    def teardown(self) -> None:
        if self.host is not None and not self.closed:
            try:
                self.shutdown()
            finally:
                self.closed = True
                if self.host.thread.is_alive():
                    self.host.close()


PoolModel.TestCase.settings = settings(
    max_examples=8,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=False,
)
test_pool_model = PoolModel.TestCase


@pytest.mark.slow
def test_pool_model_long() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        PoolModel,
        settings=settings(
            max_examples=int(os.environ.get("DSPEX_MODEL_EXAMPLES", "60")),
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
