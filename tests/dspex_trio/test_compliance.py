"""Behaviour compliance: the same tests on every layer, through the ``dspex_backend`` fixture of the
``dspex_trio.testing`` plugin.

``mock`` needs no process; ``bridge`` and ``full`` start real workers (the plugin marks them
``real_processes`` and checks that none is left behind). Real processes mean real time: bounded waits only.
"""

from __future__ import annotations

from typing import Any

import pytest

from bridge_child._signatures import parse_type
from dspex_trio import Backend, CircuitState, InvalidParams, ProgramNotFound

SIGNATURE = "input: str, context: list[str] -> result: str, reasoning: list[str], confidence: float"
OUTPUT_TYPES = {"result": "str", "reasoning": "list[str]", "confidence": "float"}
INPUTS = {"input": "What is Trio?", "context": ["a Python library", "structured concurrency"]}
BACKEND_NAME = {"mock": "mock", "bridge": "bridge", "full": "pool"}
"""The backend each layer gets."""

every_layer = pytest.mark.parametrize("dspex_backend", ["mock", "bridge", "full"], indirect=True)


@pytest.fixture
def dspex_pool_options() -> dict[str, Any]:
    return {"workers": 1}  # one is enough for behaviour; the pool's own tests cover routing


def assert_typed_outputs(outputs: dict[str, Any]) -> None:
    assert set(outputs) == set(OUTPUT_TYPES), outputs
    for name, annotation in OUTPUT_TYPES.items():
        assert parse_type(annotation).accepts(outputs[name]), (name, outputs[name])


@every_layer
async def test_create_execute_and_stream_give_every_declared_output_typed(
    dspex_backend: Backend, dspex_layer: str
) -> None:
    backend = dspex_backend
    kind = BACKEND_NAME[dspex_layer]
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


@every_layer
async def test_programs_are_listed_found_and_deleted(dspex_backend: Backend) -> None:
    backend = dspex_backend
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


@every_layer
async def test_sessions_do_not_leak_between_tests(dspex_backend: Backend) -> None:
    """Each test gets a fresh backend: what the tests above created (sessions s1, s2) is not here."""
    assert await dspex_backend.list_programs(session="s1") == []
    assert await dspex_backend.list_programs(session="s2") == []
