"""The pool: supervised worker slots, least-loaded routing, bounded admission, host-owned sessions.

Structure (all in the pool's nursery):
- one supervisor task per slot: starts a worker, waits until it fails or retires, starts the next one
  (one-for-one), under a restart budget; a worker retiring (recycled) drains in its own task while its
  replacement starts;
- a maintenance task: session TTL sweeps and worker RSS checks.
Callers never touch a nursery: ``call()`` checks out the least-loaded ready worker with free capacity
(waiting in a bounded queue when none has), multiplexes its call on it, and re-dispatches calls that
never started when their worker dies.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import random
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import attrs
import trio

from bridge_child import wire
from dspex_trio._breaker import CircuitBreaker, CircuitState
from dspex_trio._errors import (
    CacheMiss,
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
from dspex_trio._launcher import Launcher, WorkerSpec
from dspex_trio._programs_host import ProgramHost, program_events, program_spec
from dspex_trio._retry import RandomSource, RetryPolicy
from dspex_trio._sessions import DEFAULT_SESSION_TTL_S, ProgramSpec
from dspex_trio._states import TERMINAL, WorkerState
from dspex_trio._util import open_service_nursery
from dspex_trio._worker import Worker, WorkerOptions, WorkerStatistics, next_worker_id, start_worker
from dspex_trio._zygote import open_launcher

logger = logging.getLogger("dspex_trio.pool")

MAX_REDISPATCHES: Final = 3
"""Default re-dispatches of a call that never started (``retry_max_attempts`` is this + 1)."""
MAINTENANCE_INTERVAL_S: Final = 1.0
"""How often sessions are swept for the idle TTL, in seconds."""
LAUNCHER_KINDS: Final = ("auto", "zygote", "subprocess")
LATENCY_WINDOW: Final = 2048
"""Latest call latencies kept per method for the percentiles."""


def _at_least(minimum: float) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not value >= minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, not {value!r}")

    return check


@attrs.frozen(kw_only=True)
class PoolOptions:
    """The pool's own settings. Every duration is in seconds."""

    workers: int = attrs.field(default=2, validator=_at_least(1))
    """Worker slots."""
    max_queue: int = attrs.field(default=1024, validator=_at_least(0))
    """Calls waiting for a worker with free capacity; past it, ``Overloaded`` (or wait, if asked)."""
    restart_intensity: int = attrs.field(default=5, validator=_at_least(0))
    """More than this many counted restarts within ``restart_period`` open the circuit (the breaker's
    failure threshold is ``restart_intensity + 1``)."""
    restart_period: float = attrs.field(default=10.0, validator=_at_least(0))
    """The breaker's failure window."""
    min_healthy_uptime: float = attrs.field(default=1.0, validator=_at_least(0))
    """A worker that fails before its handshake, or within this uptime having served no call, counts
    against the restart budget; one killed after serving calls is simply replaced."""
    probe_backoff: float = attrs.field(default=0.5, validator=_at_least(0))
    """The breaker's reset timeout: first wait before a probe while the circuit is open; doubles per
    failed probe up to ``probe_backoff_max``."""
    probe_backoff_max: float = attrs.field(default=30.0, validator=_at_least(0))
    half_open_probes: int = attrs.field(default=1, validator=_at_least(1))
    """Worker starts that must succeed while half-open to close the circuit (a probe is one worker
    start in an empty slot, so at most ``workers`` are needed; fewer if no other slot is empty)."""
    retry_backoff: float = attrs.field(default=0.01, validator=_at_least(0))
    """Wait before re-sending a call after its worker failed; grows by ``retry_backoff_multiplier`` per
    attempt up to ``retry_backoff_max``, with ``retry_jitter`` of it random."""
    retry_backoff_multiplier: float = attrs.field(default=2.0, validator=_at_least(1))
    retry_backoff_max: float = attrs.field(default=1.0, validator=_at_least(0))
    retry_jitter: float = attrs.field(default=0.5, validator=_at_least(0))
    """Random fraction of each retry wait, within [0, 1]."""
    retry_max_attempts: int = attrs.field(default=MAX_REDISPATCHES + 1, validator=_at_least(1))
    """Attempts of one call in all (re-dispatches of never-acked calls and idempotent retries)."""
    drain_grace: float = attrs.field(default=10.0, validator=_at_least(0))
    """On close: how long in-flight calls may finish before the workers are torn down."""
    max_calls_per_worker: int | None = attrs.field(default=None, validator=_at_least(1))
    """Recycle a worker after this many calls (None: never)."""
    max_worker_rss_bytes: int | None = attrs.field(default=None, validator=_at_least(1))
    """Recycle a worker whose resident memory passes this, in bytes (None: never)."""
    rss_check_interval: float = attrs.field(default=5.0, validator=_at_least(0.01))
    session_ttl: float = attrs.field(default=DEFAULT_SESSION_TTL_S, validator=_at_least(0))
    python: str = sys.executable
    """Interpreter for the subprocess launcher and the zygote template."""


