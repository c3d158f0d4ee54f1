"""The ``fallback`` backend: pool -> bridge (-> mock, only with ``allow_mock=True``: it returns fake
answers). A backend that cannot start is skipped; a call refused with ``PoolUnavailable`` goes to the next
one. Every answer says which backend served it, and every health event carries ``backend``.

Also :func:`open_backend`, which opens any backend by its kind: the fallback holds the table of openers.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import attrs
import trio

from dspex_trio._backend import BACKEND_KINDS, Backend, BackendKind
from dspex_trio._bridge import BridgeBackend, open_bridge
from dspex_trio._client import RemoteBackend, open_remote
from dspex_trio._errors import DspexError, PoolUnavailable, ProgramModuleError, ProgramNotFound
from dspex_trio._events import EventBus, Subscription
from dspex_trio._health import HealthSnapshot
from dspex_trio._mock import MockBackend, open_mock
from dspex_trio._pool import Pool, open_pool
from dspex_trio._sessions import DEFAULT_SESSION, MINTED_PREFIX, SessionStore
from dspex_trio._statistics import FallbackStatistics
from dspex_trio._util import open_service_nursery

FORWARD_BUFFER: Final = 4096
"""Events buffered by the fallback's forwarder from each backend's bus (then ``lagged``)."""
_OPENERS: Final[dict[BackendKind, Callable[..., AbstractAsyncContextManager[Backend]]]] = {
    "pool": open_pool,
    "bridge": open_bridge,
    "mock": open_mock,
}
"""How :func:`open_backend` and the fallback open each backend."""

T = TypeVar("T")


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
        self.sessions = SessionStore(clock=trio.current_time)
        """The fallback's minted sessions (their programs live in ``_programs``, in the backends under
        :meth:`_down` names)."""
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
            await backend.configure_lm(session=self._down(session), **config)
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
            backend_id = entry.ids[backend.name] = await backend.create_program(
                session=self._down(session), **entry.spec
            )
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
        signature: str | dict[str, Any] | None = None,
        *,
        module: str = "predict",
        instructions: str | None = None,
        session: str | None = None,
        state: dict[str, Any] | None = None,
        include: list[str] | None = None,
        **options: Any,
    ) -> str:
        spec: dict[str, Any] = {
            "signature": signature,
            "module": module,
            "instructions": instructions,
            "state": state,
            "include": include,
            **options,
        }

        async def create(backend: Backend) -> tuple[str, str, dict[str, Any]]:
            backend_id = await backend.create_program(session=self._down(session), **spec)
            return (
                backend.name,
                backend_id,
                await backend.get_program(backend_id, session=self._down(session)),
            )

        name, backend_id, description = await self._route(create)
        program_id = f"p_{secrets.token_hex(6)}"
        description = {k: v for k, v in description.items() if k not in ("id", "version")}
        self._programs[session or DEFAULT_SESSION, program_id] = _Program(
            spec, description, {name: backend_id}
        )
        return program_id

    async def available_programs(self) -> dict[str, Any]:
        return await self._route(lambda backend: backend.available_programs())

    async def get_state(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        async def run(backend: Backend, backend_id: str) -> dict[str, Any]:
            return await backend.get_state(backend_id, session=self._down(session))

        return await self._on_program(session, program, run)

    async def load_state(self, program: str, state: dict[str, Any], *, session: str | None = None) -> None:
        entry = self._entry(session, program)

        async def run(backend: Backend, backend_id: str) -> None:
            await backend.load_state(backend_id, state, session=self._down(session))

        await self._on_program(session, program, run)
        entry.spec["state"] = state  # backends that create it later get it too
        for name in [n for n in entry.ids if n != self.last_backend]:
            entry.ids.pop(name)  # the others rebuild it with the state on first use

    async def get_program(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {**self._entry(session, program).description, "id": program}

    def has_program(self, program: str, *, session: str | None = None) -> bool:
        if session is not None and session.startswith(MINTED_PREFIX):
            self.sessions.minted(session)  # SessionNotFound
        return (session or DEFAULT_SESSION, program) in self._programs

    async def open_session(self, *, max_programs: int | None = None, max_bytes: int | None = None) -> str:
        await trio.lowlevel.checkpoint()
        return self.sessions.open(max_programs=max_programs, max_bytes=max_bytes).id

    async def end_session(self, session: str) -> bool:
        down = "fallback-" + session if session.startswith(MINTED_PREFIX) else session
        ended = self.sessions.end(session)
        mine = [key for key in self._programs if key[0] == session]
        for key in mine:
            del self._programs[key]
        for backend in self.chain:
            with contextlib.suppress(DspexError):
                await backend.end_session(down)
        return ended or bool(mine)

    def has_session(self, session: str) -> bool:
        if session.startswith(MINTED_PREFIX):
            return self.sessions.exists(session)
        return any(key[0] == session for key in self._programs)

    def _down(self, session: str | None) -> str | None:
        """The session's name in the backends of the chain (a minted id is the fallback's own)."""
        if session is not None and session.startswith(MINTED_PREFIX):
            self.sessions.minted(session)  # SessionNotFound
            return "fallback-" + session
        return session

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
                    await backend.delete_program(backend_id, session=self._down(session))

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
                backend_id, inputs, session=self._down(session), timeout=timeout, with_usage=with_usage
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
                    backend.stream(backend_id, inputs, session=self._down(session), timeout=timeout)
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
                await backend.configure_lm(session=self._down(session), **config)
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
                    session=self._down(session),
                    timeout=timeout,
                    idempotent=idempotent,
                )

            return await self._on_program(session, params["program"], on_program)

        async def run(backend: Backend) -> Any:
            return await backend.call(
                method, params, session=self._down(session), timeout=timeout, idempotent=idempotent
            )

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
    programs: Sequence[str] = (),
) -> AsyncIterator[FallbackBackend]:
    """Open pool, bridge (and mock, with ``allow_mock``) and chain them; a backend that cannot start is
    skipped (``statistics().skipped``). ``PoolUnavailable`` if none starts; ``ProgramModuleError`` (no
    fallback) if the operator's ``programs`` cannot be used."""
    kinds: list[BackendKind] = ["pool", "bridge"]
    if allow_mock:
        kinds.append("mock")
    options: dict[str, dict[str, Any]] = {
        "pool": {"lm": lm, "diagnostics": diagnostics, "programs": programs, **(pool_options or {})},
        "bridge": {"lm": lm, "diagnostics": diagnostics, "programs": programs, **(bridge_options or {})},
        "mock": {"programs": programs},
    }
    async with contextlib.AsyncExitStack() as stack:
        chain: list[Backend] = []
        skipped: dict[str, str] = {}
        for kind in kinds:
            try:
                chain.append(await stack.enter_async_context(_OPENERS[kind](**options[kind])))
            except ProgramModuleError:
                raise  # the operator's modules: the next backend would refuse them alike
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


