"""The websocket's ``lm/cache`` method (``_ws_lm_cache.py``) over mock backends, in-process: a client
sets its session's LM cache mode, only to one of the three modes, and a backend without a cache says
so."""

from __future__ import annotations

from typing import Any

from dspex_trio._mock import MockBackend
from tests.dspex_trio.test_ws_api import connect, service_of


class CachingMock(MockBackend):
    def __init__(self) -> None:
        super().__init__()
        self.modes: list[tuple[str | None, str | None]] = []

    async def set_lm_cache_mode(self, mode: str | None, *, session: str | None = None) -> None:
        self.modes.append((session, mode))


async def test_a_client_sets_its_sessions_mode() -> None:
    backend = CachingMock()
    async with connect(service_of(backend)) as client:
        private = await client.result("lm/cache", mode="read_only")
        assert private == {"mode": "read_only", "session": None}
        session = (await client.result("session/open"))["session"]
        assert await client.result("lm/cache", mode="off", session=session) == {
            "mode": "off",
            "session": session,
        }
        assert await client.result("lm/cache", mode=None, session=session) == {
            "mode": None,
            "session": session,
        }
        [(first, _), *_rest] = backend.modes
        assert first is not None and first != session  # the connection's private session
        assert [mode for _, mode in backend.modes] == ["read_only", "off", None]
        assert backend.modes[1:] == [(session, "off"), (session, None)]


async def test_only_the_three_modes_and_named_params() -> None:
    backend = CachingMock()
    async with connect(service_of(backend)) as client:
        for bad in ({"mode": "always"}, {"mode": "x" * 10_000}, {"mode": 3}, {"mode": "off", "extra": 1}, {}):
            error: dict[str, Any] = await client.error("lm/cache", **bad)
            assert error["code"] == -32602, error  # invalid params
        assert backend.modes == []


async def test_a_backend_without_a_cache_says_so() -> None:
    async with connect(service_of(MockBackend())) as client:
        error = await client.error("lm/cache", mode="off")
        assert "no LM cache" in error["message"]
