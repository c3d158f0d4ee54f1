"""The ``bridge`` backend: one worker process, no pool (the single bridge), with host-side sessions like the
pool's. A worker that dies is replaced on the next call; one that cannot start opens a breaker.
"""

from __future__ import annotations

import collections
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import attrs
import trio

from dspex_trio._breaker import CircuitBreaker, CircuitState
from dspex_trio._dispatch import Dispatch
from dspex_trio._errors import (
    PoolUnavailable,
    WorkerClosed,
    WorkerStartFailed,
)
from dspex_trio._events import EventBus, Subscription
from dspex_trio._health import HealthSnapshot, WorkerHealth, worker_state_data
from dspex_trio._launcher import Launcher, WorkerSpec, default_launcher
from dspex_trio._options import WorkerOptions, options_from
from dspex_trio._programs_host import ProgramHost, ProgramKey, program_module_error
from dspex_trio._retry import RandomSource, RetryPolicy
from dspex_trio._sessions import DEFAULT_SESSION_TTL_S
from dspex_trio._states import TERMINAL, WorkerState
from dspex_trio._statistics import BackendStatistics
from dspex_trio._util import open_service_nursery
from dspex_trio._worker import Worker, next_worker_id, start_worker

BRIDGE_RESTART_BACKOFF_S: Final = 0.5
"""After the bridge's worker failed to start: wait before trying again, doubling up to the max, in s."""
BRIDGE_RESTART_BACKOFF_MAX_S: Final = 30.0


@attrs.define(eq=False)
class _Tenure:
    """One worker's time as the bridge's worker."""

    worker: Worker
    programs: set[ProgramKey] = attrs.Factory(set)
    """(program id, version) the worker holds in its cache, as far as the bridge knows."""