def open_backend(kind: BackendKind | str, **options: Any) -> AbstractAsyncContextManager[Backend]:
    """``async with open_backend(kind, **options) as backend``: one of the backends.

    - ``"ws://host:port"`` / ``"wss://..."``: a :class:`~dspex_trio.RemoteBackend` on that server
      (:func:`~dspex_trio.connect`: ``token``, ``ssl_context`` and the ``ClientOptions`` fields);
    - ``"mock"``: :class:`~dspex_trio._mock.MockBackend` (options: ``clock``, ``session_ttl``, ``programs``);
    - ``"bridge"``: :class:`~dspex_trio._bridge.BridgeBackend` (``lm``, ``diagnostics``, ``launcher``,
      ``retry``, ``session_ttl``, and ``options=WorkerOptions(...)`` or its fields);
    - ``"pool"``: :func:`~dspex_trio.open_pool` (its arguments);
    - ``"fallback"``: :class:`FallbackBackend` (``allow_mock=False``, ``lm``, ``diagnostics``,
      ``pool_options``, ``bridge_options``, ``programs``).

    Every local kind takes ``programs``: the operator's program modules (``bridge_child.registry``); a
    remote server serves its own.
    """
    if kind.startswith(("ws://", "wss://")):
        return open_remote(kind, **options)
    if kind == "fallback":
        return open_fallback(**options)
    opener = _OPENERS.get(cast(BackendKind, kind))
    if opener is None:
        raise ValueError(
            f"backend kind must be one of {', '.join(BACKEND_KINDS)} or a ws:// URL, not {kind!r}"
        )
    return opener(**options)


if TYPE_CHECKING:  # every backend satisfies the interface (checked by mypy)

    def _conforms(
        pool: Pool, mock: MockBackend, bridge: BridgeBackend, fallback: FallbackBackend, remote: RemoteBackend
    ) -> list[Backend]:
        return [pool, mock, bridge, fallback, remote]
