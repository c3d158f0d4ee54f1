"""Every async API function is a checkpoint (Trio's rule), on every backend and on the worker handle.

A checkpoint is where Trio may cancel the caller and switch tasks: an async function that returns
without one cannot be cancelled at its call, and a loop of such calls starves every other task. So each
public async method of a backend (and entering each async context manager it hands out: ``stream``,
``subscribe_health``) must pass one, also when it has nothing to wait for (a free worker, a program the
host knows): ``trio.testing.assert_checkpoints`` checks that, as trio's own tests do.

The walk is exhaustive: a backend's public coroutine methods are listed from its class, and one without a
way to call it here fails the test by name, so a new method is checked the day it is written.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import dspex_trio
from dspex_trio import Backend, open_backend, open_pool, open_worker, serve_websocket

SIGNATURE = "question -> answer"
INPUTS = {"question": "What is Trio?"}
START_TIMEOUT_S = 120.0
"""Bound on opening and closing a backend with real workers on a busy machine (a zygote imports dspy
first)."""
CALL_TIMEOUT_S = 60.0
"""Bound on each checked call (a worker's first DSPy execution imports dspy)."""


def async_context_methods() -> frozenset[str]:
    """The ``Backend`` methods that hand out an async context manager (entering one must checkpoint)."""
    names = set()
    for name, member in vars(Backend).items():
        if name.startswith("_") or not callable(member):
            continue
        returned = typing.get_type_hints(member).get("return")
        if typing.get_origin(returned) is contextlib.AbstractAsyncContextManager:
            names.add(name)
    return frozenset(names)


def public_async_methods(obj: object) -> frozenset[str]:
    """The public coroutine methods of ``obj``'s class (its own and inherited)."""
    return frozenset(
        name
        for name, member in inspect.getmembers(type(obj))
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    )


@attrs.define
class Scene:
    """What the calls need: a session with a program in it, and spares to delete or end."""

    session: str
    program: str
    spare_program: str = ""
    spare_session: str = ""


Call = Callable[[Any, Scene], Awaitable[Any]]
CALLS: dict[str, Call] = {
    "call": lambda b, s: b.call("ping"),
    "create_program": lambda b, s: b.create_program(SIGNATURE, session=s.session),
    "execute": lambda b, s: b.execute(s.program, INPUTS, session=s.session),
    "list_programs": lambda b, s: b.list_programs(session=s.session),
    "get_program": lambda b, s: b.get_program(s.program, session=s.session),
    "delete_program": lambda b, s: b.delete_program(s.spare_program, session=s.session),
    "open_session": lambda b, s: b.open_session(),
    "end_session": lambda b, s: b.end_session(s.spare_session),
    "configure_lm": lambda b, s: b.configure_lm("offline", session=s.session),
    "get_state": lambda b, s: b.get_state(s.program, session=s.session),
    "load_state": lambda b, s: b.load_state(s.program, {}, session=s.session),
    "available_programs": lambda b, s: b.available_programs(),
    "resize": lambda b, s: b.resize(b.size),  # the pool's (its size kept: the other tests need it)
    "set_lm_cache_mode": lambda b, s: b.set_lm_cache_mode("read_only", session=s.session),
}
"""How to call each public async method of a backend, in the scene."""
CONTEXTS: dict[str, Callable[[Any, Scene], contextlib.AbstractAsyncContextManager[Any]]] = {
    "stream": lambda b, s: b.stream(s.program, INPUTS, session=s.session),
    "subscribe_health": lambda b, s: b.subscribe_health(),
}
"""How to enter each async context manager a backend hands out."""


def test_the_tables_cover_the_backend_interface() -> None:
    interface = {name for name, member in vars(Backend).items() if inspect.iscoroutinefunction(member)}
    assert interface <= set(CALLS)
    assert async_context_methods() == set(CONTEXTS)


async def check_every_method(backend: Any) -> list[str]:
    """Call every public async method of ``backend`` (and enter every context it hands out) once, each
    under ``assert_checkpoints``; the names checked."""
    methods = public_async_methods(backend)
    unknown = sorted(methods - set(CALLS))
    assert not unknown, f"{type(backend).__name__}: add a way to call {unknown} to CALLS"
    checked = []
    session = "checkpoints"
    program = await backend.create_program(SIGNATURE, session=session)
    for name in sorted(methods):
        scene = Scene(session, program)
        if name == "delete_program":
            scene.spare_program = await backend.create_program(SIGNATURE, session=session)
        if name == "end_session":
            scene.spare_session = await backend.open_session()
        with trio.fail_after(CALL_TIMEOUT_S), trio.testing.assert_checkpoints():
            await CALLS[name](backend, scene)
        checked.append(name)
    for name in sorted(CONTEXTS):
        async with contextlib.AsyncExitStack() as stack:
            with trio.fail_after(CALL_TIMEOUT_S), trio.testing.assert_checkpoints():
                entered = await stack.enter_async_context(CONTEXTS[name](backend, Scene(session, program)))
            if name == "stream":
                with trio.fail_after(CALL_TIMEOUT_S):
                    events = [event async for event in entered]
                assert events[-1]["event"] == "completed"
        checked.append(name)
    return checked


async def test_every_async_method_of_the_mock_backend_checkpoints() -> None:
    async with open_backend("mock") as mock:
        checked = await check_every_method(mock)
    assert {"get_program", "list_programs", "delete_program", "stream", "subscribe_health"} <= set(checked)


async def test_the_websocket_server_checkpoints() -> None:
    async with open_backend("mock") as mock, trio.open_nursery() as nursery:
        server: dspex_trio.WebsocketServer = await nursery.start(serve_websocket, mock, "127.0.0.1", 0)
        assert public_async_methods(server) == {"drain", "shutdown"}
        with trio.testing.assert_checkpoints():
            await server.drain()
        with trio.testing.assert_checkpoints():
            await server.shutdown()
        nursery.cancel_scope.cancel()


def open_process_backend(kind: str) -> contextlib.AbstractAsyncContextManager[Any]:
    """A backend with real workers (one each)."""
    if kind == "pool":
        return open_pool(workers=1)
    if kind == "fallback":
        return open_backend("fallback", allow_mock=True, pool_options={"workers": 1})
    return open_backend("bridge")


@pytest.mark.parametrize("kind", ["pool", "bridge", "fallback"])
async def test_every_async_method_of_a_backend_with_workers_checkpoints(kind: str) -> None:
    with trio.fail_after(START_TIMEOUT_S + len(CALLS) * CALL_TIMEOUT_S):
        async with open_process_backend(kind) as backend:
            checked = await check_every_method(backend)
    assert {"get_program", "list_programs", "delete_program", "execute", "stream"} <= set(checked)
    if kind == "pool":
        assert {"get_state", "load_state"} <= set(checked)


async def test_every_async_method_of_the_worker_handle_checkpoints() -> None:
    async with open_worker() as worker:
        assert public_async_methods(worker) == {"call", "wait_idle", "aclose"}
        with trio.fail_after(CALL_TIMEOUT_S), trio.testing.assert_checkpoints():
            await worker.call("ping")
        with trio.testing.assert_checkpoints():
            await worker.wait_idle()
        async with contextlib.AsyncExitStack() as stack:
            with trio.fail_after(CALL_TIMEOUT_S), trio.testing.assert_checkpoints():
                events = await stack.enter_async_context(worker.stream("ping"))
            with trio.fail_after(CALL_TIMEOUT_S):
                assert (await events.result())["pid"] == worker.pid
        with trio.testing.assert_checkpoints():
            await worker.aclose()
