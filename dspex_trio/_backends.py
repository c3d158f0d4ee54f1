"""Backends: one async interface for running DSPy programs, three implementations and a fallback chain.

- ``mock``: in-process, no subprocess, no dspy. Outputs are derived deterministically from the
  signature's output types, with the offline LM's own value derivation (``bridge_child._offline_lm``), and
  signatures are parsed by the same safe parser the workers use, so mock and pool agree on every type.
- ``bridge``: one worker process, no pool (the single bridge), with a host-side session store like the
  pool's. A worker that dies is replaced on the next call; one that cannot start opens a breaker.
- ``pool``: the :class:`~dspex_trio.Pool` itself.
- ``fallback``: pool -> bridge (-> mock, only with ``allow_mock=True``: it returns fake answers). A
  backend that cannot start is skipped; a call refused with ``PoolUnavailable`` goes to the next one.

Every answer says which backend served it (``execute(..., with_usage=True)["backend"]``, the stream's
``completed`` event, ``FallbackBackend.last_backend``), and every health event carries ``backend``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, cast, runtime_checkable

import attrs
import trio

from bridge_child._context import MethodError
from bridge_child._offline_lm import fake_value
from bridge_child._programs import check_lm_config, describe_lm, parse_spec
from bridge_child._signatures import STR, FieldSpec
from dspex_trio._breaker import CircuitBreaker, CircuitState
from dspex_trio._errors import (
    CacheMiss,
    DspexError,
    InvalidParams,
    PoolUnavailable,
    ProgramNotFound,
    ProtocolError,
    UnknownMethod,
    WorkerClosed,
    WorkerCrashed,
    WorkerStartFailed,
)
from dspex_trio._events import EventBus, Subscription
from dspex_trio._launcher import Launcher, SubprocessLauncher, WorkerSpec
from dspex_trio._pool import HealthSnapshot, Pool, WorkerHealth, open_pool
from dspex_trio._retry import RetryPolicy
from dspex_trio._sessions import DEFAULT_SESSION, DEFAULT_SESSION_TTL_S, ProgramSpec, SessionStore
from dspex_trio._states import TERMINAL, WorkerState
from dspex_trio._util import open_service_nursery
from dspex_trio._worker import Worker, WorkerOptions, next_worker_id, start_worker

BackendKind = Literal["mock", "bridge", "pool", "fallback"]
BACKEND_KINDS: Final = ("mock", "bridge", "pool", "fallback")
BRIDGE_RESTART_BACKOFF_S: Final = 0.5
"""After the bridge's worker failed to start: wait before trying again, doubling up to the max, in s."""
BRIDGE_RESTART_BACKOFF_MAX_S: Final = 30.0
FORWARD_BUFFER: Final = 4096
"""Events buffered by the fallback's forwarder from each backend's bus (then ``lagged``)."""

T = TypeVar("T")


@runtime_checkable
class Backend(Protocol):
    """What every backend offers (see the module doc). Errors are those of :class:`~dspex_trio.Pool`."""

    name: str
    """``mock``, ``bridge``, ``pool`` or ``fallback``."""

    async def create_program(
        self,
        signature: str | dict[str, Any],
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> str:
        """Create a program; its id."""
        ...

    async def execute(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        """The output fields; with ``with_usage``: ``{"outputs", "usage", "backend"}``."""
        ...

    def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        """``{"event": "chunk", "field", "chunk"}`` ..., then ``{"event": "completed", "outputs",
        "usage", "backend"}``."""
        ...

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]: ...

    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]: ...

    async def delete_program(self, program: str, *, session: str | None = None) -> None: ...

    async def configure_lm(
        self,
        model: str,
        *,
        session: str | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        **settings: Any,
    ) -> None: ...

    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any: ...

    def subscribe_health(self, *, buffer: int | None = None) -> AbstractAsyncContextManager[Subscription]: ...

    def health(self) -> HealthSnapshot: ...

    def statistics(self) -> Any: ...


@attrs.frozen
class BackendStatistics:
    """A snapshot of a ``mock`` or ``bridge`` backend."""

    backend: str
    calls: int
    """Calls admitted."""
    completed: int
    failed: int
    unavailable: int
    """Calls refused with ``PoolUnavailable``."""
    restarts: int
    """Worker replacements (bridge)."""
    retried: int
    """Re-sent calls (bridge: never-acked or idempotent calls after the worker died)."""
    sessions: int
    circuit: CircuitState