class BridgeBackend(ProgramHost):
    """One worker process, no pool, with host-side sessions. Made by :func:`open_backend` ("bridge").

    Calls and streams run through the pool's dispatch loop (``dspex_trio._dispatch.Dispatch``), with one
    worker: a worker that died is replaced on the next attempt, and "another worker" for an idempotent
    retry is that replacement (never-acked calls are re-sent, idempotent ones once, after a backoff). A
    worker that cannot start opens the bridge's breaker: calls get ``PoolUnavailable`` until a later start
    succeeds (tried after 0.5 s, doubling up to 30 s).
    """

    name = "bridge"

    def __init__(
        self,
        *,
        nursery: trio.Nursery,
        launcher: Launcher,
        options: WorkerOptions,
        diagnostics: bool,
        lm: Any,
        clock: Callable[[], float] | None,
        session_ttl: float,
        retry: RetryPolicy,
    ) -> None:
        super().__init__(clock=clock, session_ttl=session_ttl, lm=lm)
        self._nursery = nursery
        self._launcher = launcher
        self.options = options
        self.diagnostics = diagnostics
        self.retry = retry
        self._rng: RandomSource = random.Random()
        self.events = EventBus(backend=self.name)
        self.breaker = CircuitBreaker(
            clock=trio.current_time,
            failure_threshold=1,
            window=0,
            reset_timeout=BRIDGE_RESTART_BACKOFF_S,
            reset_timeout_max=BRIDGE_RESTART_BACKOFF_MAX_S,
            on_change=self._on_circuit,
            trip_label="the bridge's worker cannot start",
        )
        self._tenure: _Tenure | None = None
        self._lock = trio.Lock()
        self._closing = False
        self._counts = collections.Counter[str]()
        self._backoff_seconds = 0.0

    @property
    def worker(self) -> Worker | None:
        """The bridge's worker (None before the first start)."""
        return None if self._tenure is None else self._tenure.worker

    # -- the worker -----------------------------------------------------------------------------------
    def _on_circuit(self, old: CircuitState, new: CircuitState, reason: str) -> None:
        self.events.publish("circuit", {"from": str(old), "to": str(new), "reason": reason})

    def _on_transition(self, worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        self.events.publish("worker_state", worker_state_data(worker, old, new, reason))

    async def _start(self) -> _Tenure:
        """Start a worker (replacing a dead one). Raises ``WorkerStartFailed``."""
        old = self.worker
        if old is not None:
            self._tenure = None
            self._counts["restarts"] += 1
            with trio.CancelScope(shield=True):
                await old.aclose(grace=0.0)
        spec = WorkerSpec(
            worker_id=next_worker_id(),
            diagnostics=self.diagnostics,
            capacity=self.options.capacity,
            max_frame_bytes=self.options.max_frame_bytes,
            programs=self.options.programs,
        )
        worker = await start_worker(
            self._nursery,
            launcher=self._launcher,
            spec=spec,
            options=self.options,
            on_transition=self._on_transition,
        )
        if self.lm is not None:
            await worker.call("configure_lm", {"lm": self.lm}, timeout=self.options.ack_timeout * 2)
        self._tenure = _Tenure(worker)
        return self._tenure

    async def _checkout(self, dispatch: Dispatch) -> _Tenure:
        """The live worker for ``dispatch``'s next attempt, started (again) if needed. Raises
        ``PoolUnavailable`` if it cannot start."""
        if self._closing:
            raise WorkerClosed("the bridge is closing")
        tenure = self._tenure
        if tenure is not None and tenure.worker.accepting:
            return tenure
        async with self._lock:
            tenure = self._tenure
            if tenure is not None and tenure.worker.accepting:
                return tenure
            worker = self.worker
            if worker is not None and worker.state not in TERMINAL and not worker.accepting:
                await worker.wait_idle()  # draining: let it go
            probing = False
            if not self.breaker.allows_calls:
                if not self.breaker.try_probe():
                    self._counts["unavailable"] += 1
                    reason = self.breaker.reason
                    raise PoolUnavailable(f"the bridge is unavailable: {reason}", reason=reason)
                probing = True
            try:
                tenure = await self._start()
            except WorkerStartFailed as exc:
                reason = str(exc).splitlines()[0]
                if probing:
                    self.breaker.probe_failed(reason)
                else:
                    self.breaker.record_failure(reason)
                self._counts["unavailable"] += 1
                raise PoolUnavailable(f"the bridge is unavailable: {reason}", reason=reason) from exc
            if probing:
                self.breaker.probe_succeeded()
            return tenure

    def _end_attempt(self, tenure: _Tenure) -> None:
        """Nothing to release: the bridge has no admission queue."""

    def _record_latency(self, method: str, seconds: float) -> None:
        """The bridge keeps no latency figures."""

    def _record_outcome(self, method: str, outcome: str, seconds: float) -> None:
        """The bridge keeps no per-method figures."""

    async def _aclose(self) -> None:
        self._closing = True
        if self.worker is not None:
            await self.worker.aclose()
        self.events.close()

    # -- calls ----------------------------------------------------------------------------------------
    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Run ``method(params)`` in the bridge's worker; programs in ``params`` resolve in ``session``.
        Errors and retries are those of ``Pool.call`` (there is no queue: no ``Overloaded``)."""
        program = self._resolve(params, session)
        dispatch = Dispatch(self, method, params, program=program, timeout=timeout, idempotent=idempotent)
        return await dispatch.result()

    def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        lm_cache: str | None = None,
    ) -> Dispatch:
        """Run a program streamed, as ``Pool.stream`` does (``lm_cache``: as ``execute``'s)."""
        spec = self.sessions.program(session, program)
        params = self._execute_params(program, inputs, session, lm_cache)
        return Dispatch(self, "execute", params, program=spec, timeout=timeout, stream=True)

    async def _apply_default_lm(self) -> None:
        if self.worker is not None and self.worker.accepting:
            await self.worker.call("configure_lm", {"lm": self.lm}, timeout=self.options.ack_timeout * 2)

    def subscribe_health(self, *, buffer: int | None = None) -> AbstractAsyncContextManager[Subscription]:
        """The worker's state transitions (``worker_state``) and the bridge's breaker (``circuit``)."""
        return self.events.subscribe(buffer=buffer)

    def health(self) -> HealthSnapshot:
        worker = self.worker
        workers: tuple[WorkerHealth, ...] = ()
        if worker is not None:
            workers = (WorkerHealth.of(worker, restarts=self._counts["restarts"]),)
        return HealthSnapshot(
            backend=self.name,
            workers=workers,
            size=1,
            restarts=self._counts["restarts"],
            circuit=self.breaker.state,
            circuit_reason=self.breaker.reason,
            launcher=self._launcher.name,
            seq=self.events.published,
        )

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            backend=self.name,
            calls=self._counts["calls"],
            completed=self._counts["completed"],
            failed=self._counts["failed"],
            unavailable=self._counts["unavailable"],
            restarts=self._counts["restarts"],
            retried=self._counts["redispatched"] + self._counts["retried"],
            sessions=len(self.sessions),
            circuit=self.breaker.state,
        )


@asynccontextmanager
async def open_bridge(
    *,
    lm: Any = None,
    diagnostics: bool = False,
    launcher: Launcher | None = None,
    clock: Callable[[], float] | None = None,
    session_ttl: float = DEFAULT_SESSION_TTL_S,
    retry: RetryPolicy | None = None,
    options: WorkerOptions | None = None,
    **option_fields: Any,
) -> AsyncIterator[BridgeBackend]:
    """Start the bridge's worker (``WorkerStartFailed`` if it cannot start) and serve until the block
    ends; then its teardown ladder runs. ``options`` is a :class:`WorkerOptions`; or pass its fields as
    keywords (``option_fields``), not both (``TypeError``)."""
    worker_options = options_from(WorkerOptions, options, option_fields)
    async with open_service_nursery() as nursery:
        bridge = BridgeBackend(
            nursery=nursery,
            launcher=default_launcher(launcher, worker_options.worker_env),
            options=worker_options,
            diagnostics=diagnostics,
            lm=lm,
            clock=clock,
            session_ttl=session_ttl,
            retry=retry or RetryPolicy(),
        )
        try:
            try:
                await bridge._start()
            except WorkerStartFailed as exc:
                raise program_module_error(exc) or exc from exc.__cause__
            yield bridge
        finally:
            with trio.CancelScope(shield=True):
                await bridge._aclose()
            nursery.cancel_scope.cancel()
