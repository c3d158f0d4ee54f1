"""Backends: one behaviour, checked on mock, bridge and pool alike; and the fallback chain.

The compliance tests are the same code for every backend. ``mock`` needs no process; ``bridge`` and
``pool`` start real workers (real time: bounded waits only).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import dspex_trio
from bridge_child._signatures import parse_type
from dspex_trio import (
    Backend,
    CircuitState,
    HealthEvent,
    InvalidParams,
    PoolUnavailable,
    ProgramNotFound,
    UnknownMethod,
    open_backend,
)
from tests.fakes import FlakyLauncher
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="starts real workers")

SIGNATURE = "input: str, context: list[str] -> result: str, reasoning: list[str], confidence: float"
OUTPUT_TYPES = {"result": "str", "reasoning": "list[str]", "confidence": "float"}
INPUTS = {"input": "What is Trio?", "context": ["a Python library", "structured concurrency"]}


@asynccontextmanager
async def backend_of(kind: str) -> AsyncIterator[Backend]:
    options: dict[str, Any] = {"workers": 1} if kind == "pool" else {}
    with trio.fail_after(30):
        async with open_backend(kind, **options) as backend:  # type: ignore[arg-type]
            yield backend


KINDS = ["mock", "bridge", "pool"]


def assert_typed_outputs(outputs: dict[str, Any]) -> None:
    assert set(outputs) == set(OUTPUT_TYPES), outputs
    for name, annotation in OUTPUT_TYPES.items():
        assert parse_type(annotation).accepts(outputs[name]), (name, outputs[name])


@pytest.mark.parametrize("kind", KINDS)
async def test_create_execute_and_stream_give_every_declared_output_typed(kind: str) -> None:
    async with backend_of(kind) as backend:
        assert isinstance(backend, Backend) and backend.name == kind
        pid = await backend.create_program(SIGNATURE, session="s1")
        assert isinstance(pid, str) and pid

        outputs = await backend.execute(pid, INPUTS, session="s1", timeout=20)
        assert_typed_outputs(outputs)
        answer = await backend.execute(pid, INPUTS, session="s1", with_usage=True)
        assert answer["backend"] == kind
        assert_typed_outputs(answer["outputs"])
        assert answer["usage"]["total_tokens"] > 0

        async with backend.stream(pid, INPUTS, session="s1") as events:
            seen = [event async for event in events]
        assert [e["event"] for e in seen].count("completed") == 1 and seen[-1]["event"] == "completed"
        assert seen[-1]["backend"] == kind
        assert_typed_outputs(seen[-1]["outputs"])
        chunks = [e for e in seen if e["event"] == "chunk"]
        assert chunks and all(set(e) == {"event", "field", "chunk"} for e in chunks)

        info = await backend.get_program(pid, session="s1")
        assert info["id"] == pid
        assert [f["name"] for f in info["outputs"]] == list(OUTPUT_TYPES)
        assert [f["type"] for f in info["outputs"]] == list(OUTPUT_TYPES.values())

        with pytest.raises(InvalidParams):
            await backend.create_program("question: MyClass -> answer", session="s1")
        with pytest.raises(InvalidParams):
            await backend.execute(pid, {"input": "no context"}, session="s1")

        health = backend.health()
        assert health.backend == kind and health.circuit is CircuitState.CLOSED


@pytest.mark.parametrize("kind", KINDS)
async def test_programs_are_listed_found_and_deleted(kind: str) -> None:
    async with backend_of(kind) as backend:
        with pytest.raises(ProgramNotFound):
            await backend.execute("p_nonexistent", INPUTS, session="s2")
        with pytest.raises(ProgramNotFound):
            await backend.get_program("p_nonexistent", session="s2")
        ids = [await backend.create_program("question -> answer", session="s2") for _ in range(3)]
        assert len(set(ids)) == 3
        listed = await backend.list_programs(session="s2")
        assert len(listed) >= 3 and set(ids) <= {p["id"] for p in listed}
        assert await backend.list_programs(session="elsewhere") == []
        await backend.delete_program(ids[0], session="s2")
        assert ids[0] not in {p["id"] for p in await backend.list_programs(session="s2")}
        with pytest.raises(ProgramNotFound):
            await backend.execute(ids[0], {"question": "q"}, session="s2")
        with pytest.raises(ProgramNotFound):
            await backend.delete_program(ids[0], session="s2")
        await backend.configure_lm("offline", session="s2")
        assert await backend.execute(ids[1], {"question": "q"}, session="s2")
        assert (await backend.call("ping"))["pid"] > 0


async def test_mock_is_deterministic_and_needs_no_process() -> None:
    async with open_backend("mock") as mock:
        pid = await mock.create_program(SIGNATURE, module="chain_of_thought")
        first = await mock.execute(pid, INPUTS)
        assert first == await mock.execute(pid, INPUTS)
        assert first != await mock.execute(pid, {**INPUTS, "input": "something else"})
        assert list(first) == ["reasoning", "result", "confidence"]  # declared reasoning moved first
        with pytest.raises(UnknownMethod):
            await mock.call("hang")
        with pytest.raises(InvalidParams):
            await mock.configure_lm("no-provider")
        assert mock.statistics().completed == 3


async def test_open_backend_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="mock, bridge, pool, fallback"):
        open_backend("cloud")  # type: ignore[arg-type]


# -- the fallback chain --------------------------------------------------------------------------------


async def test_fallback_engages_when_the_pool_is_unavailable_and_returns_when_it_recovers() -> None:
    flaky = FlakyLauncher()
    events: list[HealthEvent] = []
    with trio.fail_after(30):
        async with (
            open_backend(
                "fallback",
                pool_options={"workers": 1, "launcher": flaky, "restart_intensity": 0, "probe_backoff": 0.2},
            ) as fallback,
            fallback.subscribe_health() as health,
        ):
            assert isinstance(fallback, dspex_trio.FallbackBackend)
            pool = fallback.chain[0]
            assert isinstance(pool, dspex_trio.Pool) and pool.circuit is not CircuitState.CLOSED
            pid = await fallback.create_program(SIGNATURE, session="s")
            answer = await fallback.execute(pid, INPUTS, session="s", with_usage=True)
            assert answer["backend"] == "bridge" and fallback.last_backend == "bridge"
            assert_typed_outputs(answer["outputs"])
            assert fallback.health().backend == "bridge"

            flaky.failing = False  # the cause is removed: the pool's probe closes its circuit
            await wait_until(lambda: pool.circuit is CircuitState.CLOSED, 10, lambda: repr(pool.health()))
            answer = await fallback.execute(pid, INPUTS, session="s", with_usage=True)
            assert answer["backend"] == "pool" and fallback.last_backend == "pool"
            assert [p["id"] for p in await fallback.list_programs(session="s")] == [pid]

            stats = fallback.statistics()
            assert stats.backend == "pool" and stats.chain == ("pool", "bridge")
            assert stats.served == {"bridge": 2, "pool": 1} and stats.fallbacks == 2 and stats.switches == 1
            while (event := health.receive_nowait()).kind != "backend" or event.data["to"] != "pool":
                events.append(event)
    switches = [e for e in events if e.kind == "backend"]
    assert switches[0].data["from"] is None and switches[0].data["to"] == "bridge"
    assert "pool" in switches[0].data["reason"] and switches[0].backend == "bridge"
    assert {e.backend for e in events if e.kind == "circuit"} == {"pool"}


async def test_fallback_reaches_mock_only_when_allowed() -> None:
    with trio.fail_after(30):
        broken = {"workers": 1, "launcher": FlakyLauncher(), "restart_intensity": 0}
        async with open_backend(
            "fallback", pool_options=broken, bridge_options={"launcher": FlakyLauncher()}
        ) as fallback:
            assert fallback.statistics().chain == ("pool",)
            assert "bridge" in fallback.statistics().skipped
            with pytest.raises(PoolUnavailable, match="every backend is unavailable"):
                await fallback.create_program("question -> answer")

        async with open_backend(
            "fallback", allow_mock=True, pool_options=broken, bridge_options={"launcher": FlakyLauncher()}
        ) as fallback:
            assert isinstance(fallback, dspex_trio.FallbackBackend)
            assert fallback.statistics().chain == ("pool", "mock")
            pid = await fallback.create_program("question -> answer")
            answer = await fallback.execute(pid, {"question": "q"}, with_usage=True)
            assert answer["backend"] == "mock" and fallback.last_backend == "mock"
            assert fallback.statistics().served == {"mock": 2}
