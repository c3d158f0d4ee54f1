"""The host-side program layer that every backend shares: sessions, program descriptions, LM settings.

Programs and LM configuration live on the host (a :class:`~dspex_trio._sessions.SessionStore`); workers
only cache them. This module writes that layer once:

- :class:`ProgramCatalog`: the session store, describing, listing and deleting programs, and
  ``configure_lm``, in terms of a few hooks (``_info``, ``_forget``, ``_validate_lm``,
  ``_apply_default_lm``). The mock backend builds on it directly (it validates in-process).
- :class:`ProgramHost`: the catalog for backends whose workers validate and run programs (the pool and
  the bridge), in terms of their ``call()``: ``create_program``, ``execute``, and the LM parameters of a
  call. Their calls and streams run through ``dspex_trio._dispatch.Dispatch``.
- :func:`completed_event`: the last event of every backend's ``stream()``.
- :func:`program_spec` (a ``create_program`` call as the spec the store keeps and workers build),
  :func:`program_module_error` (the one error an unusable program module is at start-up).
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import msgspec
import trio

from bridge_child.registry import EXIT_PROGRAMS, FAILED_PREFIX
from bridge_child.spec import MAX_STATE_BYTES
from dspex_trio._errors import InvalidParams, ProgramModuleError, WorkerStartFailed
from dspex_trio._jobs import EvaluationJob, open_evaluation, open_job
from dspex_trio._lm_cache import lm_cache_mode, set_session_lm_cache
from dspex_trio._sessions import ProgramSpec, SessionStore

if TYPE_CHECKING:
    from dspex_trio._compile import CompileJob

JOB_CONCURRENCY: Final = 8
"""Examples of a job in flight at once on a backend that says no other (the pool: all its capacity)."""
DEFAULT_LM: Final = "default"
"""``configure_lm(DEFAULT_LM, session=...)``: the session uses the backend's default LM again."""

ProgramKey = tuple[str, int]
"""A program version: (program id, version)."""


