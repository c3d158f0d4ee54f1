"""The websocket's LM cache method: ``lm/cache {"mode", "session"?}`` sets the cache mode of a
session's executions; and an execution's own mode, ``execution/submit`` / ``execution/run``'s
``lm_cache`` (docs/websocket-api.md, docs/lm.md "Cache"). The mode is one of three words
(``rpc.ExecutionParams`` checks it) and the session a capability the connection holds, so the client
chooses nothing unbounded, and a call's mode touches that call alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from dspex_trio._errors import InvalidParams
from dspex_trio._jsonrpc import _name_field
from dspex_trio._lm_cache import MODES

if TYPE_CHECKING:
    from dspex_trio._jsonrpc import ExecutionParams
    from dspex_trio._ws_api import ApiConnection, _Method


def _mode(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and value not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} or null, not {str(value)[:64]!r}")


@attrs.frozen(kw_only=True)
class LmCacheParams:
    mode: str | None = attrs.field(validator=_mode)
    """``read_write``, ``read_only``, ``off``; null: the server's mode again."""
    session: str | None = _name_field()


def methods(conn: ApiConnection) -> dict[str, _Method]:
    from dspex_trio._ws_api import _Method

    async def lm_cache(p: LmCacheParams) -> Any:
        conn._check_open()
        setter = getattr(conn.backend, "set_lm_cache_mode", None)
        if setter is None:
            raise InvalidParams("this server's backend has no LM cache")
        session = await conn._write_session(p.session)
        await setter(p.mode, session=session)
        return {"mode": p.mode, "session": None if p.session is None else session}

    return {"lm/cache": _Method(LmCacheParams, lm_cache, False)}


def check_call_mode(conn: ApiConnection, p: ExecutionParams) -> None:
    """Refuse an execution's own ``lm_cache`` on a backend without an LM cache (the mock)."""
    if p.lm_cache is not None and getattr(conn.backend, "set_lm_cache_mode", None) is None:
        raise InvalidParams("this server's backend has no LM cache: lm_cache must be null")


def call_mode(p: ExecutionParams) -> dict[str, Any]:
    """The keyword arguments that give the backend's ``execute``/``stream`` the execution's mode."""
    return {} if p.lm_cache is None else {"lm_cache": p.lm_cache}
