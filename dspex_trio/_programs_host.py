"""The host-side program layer that every backend shares: sessions, program descriptions, LM settings.

Programs and LM configuration live on the host (a :class:`~dspex_trio._sessions.SessionStore`); workers
only cache them. This module writes that layer once:

- :class:`ProgramCatalog`: the session store, describing, listing and deleting programs, and
  ``configure_lm``, in terms of a few hooks (``_info``, ``_forget``, ``_validate_lm``,
  ``_apply_default_lm``). The mock backend builds on it directly (it validates in-process).
- :class:`ProgramHost`: the catalog for backends whose workers validate and run programs (the pool and
  the bridge), in terms of their ``call()``: ``create_program``, ``execute``, program references on the
  wire, and the LM parameters of a call.
- :func:`program_events`: a worker's execution stream as the ``chunk`` ... ``completed`` events of
  ``stream()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import trio

from dspex_trio._sessions import ProgramSpec, SessionStore

ProgramKey = tuple[str, int]
"""A program version: (program id, version)."""


def program_spec(
    signature: str | dict[str, Any], module: str, instructions: str | None, state: dict[str, Any] | None
) -> dict[str, Any]:
    """The definition of a program, as the session store keeps it and workers receive it."""
    spec: dict[str, Any] = {"signature": signature, "module": module}
    if instructions is not None:
        spec["instructions"] = instructions
    if state is not None:
        spec["state"] = state
    return spec


def lm_config(
    model: str, api_base: str | None, api_key: str | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """The LM configuration of a ``configure_lm`` call."""
    config: dict[str, Any] = {"model": model, **settings}
    if api_base is not None:
        config["api_base"] = api_base
    if api_key is not None:
        config["api_key"] = api_key
    return config


def completed_event(outputs: dict[str, Any], usage: Any, backend: str) -> dict[str, Any]:
    """The last event of ``stream()``."""
    return {"event": "completed", "outputs": outputs, "usage": usage, "backend": backend}


async def program_events(
    events: Any,
    backend: str,
    *,
    on_completed: Callable[[], None],
    on_failed: Callable[[], None] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """A worker's ``execute`` stream as ``{"event": "chunk", ...}`` events, then one ``completed`` event.

    ``on_completed`` runs once the worker's answer is in, before the ``completed`` event; ``on_failed``
    (if given) when awaiting the answer raises.
    """
    async for data in events:
        yield {"event": "chunk", **data}
    try:
        answer = await events.result()
    except BaseException:
        if on_failed is not None:
            on_failed()
        raise
    on_completed()
    yield completed_event(answer["outputs"], answer.get("usage"), backend)


class ProgramCatalog:
    """The programs and LM configuration a backend keeps on the host, per session."""

    name: str
    """The backend name (see ``dspex_trio.Backend``)."""
    _reads_checkpoint: ClassVar[bool] = True
    """Whether ``get_program``, ``list_programs`` and ``delete_program`` pass a Trio checkpoint."""

    def __init__(self, *, clock: Callable[[], float] | None, session_ttl: float, lm: Any = None) -> None:
        self.sessions = SessionStore(clock=clock or trio.current_time, ttl=session_ttl)
        self.lm = lm

    # -- hooks ----------------------------------------------------------------------------------------
    def _info(self, program: ProgramSpec) -> dict[str, Any]:
        """The description of a stored program (with its ``id`` and ``version``)."""
        raise NotImplementedError

    def _forget(self, program: ProgramSpec) -> None:
        """Drop what the backend keeps about a deleted program."""
        raise NotImplementedError

    async def _validate_lm(self, config: dict[str, Any]) -> dict[str, Any]:
        """Check an LM configuration (``InvalidParams`` if it is not one); the configuration to keep."""
        raise NotImplementedError

    async def _apply_default_lm(self) -> None:
        """``self.lm`` just changed: apply it where the backend runs programs."""

    # -- programs -------------------------------------------------------------------------------------
    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        """The program's description (fields, types, instructions). ``ProgramNotFound`` if absent."""
        if self._reads_checkpoint:
            await trio.lowlevel.checkpoint()
        return self._info(self.sessions.program(session, program))

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]:
        """Every program of the session, each described as by ``get_program`` (with its ``id``)."""
        if self._reads_checkpoint:
            await trio.lowlevel.checkpoint()
        return [self._info(p) for p in self.sessions.programs(session)]

    async def delete_program(self, program: str, *, session: str | None = None) -> None:
        """Delete a program (workers drop their cached copy as it ages out). ``ProgramNotFound`` if absent."""
        if self._reads_checkpoint:
            await trio.lowlevel.checkpoint()
        spec = self.sessions.program(session, program)
        self.sessions.delete_program(session, program)
        self._forget(spec)

    async def configure_lm(
        self,
        model: str,
        *,
        session: str | None = None,
        api_base: str | None = None,
        api_key: str | None = None,
        **settings: Any,
    ) -> None:
        """Set the LM: for ``session`` only, or (without one) the backend's default. ``model`` is
        ``"offline"`` (the embedded deterministic LM) or any ``provider/model`` of ``dspy.LM``. The key is
        never logged or echoed back."""
        config = await self._validate_lm(lm_config(model, api_base, api_key, settings))
        if session is not None:
            self.sessions.set_lm(session, config)
            return
        self.lm = config
        await self._apply_default_lm()


