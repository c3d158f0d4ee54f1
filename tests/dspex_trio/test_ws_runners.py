"""Requests that wait on a worker are answered by tasks the connection keeps (``_ws_api``'s runners):
one is woken per request instead of a task started, at most ``MAX_IDLE_RUNNERS`` wait idle, and leaving
the connection ends them. In-process (the mock backend)."""

from __future__ import annotations

import json

import trio
import trio.testing

from dspex_trio._mock import MockBackend
from dspex_trio._ws_api import MAX_IDLE_RUNNERS
from tests.dspex_trio.test_ws_api import GatedMock, connect, service_of

BOUND_S = 10.0


async def test_one_runner_answers_requests_one_after_the_other() -> None:
    with trio.fail_after(BOUND_S):
        async with connect(service_of(MockBackend())) as conn:
            runners = conn.api._idle_runners
            assert runners == []
            await conn.result("program/available")
            await trio.testing.wait_all_tasks_blocked()
            assert len(runners) == 1
            (first,) = runners
            program = (await conn.result("program/create", signature="question -> answer"))["program"]
            for i in range(5):
                got = await conn.result("execution/run", program=program, inputs={"question": f"q{i}"})
                assert "answer" in got["outputs"]
                await trio.testing.wait_all_tasks_blocked()
                assert runners == [first], "a request started a task of its own"
            assert conn.api.pending_requests == 0


async def test_concurrent_requests_get_runners_of_their_own_and_at_most_the_cap_stay() -> None:
    backend = GatedMock()
    with trio.fail_after(BOUND_S):
        async with connect(service_of(backend)) as conn:
            backend.gate.set()
            program = (await conn.result("program/create", signature="question -> answer"))["program"]
            backend.gate = trio.Event()
            requests = MAX_IDLE_RUNNERS + 3
            for i in range(requests):  # none can finish before the gate opens
                params = {"program": program, "inputs": {"question": "q"}}
                request = {"jsonrpc": "2.0", "id": 100 + i, "method": "execution/run", "params": params}
                await conn.api.handle(json.dumps(request))
            await trio.testing.wait_all_tasks_blocked()
            assert conn.api.pending_requests == requests
            backend.gate.set()
            while conn.api.pending_requests:
                await trio.testing.wait_all_tasks_blocked()
            replies = [m for m in conn.outbox.messages if isinstance(m.get("id"), int) and m["id"] >= 100]
            assert sorted(m["id"] for m in replies) == list(range(100, 100 + requests))
            assert all("result" in m for m in replies), replies
            assert len(conn.api._idle_runners) == MAX_IDLE_RUNNERS
    # leaving the connection cancelled the idle runners (the block returned)
    assert conn.api._idle_runners == []
