"""The backend interface: one async API for running DSPy programs, and the statistics records of backends.

The backends (see ``dspex_trio._backends``): ``mock`` (:mod:`dspex_trio._mock`), ``bridge``
(:mod:`dspex_trio._bridge`), ``pool`` (:class:`~dspex_trio.Pool`) and ``fallback``
(:mod:`dspex_trio._fallback`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Literal, Protocol, runtime_checkable

import attrs

from dspex_trio._breaker import CircuitState
from dspex_trio._events import Subscription
from dspex_trio._pool import HealthSnapshot

BackendKind = Literal["mock", "bridge", "pool", "fallback"]
BACKEND_KINDS: Final = ("mock", "bridge", "pool", "fallback")


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