@attrs.frozen
class FallbackStatistics:
    """A snapshot of a fallback chain."""

    backend: str | None
    """The backend that served the latest call (``last_backend``)."""
    chain: tuple[str, ...]
    """The backends in order of preference (those that started)."""
    skipped: dict[str, str]
    """Backends that could not start, with why."""
    served: dict[str, int]
    """Calls served, per backend."""
    fallbacks: int
    """Calls served by a backend other than the first of the chain."""
    switches: int
    """Times the serving backend changed."""
    backends: dict[str, Any]
    """Each backend's own statistics."""


def _spec(
    signature: str | dict[str, Any], module: str, instructions: str | None, state: dict[str, Any] | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"signature": signature, "module": module}
    if instructions is not None:
        spec["instructions"] = instructions
    if state is not None:
        spec["state"] = state
    return spec


def _lm_config(
    model: str, api_base: str | None, api_key: str | None, settings: dict[str, Any]
) -> dict[str, Any]:
    config: dict[str, Any] = {"model": model, **settings}
    if api_base is not None:
        config["api_base"] = api_base
    if api_key is not None:
        config["api_key"] = api_key
    return config


def _invalid(exc: MethodError) -> DspexError:
    return InvalidParams(exc.message)


# -- mock ------------------------------------------------------------------------------------------------


@attrs.frozen
class _MockProgram:
    module: str
    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]
    instructions: str

    def describe(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "inputs": [f.describe() for f in self.inputs],
            "outputs": [f.describe() for f in self.outputs],
            "instructions": self.instructions,
        }


def _mock_program(spec: dict[str, Any]) -> _MockProgram:
    """Parse a spec as a worker would (same parser, same rules), without dspy."""
    try:
        parsed = parse_spec(spec)
    except MethodError as exc:
        raise _invalid(exc) from None
    outputs = parsed.signature.outputs
    if parsed.module == "chain_of_thought":  # as ChainOfThought does: a reasoning field first
        outputs = (
            *(f for f in outputs if f.name == "reasoning"),
            *((FieldSpec("reasoning", STR),) if not any(f.name == "reasoning" for f in outputs) else ()),
            *(f for f in outputs if f.name != "reasoning"),
        )
    inputs = parsed.signature.inputs
    instructions = parsed.signature.instructions or (
        "Given the fields "
        + ", ".join(f"`{f.name}`" for f in inputs)
        + ", produce the fields "
        + ", ".join(f"`{f.name}`" for f in parsed.signature.outputs)
        + "."
    )
    return _MockProgram(parsed.module, inputs, outputs, instructions)


