"""The pool: supervised worker slots, least-loaded routing, bounded admission, host-owned sessions.

Structure (all in the pool's nursery):
- one supervisor task per slot: starts a worker, waits until it fails or retires, starts the next one
  (one-for-one), under a restart budget; a worker retiring (recycled) drains in its own task while its
  replacement starts;
- a maintenance task: session TTL sweeps and worker RSS checks.
Callers never touch a nursery: ``call()``, ``execute()`` and ``stream()`` run through the dispatch loop
(``dspex_trio._dispatch.Dispatch``), whose placement hook here (``_checkout``) takes the least-loaded
ready worker with free capacity (waiting in a bounded queue when none has); the call is multiplexed on
it, and re-dispatched when it never started, as ``dspex_trio._retry.Attempts`` decides.
"""

from __future__ import annotations

import collections
import functools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import attrs
import trio

from dspex_trio import _log_context as log_context
from dspex_trio._breaker import CircuitBreaker, CircuitState
from dspex_trio._call_metrics import CallMetrics
from dspex_trio._dispatch import Dispatch
from dspex_trio._errors import (
    CallTimeout,
    DspexError,
    Overloaded,
    PoolUnavailable,
    ProtocolError,
    WorkerClosed,
    WorkerCrashed,
    WorkerStartFailed,
)
from dspex_trio._events import EventBus, Subscription
from dspex_trio._exports import NoPublicConstructor
from dspex_trio._health import HealthSnapshot, WorkerHealth, worker_state_data
from dspex_trio._launcher import Launcher, WorkerSpec
from dspex_trio._lm_budgets import LMBudget, LMBudgets
from dspex_trio._lm_cache import LMCache
from dspex_trio._options import PoolOptions, WorkerOptions, pool_options_from
from dspex_trio._pool_launcher import open_launcher
from dspex_trio._programs_host import ProgramHost, program_module_error, program_spec
from dspex_trio._retry import RandomSource, RetryPolicy, place
from dspex_trio._sessions import public_session_id
from dspex_trio._states import TERMINAL, WorkerState
from dspex_trio._statistics import LatencySummary, PoolStatistics
from dspex_trio._util import open_service_nursery
from dspex_trio._worker import Worker, next_worker_id, start_worker

logger = logging.getLogger("dspex_trio.pool")

MAINTENANCE_INTERVAL_S: Final = 1.0
"""How often sessions are swept for the idle TTL, in seconds."""
LATENCY_WINDOW: Final = 2048
"""Latest call latencies kept per method for the percentiles."""


@attrs.define(eq=False)
class _Tenure:
    """One worker's time in a slot."""

    slot: int
    worker: Worker
    started_at: float
    ended: trio.Event = attrs.Factory(trio.Event)
    """Set when the worker stops or fails, or is asked to retire."""
    retiring: bool = False
    end_reason: str = ""
    """Why the worker stopped or failed (its last transition's reason), for the log."""
    programs: set[tuple[str, int]] = attrs.Factory(set)
    """(program id, version) the worker holds in its cache, as far as the pool knows."""