@attrs.frozen
class LatencySummary:
    """Latencies of the latest calls of one method, in seconds."""

    count: int
    """Calls measured in the window."""
    p50: float
    p90: float
    p99: float
    max: float


@attrs.frozen
class PoolStatistics:
    """A snapshot of the pool."""

    workers: tuple[WorkerStatistics, ...]
    """Each live worker (retiring ones included)."""
    size: int
    """Configured worker slots."""
    ready: int
    """Workers taking calls now."""
    in_flight: int
    """Calls running on workers."""
    queued: int
    """Calls waiting for a worker."""
    calls: int
    """Calls admitted since the pool opened."""
    completed: int
    failed: int
    overloaded: int
    """Calls refused with ``Overloaded``."""
    unavailable: int
    """Calls refused with ``PoolUnavailable`` (circuit open)."""
    redispatched: int
    """Calls re-sent after their worker died before acking them."""
    retried: int
    """Idempotent calls retried on another worker after their worker died."""
    backoffs: int
    """Waits before a re-dispatch or retry (see ``retry_backoff``)."""
    backoff_seconds: float
    """Total time calls spent in those waits, in seconds."""
    restarts: int
    """Workers replaced after failing."""
    recycled: int
    """Workers replaced by recycling (call count or memory)."""
    launcher: str
    """Launcher in use ("zygote" or "subprocess", with the reason for a fallback)."""
    circuit: CircuitState
    circuit_reason: str
    circuit_opened: int
    """Times the circuit opened (trips and failed probes)."""
    checkout_success_rate: float
    """Share of checkouts that got a worker (1.0 when none was attempted)."""
    sessions: int
    latency: dict[str, LatencySummary]
    """Per method."""


@attrs.frozen
class WorkerHealth:
    """One worker in a health snapshot."""

    worker_id: str
    pid: int
    state: WorkerState
    in_flight: int
    last_heartbeat_age: float
    """Seconds since the worker last sent anything (a pong, an ack, a result)."""
    restarts: int
    """Restarts of its slot so far."""
    retiring: bool

    @classmethod
    def of(cls, worker: Worker, *, restarts: int, retiring: bool = False) -> WorkerHealth:
        """The health of ``worker`` now."""
        return cls(
            worker_id=worker.worker_id,
            pid=worker.pid,
            state=worker.state,
            in_flight=worker.in_flight,
            last_heartbeat_age=max(0.0, trio.current_time() - worker.last_seen),
            restarts=restarts,
            retiring=retiring,
        )