def _check_inputs(program: _MockProgram, inputs: Any) -> None:
    if not isinstance(inputs, dict):
        raise InvalidParams("execute: inputs must be an object")
    names = [f.name for f in program.inputs]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InvalidParams(f"execute: missing input field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise InvalidParams(f"execute: unknown input field(s) {', '.join(map(repr, unknown))}")
    for f in program.inputs:
        if not f.type.accepts(inputs[f.name]):
            raise InvalidParams(f"execute: input {f.name!r} must be {f.type.render()}")


class MockBackend:
    """In-process backend with deterministic fake answers (see the module doc). No subprocess, no dspy.

    The same inputs always give the same outputs; every output field has its declared type. LM
    configuration is validated and recorded, but never used.
    """

    name = "mock"

    def __init__(
        self, *, clock: Callable[[], float] | None = None, session_ttl: float = DEFAULT_SESSION_TTL_S
    ):
        self.sessions = SessionStore(clock=clock or trio.current_time, ttl=session_ttl)
        self.events = EventBus(backend=self.name)
        self.lm: dict[str, Any] | None = None
        self._programs: dict[tuple[str, int], _MockProgram] = {}
        self._counts = collections.Counter[str]()

    def _program(self, spec: ProgramSpec) -> _MockProgram:
        key = (spec.id, spec.version)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = _mock_program(spec.spec)
        return program

    async def create_program(
        self,
        signature: str | dict[str, Any],
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> str:
        await trio.lowlevel.checkpoint()
        spec = _spec(signature, module, instructions, state)
        program = _mock_program(spec)
        stored = self.sessions.add_program(session, spec)
        self._programs[stored.id, stored.version] = program
        return stored.id

    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        spec = self.sessions.program(session, program)
        return {**self._program(spec).describe(), "id": spec.id, "version": spec.version}

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        return [
            {**self._program(p).describe(), "id": p.id, "version": p.version}
            for p in self.sessions.programs(session)
        ]

    async def delete_program(self, program: str, *, session: str | None = None) -> None:
        await trio.lowlevel.checkpoint()
        spec = self.sessions.program(session, program)
        self.sessions.delete_program(session, program)
        self._programs.pop((spec.id, spec.version), None)

    def _answer(self, program: str, inputs: Any, session: str | None) -> tuple[_MockProgram, dict[str, Any]]:
        self._counts["calls"] += 1
        try:
            mock = self._program(self.sessions.program(session, program))
            _check_inputs(mock, inputs)
        except DspexError:
            self._counts["failed"] += 1
            raise
        seed = json.dumps(inputs, sort_keys=True, default=str)
        outputs = {f.name: fake_value(f.name, f.type, seed) for f in mock.outputs}
        return mock, outputs

    def _usage(self, inputs: Any, outputs: dict[str, Any]) -> dict[str, Any]:
        prompt = len(json.dumps(inputs, default=str).split())
        completion = len(json.dumps(outputs).split())
        totals = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        return {**totals, "by_model": {"mock": dict(totals)}}

    async def execute(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        _, outputs = self._answer(program, inputs, session)
        self._counts["completed"] += 1
        if with_usage:
            return {"outputs": outputs, "usage": self._usage(inputs, outputs), "backend": self.name}
        return outputs

    @asynccontextmanager
    async def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        await trio.lowlevel.checkpoint()
        mock, outputs = self._answer(program, inputs, session)
        yield self._events(mock, inputs, outputs)

    async def _events(
        self, mock: _MockProgram, inputs: Any, outputs: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        for f in mock.outputs:
            if f.type.kind == "str":
                for piece in re.findall(r"\s*\S+\s*", outputs[f.name]):
                    await trio.lowlevel.checkpoint()
                    yield {"event": "chunk", "field": f.name, "chunk": piece}
        self._counts["completed"] += 1
        yield {
            "event": "completed",
            "outputs": outputs,
            "usage": self._usage(inputs, outputs),
            "backend": self.name,
        }

    async def configure_lm(
        self,
        model: str,
        *,
        session: str | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        **settings: Any,
    ) -> None:
        await trio.lowlevel.checkpoint()
        try:
            config = check_lm_config(_lm_config(model, api_base, api_key, settings))
        except MethodError as exc:
            raise _invalid(exc) from None
        if session is not None:
            self.sessions.set_lm(session, config)
        else:
            self.lm = config

    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """``ping``, ``echo``, ``worker_lm`` and ``execute`` (``{"program", "inputs"}``)."""
        await trio.lowlevel.checkpoint()
        params = params if params is not None else {}
        if method == "ping":
            return {"pid": os.getpid(), "worker_id": "mock"}
        if method == "echo":
            return params.get("value") if isinstance(params, dict) else params
        if method == "worker_lm":
            record = self.sessions.peek(session)
            return describe_lm(record.lm if record is not None and record.lm else self.lm)
        if method == "execute" and isinstance(params, dict):
            return await self.execute(
                params.get("program", ""),
                cast(dict[str, Any], params.get("inputs")),
                session=session,
                with_usage=True,
            )
        raise UnknownMethod(f"the mock backend has no method {method!r}")

    def subscribe_health(self, *, buffer: int | None = None) -> AbstractAsyncContextManager[Subscription]:
        """Nothing happens to a mock's health; the subscription only ends when the bus closes."""
        return self.events.subscribe(buffer=buffer)

    def health(self) -> HealthSnapshot:
        return HealthSnapshot(
            backend=self.name,
            workers=(),
            size=0,
            restarts=0,
            circuit=CircuitState.CLOSED,
            circuit_reason="",
            launcher="in-process",
            seq=self.events.published,
        )

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            backend=self.name,
            calls=self._counts["calls"],
            completed=self._counts["completed"],
            failed=self._counts["failed"],
            unavailable=0,
            restarts=0,
            retried=0,
            sessions=len(self.sessions),
            circuit=CircuitState.CLOSED,
        )


# -- bridge ----------------------------------------------------------------------------------------------


class BridgeBackend:
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
        self._nursery = nursery
        self._launcher = launcher
        self.options = options
        self.diagnostics = diagnostics
        self.lm = lm
        self.retry = retry
        self._rng = random.Random()
        self.sessions = SessionStore(clock=clock or trio.current_time, ttl=session_ttl)
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
        self._descriptions: dict[tuple[str, int], dict[str, Any]] = {}
        self._lock = trio.Lock()
        self._closing = False
        self._counts = collections.Counter[str]()

    # -- the worker -----------------------------------------------------------------------------------
    def _on_circuit(self, old: CircuitState, new: CircuitState, reason: str) -> None:
        self.events.publish("circuit", {"from": str(old), "to": str(new), "reason": reason})

    def _on_transition(self, worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        self.events.publish(
            "worker_state",
            {
                "worker_id": worker.worker_id,
                "pid": worker.pid,
                "from": str(old),
                "to": str(new),
                "reason": reason,
            },
        )

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
    def _lm_params(self, session: str | None) -> dict[str, Any]:
        record = self.sessions.peek(session)
        if record is not None and record.lm is not None:
            return {"lm": record.lm}
        return {"lm": self.lm} if self.lm is not None else {}

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
        program: ProgramSpec | None = None
        if isinstance(params, dict) and isinstance(params.get("program"), str):
            program = self.sessions.program(session, params["program"])
        elif session is not None:
            self.sessions.session(session)
        deadline = trio.current_time() + timeout if timeout is not None else None
        self._counts["calls"] += 1
        attempts = 1
        send_spec = False
        try:
            while True:
                worker = await self._ensure()
                call_params = params
                if program is not None:
                    with_spec = send_spec or (program.id, program.version) not in self._held
                    call_params = {**params, "program": program.wire_ref(with_spec=with_spec)}
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

    async def create_program(
        self,
        signature: str | dict[str, Any],
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> str:
        spec = _spec(signature, module, instructions, state)
        description = await self.call("validate_program", {"spec": spec}, idempotent=True)
        program = self.sessions.add_program(session, spec)
        self._descriptions[program.id, program.version] = description
        return program.id

    def _info(self, program: ProgramSpec) -> dict[str, Any]:
        description = self._descriptions.get((program.id, program.version), {})
        return {
            **description,
            "id": program.id,
            "module": program.spec.get("module"),
            "version": program.version,
        }

    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return self._info(self.sessions.program(session, program))

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        return [self._info(p) for p in self.sessions.programs(session)]

    async def delete_program(self, program: str, *, session: str | None = None) -> None:
        await trio.lowlevel.checkpoint()
        spec = self.sessions.program(session, program)
        self.sessions.delete_program(session, program)
        self._descriptions.pop((spec.id, spec.version), None)

    async def execute(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        params = {"program": program, "inputs": inputs, **self._lm_params(session)}
        answer = await self.call("execute", params, session=session, timeout=timeout)
        return {**answer, "backend": self.name} if with_usage else answer["outputs"]

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
        params = {"program": spec.wire_ref(with_spec=True), "inputs": inputs, **self._lm_params(session)}
        self._counts["calls"] += 1
        async with worker.stream("execute", params, timeout=timeout) as events:
            yield self._events(events, spec)

    async def _events(self, events: Any, spec: ProgramSpec) -> AsyncIterator[dict[str, Any]]:
        async for data in events:
            yield {"event": "chunk", **data}
        try:
            answer = await events.result()
        except BaseException:
            self._counts["failed"] += 1
            raise
        self._held.add((spec.id, spec.version))
        self._counts["completed"] += 1
        yield {
            "event": "completed",
            "outputs": answer["outputs"],
            "usage": answer.get("usage"),
            "backend": self.name,
        }

    async def configure_lm(
        self,
        model: str,
        *,
        session: str | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        **settings: Any,
    ) -> None:
        config = _lm_config(model, api_base, api_key, settings)
        await self.call("validate_lm", {"lm": config}, idempotent=True)
        if session is not None:
            self.sessions.set_lm(session, config)
            return
        self.lm = config
        if self.worker is not None and self.worker.accepting:
            await self.worker.call("configure_lm", {"lm": config}, timeout=self.options.ack_timeout * 2)

    def subscribe_health(self, *, buffer: int | None = None) -> AbstractAsyncContextManager[Subscription]:
        """The worker's state transitions (``worker_state``) and the bridge's breaker (``circuit``)."""
        return self.events.subscribe(buffer=buffer)

    def health(self) -> HealthSnapshot:
        worker = self.worker
        workers: tuple[WorkerHealth, ...] = ()
        if worker is not None:
            workers = (
                WorkerHealth(
                    worker_id=worker.worker_id,
                    pid=worker.pid,
                    state=worker.state,
                    in_flight=worker.in_flight,
                    last_heartbeat_age=max(0.0, trio.current_time() - worker.last_seen),
                    restarts=self._counts["restarts"],
                    retiring=False,
                ),
            )
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


# -- fallback --------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Program:
    """A program of the fallback: its definition, and its id in each backend that has it."""

    spec: dict[str, Any]
    description: dict[str, Any]
    ids: dict[str, str] = attrs.Factory(dict)


class FallbackBackend:
    """Pool -> bridge (-> mock): each call goes to the first backend that takes it. Made by
    :func:`open_backend` ("fallback").

    The fallback owns the program definitions: a program created on one backend is created on another
    the first time a call needs it there. LM configuration reaches every backend (one unavailable now
    gets it before its next call). ``last_backend`` names the backend of the latest call; a change
    publishes a ``backend`` health event (from, to, reason).
    """

    name = "fallback"

    def __init__(self, chain: list[Backend], skipped: dict[str, str]) -> None:
        if not chain:
            raise ValueError("a fallback needs at least one backend")
        self.chain = chain
        self.skipped = skipped
        self.events = EventBus(backend=self.name)
        self.last_backend: str | None = None
        """The backend that served the latest call (None before the first)."""
        self._programs: dict[tuple[str, str], _Program] = {}
        self._pending_lm: dict[str, list[tuple[str | None, dict[str, Any]]]] = {b.name: [] for b in chain}
        self._served = collections.Counter[str]()
        self._counts = collections.Counter[str]()

    # -- routing --------------------------------------------------------------------------------------
    async def _route(self, op: Callable[[Backend], Awaitable[T]]) -> T:
        reasons: list[str] = []
        for backend in self.chain:
            try:
                await self._apply_pending_lm(backend)
                result = await op(backend)
            except PoolUnavailable as exc:
                reasons.append(f"{backend.name}: {exc.reason}")
                continue
            self._note_served(backend.name, reasons)
            return result
        raise PoolUnavailable(
            "every backend is unavailable: " + "; ".join(reasons), reason="; ".join(reasons)
        )

    def _note_served(self, name: str, reasons: list[str]) -> None:
        self._served[name] += 1
        if name != self.chain[0].name:
            self._counts["fallbacks"] += 1
        if name != self.last_backend:
            if self.last_backend is not None:
                self._counts["switches"] += 1
            reason = "; ".join(reasons) if reasons else "preferred backend available"
            self.events.publish(
                "backend", {"from": self.last_backend, "to": name, "reason": reason}, backend=name
            )
            self.last_backend = name

    async def _apply_pending_lm(self, backend: Backend) -> None:
        pending = self._pending_lm[backend.name]
        while pending:
            session, config = pending[0]
            await backend.configure_lm(session=session, **config)
            pending.pop(0)

    def _entry(self, session: str | None, program: str) -> _Program:
        entry = self._programs.get((session or DEFAULT_SESSION, program))
        if entry is None:
            raise ProgramNotFound(f"no program {program!r} in session {session or DEFAULT_SESSION!r}")
        return entry

    async def _id_in(self, backend: Backend, entry: _Program, session: str | None) -> str:
        """The program's id in ``backend``, creating it there on first use."""
        backend_id = entry.ids.get(backend.name)
        if backend_id is None:
            backend_id = entry.ids[backend.name] = await backend.create_program(session=session, **entry.spec)
        return backend_id

    async def _on_program(
        self, session: str | None, program: str, op: Callable[[Backend, str], Awaitable[T]]
    ) -> T:
        entry = self._entry(session, program)

        async def run(backend: Backend) -> T:
            for _ in range(2):
                backend_id = await self._id_in(backend, entry, session)
                try:
                    return await op(backend, backend_id)
                except ProgramNotFound:  # the backend dropped it (its session expired): once more
                    entry.ids.pop(backend.name, None)
            raise ProgramNotFound(f"{backend.name} lost program {program!r}")

        return await self._route(run)

    # -- the interface --------------------------------------------------------------------------------
    async def create_program(
        self,
        signature: str | dict[str, Any],
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> str:
        spec: dict[str, Any] = {
            "signature": signature,
            "module": module,
            "instructions": instructions,
            "state": state,
        }

        async def create(backend: Backend) -> tuple[str, str, dict[str, Any]]:
            backend_id = await backend.create_program(session=session, **spec)
            return backend.name, backend_id, await backend.get_program(backend_id, session=session)

        name, backend_id, description = await self._route(create)
        program_id = f"p_{secrets.token_hex(6)}"
        description = {k: v for k, v in description.items() if k not in ("id", "version")}
        self._programs[session or DEFAULT_SESSION, program_id] = _Program(
            spec, description, {name: backend_id}
        )
        return program_id

    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {**self._entry(session, program).description, "id": program}

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        sid = session or DEFAULT_SESSION
        return [{**p.description, "id": pid} for (s, pid), p in self._programs.items() if s == sid]

    async def delete_program(self, program: str, *, session: str | None = None) -> None:
        entry = self._entry(session, program)
        del self._programs[session or DEFAULT_SESSION, program]
        for backend in self.chain:
            backend_id = entry.ids.get(backend.name)
            if backend_id is not None:
                with contextlib.suppress(DspexError):
                    await backend.delete_program(backend_id, session=session)

    async def execute(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        async def run(backend: Backend, backend_id: str) -> dict[str, Any]:
            return await backend.execute(
                backend_id, inputs, session=session, timeout=timeout, with_usage=with_usage
            )

        return await self._on_program(session, program, run)

    @asynccontextmanager
    async def stream(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        async with contextlib.AsyncExitStack() as stack:

            async def open_on(backend: Backend, backend_id: str) -> AsyncIterator[dict[str, Any]]:
                return await stack.enter_async_context(
                    backend.stream(backend_id, inputs, session=session, timeout=timeout)
                )

            events = await self._on_program(session, program, open_on)
            yield events

    async def configure_lm(
        self,
        model: str,
        *,
        session: str | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        **settings: Any,
    ) -> None:
        """Configure every backend; one that is unavailable now gets it before its next call."""
        config = {"model": model, "api_base": api_base, "api_key": api_key, **settings}
        configured = 0
        for backend in self.chain:
            try:
                await self._apply_pending_lm(backend)
                await backend.configure_lm(session=session, **config)
                configured += 1
            except PoolUnavailable:
                self._pending_lm[backend.name].append((session, config))
        if not configured:
            raise PoolUnavailable(
                "no backend is available to validate the LM", reason="every backend unavailable"
            )

    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        if isinstance(params, dict) and isinstance(params.get("program"), str):

            async def on_program(backend: Backend, backend_id: str) -> Any:
                return await backend.call(
                    method,
                    {**params, "program": backend_id},
                    session=session,
                    timeout=timeout,
                    idempotent=idempotent,
                )

            return await self._on_program(session, params["program"], on_program)

        async def run(backend: Backend) -> Any:
            return await backend.call(method, params, session=session, timeout=timeout, idempotent=idempotent)

        return await self._route(run)

    def subscribe_health(self, *, buffer: int | None = None) -> AbstractAsyncContextManager[Subscription]:
        """Every backend's health events (each with its ``backend``), and ``backend`` events when the
        serving backend changes."""
        return self.events.subscribe(buffer=buffer)

    async def _forward(
        self, backend: Backend, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with backend.subscribe_health(buffer=FORWARD_BUFFER) as events:
            task_status.started()
            async for event in events:
                self.events.publish(event.kind, event.data, backend=event.backend)

    @property
    def current(self) -> Backend:
        """The backend in use: the latest call's, or the first of the chain before any call."""
        for backend in self.chain:
            if backend.name == self.last_backend:
                return backend
        return self.chain[0]

    def health(self) -> HealthSnapshot:
        """The health of the backend in use (``.backend`` names it)."""
        return attrs.evolve(self.current.health(), seq=self.events.published)

    def statistics(self) -> FallbackStatistics:
        return FallbackStatistics(
            backend=self.last_backend,
            chain=tuple(b.name for b in self.chain),
            skipped=dict(self.skipped),
            served=dict(self._served),
            fallbacks=self._counts["fallbacks"],
            switches=self._counts["switches"],
            backends={b.name: b.statistics() for b in self.chain},
        )


@asynccontextmanager
async def open_fallback(
    *,
    allow_mock: bool = False,
    lm: Any = None,
    diagnostics: bool = False,
    pool_options: dict[str, Any] | None = None,
    bridge_options: dict[str, Any] | None = None,
) -> AsyncIterator[FallbackBackend]:
    """Open pool, bridge (and mock, with ``allow_mock``) and chain them; a backend that cannot start is
    skipped (``statistics().skipped``). ``PoolUnavailable`` if none starts."""
    kinds: list[BackendKind] = ["pool", "bridge"]
    if allow_mock:
        kinds.append("mock")
    options: dict[str, dict[str, Any]] = {
        "pool": {"lm": lm, "diagnostics": diagnostics, **(pool_options or {})},
        "bridge": {"lm": lm, "diagnostics": diagnostics, **(bridge_options or {})},
        "mock": {},
    }
    async with contextlib.AsyncExitStack() as stack:
        chain: list[Backend] = []
        skipped: dict[str, str] = {}
        for kind in kinds:
            try:
                chain.append(await stack.enter_async_context(open_backend(kind, **options[kind])))
            except (DspexError, OSError) as exc:
                skipped[kind] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not chain:
            reasons = "; ".join(f"{k}: {why}" for k, why in skipped.items())
            raise PoolUnavailable(f"no backend could start: {reasons}", reason=reasons)
        fallback = FallbackBackend(chain, skipped)
        async with open_service_nursery() as nursery:
            for backend in chain:
                await nursery.start(fallback._forward, backend)
            for name, why in skipped.items():
                fallback.events.publish(
                    "backend", {"from": name, "to": None, "reason": f"could not start: {why}"}
                )
            try:
                yield fallback
            finally:
                nursery.cancel_scope.cancel()
                fallback.events.close()


@asynccontextmanager
async def _open_mock(**options: Any) -> AsyncIterator[MockBackend]:
    backend = MockBackend(**options)
    try:
        yield backend
    finally:
        backend.events.close()


def open_backend(kind: BackendKind, **options: Any) -> AbstractAsyncContextManager[Backend]:
    """``async with open_backend(kind, **options) as backend``: one of the backends.

    - ``"mock"``: :class:`MockBackend` (options: ``clock``, ``session_ttl``);
    - ``"bridge"``: :class:`BridgeBackend` (``lm``, ``diagnostics``, ``launcher``, ``retry``,
      ``session_ttl`` and the :class:`WorkerOptions` fields);
    - ``"pool"``: :func:`open_pool` (its arguments);
    - ``"fallback"``: :class:`FallbackBackend` (``allow_mock=False``, ``lm``, ``diagnostics``,
      ``pool_options``, ``bridge_options``).
    """
    if kind == "mock":
        return _open_mock(**options)
    if kind == "bridge":
        return open_bridge(**options)
    if kind == "pool":
        return open_pool(**options)
    if kind == "fallback":
        return open_fallback(**options)
    raise ValueError(f"backend kind must be one of {', '.join(BACKEND_KINDS)}, not {kind!r}")


if TYPE_CHECKING:  # every backend satisfies the interface (checked by mypy)

    def _conforms(
        pool: Pool, mock: MockBackend, bridge: BridgeBackend, fallback: FallbackBackend
    ) -> list[Backend]:
        return [pool, mock, bridge, fallback]
