"""The ``mock`` backend: in-process, no subprocess, no dspy.

Outputs are derived deterministically from the signature's output types, with the offline LM's own value
derivation (``bridge_child._offline_lm``), and signatures are parsed by the same safe parser the workers
use, so mock and pool agree on every type.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import attrs
import trio

from bridge_child._context import MethodError
from bridge_child._offline_lm import fake_value
from bridge_child._programs import check_lm_config, describe_lm, parse_spec
from bridge_child._signatures import STR, FieldSpec
from dspex_trio._backend import BackendStatistics
from dspex_trio._breaker import CircuitState
from dspex_trio._errors import DspexError, InvalidParams, UnknownMethod
from dspex_trio._events import EventBus, Subscription
from dspex_trio._pool import HealthSnapshot
from dspex_trio._programs_host import ProgramCatalog, completed_event, program_spec
from dspex_trio._sessions import DEFAULT_SESSION_TTL_S, ProgramSpec


def _invalid(exc: MethodError) -> DspexError:
    return InvalidParams(exc.message)


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


class MockBackend(ProgramCatalog):
    """In-process backend with deterministic fake answers (see the module doc). No subprocess, no dspy.

    The same inputs always give the same outputs; every output field has its declared type. LM
    configuration is validated and recorded, but never used.
    """

    name = "mock"

    def __init__(
        self, *, clock: Callable[[], float] | None = None, session_ttl: float = DEFAULT_SESSION_TTL_S
    ):
        super().__init__(clock=clock, session_ttl=session_ttl)
        self.events = EventBus(backend=self.name)
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
        spec = program_spec(signature, module, instructions, state)
        program = _mock_program(spec)
        stored = self.sessions.add_program(session, spec)
        self._programs[stored.id, stored.version] = program
        return stored.id

    # -- the catalog's hooks --------------------------------------------------------------------------
    def _info(self, program: ProgramSpec) -> dict[str, Any]:
        return {**self._program(program).describe(), "id": program.id, "version": program.version}

    def _forget(self, program: ProgramSpec) -> None:
        self._programs.pop((program.id, program.version), None)

    async def _validate_lm(self, config: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        try:
            return check_lm_config(config)
        except MethodError as exc:
            raise _invalid(exc) from None

    # -- execution ------------------------------------------------------------------------------------
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
        yield completed_event(outputs, self._usage(inputs, outputs), self.name)

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


@asynccontextmanager
async def open_mock(**options: Any) -> AsyncIterator[MockBackend]:
    backend = MockBackend(**options)
    try:
        yield backend
    finally:
        backend.events.close()