class ProgramHost(ProgramCatalog):
    """A catalog whose programs are validated and run by workers, through the backend's ``call()``."""

    def __init__(self, *, clock: Callable[[], float] | None, session_ttl: float, lm: Any = None) -> None:
        super().__init__(clock=clock, session_ttl=session_ttl, lm=lm)
        self._descriptions: dict[ProgramKey, dict[str, Any]] = {}
        """Each program version's description, as the worker that validated it gave it."""

    # -- hooks ----------------------------------------------------------------------------------------
    async def call(
        self,
        method: str,
        params: Any = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Run ``method(params)`` in a worker; programs in ``params`` resolve in ``session``."""
        raise NotImplementedError

    # -- the catalog's hooks --------------------------------------------------------------------------
    def _info(self, program: ProgramSpec) -> dict[str, Any]:
        description = self._descriptions.get((program.id, program.version), {})
        return {
            **description,
            "id": program.id,
            "module": program.spec.get("module"),
            "version": program.version,
        }

    def _forget(self, program: ProgramSpec) -> None:
        self._descriptions.pop((program.id, program.version), None)

    async def _validate_lm(self, config: dict[str, Any]) -> dict[str, Any]:
        await self.call("validate_lm", {"lm": config}, idempotent=True)
        return config

    # -- calls ----------------------------------------------------------------------------------------
    def _resolve(self, params: Any, session: str | None) -> ProgramSpec | None:
        """The program ``params`` names (``ProgramNotFound`` if absent); else the session is touched."""
        if isinstance(params, dict) and isinstance(params.get("program"), str):
            return self.sessions.program(session, params["program"])
        if session is not None:
            self.sessions.session(session)
        return None

    @staticmethod
    def _wire_params(
        params: Any, program: ProgramSpec | None, held: set[ProgramKey], *, send_spec: bool
    ) -> Any:
        """``params`` as sent to a worker holding ``held``: the program by reference, with its spec if the
        worker lacks it (or ``send_spec``)."""
        if program is None:
            return params
        with_spec = send_spec or (program.id, program.version) not in held
        return {**params, "program": program.wire_ref(with_spec=with_spec)}

    def _lm_params(self, session: str | None) -> dict[str, Any]:
        record = self.sessions.peek(session)
        if record is not None and record.lm is not None:
            return {"lm": record.lm}
        return {"lm": self.lm} if self.lm is not None else {}

    def _execute_params(self, program: str, inputs: dict[str, Any], session: str | None) -> dict[str, Any]:
        return {"program": program, "inputs": inputs, **self._lm_params(session)}

    # -- programs -------------------------------------------------------------------------------------
    async def _add_program(self, spec: dict[str, Any], session: str | None, timeout: float | None) -> str:
        description = await self.call("validate_program", {"spec": spec}, timeout=timeout, idempotent=True)
        program = self.sessions.add_program(session, spec)
        self._descriptions[program.id, program.version] = description
        return program.id

    async def create_program(
        self,
        signature: str | dict[str, Any],
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> str:
        """Create a program in ``session`` (validated by a worker first) and return its id."""
        return await self._add_program(program_spec(signature, module, instructions, state), session, None)

    async def execute(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        with_usage: bool = False,
    ) -> dict[str, Any]:
        """Run a program and return its output fields as plain JSON values of their declared types.

        With ``with_usage=True`` the answer is ``{"outputs": {...}, "usage": {...} | None, "backend":
        <the backend's name>}``.

        Raises:
            ProgramNotFound: no such program in the session.
            ProgramError: the program failed (``error_type`` names DSPy's error, e.g. ``LMRateLimitError``).
            InvalidParams: missing, unknown or mistyped inputs.
            and the errors of ``call()``.
        """
        params = self._execute_params(program, inputs, session)
        answer = await self.call("execute", params, session=session, timeout=timeout)
        return {**answer, "backend": self.name} if with_usage else answer["outputs"]