def worker_state_data(worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> dict[str, Any]:
    """The data of a ``worker_state`` health event (the same for every backend)."""
    return {
        "worker_id": worker.worker_id,
        "pid": worker.pid,
        "from": str(old),
        "to": str(new),
        "reason": reason,
    }


@attrs.frozen
class HealthSnapshot:
    """The health of a backend at one moment."""

    backend: str
    workers: tuple[WorkerHealth, ...]
    size: int
    restarts: int
    circuit: CircuitState
    circuit_reason: str
    launcher: str
    seq: int
    """Events published before this snapshot (a subscriber resyncs from here)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "size": self.size,
            "restarts": self.restarts,
            "circuit": str(self.circuit),
            "circuit_reason": self.circuit_reason,
            "launcher": self.launcher,
            "seq": self.seq,
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "pid": w.pid,
                    "state": str(w.state),
                    "in_flight": w.in_flight,
                    "last_heartbeat_age": round(w.last_heartbeat_age, 3),
                    "restarts": w.restarts,
                    "retiring": w.retiring,
                }
                for w in self.workers
            ],
        }


@attrs.define(eq=False)
class _Tenure:
    """One worker's time in a slot."""

    slot: int
    worker: Worker
    started_at: float
    ended: trio.Event = attrs.Factory(trio.Event)
    """Set when the worker stops or fails, or is asked to retire."""
    retiring: bool = False
    programs: set[tuple[str, int]] = attrs.Factory(set)
    """(program id, version) the worker holds in its cache, as far as the pool knows."""


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


class Pool(ProgramHost):
    """A supervised pool of workers. Made by :func:`open_pool`."""

    name = "pool"
    """The backend name (see ``dspex_trio.Backend``)."""
    _reads_checkpoint = False  # the pool's get/list/delete_program never passed a checkpoint

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
        """Backoff between the attempts of a call (whether to retry is ``_dispatch``'s rule)."""
        self._rng: RandomSource = rng if rng is not None else random.Random()
        self._backoff_seconds = 0.0
        self._circuit_changed = trio.Event()
        self._waiting_slots = 0
        self._latency: dict[str, collections.deque[float]] = {}
        self._counts = collections.Counter[str]()
        self._nursery: trio.Nursery | None = None
        self._slot_restarts = collections.Counter[int]()
        self.events = EventBus(backend="pool")
        """Health events: every worker state transition and circuit change."""
        self.transition_hooks: list[Callable[[Worker, WorkerState, WorkerState, str], None]] = []
        """Called on every worker state transition (health events hook in here)."""

    # -- public API -----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.options.workers

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
        Cancelling the caller cancels the call in its worker.
        """
        program = self._resolve(params, session)
        return await self._dispatch(
            method, params, program=program, timeout=timeout, idempotent=idempotent, wait=wait
        )

    # -- DSPy programs --------------------------------------------------------------------------------
    async def create_program(
        self,
        signature: str | dict[str, Any],
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Create a program in ``session`` and return its id.

        ``signature`` is a string (``"question: str, context: list[str] -> answer, confidence: float"``)
        or a dict ``{"inputs": [...], "outputs": [...], "instructions": ...}``; ``module`` is
        ``"predict"`` or ``"chain_of_thought"``. A worker parses and builds it first (never ``eval``), so an
        invalid signature or a disallowed type is an ``InvalidParams`` here, not at execution.
        """
        return await self._add_program(program_spec(signature, module, instructions, state), session, timeout)

    @asynccontextmanager
    async def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Run a program streamed: ``{"event": "chunk", "field", "chunk"}`` as chunks arrive, then one
        ``{"event": "completed", "outputs", "usage", "backend"}``. Leaving the block early cancels the
        execution in its worker. A worker dying before it acked the call (and before the block got the
        events) is retried transparently, after a backoff; after, it raises.
        """
        spec = self.sessions.program(session, program)
        params = self._execute_params(program, inputs, session)
        start = trio.current_time()
        deadline = math.inf if timeout is None else start + timeout
        self._counts["calls"] += 1
        for attempt in range(1, self.retry.max_attempts + 1):
            tenure = await self._checkout(deadline, wait=False, program=spec, excluded=set())
            call_params = self._wire_params(params, spec, tenure.programs, send_spec=False)
            remaining = None if deadline == math.inf else max(1e-3, deadline - trio.current_time())
            self._in_flight += 1
            yielded = False
            try:
                async with tenure.worker.stream("execute", call_params, timeout=remaining) as events:
                    yielded = True
                    yield program_events(
                        events, self.name, on_completed=functools.partial(self._streamed, tenure, spec, start)
                    )
                    return
            except (WorkerCrashed, ProtocolError) as exc:
                if exc.started or yielded:  # the block saw the stream: not ours to re-run
                    self._counts["failed"] += 1
                    raise
                self._counts["redispatched"] += 1
            finally:
                self._in_flight -= 1
                self._after_call(tenure)
            if attempt < self.retry.max_attempts:
                await self._back_off(attempt, deadline)
        raise PoolUnavailable("the execution could not be placed on a worker", reason="re-dispatch limit")

    async def get_state(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        """The program's DSPy state (demos, instructions), e.g. to save an optimised program."""
        return await self.call("get_state", {"program": program}, session=session, idempotent=True)

    async def load_state(self, program: str, state: dict[str, Any], *, session: str | None = None) -> None:
        """Install DSPy state (demos, instructions) into a program: validated by a worker, then stored in
        the session (a new version: workers rebuild it on their next call)."""
        spec = {**self.sessions.program(session, program).spec, "state": state}
        description = await self.call("validate_program", {"spec": spec}, idempotent=True)
        updated = self.sessions.update_program(session, program, state=state)
        self._descriptions[updated.id, updated.version] = description

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
            size=self.options.workers,
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
        latency = {}
        for method, samples in self._latency.items():
            ordered = sorted(samples)
            latency[method] = LatencySummary(
                count=len(ordered),
                p50=_percentile(ordered, 0.50),
                p90=_percentile(ordered, 0.90),
                p99=_percentile(ordered, 0.99),
                max=ordered[-1] if ordered else 0.0,
            )
        checkouts = self._counts["checkouts"]
        return PoolStatistics(
            workers=workers,
            size=self.options.workers,
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
        )

    # -- dispatch -------------------------------------------------------------------------------------
    async def _dispatch(
        self,
        method: str,
        params: Any,
        *,
        program: ProgramSpec | None,
        timeout: float | None,
        idempotent: bool,
        wait: bool,
    ) -> Any:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        start = trio.current_time()
        deadline = math.inf if timeout is None else start + timeout
        flags = wire.FLAG_IDEMPOTENT if idempotent else 0
        self._counts["calls"] += 1
        attempts = 1
        retried = False
        excluded: set[str] = set()
        send_spec = False
        try:
            while True:
                tenure = await self._checkout(deadline, wait=wait, program=program, excluded=excluded)
                worker = tenure.worker
                call_params = self._wire_params(params, program, tenure.programs, send_spec=send_spec)
                remaining = None if deadline == math.inf else deadline - trio.current_time()
                if remaining is not None and remaining <= 0:
                    raise CallTimeout(f"{method} timed out after {timeout} s waiting for a worker")
                self._in_flight += 1
                back_off = False
                try:
                    call = worker._submit(method, call_params, timeout=remaining, flags=flags)
                    result = await worker._wait(call)
                except CacheMiss:
                    if send_spec:
                        raise
                    send_spec = True
                    continue
                except (WorkerCrashed, ProtocolError) as exc:
                    # Retried: calls that never started, and idempotent ones (once, elsewhere).
                    if not self.retry.allows(attempts):
                        raise
                    if not exc.started:
                        self._counts["redispatched"] += 1
                    elif idempotent and not retried:
                        retried = True
                        excluded.add(worker.worker_id)
                        self._counts["retried"] += 1
                    else:
                        raise
                    back_off = True
                except WorkerClosed:
                    if self._closing or not self.retry.allows(attempts):
                        raise
                    attempts += 1  # it began closing (recycled) between checkout and submit: no wait
                    self._counts["redispatched"] += 1
                    continue
                finally:
                    self._in_flight -= 1
                    self._after_call(tenure)
                if back_off:
                    await self._back_off(attempts, deadline)
                    attempts += 1
                    continue
                if program is not None:
                    tenure.programs.add((program.id, program.version))
                self._counts["completed"] += 1
                self._record_latency(method, trio.current_time() - start)
                return result
        except BaseException:
            self._counts["failed"] += 1
            raise

    async def _back_off(self, retry: int, deadline: float) -> None:
        """Wait before retry number ``retry`` (capped by the call's deadline)."""
        now = trio.current_time()
        wake = min(now + self.retry.delay(retry, self._rng), deadline)
        self._counts["backoffs"] += 1
        self._backoff_seconds += max(0.0, wake - now)
        await trio.sleep_until(wake)

    def _after_call(self, tenure: _Tenure) -> None:
        self._lot.unpark()
        limit = self.options.max_calls_per_worker
        if limit is not None and not tenure.retiring:
            stats = tenure.worker.statistics()
            if stats.calls_served + stats.calls_failed >= limit:
                self._retire(tenure, f"served {limit} calls")
        if self._closing and self._in_flight == 0:
            self._drained.set()

    def _streamed(self, tenure: _Tenure, spec: ProgramSpec, start: float) -> None:
        """A streamed execution completed."""
        tenure.programs.add((spec.id, spec.version))
        self._counts["completed"] += 1
        self._record_latency("execute", trio.current_time() - start)

    def _record_latency(self, method: str, seconds: float) -> None:
        samples = self._latency.get(method)
        if samples is None:
            samples = self._latency[method] = collections.deque(maxlen=LATENCY_WINDOW)
        samples.append(seconds)

    def _pick(self, program: ProgramSpec | None, excluded: set[str]) -> _Tenure | None:
        best: _Tenure | None = None
        best_key: tuple[int, int] | None = None
        for tenure in self._live.values():
            worker = tenure.worker
            if tenure.retiring or not worker.accepting or worker.in_flight >= worker.capacity:
                continue
            if worker.worker_id in excluded:
                continue
            holds = program is not None and (program.id, program.version) in tenure.programs
            key = (worker.in_flight, 0 if holds else 1)  # least loaded; affinity breaks ties
            if best_key is None or key < best_key:
                best, best_key = tenure, key
        return best

    async def _checkout(
        self, deadline: float, *, wait: bool, program: ProgramSpec | None, excluded: set[str]
    ) -> _Tenure:
        self._counts["checkouts"] += 1
        self._check_admission()
        tenure = self._pick(program, excluded) or (self._pick(program, set()) if excluded else None)
        if tenure is not None:
            self._counts["checkouts_ok"] += 1
            return tenure
        try:
            self._queue_slots.acquire_nowait()
        except trio.WouldBlock:
            if not wait:
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
                tenure = self._pick(program, excluded) or (self._pick(program, set()) if excluded else None)
                if tenure is not None:
                    self._counts["checkouts_ok"] += 1
                    return tenure
                if trio.current_time() >= deadline:
                    raise CallTimeout("timed out waiting for a worker with free capacity")
        finally:
            self._queue_slots.release()

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
            tenure.ended.set()
        if new in (WorkerState.READY,):
            self._lot.unpark_all()
        self.events.publish("worker_state", worker_state_data(worker, old, new, reason))
        for hook in self.transition_hooks:
            hook(worker, old, new, reason)

    def _retire(self, tenure: _Tenure, reason: str) -> None:
        if tenure.retiring:
            return
        logger.info("worker %s retiring: %s", tenure.worker.worker_id, reason)
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
        )

    async def _run_worker(
        self, slot: int, *, task_status: trio.TaskStatus[_Tenure] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own one worker for its whole life: start it, serve, drain if retiring, tear it down."""
        async with open_service_nursery() as nursery:
            worker = await start_worker(
                nursery,
                launcher=self._launcher,
                spec=self._spec(),
                options=self.worker_options,
                on_transition=self._on_transition,
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
        while not self._closing:
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
                self._counts["restarts"] += 1 if started else 0
                logger.warning("slot %d: %s", slot, exc)
                reason = str(exc).splitlines()[0]
                if probing:
                    breaker.probe_failed(reason)
                else:
                    breaker.record_failure(reason)
                continue  # a first start retries within the budget; after it, the breaker decides
            if probing:
                breaker.probe_succeeded()
                if breaker.state is CircuitState.HALF_OPEN and self._waiting_slots == 0:
                    breaker.probes_exhausted()  # no empty slot left to probe with
                self._wake_supervisors()
            if not started:
                started = True
                task_status.started()
            await tenure.ended.wait()
            if tenure.retiring or self._closing:
                continue
            self._counts["restarts"] += 1
            self._slot_restarts[slot] += 1
            uptime = trio.current_time() - tenure.started_at
            stats = tenure.worker.statistics()
            if uptime < self.options.min_healthy_uptime and stats.calls_served == 0:
                breaker.record_failure(
                    f"worker {tenure.worker.worker_id} failed after {uptime:.3f} s without serving a call"
                )

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
                logger.info("sessions expired: %s", ", ".join(expired))
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


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pool_fields = {a.name for a in attrs.fields(PoolOptions)}
    worker_fields = {a.name for a in attrs.fields(WorkerOptions)}
    unknown = sorted(set(options) - pool_fields - worker_fields)
    if unknown:
        raise TypeError(
            f"unknown pool option(s) {', '.join(unknown)}; known: {', '.join(sorted(pool_fields | worker_fields))}"
        )
    return (
        {k: v for k, v in options.items() if k in pool_fields},
        {k: v for k, v in options.items() if k in worker_fields},
    )


@asynccontextmanager
async def open_pool(
    workers: int = 2,
    lm: Any = None,
    diagnostics: bool = False,
    *,
    launcher: str | Launcher = "auto",
    clock: Callable[[], float] | None = None,
    fail_at_start: int | None = None,
    rng: RandomSource | None = None,
    **options: Any,
) -> AsyncIterator[Pool]:
    """Open a pool of ``workers`` supervised worker processes.

    Returns once every slot has a ready worker (or the circuit opened trying). Leaving the block stops
    admission, lets in-flight calls finish for up to ``drain_grace`` seconds, then tears every worker
    down (and the zygote): nothing is left running.

    ``lm`` is the default LM configuration (None: the embedded offline LM). ``launcher`` is "zygote"
    (fork workers from a template process that imported dspy once), "subprocess" (``python -m
    bridge_child``), "auto" (zygote where ``os.fork`` exists, else subprocess), or a ``Launcher``; ``clock`` the session store's clock; ``fail_at_start`` (diagnostics) makes every
    worker exit with that code before its handshake; ``rng`` the random source of the retry jitter (a seeded
    ``random.Random`` in tests). ``options`` are the fields of :class:`PoolOptions`
    and :class:`WorkerOptions`.
    """
    pool_kwargs, worker_kwargs = _split_options({"workers": workers, **options})
    pool_options = PoolOptions(**pool_kwargs)
    worker_options = WorkerOptions(**worker_kwargs)
    if fail_at_start is not None and not diagnostics:
        raise ValueError("fail_at_start needs diagnostics=True")
    # The launcher (a zygote) outlives the nursery: every worker is reaped before the template stops.
    async with _open_launcher(pool_options, launcher) as chosen, open_service_nursery() as nursery:
        pool = Pool(
            options=pool_options,
            worker_options=worker_options,
            launcher=chosen,
            diagnostics=diagnostics,
            lm=lm,
            clock=clock,
            fail_at_start=fail_at_start,
            rng=rng,
        )
        pool._nursery = nursery
        try:
            async with trio.open_nursery() as starting:
                for slot in range(pool_options.workers):
                    starting.start_soon(nursery.start, pool._supervise_slot, slot)
            nursery.start_soon(pool._maintain)
            yield pool
        finally:
            with trio.CancelScope(shield=True):
                await pool._close()
                async with trio.open_nursery() as closing:  # every ladder at once, tasks still alive
                    for worker in pool.workers():
                        closing.start_soon(functools.partial(worker.aclose, grace=0.0))
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _open_launcher(options: PoolOptions, launcher: str | Launcher) -> AsyncIterator[Launcher]:
    if not isinstance(launcher, str):
        yield launcher
        return
    if launcher not in LAUNCHER_KINDS:
        raise ValueError(
            f"launcher must be one of {', '.join(LAUNCHER_KINDS)} or a Launcher, not {launcher!r}"
        )
    async with open_launcher(launcher, python=options.python) as chosen:
        yield chosen
