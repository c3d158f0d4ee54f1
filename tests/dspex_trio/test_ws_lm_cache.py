"""The websocket's ``lm/cache`` method (``_ws_lm_cache.py``) over mock backends, in-process: a client
sets its session's LM cache mode, only to one of the three modes, and a backend without a cache says
so. And an execution's own mode (``execution/submit`` / ``execution/run``'s ``lm_cache``): it reaches
that execution's backend call alone, only as one of the three modes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
import trio.testing

from dspex_trio._mock import MockBackend
from tests.dspex_trio.test_ws_api import connect, service_of


class CachingMock(MockBackend):
    def __init__(self) -> None:
        super().__init__()
        self.modes: list[tuple[str | None, str | None]] = []

        self.calls: list[tuple[str, str | None]] = []
        """(``execute`` or ``stream``, the ``lm_cache`` it was given) of each execution."""

    async def set_lm_cache_mode(self, mode: str | None, *, session: str | None = None) -> None:
        self.modes.append((session, mode))

    async def execute(self, *args: Any, lm_cache: str | None = None, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("execute", lm_cache))
        return await super().execute(*args, **kwargs)

    def stream(
        self, *args: Any, lm_cache: str | None = None, **kwargs: Any
    ) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        self.calls.append(("stream", lm_cache))
        return super().stream(*args, **kwargs)


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


@pytest.mark.parametrize("mode", ["read_write", "read_only", "off"])
async def test_an_execution_carries_its_own_mode_to_its_backend_call(mode: str) -> None:
    backend = CachingMock()
    async with connect(service_of(backend)) as client:
        program = (await client.result("program/create", signature="q -> a"))["program"]
        run = await client.result("execution/run", program=program, inputs={"q": "x"}, lm_cache=mode)
        assert "a" in run["outputs"]
        for stream in (False, True):
            submitted = await client.result(
                "execution/submit", program=program, inputs={"q": "y"}, stream=stream, lm_cache=mode
            )
            await trio.testing.wait_all_tasks_blocked()
            assert client.events(submitted["execution"])[-1]["event"] == "completed"
        await client.result("execution/run", program=program, inputs={"q": "z"})  # no mode: none passed
    assert backend.calls == [("execute", mode), ("execute", mode), ("stream", mode), ("execute", None)]
    assert backend.modes == []  # the session's mode is untouched


async def test_an_executions_mode_is_one_of_the_three() -> None:
    backend = CachingMock()
    async with connect(service_of(backend)) as client:
        program = (await client.result("program/create", signature="q -> a"))["program"]
        for method in ("execution/run", "execution/submit"):
            for bad in ("always", "x" * 10_000, 3, ["off"], {"mode": "off"}):
                error = await client.error(method, program=program, inputs={"q": "x"}, lm_cache=bad)
                assert error["code"] == -32602, error  # invalid params
                assert len(error["message"]) < 1_000, error["message"]
        await trio.testing.wait_all_tasks_blocked()
        assert not [m for m in client.outbox.messages if m.get("method") == "execution/event"]
    assert backend.calls == []


async def test_an_executions_mode_on_a_backend_without_a_cache_is_refused() -> None:
    async with connect(service_of(MockBackend())) as client:
        program = (await client.result("program/create", signature="q -> a"))["program"]
        for method in ("execution/run", "execution/submit"):
            error = await client.error(method, program=program, inputs={"q": "x"}, lm_cache="off")
            assert "no LM cache" in error["message"]
        assert await client.result("execution/run", program=program, inputs={"q": "x"}, lm_cache=None)