class Pool(ProgramHost, metaclass=NoPublicConstructor):
    """A supervised pool of workers. Made by :func:`open_pool` (``Pool(...)`` raises ``TypeError``)."""

    name = "pool"
    """The backend name (see ``dspex_trio.Backend``)."""

    def __init__(
        self,
        *,
        options: PoolOptions,
        worker_options: WorkerOptions,
        launcher: Launcher,
        diagnostics: bool,
        lm: Any,
        clock: Callable[[], float] | None,
        fail_at_start: int | None = None,
        rng: RandomSource | None = None,
        lm_budgets: Iterable[LMBudget] | None = None,
        lm_cache: LMCache | None = None,
        events: EventBus | None = None,
    ) -> None:
        super().__init__(clock=clock, session_ttl=options.session_ttl, lm=lm)
        self.options = options
        self.worker_options = worker_options
        self.diagnostics = diagnostics
        self._launcher = launcher
        self._launcher_note = launcher.name
        self._fail_at_start = fail_at_start
        self._live: dict[str, _Tenure] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self._queue_slots = trio.Semaphore(options.max_queue)
        self._closing = False
        self._in_flight = 0
        self._drained = trio.Event()
        self.breaker = CircuitBreaker(
            clock=trio.current_time,
            failure_threshold=options.restart_intensity + 1,
            window=options.restart_period,
            reset_timeout=options.probe_backoff,
            reset_timeout_max=options.probe_backoff_max,
            half_open_probes=min(options.half_open_probes, options.workers),
            on_change=self._set_circuit,
            trip_label="restart budget spent",
        )
        """The circuit breaker, fed by the restart budget's counted failures."""
        self.retry = RetryPolicy(
            initial=options.retry_backoff,
            multiplier=options.retry_backoff_multiplier,
            cap=options.retry_backoff_max,
            jitter=options.retry_jitter,
            max_attempts=options.retry_max_attempts,
        )
        """Attempts of a call and the backoff between them (what follows a failed attempt is
        ``Attempts.after``'s rule)."""
        self._rng: RandomSource = rng if rng is not None else random.Random()
        self._backoff_seconds = 0.0
        self._circuit_changed = trio.Event()
        self._waiting_slots = 0
        self._latency: dict[str, collections.deque[float]] = {}
        self._counts = collections.Counter[str]()
        self.call_metrics = CallMetrics()
        """Calls by method and outcome, duration histograms (read by the Prometheus collector)."""
        self._nursery: trio.Nursery | None = None
        self._slot_restarts = collections.Counter[int]()
        self._starting: dict[int, str] = {}
        """Slot -> the id of the worker starting in it (for the log line of a start that fails)."""
        self._slots: set[int] = set(range(options.workers))
        """The slots the pool keeps filled (``resize`` adds and removes some)."""
        self._next_slot = options.workers
        self.events = events if events is not None else EventBus(backend="pool")
        """Health events: every worker state transition and circuit change (``open_pool`` makes the bus
        before the launcher, so that a shared launcher's events reach it too)."""
        self.lm_cache = lm_cache
        """How the workers cache LM answers (None: they do not; docs/lm.md, "Cache")."""
        self.lm_budgets = (
            None if lm_budgets is None else LMBudgets(lm_budgets, publish=self.events.publish, rng=self._rng)
        )
        """The pool-wide LM budgets its workers lease from (None: workers do not lease)."""
        self._transition_hooks: list[Callable[[Worker, WorkerState, WorkerState, str], None]] = []
        """Called synchronously on every worker state transition, after its health event is published
        (tests and the chaos benchmark hook in here; applications read ``subscribe_health()``)."""

    # -- public API -----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """The workers the pool keeps (``options.workers``, until ``resize``)."""
        return len(self._slots)

    async def resize(self, workers: int) -> None:
        """Keep ``workers`` workers (at least 1) from now on.

        Growing starts the new slots and returns once each has started its worker (or spent its first
        attempt: a slot that cannot start one retries under the restart budget, as any slot). Shrinking
        retires the workers of the removed slots (the newest slots first) and returns at once: they take
        no new calls, finish theirs (up to ``drain_grace``) and are torn down in the background.
        With ``RayLauncher``, new workers are Ray's to place (its autoscaler may add a node for them).

        Raises:
            ValueError: ``workers`` is not an int of at least 1.
            WorkerClosed: the pool is closing.
        """
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, not {workers!r}")
        if self._closing or self._nursery is None:
            raise WorkerClosed("the pool is closing")
        await trio.lowlevel.checkpoint()  # a checkpoint whichever way it goes (shrinking does not wait)
        current = sorted(self._slots)
        logger.info("pool resized from %d to %d workers", len(current), workers)
        if workers < len(current):
            for slot in current[workers:]:
                self._slots.discard(slot)
                for tenure in list(self._live.values()):
                    if tenure.slot == slot:
                        self._retire_for_resize(tenure)
            self._wake_supervisors()
            return
        added = range(self._next_slot, self._next_slot + workers - len(current))
        self._next_slot += len(added)
        self._slots.update(added)
        async with trio.open_nursery() as starting:
            for slot in added:
                starting.start_soon(self._nursery.start, self._supervise_slot, slot)

    def _retire_for_resize(self, tenure: _Tenure) -> None:
        if not tenure.retiring:
            worker_id = tenure.worker.worker_id
            _log_worker(
                logging.INFO, worker_id, "worker %s retiring: its slot was removed by resize", worker_id
            )
            tenure.retiring = True
            tenure.ended.set()

    @property
    def circuit(self) -> CircuitState:
        return self.breaker.state

    @property
    def launcher_name(self) -> str:
        return self._launcher_note

    def workers(self) -> list[Worker]:
        """The live workers (a snapshot)."""
        return [t.worker for t in self._live.values()]

    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        wait: bool = False,
    ) -> Any:
        """Run ``method(params)`` on the least-loaded ready worker and return its result.

        When ``params`` names a program (``{"program": "<id>", ...}``) it is looked up in ``session``
        (``ProgramNotFound`` if absent) and sent by reference, with its spec to a worker that lacks it.

        Raises:
            Overloaded: the admission queue is full (unless ``wait``: then it waits up to the deadline).
            PoolUnavailable: the circuit is open (too many workers failing); the reason is included.
            CallTimeout: ``timeout`` seconds passed (queueing included).
            WorkerCrashed: the worker died after acking the call (retried once elsewhere when
                ``idempotent``); calls never acked are re-dispatched transparently.
            WorkerClosed: the pool is closing.
            and the worker's own errors (``UnknownMethod``, ``InvalidParams``, ...).
        Cancelling the caller cancels the call in its worker. The worker is told the caller's deadline,
        however it was set: ``with trio.move_on_after(0.5): await pool.call(...)`` ends the call in the
        worker at 0.5 s as ``timeout=0.5`` does (the caller then sees plain cancellation, not
        ``CallTimeout``).
        """
        program = self._resolve(params, session)
        dispatch = Dispatch(
            self, method, params, program=program, timeout=timeout, idempotent=idempotent, wait=wait
        )
        return await dispatch.result()

    async def _job_call(self, method: str, params: Any, *, session: str | None, timeout: float | None) -> Any:
        """One example of a job: idempotent, and waiting for a place in a full queue."""
        return await self.call(method, params, session=session, timeout=timeout, idempotent=True, wait=True)

    def _job_concurrency(self) -> int:
        """A job's examples in flight by default: the capacity of every worker."""
        return self.options.workers * self.worker_options.capacity

    def _job_workers(self) -> int:
        """Every worker of the pool runs a job's calls."""
        return self.options.workers

    # -- DSPy programs --------------------------------------------------------------------------------
    async def create_program(
        self,
        signature: str | dict[str, Any] | None = None,
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
        include: list[str] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> str:
        """Create a program in ``session`` and return its id (see ``ProgramHost.create_program``: a
        built-in from ``signature``, or a registered program by name, with the built-in's ``options``).

        ``signature`` is a string (``"question: str, context: list[str] -> answer, confidence: float"``)
        or a dict ``{"inputs": [...], "outputs": [...], "instructions": ...}``. A worker parses and builds
        it first (never ``eval``), so an invalid signature, module, tool or state is an
        ``InvalidParams`` here, not at execution.
        """
        spec = program_spec(signature, module, instructions, state, include, options)
        return await self._add_program(spec, session, timeout)

    def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        lm_cache: str | None = None,
    ) -> Dispatch:
        """Run a program streamed: ``async with pool.stream(...) as events: async for event in events``.

        The events are the worker's ``{"event": "chunk", "field", "chunk"}`` as chunks arrive, then one
        ``{"event": "completed", "outputs", "usage", "backend"}``. Placed, re-dispatched and timed out as
        ``call()`` is (a worker that lacks the program gets its spec; a call never acked goes to another
        worker), until the block has seen an event; after, a failure raises. Leaving the block early
        cancels the execution in its worker. ``lm_cache``: this call's LM cache mode, as ``execute``'s.
        """
        spec = self.sessions.program(session, program)
        params = self._execute_params(program, inputs, session, lm_cache)
        return Dispatch(self, "execute", params, program=spec, timeout=timeout, stream=True)

    async def _apply_default_lm(self) -> None:
        """The default LM changed: apply it on every worker now (workers started later get it too)."""
        async with trio.open_nursery() as nursery:
            for worker in self.workers():
                nursery.start_soon(self._configure_worker, worker)

    async def _configure_worker(self, worker: Worker) -> None:
        if self.lm is None:
            return
        try:
            await worker.call("configure_lm", {"lm": self.lm}, timeout=self.worker_options.ack_timeout * 2)
        except (WorkerCrashed, WorkerClosed, ProtocolError, CallTimeout):
            pass  # it is gone; its replacement is configured when it starts

    def subscribe_health(self, *, buffer: int | None = None) -> AbstractAsyncContextManager[Subscription]:
        """``async with pool.subscribe_health() as events: async for event in events: ...``

        Every worker state transition (``worker_state``: worker_id, pid, from, to, reason) and circuit
        change (``circuit``). Bounded: a subscriber that falls ``buffer`` events behind misses events and
        then receives one ``lagged`` event with the count; ``health()`` gives a fresh snapshot.
        """
        return self.events.subscribe(buffer=buffer)

    def health(self) -> HealthSnapshot:
        """Per-worker state and heartbeat age, restarts, the circuit, the launcher, the backend."""
        workers = tuple(
            WorkerHealth.of(t.worker, restarts=self._slot_restarts[t.slot], retiring=t.retiring)
            for t in self._live.values()
        )
        return HealthSnapshot(
            backend="pool",
            workers=workers,
            size=self.size,
            restarts=self._counts["restarts"],
            circuit=self.breaker.state,
            circuit_reason=self.breaker.reason,
            launcher=self._launcher.name,
            seq=self.events.published,
        )

    def statistics(self) -> PoolStatistics:
        workers = tuple(
            attrs.evolve(t.worker.statistics(), restarts=self._slot_restarts[t.slot])
            for t in self._live.values()
        )
        latency = {method: LatencySummary.of(samples) for method, samples in self._latency.items()}
        checkouts = self._counts["checkouts"]
        return PoolStatistics(
            workers=workers,
            size=self.size,
            ready=sum(1 for t in self._live.values() if not t.retiring and t.worker.accepting),
            in_flight=self._in_flight,
            queued=self.options.max_queue - self._queue_slots.value,
            calls=self._counts["calls"],
            completed=self._counts["completed"],
            failed=self._counts["failed"],
            overloaded=self._counts["overloaded"],
            unavailable=self._counts["unavailable"],
            redispatched=self._counts["redispatched"],
            retried=self._counts["retried"],
            backoffs=self._counts["backoffs"],
            backoff_seconds=self._backoff_seconds,
            restarts=self._counts["restarts"],
            recycled=self._counts["recycled"],
            launcher=self._launcher_note,
            circuit=self.breaker.state,
            circuit_reason=self.breaker.reason,
            circuit_opened=self.breaker.statistics().opened,
            checkout_success_rate=(self._counts["checkouts_ok"] / checkouts) if checkouts else 1.0,
            sessions=len(self.sessions),
            latency=latency,
            lm=() if self.lm_budgets is None else self.lm_budgets.statistics(),
        )

    # -- dispatch (the loop is ``Dispatch``'s; these are its hooks) -----------------------------------
    async def _checkout(self, dispatch: Dispatch) -> _Tenure:
        """The worker for ``dispatch``'s next attempt, counted in flight until ``_end_attempt``: the
        least-loaded ready one with free capacity (``place``). When none has, the call waits in the
        bounded queue (``Overloaded`` when it is full, unless ``dispatch.wait``), up to its deadline
        (``CallTimeout``)."""
        self._counts["checkouts"] += 1
        self._check_admission()
        tenure = place(self._live.values(), dispatch.key, dispatch.avoid)
        if tenure is None:
            tenure = await self._queue_for(dispatch)
        self._counts["checkouts_ok"] += 1
        self._in_flight += 1
        return tenure

    async def _queue_for(self, dispatch: Dispatch) -> _Tenure:
        deadline = dispatch.deadline
        try:
            self._queue_slots.acquire_nowait()
        except trio.WouldBlock:
            if not dispatch.wait:
                self._counts["overloaded"] += 1
                raise Overloaded(
                    f"all {len(self._live)} workers are at capacity and {self.options.max_queue} calls are queued"
                ) from None
            with trio.move_on_at(deadline):
                await self._queue_slots.acquire()
            if trio.current_time() >= deadline:
                raise CallTimeout("timed out waiting for a place in the pool's queue") from None
        try:
            while True:
                with trio.move_on_at(deadline):
                    await self._lot.park()
                self._check_admission()
                tenure = place(self._live.values(), dispatch.key, dispatch.avoid)
                if tenure is not None:
                    return tenure
                if trio.current_time() >= deadline:
                    raise CallTimeout("timed out waiting for a worker with free capacity")
        finally:
            self._queue_slots.release()

    def _end_attempt(self, tenure: _Tenure) -> None:
        self._in_flight -= 1
        self._lot.unpark()
        limit = self.options.max_calls_per_worker
        if limit is not None and not tenure.retiring:
            stats = tenure.worker.statistics()
            if stats.calls_served + stats.calls_failed >= limit:
                self._retire(tenure, f"served {limit} calls")
        if self._closing and self._in_flight == 0:
            self._drained.set()

    def _record_latency(self, method: str, seconds: float) -> None:
        samples = self._latency.get(method)
        if samples is None:
            samples = self._latency[method] = collections.deque(maxlen=LATENCY_WINDOW)
        samples.append(seconds)

    def _record_outcome(self, method: str, outcome: str, seconds: float) -> None:
        self.call_metrics.observe(method, outcome, seconds)

    def _check_admission(self) -> None:
        if self._closing:
            raise WorkerClosed("the pool is closing")
        if not self.breaker.allows_calls:
            self._counts["unavailable"] += 1
            reason = self.breaker.reason
            raise PoolUnavailable(f"the pool is unavailable: {reason}", reason=reason)

    # -- supervision ----------------------------------------------------------------------------------
    def _on_transition(self, worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        tenure = self._live.get(worker.worker_id)
        if tenure is not None and new in TERMINAL:
            tenure.end_reason = reason
            tenure.ended.set()
        if new in (WorkerState.READY,):
            self._lot.unpark_all()
        self.events.publish("worker_state", worker_state_data(worker, old, new, reason))
        for hook in self._transition_hooks:
            hook(worker, old, new, reason)

    def _retire(self, tenure: _Tenure, reason: str) -> None:
        if tenure.retiring:
            return
        worker_id = tenure.worker.worker_id
        _log_worker(logging.INFO, worker_id, "worker %s retiring: %s", worker_id, reason)
        tenure.retiring = True
        self._counts["recycled"] += 1
        tenure.ended.set()

    def _spec(self) -> WorkerSpec:
        return WorkerSpec(
            worker_id=next_worker_id(),
            diagnostics=self.diagnostics,
            capacity=self.worker_options.capacity,
            max_frame_bytes=self.worker_options.max_frame_bytes,
            fail_at_start=self._fail_at_start,
            programs=self.worker_options.programs,
            lease_lms=self.lm_budgets is not None,
            async_capacity=self.worker_options.async_capacity,
            lm_cache=() if self.lm_cache is None else tuple(self.lm_cache.argv()),
        )

    async def _run_worker(
        self, slot: int, *, task_status: trio.TaskStatus[_Tenure] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own one worker for its whole life: start it, serve, drain if retiring, tear it down."""
        async with open_service_nursery() as nursery:
            spec = self._spec()
            self._starting[slot] = spec.worker_id
            worker = await start_worker(
                nursery,
                launcher=self._launcher,
                spec=spec,
                options=self.worker_options,
                on_transition=self._on_transition,
                lm_budgets=self.lm_budgets,
            )
            if self.lm is not None:
                await self._configure_worker(worker)
            tenure = _Tenure(slot, worker, trio.current_time())
            self._live[worker.worker_id] = tenure
            try:
                self._lot.unpark_all()
                task_status.started(tenure)
                await tenure.ended.wait()
                if tenure.retiring and worker.accepting:
                    with trio.move_on_after(self.options.drain_grace):
                        await worker.wait_idle()
            finally:
                self._live.pop(worker.worker_id, None)
                with trio.CancelScope(shield=True):
                    await worker.aclose(grace=0.0 if self._closing else None)

    async def _supervise_slot(
        self, slot: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self._nursery is not None
        breaker = self.breaker
        started = False
        previous: _Tenure | None = None  # the worker the next one replaces
        while not self._closing and slot in self._slots:
            probing = False
            if not breaker.allows_calls:
                if not breaker.try_probe():
                    if not started:
                        started = True
                        task_status.started()
                    changed = self._circuit_changed
                    self._waiting_slots += 1
                    try:
                        with trio.move_on_at(breaker.retry_at):
                            await changed.wait()
                    finally:
                        self._waiting_slots -= 1
                    continue
                probing = True
            try:
                tenure: _Tenure = await self._nursery.start(self._run_worker, slot)
            except WorkerStartFailed as exc:
                if not started and (unusable := program_module_error(exc)) is not None:
                    raise unusable from None  # the program modules cannot be used: no pool
                self._counts["restarts"] += 1 if started else 0
                _log_worker(logging.WARNING, self._starting.pop(slot, ""), "slot %d: %s", slot, exc)
                reason = str(exc).splitlines()[0]
                if probing:
                    breaker.probe_failed(reason)
                else:
                    breaker.record_failure(reason)
                continue  # a first start retries within the budget; after it, the breaker decides
            self._starting.pop(slot, None)
            if slot not in self._slots:  # removed by resize while its worker started
                self._retire_for_resize(tenure)
            if probing:
                breaker.probe_succeeded()
                if breaker.state is CircuitState.HALF_OPEN and self._waiting_slots == 0:
                    breaker.probes_exhausted()  # no empty slot left to probe with
                self._wake_supervisors()
            if not started:
                started = True
                task_status.started()
            worker = tenure.worker
            if previous is not None:
                _log_worker(
                    logging.INFO,
                    worker.worker_id,
                    "worker %s (pid %d) replaced worker %s in slot %d",
                    worker.worker_id,
                    worker.pid,
                    previous.worker.worker_id,
                    slot,
                )
            else:
                _log_worker(
                    logging.DEBUG,
                    worker.worker_id,
                    "worker %s (pid %d) started in slot %d",
                    worker.worker_id,
                    worker.pid,
                    slot,
                )
            await tenure.ended.wait()
            previous = tenure
            if tenure.retiring or self._closing:
                continue
            _log_worker(
                logging.WARNING,
                worker.worker_id,
                "worker %s (pid %d) %s: %s; starting a replacement",
                worker.worker_id,
                worker.pid,
                worker.state,
                tenure.end_reason or "stopped",
            )
            self._counts["restarts"] += 1
            self._slot_restarts[slot] += 1
            uptime = trio.current_time() - tenure.started_at
            stats = tenure.worker.statistics()
            if uptime < self.options.min_healthy_uptime and stats.calls_served == 0:
                breaker.record_failure(
                    f"worker {tenure.worker.worker_id} failed after {uptime:.3f} s without serving a call"
                )
        if not started:  # removed by resize (or the pool closed) before its first worker
            task_status.started()

    def _set_circuit(self, old: CircuitState, new: CircuitState, reason: str) -> None:
        """The breaker changed state: log, publish a ``circuit`` event, wake whoever waits on it."""
        if new is CircuitState.OPEN:
            delay = self.breaker.retry_at - trio.current_time()
            logger.error("pool circuit open (next probe in %.2f s): %s", delay, reason)
        elif new is CircuitState.CLOSED:
            logger.info("pool circuit closed: probe workers started")
        self.events.publish("circuit", {"from": str(old), "to": str(new), "reason": reason})
        if new is CircuitState.OPEN:
            self._lot.unpark_all()  # queued callers fail with PoolUnavailable
        self._wake_supervisors()

    def _wake_supervisors(self) -> None:
        self._circuit_changed.set()
        self._circuit_changed = trio.Event()

    async def _maintain(self) -> None:
        next_rss = trio.current_time() + self.options.rss_check_interval
        while True:
            await trio.sleep(min(MAINTENANCE_INTERVAL_S, self.options.rss_check_interval))
            expired = self.sessions.expire()
            if expired:
                logger.info("sessions expired: %s", ", ".join(map(public_session_id, expired)))
            limit = self.options.max_worker_rss_bytes
            if limit is not None and trio.current_time() >= next_rss:
                next_rss = trio.current_time() + self.options.rss_check_interval
                for tenure in list(self._live.values()):
                    if tenure.retiring or not tenure.worker.accepting:
                        continue
                    try:
                        stats = await tenure.worker.call("stats", timeout=self.worker_options.ack_timeout)
                    except DspexError:
                        continue
                    if stats.get("rss_bytes", 0) > limit:
                        self._retire(tenure, f"resident memory {stats['rss_bytes']} B over {limit} B")

    async def _close(self) -> None:
        """Stop admission, drain in-flight calls up to the grace; the caller then cancels the nursery."""
        self._closing = True
        self._lot.unpark_all()
        self._wake_supervisors()
        if self._in_flight:
            with trio.move_on_after(self.options.drain_grace):
                await self._drained.wait()


@asynccontextmanager
async def open_pool(
    workers: int | None = None,
    lm: Any = None,
    diagnostics: bool = False,
    *,
    options: PoolOptions | None = None,
    worker_options: WorkerOptions | None = None,
    launcher: str | Launcher = "auto",
    clock: Callable[[], float] | None = None,
    fail_at_start: int | None = None,
    rng: RandomSource | None = None,
    lm_budgets: Iterable[LMBudget] | None = None,
    lm_cache: LMCache | None = None,
    **option_fields: Any,
) -> AsyncIterator[Pool]:
    """Open a pool of ``workers`` supervised worker processes (2 unless the options say otherwise).

    Returns once every slot has a ready worker (or the circuit opened trying). Leaving the block stops
    admission, lets in-flight calls finish for up to ``drain_grace`` seconds, then tears every worker
    down (and the zygote): nothing is left running.

    ``lm`` is the default LM configuration (None: the embedded offline LM). ``options`` is a
    :class:`PoolOptions` and ``worker_options`` a :class:`WorkerOptions`; or pass their fields as keywords
    (``option_fields``; ``workers`` is one of them): each record one way, not both (``TypeError``).
    ``launcher`` is "zygote" (fork workers from a template process that imported dspy once),
    "subprocess" (``python -m bridge_child``), "auto" (zygote where ``os.fork`` exists, else
    subprocess), a ``Launcher``, or a :class:`~dspex_trio.SharedLauncher` from
    :func:`~dspex_trio.open_launcher` (a warm template shared by pools: used, not owned; its needs must
    match this pool's, else :class:`~dspex_trio.LauncherMismatch`); ``clock`` the session store's clock;
    ``fail_at_start`` (diagnostics) makes every worker exit with that code before its handshake; ``rng``
    the random source of the retry jitter (a seeded ``random.Random`` in tests). ``lm_budgets`` (an
    iterable of :class:`LMBudget`; docs/lm.md) makes the workers lease before each LM request, so the
    budgets hold for the whole pool and a ``429`` pauses that LM for every worker; ``[]`` leases with no
    limits (pauses only); None (the default) does not lease. ``lm_cache`` (an :class:`LMCache`) turns
    DSPy's LM answer cache on in the workers: bounded in memory per worker, optionally on disk in one
    directory the pool's workers share, with a size cap (docs/lm.md, "Cache"); None (the default): off.
    """
    if workers is not None:
        option_fields["workers"] = workers
    pool_options, worker_opts = pool_options_from(options, worker_options, option_fields)
    if fail_at_start is not None and not diagnostics:
        raise ValueError("fail_at_start needs diagnostics=True")
    # The launcher (a zygote) outlives the nursery: every worker is reaped before the template stops.
    events = EventBus(backend="pool")  # made here: a shared launcher's health events reach it too
    opened = open_launcher(
        launcher,
        python=pool_options.python,
        worker_env=worker_opts.worker_env,
        programs=worker_opts.programs,
        events=events.publish,
    )
    started = False
    try:
        async with opened as chosen, open_service_nursery() as nursery:
            pool = Pool._create(
                options=pool_options,
                worker_options=worker_opts,
                launcher=chosen,
                diagnostics=diagnostics,
                lm=lm,
                clock=clock,
                fail_at_start=fail_at_start,
                rng=rng,
                lm_budgets=lm_budgets,
                lm_cache=lm_cache,
                events=events,
            )
            pool._nursery = nursery
            try:
                async with trio.open_nursery() as starting:
                    for slot in range(pool_options.workers):
                        starting.start_soon(nursery.start, pool._supervise_slot, slot)
                nursery.start_soon(pool._maintain)
                started = True
                yield pool
            finally:
                with trio.CancelScope(shield=True):
                    await pool._close()
                    async with trio.open_nursery() as closing:  # every ladder at once, tasks still alive
                        for worker in pool.workers():
                            closing.start_soon(functools.partial(worker.aclose, grace=0.0))
                nursery.cancel_scope.cancel()
    except BaseException as exc:  # a program module that cannot be used: one error, however it came
        unusable = None if started else program_module_error(exc)
        if unusable is None:
            raise
        raise unusable from None


def _log_worker(level: int, worker_id: str, message: str, *args: Any) -> None:
    """A supervisor's line about one worker: with its ``worker_id`` field (``_log_context.py``), as the
    worker's own tasks' lines have it."""
    if not logger.isEnabledFor(level):
        return
    if not worker_id:  # not known (a start that failed before its worker had an id)
        logger.log(level, message, *args)
        return
    with log_context.bound(worker_id=worker_id):
        logger.log(level, message, *args)
