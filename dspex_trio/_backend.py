"""The backend interface: one async API for running DSPy programs (its statistics records are in
:mod:`dspex_trio._statistics`).

Three implementations and a fallback chain, each in its own module (``open_backend(kind)`` in
:mod:`dspex_trio._fallback` opens any of them):

- ``mock`` (:mod:`dspex_trio._mock`): in-process, no subprocess, no dspy. Outputs are derived
  deterministically from the signature's output types, with the offline LM's own value derivation, and
  signatures are parsed by the same safe parser the workers use, so mock and pool agree on every type.
- ``bridge`` (:mod:`dspex_trio._bridge`): one worker process, no pool (the single bridge), with a
  host-side session store like the pool's. A worker that dies is replaced on the next call; one that
  cannot start opens a breaker.
- ``pool`` (:mod:`dspex_trio._pool`): the :class:`~dspex_trio.Pool` itself.
- ``fallback`` (:mod:`dspex_trio._fallback`): pool -> bridge (-> mock, only with ``allow_mock=True``: it
  returns fake answers). A backend that cannot start is skipped; a call refused with ``PoolUnavailable``
  goes to the next one.

Every answer says which backend served it (``execute(..., with_usage=True)["backend"]``, the stream's
``completed`` event, ``FallbackBackend.last_backend``), and every health event carries ``backend``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Literal, Protocol, runtime_checkable

from dspex_trio._events import Subscription
from dspex_trio._health import HealthSnapshot

BackendKind = Literal["mock", "bridge", "pool", "fallback"]
BACKEND_KINDS: Final = ("mock", "bridge", "pool", "fallback")


@runtime_checkable
class Backend(Protocol):
    """What every backend offers (see the module doc). Errors are those of :class:`~dspex_trio.Pool`."""

    name: str
    """``mock``, ``bridge``, ``pool`` or ``fallback``."""

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
        """Create a program (a built-in from ``signature``, or a registered program by name); its id."""
        ...

    async def available_programs(self) -> dict[str, Any]:
        """What the operator's program modules registered: ``{"programs", "tools", "metrics", "modules"}``."""
        ...

    async def get_state(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        """The program's DSPy JSON state (``program.save("p.json")``'s format)."""
        ...

    async def load_state(self, program: str, state: dict[str, Any], *, session: str | None = None) -> None:
        """Load DSPy JSON state into the program (checked against its predictors; its LM ignored)."""
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
        """``{"event": "chunk", "predictor", "field", "chunk"}`` and ``{"event": "status", "status", ...}``
        ..., then ``{"event": "completed", "outputs", "usage", "backend"}``."""
        ...

    async def list_programs(self, *, session: str | None = None) -> list[dict[str, Any]]: ...

    def has_program(self, program: str, *, session: str | None = None) -> bool:
        """Whether the session holds the program (``SessionNotFound`` for an unknown minted session)."""
        ...

    async def open_session(self, *, max_programs: int | None = None, max_bytes: int | None = None) -> str:
        """A new session under a server-minted, unguessable id."""
        ...

    async def end_session(self, session: str) -> bool:
        """Drop a session now; False if there was none."""
        ...

    def has_session(self, session: str) -> bool: ...

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