def program_spec(
    signature: str | dict[str, Any] | None,
    module: str,
    instructions: str | None,
    state: dict[str, Any] | None,
    include: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The definition of a program, as the session store keeps it and workers receive it: the module (a
    built-in or a registered program), its signature (built-ins), the module's ``options`` (``tools``,
    ``max_iters``, ``n``, ``reward``, ``threshold``, ``base``), ``include`` and DSPy state.

    Raises:
        InvalidParams: the state is not JSON data, or larger than ``MAX_STATE_BYTES`` (checked here, so
            an oversized state never reaches a worker).
    """
    spec: dict[str, Any] = {"module": module}
    if signature is not None:
        spec["signature"] = signature
    if instructions is not None:
        spec["instructions"] = instructions
    if include is not None:
        spec["include"] = include
    spec.update(options or {})
    if state is not None:
        check_state_size(state)
        spec["state"] = state
    return spec


def check_state_size(state: Any) -> None:
    """``InvalidParams`` unless ``state`` is JSON data of at most ``MAX_STATE_BYTES`` (encoded)."""
    try:
        size = len(msgspec.json.encode(state))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidParams(f"a program state must be JSON data (DSPy's JSON state format): {exc}") from None
    if size > MAX_STATE_BYTES:
        raise InvalidParams(
            f"the program state is {size} bytes of JSON; at most {MAX_STATE_BYTES} are allowed"
        )


def program_module_error(exc: BaseException) -> ProgramModuleError | None:
    """The :class:`ProgramModuleError` ``exc`` holds, if any: itself, a leaf of an exception group (the
    start-up of a pool's slots), or a ``WorkerStartFailed`` of a worker that exited because its program
    modules cannot be used (``bridge_child.registry.EXIT_PROGRAMS``, the reason on its stderr)."""
    if isinstance(exc, ProgramModuleError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for leaf in exc.exceptions:
            found = program_module_error(leaf)
            if found is not None:
                return found
        return None
    status = exc.exit_status if isinstance(exc, WorkerStartFailed) else None
    if status is not None and status.code == EXIT_PROGRAMS:
        lines = [line for line in str(exc).splitlines() if line.startswith(FAILED_PREFIX)]
        return ProgramModuleError(lines[-1][len(FAILED_PREFIX) :] if lines else str(exc))
    return None


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
    """The last event of ``stream()``; the events before it are the worker's own ``{"event": "chunk",
    "field", "chunk"}`` (the mock builds the same)."""
    return {"event": "completed", "outputs": outputs, "usage": usage, "backend": backend}


class ProgramCatalog:
    """The programs and LM configuration a backend keeps on the host, per session."""

    name: str
    """The backend name (see ``dspex_trio.Backend``)."""

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

    # -- sessions -------------------------------------------------------------------------------------
    async def open_session(self, *, max_programs: int | None = None, max_bytes: int | None = None) -> str:
        """A new session under a server-minted, unguessable id (``s_`` + 128 random bits): whoever holds
        the id can use the session, nobody else can name it. It expires after the idle TTL like any
        session. ``max_programs`` / ``max_bytes`` bound what it may hold (programs; bytes of their specs).

        Raises:
            LimitExceeded: the backend holds its maximum of minted sessions.
        """
        await trio.lowlevel.checkpoint()
        return self.sessions.open(max_programs=max_programs, max_bytes=max_bytes).id

    async def end_session(self, session: str) -> bool:
        """Drop a session and its programs and LM now; False if there was no such session."""
        await trio.lowlevel.checkpoint()
        return self.sessions.end(session)

    def has_session(self, session: str) -> bool:
        """Whether the session exists (created, not ended, not expired)."""
        return self.sessions.exists(session)

    def has_program(self, program: str, *, session: str | None = None) -> bool:
        """Whether the session holds the program (a use of the session: it refreshes its TTL).

        Raises:
            SessionNotFound: a minted session id that does not exist.
        """
        record = self.sessions.get(session)
        return record is not None and program in record.programs

    # -- programs -------------------------------------------------------------------------------------
    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        """The program's description (fields, types, instructions). ``ProgramNotFound`` if absent.

        A checkpoint, as every async method of a backend (it has nothing to wait for, but a caller's
        cancellation and the other tasks must not depend on that)."""
        await trio.lowlevel.checkpoint()
        return self._info(self.sessions.program(session, program))

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]:
        """Every program of the session, each described as by ``get_program`` (with its ``id``)."""
        await trio.lowlevel.checkpoint()
        return [self._info(p) for p in self.sessions.programs(session)]

    async def delete_program(self, program: str, *, session: str | None = None) -> None:
        """Delete a program (workers drop their cached copy as it ages out). ``ProgramNotFound`` if absent."""
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
        ``"offline"`` (the embedded deterministic LM) or any ``provider/model`` of ``dspy.LM``; with a
        session, ``"default"`` makes the session use the backend's default LM again. The key is never
        logged or echoed back."""
        if model == DEFAULT_LM:
            if session is None or api_base is not None or api_key is not None or settings:
                raise InvalidParams(f"model {DEFAULT_LM!r} takes a session and nothing else")
            await trio.lowlevel.checkpoint()
            self.sessions.set_lm(session, None)
            return
        config = await self._validate_lm(lm_config(model, api_base, api_key, settings))
        if session is not None:
            self.sessions.set_lm(session, config)
            return
        self.lm = config
        await self._apply_default_lm()


MAX_LM_LABELS: Final = 64
"""Distinct LMs counted by name in :class:`LMUsage` (later ones count as ``other``: bounded labels)."""


