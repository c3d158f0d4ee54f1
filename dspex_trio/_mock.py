"""The ``mock`` backend: in-process, no subprocess, no dspy (unless the operator's program modules import it).

Specs, inputs, states and LM configurations go through the workers' own program-spec layer
(:mod:`bridge_child.spec`: same parser, same rules, same output fields and predictors, same messages), and
outputs are derived deterministically from the output types with the offline LM's value derivation
(``spec.fake_value``, ``spec.fake_from_schema``), so mock and pool agree on every type. The operator's
program modules (``programs=[...]``) are loaded here too, as the workers load them
(:mod:`bridge_child.registry`): a registered program is instantiated once per creation to read its
interface, never run.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import attrs
import trio

from bridge_child import registry
from bridge_child.spec import (
    FieldSpec,
    ModuleLayout,
    PredictorLayout,
    SpecError,
    check_inputs,
    check_lm_config,
    check_state,
    describe_lm,
    fake_value,
    parse_spec,
)
from bridge_child.spec import (
    ProgramSpec as ParsedSpec,
)
from dspex_trio._breaker import CircuitState
from dspex_trio._errors import DspexError, InvalidParams, ProgramError, ProgramModuleError, UnknownMethod
from dspex_trio._events import EventBus, Subscription
from dspex_trio._health import HealthSnapshot
from dspex_trio._programs_host import ProgramCatalog, check_state_size, completed_event, program_spec
from dspex_trio._sessions import DEFAULT_SESSION_TTL_S, ProgramSpec
from dspex_trio._statistics import BackendStatistics


def _invalid(exc: SpecError | registry.ProgramFactoryError) -> DspexError:
    if isinstance(exc, registry.ProgramFactoryError):  # a registered program's factory failed
        return ProgramError(exc.message, error_type=exc.type)
    return InvalidParams(exc.message)


@attrs.frozen
class _MockProgram:
    module: str
    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]
    instructions: str
    layout: ModuleLayout
    include: tuple[str, ...] = ()
    options: dict[str, Any] = attrs.Factory(dict)

    def describe(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "inputs": [f.describe() for f in self.inputs],
            "outputs": [f.describe() for f in self.outputs],
            "predictors": [p.describe() for p in self.layout.predictors],
            "instructions": self.instructions,
            **({"include": list(self.include)} if self.include else {}),
            **({"options": self.options} if self.options else {}),
        }

    @property
    def chunked(self) -> str | None:
        """The predictor whose ``str`` outputs a stream chunks: the last one; none for best_of_n and
        refine, which run copies of their module (as the workers stream them)."""
        if self.module in ("best_of_n", "refine") or not self.layout.predictors:
            return None
        return self.layout.predictors[-1].name


def _prefix(name: str) -> str:
    """DSPy's default prefix of a field (``question`` -> ``Question:``)."""
    return " ".join(word.capitalize() for word in name.split("_")) + ":"


def _default_state(program: _MockProgram) -> dict[str, Any]:
    """What a worker's ``get_state`` gives for a program no state was loaded into (DSPy's format)."""
    states: dict[str, Any] = {
        p.name: {
            "traces": [],
            "train": [],
            "demos": [],
            "signature": {
                "instructions": p.instructions or program.instructions,
                "fields": [
                    {"prefix": _prefix(f), "description": f"${{{f}}}"} for f in (*p.inputs, *p.outputs)
                ],
            },
            "lm": None,
        }
        for p in program.layout.predictors
    }
    state = states[program.layout.predictors[0].name] if program.layout.flat else states
    return {**state, "metadata": {"dependency_versions": {}}}


def _registered(loaded: registry.Registry, name: str) -> tuple[registry.ProgramInterface, ModuleLayout]:
    interface = registry.program_interface(registry.instantiate(loaded, name))
    return interface, ModuleLayout(interface.predictors, flat=interface.flat)


def _mock_program(spec: dict[str, Any], loaded: registry.Registry) -> _MockProgram:
    """Parse a spec as a worker would (same parser, same rules, same registry), without running it."""
    try:
        parsed = parse_spec(spec, loaded.names())
        program = _describe(parsed, loaded)
        if parsed.state is not None:  # checked as a worker does; its instructions are the program's now
            clean = check_state(parsed.state, program.layout.predictors, flat=program.layout.flat)
            states = [clean] if program.layout.flat else [clean[p.name] for p in program.layout.predictors]
            predictors = tuple(
                dataclasses.replace(p, instructions=state["signature"]["instructions"])
                for p, state in zip(program.layout.predictors, states, strict=True)
            )
            layout = dataclasses.replace(program.layout, predictors=predictors)
            first = predictors[0].instructions if predictors else None
            program = attrs.evolve(program, layout=layout, instructions=first or program.instructions)
    except (SpecError, registry.ProgramFactoryError) as exc:
        raise _invalid(exc) from None
    return program


