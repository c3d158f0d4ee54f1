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

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from dspex_trio._backend import BACKEND_KINDS, Backend, BackendKind, BackendStatistics, FallbackStatistics
from dspex_trio._bridge import (
    BRIDGE_RESTART_BACKOFF_MAX_S,
    BRIDGE_RESTART_BACKOFF_S,
    BridgeBackend,
    open_bridge,
)
from dspex_trio._fallback import FORWARD_BUFFER, FallbackBackend, _Program, open_fallback
from dspex_trio._mock import MockBackend, _check_inputs, _invalid, _mock_program, _MockProgram, open_mock
from dspex_trio._pool import Pool, open_pool
from dspex_trio._programs_host import lm_config as _lm_config
from dspex_trio._programs_host import program_spec as _spec

_open_mock = open_mock
"""Kept under its former name."""

__all__ = [  # the names this module always had (the backends now live in their own modules)
    "BACKEND_KINDS",
    "BRIDGE_RESTART_BACKOFF_MAX_S",
    "BRIDGE_RESTART_BACKOFF_S",
    "FORWARD_BUFFER",
    "Backend",
    "BackendKind",
    "BackendStatistics",
    "BridgeBackend",
    "FallbackBackend",
    "FallbackStatistics",
    "MockBackend",
    "_MockProgram",
    "_Program",
    "_check_inputs",
    "_invalid",
    "_lm_config",
    "_mock_program",
    "_open_mock",
    "_spec",
    "open_backend",
    "open_bridge",
    "open_fallback",
]


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
        return open_mock(**options)
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