@attrs.define
class LMUsage:
    """What completed executions' ``usage`` said of the LM layer, counted on the host (read by the
    Prometheus collector): cache hits, and the failures a fallback chain moved past, by LM."""

    cache_hits: int = 0
    fallbacks: collections.Counter[str] = attrs.Factory(collections.Counter)
    answered_by: collections.Counter[str] = attrs.Factory(collections.Counter)

    def note(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        hits = usage.get("cache_hits")
        if isinstance(hits, int) and not isinstance(hits, bool) and hits > 0:
            self.cache_hits += hits
        answered = usage.get("lm")
        if isinstance(answered, str):
            self.answered_by[self._label(self.answered_by, answered)] += 1
        for skipped in usage.get("fallbacks") or ():
            if isinstance(skipped, dict) and isinstance(skipped.get("lm"), str):
                self.fallbacks[self._label(self.fallbacks, skipped["lm"])] += 1

    @staticmethod
    def _label(counter: collections.Counter[str], lm: str) -> str:
        return lm if lm in counter or len(counter) < MAX_LM_LABELS else "other"


class ProgramHost(ProgramCatalog):
    """A catalog whose programs are validated and run by workers, through the backend's ``call()``."""

    def __init__(self, *, clock: Callable[[], float] | None, session_ttl: float, lm: Any = None) -> None:
        super().__init__(clock=clock, session_ttl=session_ttl, lm=lm)
        self._descriptions: dict[ProgramKey, dict[str, Any]] = {}
        """Each program version's description, as the worker that validated it gave it."""
        self._available: dict[str, Any] | None = None
        """What the program modules registered, as a worker described it (asked once)."""
        self.lm_usage = LMUsage()
        """Cache hits and fallbacks of completed executions (from their ``usage``)."""

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

    async def _job_call(self, method: str, params: Any, *, session: str | None, timeout: float | None) -> Any:
        """One example of a job (``dspex_trio._jobs``): an idempotent call."""
        return await self.call(method, params, session=session, timeout=timeout, idempotent=True)

    def _job_concurrency(self) -> int:
        """How many examples of a job are in flight at once by default."""
        return JOB_CONCURRENCY

    def _job_workers(self) -> int:
        """How many workers run a job's calls at once (a compile job sizes its evaluation calls in flight
        by it)."""
        return 1

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

    def _lm_params(self, session: str | None) -> dict[str, Any]:
        record = self.sessions.peek(session)
        if record is not None and record.lm is not None:
            return {"lm": record.lm}
        return {"lm": self.lm} if self.lm is not None else {}

    def _execute_params(
        self, program: str, inputs: dict[str, Any], session: str | None, lm_cache: str | None = None
    ) -> dict[str, Any]:
        params = {"program": program, "inputs": inputs, **self._lm_params(session)}
        mode = lm_cache_mode(self.sessions.peek(session), lm_cache)
        if mode is not None:
            params["lm_cache"] = mode
        return params

    async def set_lm_cache_mode(self, mode: str | None, *, session: str | None = None) -> None:
        """The LM cache mode (``read_write``, ``read_only`` or ``off``) of ``session``'s executions (None:
        the pool's ``LMCache.mode`` again); a call's own ``lm_cache=`` wins (docs/lm.md, "Cache").
        Without an ``LMCache`` the workers cache nothing, whatever the mode."""
        await trio.lowlevel.checkpoint()
        set_session_lm_cache(self.sessions, session, mode)

    # -- programs -------------------------------------------------------------------------------------
    async def _add_program(self, spec: dict[str, Any], session: str | None, timeout: float | None) -> str:
        description = await self.call("validate_program", {"spec": spec}, timeout=timeout, idempotent=True)
        program = self.sessions.add_program(session, spec)
        self._descriptions[program.id, program.version] = description
        return program.id

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
        """Create a program in ``session`` (validated by a worker first) and return its id.

        ``module`` is a built-in (``predict``, ``chain_of_thought``, ``react``, ``multi_chain_comparison``,
        ``best_of_n``, ``refine``), built from ``signature``, or a program registered by the operator's
        program modules (no signature: it has its own). ``options`` are the built-in's: ``tools`` (names of
        registered tools) and ``max_iters`` for react; ``n`` for multi_chain_comparison, best_of_n and
        refine, with ``reward`` (a registered metric), ``threshold`` and ``base`` for the last two.
        ``include`` names entries of the prediction returned besides the outputs (react's
        ``trajectory``); ``state`` is DSPy's JSON state (``program.save("p.json")``'s).

        Raises:
            InvalidParams: an unknown module (the message lists the available ones), tool or metric, a
                bad signature or option, a state for another program, not JSON, or too large.
            ProgramError: a registered program's factory failed (``error_type`` ``ProgramFactoryError``).
        """
        spec = program_spec(signature, module, instructions, state, include, options)
        return await self._add_program(spec, session, None)

    async def available_programs(self) -> dict[str, Any]:
        """What the operator's program modules registered (the same for the backend's whole life):
        ``{"programs": [{name, description, inputs, outputs, predictors, instructions} | {name, error}],
        "tools": [{name, description, args}], "metrics": [{name, description}], "modules": [...]}``."""
        if self._available is None:
            self._available = await self.call("available", idempotent=True)
        else:
            await trio.lowlevel.checkpoint()
        return self._available

    async def get_state(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        """The program's state in DSPy's JSON format (what ``program.save("p.json")`` writes: it loads
        into the same program in plain DSPy with ``program.load("p.json")``)."""
        return await self.call("get_state", {"program": program}, session=session, idempotent=True)

    async def load_state(self, program: str, state: dict[str, Any], *, session: str | None = None) -> None:
        """Install DSPy's JSON state (demos, instructions; as ``program.save("p.json")`` writes it) into a
        program: checked by a worker against the program's predictors, then stored in the session (a
        new version: workers rebuild it on their next call). The LM a state names is ignored."""
        check_state_size(state)
        spec = {**self.sessions.program(session, program).spec, "state": state}
        description = await self.call("validate_program", {"spec": spec}, idempotent=True)
        updated = self.sessions.update_program(session, program, state=state)
        self._descriptions[updated.id, updated.version] = description

    def evaluate(
        self,
        program: str,
        devset: list[dict[str, Any]],
        *,
        metric: str,
        session: str | None = None,
        max_errors: int | None = None,
        concurrency: int | None = None,
        timeout: float | None = None,
    ) -> AbstractAsyncContextManager[EvaluationJob]:
        """Evaluate ``program`` on ``devset`` (``[{"inputs": {...}, "labels": {...}}, ...]``) with the
        registered ``metric``, its examples spread over every worker, as ``dspy.Evaluate`` does::

            async with pool.evaluate(pid, devset, metric="exact") as job:
                async for progress in job:          # JobProgress: done, total, errors, score
                    ...
            job.result.score                        # EvaluationResult: score, results, errors

        ``max_errors`` failed examples stop it with ``JobFailed`` (default 10, DSPy's); at most
        ``concurrency`` examples are in flight (default: the backend's capacity); ``timeout`` bounds
        each example. Leaving the block early cancels every pending example. See ``dspex_trio._jobs``.

        Raises (at ``async with``):
            ProgramNotFound: no such program in the session.
            InvalidParams: an unknown metric, an empty devset, an example missing an input field.
        """
        return open_evaluation(
            self,
            program,
            devset,
            metric=metric,
            session=session,
            max_errors=max_errors,
            concurrency=concurrency,
            timeout=timeout,
        )

    @asynccontextmanager
    async def compile(
        self,
        program: str,
        *,
        optimizer: str,
        trainset: list[dict[str, Any]],
        valset: list[dict[str, Any]] | None = None,
        metric: str,
        options: dict[str, Any] | None = None,
        session: str | None = None,
        max_errors: int | None = None,
        concurrency: int | None = None,
    ) -> AsyncIterator[CompileJob]:
        """Run a DSPy optimizer on ``program`` (``bootstrap_few_shot`` or
        ``bootstrap_few_shot_with_random_search``, with DSPy's ``options``), its executions and candidate
        evaluations spread over every worker; it ends by creating a new program with the optimized state::

            async with pool.compile(pid, optimizer="bootstrap_few_shot", trainset=train, metric="exact") as job:
                async for progress in job:          # CompileProgress: stage, trials, best_score, ...
                    ...
            job.result.program                      # the new program; job.result.state its DSPy state

        The loop runs on the host, DSPy's draws restated (``dspex_trio._compile``). Leaving the block
        early cancels every pending call.

        Raises (at ``async with``):
            ProgramNotFound: no such program in the session.
            InvalidParams: an unknown optimizer, option or metric; an empty trainset; an example
                missing an input field.
        """
        from dspex_trio._compile import start_compile

        job = await start_compile(
            self,
            program,
            optimizer=optimizer,
            trainset=trainset,
            valset=valset,
            metric=metric,
            options=options if options is not None else {},
            session=session,
            max_errors=max_errors,
            concurrency=concurrency,
        )
        async with open_job(job):
            yield job

    async def execute(
        self,
        program: str,
        inputs: dict[str, Any],
        *,
        session: str | None = None,
        timeout: float | None = None,
        with_usage: bool = False,
        lm_cache: str | None = None,
    ) -> dict[str, Any]:
        """Run a program and return its output fields as plain JSON values of their declared types.
        ``lm_cache`` is this call's LM cache mode (else the session's, else the pool's: docs/lm.md).

        With ``with_usage=True`` the answer is ``{"outputs": {...}, "usage": {...} | None, "backend":
        <the backend's name>}``.

        Raises:
            ProgramNotFound: no such program in the session.
            ProgramError: the program failed (``error_type`` names DSPy's error, e.g. ``LMRateLimitError``).
            InvalidParams: missing, unknown or mistyped inputs.
            and the errors of ``call()``.
        """
        params = self._execute_params(program, inputs, session, lm_cache)
        answer = await self.call("execute", params, session=session, timeout=timeout)
        self.lm_usage.note(answer.get("usage"))
        return {**answer, "backend": self.name} if with_usage else answer["outputs"]