def _describe(parsed: ParsedSpec, loaded: registry.Registry) -> _MockProgram:
    if parsed.registered:
        interface, layout = _registered(loaded, parsed.module)
        inputs, outputs = interface.inputs, interface.outputs
    elif parsed.signature is None:  # best_of_n / refine over a registered program
        interface, inner = _registered(loaded, parsed.options["base"])
        inputs, outputs = interface.inputs, interface.outputs
        layout = ModuleLayout(
            tuple(PredictorLayout(f"module.{p.name}", p.inputs, p.outputs) for p in inner.predictors)
        )
    else:
        inputs, outputs, layout = parsed.inputs, parsed.outputs, parsed.layout()
    first = layout.predictors[0].instructions if layout.predictors else None
    signature = parsed.signature
    instructions = (signature.instructions if signature is not None else first) or (
        "Given the fields "
        + ", ".join(f"`{f.name}`" for f in inputs)
        + ", produce the fields "
        + ", ".join(f"`{f.name}`" for f in (signature.outputs if signature is not None else outputs))
        + "."
    )
    return _MockProgram(parsed.module, inputs, outputs, instructions, layout, parsed.include, parsed.options)


def _load(programs: Sequence[str]) -> registry.Registry:
    try:
        return registry.load_registry(programs) if programs else registry.EMPTY
    except registry.RegistryError as exc:
        raise ProgramModuleError(str(exc)) from exc


class MockBackend(ProgramCatalog):
    """In-process backend with deterministic fake answers (see the module doc). No subprocess, no dspy.

    The same inputs always give the same outputs; every output field has its declared type. LM
    configuration is validated and recorded, but never used.
    """

    name = "mock"

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        session_ttl: float = DEFAULT_SESSION_TTL_S,
        programs: Sequence[str] = (),
    ):
        super().__init__(clock=clock, session_ttl=session_ttl)
        self.events = EventBus(backend=self.name)
        self.registry = _load(programs)
        """The operator's program modules, loaded in-process (``ProgramModuleError`` if unusable)."""
        self._programs: dict[tuple[str, int], _MockProgram] = {}
        self._counts = collections.Counter[str]()
        self._available: dict[str, Any] | None = None

    def _program(self, spec: ProgramSpec) -> _MockProgram:
        key = (spec.id, spec.version)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = _mock_program(spec.spec, self.registry)
        return program

    async def create_program(
        self,
        signature: str | dict[str, Any] | None = None,
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
        include: list[str] | None = None,
        **options: Any,
    ) -> str:
        """As ``Pool.create_program``: a built-in from ``signature``, or a registered program by name."""
        await trio.lowlevel.checkpoint()
        spec = program_spec(signature, module, instructions, state, include, options)
        program = _mock_program(spec, self.registry)
        stored = self.sessions.add_program(session, spec)
        self._programs[stored.id, stored.version] = program
        return stored.id

    async def available_programs(self) -> dict[str, Any]:
        """What the program modules registered, described as a worker describes it."""
        await trio.lowlevel.checkpoint()
        if self._available is None:
            self._available = registry.describe_registry(self.registry)
        return self._available

    async def get_state(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        """The state loaded into the program, or a fresh one in DSPy's format (no demos)."""
        await trio.lowlevel.checkpoint()
        stored = self.sessions.program(session, program)
        state = stored.spec.get("state")
        return dict(state) if state is not None else _default_state(self._program(stored))

    async def load_state(self, program: str, state: dict[str, Any], *, session: str | None = None) -> None:
        """Check a state against the program's predictors (as a worker does) and store it."""
        await trio.lowlevel.checkpoint()
        check_state_size(state)
        stored = self.sessions.program(session, program)
        checked = _mock_program({**stored.spec, "state": state}, self.registry)
        updated = self.sessions.update_program(session, program, state=state)
        self._programs[updated.id, updated.version] = checked

    # -- the catalog's hooks --------------------------------------------------------------------------
    def _info(self, program: ProgramSpec) -> dict[str, Any]:
        return {**self._program(program).describe(), "id": program.id, "version": program.version}

    def _forget(self, program: ProgramSpec) -> None:
        self._programs.pop((program.id, program.version), None)

    async def _validate_lm(self, config: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        try:
            return check_lm_config(config)
        except SpecError as exc:
            raise _invalid(exc) from None

    # -- execution ------------------------------------------------------------------------------------
    def _answer(self, program: str, inputs: Any, session: str | None) -> tuple[_MockProgram, dict[str, Any]]:
        self._counts["calls"] += 1
        try:
            mock = self._program(self.sessions.program(session, program))
            check_inputs(mock.inputs, inputs)
        except SpecError as exc:
            self._counts["failed"] += 1
            raise _invalid(exc) from None
        except DspexError:
            self._counts["failed"] += 1
            raise
        seed = json.dumps(inputs, sort_keys=True, default=str)
        outputs = {f.name: fake_value(f.name, f.type, seed) for f in mock.outputs}
        outputs.update(dict.fromkeys(mock.include))  # a mock has no prediction to take them from
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
        for p in mock.layout.predictors:  # each predictor starts (once here), as a worker reports it
            name = p.name
            yield {"event": "status", "status": "predictor", "predictor": name, "message": f"{name} started"}
        predictor = mock.chunked
        for f in mock.outputs if predictor is not None else ():
            if f.type.kind == "str":
                for piece in re.findall(r"\s*\S+\s*", outputs[f.name]):
                    await trio.lowlevel.checkpoint()
                    yield {"event": "chunk", "predictor": predictor, "field": f.name, "chunk": piece}
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
