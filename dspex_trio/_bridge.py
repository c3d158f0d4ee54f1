"""The ``bridge`` backend: one worker process, no pool (the single bridge), with host-side sessions like the
pool's. A worker that dies is replaced on the next call; one that cannot start opens a breaker.
"""

from __future__ import annotations

import collections
import functools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import trio

from dspex_trio._backend import BackendStatistics
from dspex_trio._breaker import CircuitBreaker, CircuitState
from dspex_trio._errors import (
    CacheMiss,
    PoolUnavailable,
    ProtocolError,
    WorkerClosed,
    WorkerCrashed,
    WorkerStartFailed,
)
from dspex_trio._events import EventBus, Subscription
from dspex_trio._launcher import Launcher, SubprocessLauncher, WorkerSpec
from dspex_trio._pool import HealthSnapshot, WorkerHealth, worker_state_data
from dspex_trio._programs_host import ProgramHost, program_events
from dspex_trio._retry import RetryPolicy
from dspex_trio._sessions import DEFAULT_SESSION_TTL_S, ProgramSpec
from dspex_trio._states import TERMINAL, WorkerState
from dspex_trio._util import open_service_nursery
from dspex_trio._worker import Worker, WorkerOptions, next_worker_id, start_worker

BRIDGE_RESTART_BACKOFF_S: Final = 0.5
"""After the bridge's worker failed to start: wait before trying again, doubling up to the max, in s."""
BRIDGE_RESTART_BACKOFF_MAX_S: Final = 30.0


class BridgeBackend(ProgramHost):
    """One worker process, no pool, with host-side sessions. Made by :func:`open_backend` ("bridge").

    A worker that died is replaced on the next call (never-acked and idempotent calls are re-sent once
    it is back, after a backoff). A worker that cannot start opens the bridge's breaker: calls get
    ``PoolUnavailable`` until a later start succeeds (tried after 0.5 s, doubling up to 30 s).
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
        self._rng = random.Random()
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
        self.worker: Worker | None = None
        self._held: set[tuple[str, int]] = set()
        self._lock = trio.Lock()
        self._closing = False
        self._counts = collections.Counter[str]()

    # -- the worker -----------------------------------------------------------------------------------
    def _on_circuit(self, old: CircuitState, new: CircuitState, reason: str) -> None:
        self.events.publish("circuit", {"from": str(old), "to": str(new), "reason": reason})

    def _on_transition(self, worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        self.events.publish("worker_state", worker_state_data(worker, old, new, reason))

    async def _start(self) -> Worker:
        """Start a worker (replacing a dead one). Raises ``WorkerStartFailed``."""
        old = self.worker
        if old is not None:
            self.worker = None
            self._held.clear()
            self._counts["restarts"] += 1
            with trio.CancelScope(shield=True):
                await old.aclose(grace=0.0)
        spec = WorkerSpec(
            worker_id=next_worker_id(),
            diagnostics=self.diagnostics,
            capacity=self.options.capacity,
            max_frame_bytes=self.options.max_frame_bytes,
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
        self.worker = worker
        return worker

    async def _ensure(self) -> Worker:
        """The live worker, started (again) if needed. Raises ``PoolUnavailable`` if it cannot start."""
        if self._closing:
            raise WorkerClosed("the bridge is closing")
        worker = self.worker
        if worker is not None and worker.accepting:
            return worker
        async with self._lock:
            worker = self.worker
            if worker is not None and worker.accepting:
                return worker
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
                worker = await self._start()
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
            return worker

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
        """Run ``method(params)`` in the bridge's worker; programs in ``params`` resolve in ``session``."""
        program = self._resolve(params, session)
        deadline = trio.current_time() + timeout if timeout is not None else None
        self._counts["calls"] += 1
        attempts = 1
        send_spec = False
        try:
            while True:
                worker = await self._ensure()
                call_params = self._wire_params(params, program, self._held, send_spec=send_spec)
                remaining = None if deadline is None else max(1e-3, deadline - trio.current_time())
                try:
                    result = await worker.call(method, call_params, timeout=remaining, idempotent=idempotent)
                except CacheMiss:
                    if send_spec:
                        raise
                    send_spec = True
                    continue
                except (WorkerCrashed, ProtocolError) as exc:
                    if (exc.started and not idempotent) or not self.retry.allows(attempts):
                        raise
                    self._counts["retried"] += 1
                    delay = self.retry.delay(attempts, self._rng)
                    await trio.sleep(
                        delay if deadline is None else min(delay, deadline - trio.current_time())
                    )
                    attempts += 1
                    continue
                if program is not None:
                    self._held.add((program.id, program.version))
                self._counts["completed"] += 1
                return result
        except BaseException:
            self._counts["failed"] += 1
            raise

    @asynccontextmanager
    async def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        spec = self.sessions.program(session, program)
        worker = await self._ensure()
        params = {**self._execute_params(program, inputs, session), "program": spec.wire_ref(with_spec=True)}
        self._counts["calls"] += 1
        async with worker.stream("execute", params, timeout=timeout) as events:
            yield program_events(
                events,
                self.name,
                on_completed=functools.partial(self._streamed, spec),
                on_failed=self._stream_failed,
            )

    def _streamed(self, spec: ProgramSpec) -> None:
        """A streamed execution completed."""
        self._held.add((spec.id, spec.version))
        self._counts["completed"] += 1

    def _stream_failed(self) -> None:
        self._counts["failed"] += 1

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
            retried=self._counts["retried"],
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
    **options: Any,
) -> AsyncIterator[BridgeBackend]:
    """Start the bridge's worker (``WorkerStartFailed`` if it cannot start) and serve until the block
    ends; then its teardown ladder runs. ``options`` are the fields of :class:`WorkerOptions`."""
    worker_options = WorkerOptions.from_kwargs(options)
    async with open_service_nursery() as nursery:
        bridge = BridgeBackend(
            nursery=nursery,
            launcher=launcher or SubprocessLauncher(),
            options=worker_options,
            diagnostics=diagnostics,
            lm=lm,
            clock=clock,
            session_ttl=session_ttl,
            retry=retry or RetryPolicy(),
        )
        try:
            await bridge._start()
            yield bridge
        finally:
            with trio.CancelScope(shield=True):
                await bridge._aclose()
            nursery.cancel_scope.cancel()
