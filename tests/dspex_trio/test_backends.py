"""Backends: the mock's own guarantees, and the fallback chain.

The behaviour-compliance tests (the same code on mock, bridge and full) are in ``test_compliance.py``.
The fallback starts real workers (real time: bounded waits only).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import dspex_trio
from bridge_child.spec import parse_type
from dspex_trio import (
    CircuitState,
    HealthEvent,
    InvalidParams,
    PoolUnavailable,
    UnknownMethod,
    open_backend,
)
from dspex_trio._fallback import FallbackBackend
from tests.fakes import FlakyLauncher
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="starts real workers")

SIGNATURE = "input: str, context: list[str] -> result: str, reasoning: list[str], confidence: float"
OUTPUT_TYPES = {"result": "str", "reasoning": "list[str]", "confidence": "float"}
INPUTS = {"input": "What is Trio?", "context": ["a Python library", "structured concurrency"]}


def assert_typed_outputs(outputs: dict[str, Any]) -> None:
    assert set(outputs) == set(OUTPUT_TYPES), outputs
    for name, annotation in OUTPUT_TYPES.items():
        assert parse_type(annotation).accepts(outputs[name]), (name, outputs[name])


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


@pytest.mark.parametrize("module", ["_backend", "_health", "_statistics"])
def test_the_interface_and_the_health_records_import_no_backend(module: str) -> None:
    """The backend interface names the health and statistics records without importing a backend (the pool
    was one)."""
    source = Path(dspex_trio.__file__).with_name(f"{module}.py").read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    backends = {f"dspex_trio.{name}" for name in ("_pool", "_bridge", "_mock", "_fallback", "_dispatch")}
    assert imported and not imported & backends, imported & backends


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
            assert isinstance(fallback, FallbackBackend)
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
            assert isinstance(fallback, FallbackBackend)
            assert fallback.statistics().chain == ("pool", "mock")
            pid = await fallback.create_program("question -> answer")
            answer = await fallback.execute(pid, {"question": "q"}, with_usage=True)
            assert answer["backend"] == "mock" and fallback.last_backend == "mock"
            assert fallback.statistics().served == {"mock": 2}
