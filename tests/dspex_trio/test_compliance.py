"""Behaviour compliance: the same tests on every layer, through the ``dspex_backend`` fixture of the
``dspex_trio.testing`` plugin.

``mock`` needs no process; ``bridge`` and ``full`` start real workers (the plugin marks them
``real_processes`` and checks that none is left behind). Real processes mean real time: bounded waits only.
"""

from __future__ import annotations

from typing import Any

import pytest

from bridge_child.spec import parse_type
from dspex_trio import Backend, CircuitState, InvalidParams, ProgramError, ProgramNotFound

APP = "tests.program_module"
"""The application whose registered programs, tools and metrics every layer serves."""

SIGNATURE = "input: str, context: list[str] -> result: str, reasoning: list[str], confidence: float"
OUTPUT_TYPES = {"result": "str", "reasoning": "list[str]", "confidence": "float"}
INPUTS = {"input": "What is Trio?", "context": ["a Python library", "structured concurrency"]}
BACKEND_NAME = {"mock": "mock", "bridge": "bridge", "full": "pool"}
"""The backend each layer gets."""

every_layer = pytest.mark.parametrize("dspex_backend", ["mock", "bridge", "full"], indirect=True)


@pytest.fixture
def dspex_pool_options() -> dict[str, Any]:
    # one worker is enough for behaviour (the pool's own tests cover routing); the test application's
    # program module is served on every layer (the mock loads it in-process)
    return {"workers": 1, "programs": [APP]}


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
    assert chunks and all(set(e) == {"event", "predictor", "field", "chunk"} for e in chunks)
    assert {e["predictor"] for e in chunks} == {"self"}  # a Predict is its own (only) predictor
    assert seen[0] == {
        "event": "status",
        "status": "predictor",
        "predictor": "self",
        "message": "self started",
    }

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


BAD_INPUTS = [
    ({"input": "only this"}, "execute: missing input field(s) 'context'"),
    ({**INPUTS, "extra": 1}, "execute: unknown input field(s) 'extra'; inputs are input, context"),
    ({**INPUTS, "context": "no"}, "execute: input 'context' must be list[str], not str"),
]
"""Inputs the program-spec layer refuses, and its message (the same on every layer)."""


@every_layer
async def test_bad_inputs_fail_with_the_same_message_on_every_layer(dspex_backend: Backend) -> None:
    backend = dspex_backend
    pid = await backend.create_program(SIGNATURE, session="s4")
    for inputs, message in BAD_INPUTS:
        with pytest.raises(InvalidParams) as info:
            await backend.execute(pid, inputs, session="s4")
        assert message in str(info.value), (message, str(info.value))


@every_layer
async def test_chain_of_thought_outputs_start_with_reasoning_on_every_layer(dspex_backend: Backend) -> None:
    backend = dspex_backend
    for signature, expected in [
        ("question -> b: int, answer", [("reasoning", "str"), ("b", "int"), ("answer", "str")]),
        ("question -> b: int, reasoning: list[str]", [("reasoning", "list[str]"), ("b", "int")]),
    ]:
        pid = await backend.create_program(signature, module="chain_of_thought", session="s5")
        info = await backend.get_program(pid, session="s5")
        assert [(f["name"], f["type"]) for f in info["outputs"]] == expected
        outputs = await backend.execute(pid, {"question": "Why?"}, session="s5")
        assert list(outputs) == [name for name, _ in expected]
        for name, annotation in expected:
            assert parse_type(annotation).accepts(outputs[name]), (name, outputs[name])


# -- registered programs ----------------------------------------------------------------------------------

REGISTERED = {
    "rag": (
        {"question": "What is Trio?"},
        [("question", "str")],
        [("reasoning", "str"), ("answer", "str")],
        [("respond.predict", ["context", "question"], ["reasoning", "answer"])],
    ),
    "pipeline": (
        {"text": "Trio nurseries."},
        [("text", "str")],
        [("answer", "str")],
        [
            ("summarize", ["text"], ["summary"]),
            ("classify", ["summary"], ["topic"]),
            ("answer", ["summary", "topic"], ["answer"]),
        ],
    ),
    "judge": (
        {"text": "Lovely."},
        [("text", "str")],
        [("verdict", "Verdict")],
        [("self", ["text"], ["verdict"])],
    ),
    "chat": (
        {"history": [{"question": "Hi?", "answer": "Hello."}], "question": "And?"},
        [("history", "History"), ("question", "str")],
        [("answer", "str")],
        [("self", ["history", "question"], ["answer"])],
    ),
}
"""Each registered program of the test application: inputs to run it with, then its interface as every
layer describes it (inputs, outputs, predictors)."""


@every_layer
@pytest.mark.parametrize("name", list(REGISTERED))
async def test_a_registered_program_is_described_run_and_streamed_alike(
    dspex_backend: Backend, dspex_layer: str, name: str
) -> None:
    backend = dspex_backend
    inputs, expected_inputs, expected_outputs, expected_predictors = REGISTERED[name]
    pid = await backend.create_program(module=name, session="r")
    info = await backend.get_program(pid, session="r")
    assert info["module"] == name
    assert [(f["name"], f["type"]) for f in info["inputs"]] == expected_inputs
    assert [(f["name"], f["type"]) for f in info["outputs"]] == expected_outputs
    assert [(p["name"], p["inputs"], p["outputs"]) for p in info["predictors"]] == expected_predictors

    declared = {f["name"]: f for f in info["outputs"]}
    outputs = await backend.execute(pid, inputs, session="r")
    assert list(outputs) == list(declared)
    for field, value in outputs.items():
        if declared[field]["type"] == "Verdict":  # a pydantic model: its JSON object
            assert set(value) == {"label", "score", "reasons"} and value["label"] in ("positive", "negative")
        else:
            assert parse_type(declared[field]["type"]).accepts(value), (field, value)

    async with backend.stream(pid, inputs, session="r") as events:
        seen = [event async for event in events]
    assert seen[-1]["event"] == "completed" and list(seen[-1]["outputs"]) == list(declared)
    statuses = [e for e in seen if e["event"] == "status"]
    assert {e["predictor"] for e in statuses} == {p[0] for p in expected_predictors}
    chunks = [e for e in seen if e["event"] == "chunk"]
    last = expected_predictors[-1][0]
    assert {(e["predictor"], e["field"]) for e in chunks if e["predictor"] == last} == {
        (last, f) for f, t in expected_outputs if t == "str"
    }

    with pytest.raises(InvalidParams) as bad:
        await backend.execute(pid, {**inputs, "extra": 1}, session="r")
    assert "execute: unknown input field(s) 'extra'" in str(bad.value)


@every_layer
async def test_what_is_available_is_described_alike(dspex_backend: Backend) -> None:
    available = await dspex_backend.available_programs()
    assert available["modules"] == [APP]
    programs = {p["name"]: p for p in available["programs"]}
    assert set(programs) == {"rag", "two_hop", "agent", "judge", "chat", "pipeline", "broken", "not_a_module"}
    assert [f["name"] for f in programs["two_hop"]["outputs"]] == ["reasoning", "answer"]
    assert "raised RuntimeError: the retriever index is missing" in programs["broken"]["error"]
    assert {t["name"]: t["args"] for t in available["tools"]}["lookup"] == {"key": {"type": "string"}}
    assert {m["name"] for m in available["metrics"]} == {"exact_match", "short_answer"}


BAD_CREATIONS = [
    (
        {"module": "nope"},
        InvalidParams,
        "unknown module 'nope'; built-in modules: predict, chain_of_thought, react, multi_chain_comparison, "
        "best_of_n, refine; registered programs: agent, broken, chat, judge, not_a_module, pipeline, rag, two_hop",
    ),
    ({"module": "broken"}, ProgramError, "the factory of program 'broken' raised RuntimeError"),
    ({"module": "not_a_module"}, ProgramError, "returned int, not a dspy.Module"),
    (
        {"signature": "question -> answer", "module": "react", "tools": ["lookup", "rm_rf"]},
        InvalidParams,
        "react: unknown tool 'rm_rf'; available tools: explode, lookup, noisy, stall, word_count",
    ),
    (
        {"signature": "question -> answer", "module": "best_of_n", "reward": "vibes"},
        InvalidParams,
        "best_of_n: unknown metric 'vibes'; available metrics: exact_match, short_answer",
    ),
    ({"module": "rag", "signature": "q -> a"}, InvalidParams, "registered with its own signatures"),
    (
        {"signature": "q -> a", "module": "program_of_thought"},
        InvalidParams,
        "module 'program_of_thought' cannot run in a dspex-trio worker: it runs LM-written Python in DSPy's "
        "sandbox, which needs the Deno runtime",
    ),
    (
        {"module": "rag", "state": {"summarize": {}, "classify": {}, "answer": {}}},
        InvalidParams,
        "the state names predictor 'summarize', which the program does not have (its predictors: "
        "respond.predict)",
    ),
    (
        {"module": "rag", "state": {"respond.predict": {"py/object": "os.system"}}},
        InvalidParams,
        "unknown key(s) 'py/object'",
    ),
]


@every_layer
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_CREATIONS, ids=lambda v: str(v)[:40])
async def test_bad_creations_fail_alike(
    dspex_backend: Backend, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        await dspex_backend.create_program(session="bad", **kwargs)
    assert message in str(info.value), str(info.value)
    if error is ProgramError:
        assert info.value.error_type == "ProgramFactoryError"  # type: ignore[attr-defined]
    assert await dspex_backend.list_programs(session="bad") == []


@every_layer
async def test_builtins_over_registered_tools_and_metrics_run_alike(dspex_backend: Backend) -> None:
    backend = dspex_backend
    react = await backend.create_program(
        "question -> answer",
        module="react",
        tools=["lookup"],
        max_iters=2,
        include=["trajectory"],
        session="b",
    )
    outputs = await backend.execute(react, {"question": "What is Trio?"}, session="b")
    assert list(outputs) == ["reasoning", "answer", "trajectory"]
    best = await backend.create_program(
        module="best_of_n", base="rag", reward="short_answer", n=2, session="b"
    )
    info = await backend.get_program(best, session="b")
    assert [f["name"] for f in info["outputs"]] == ["reasoning", "answer"]
    assert [p["name"] for p in info["predictors"]] == ["module.respond.predict"]
    assert list(await backend.execute(best, {"question": "q"}, session="b")) == ["reasoning", "answer"]


@every_layer
async def test_state_round_trips_alike(dspex_backend: Backend) -> None:
    backend = dspex_backend
    pid = await backend.create_program(module="pipeline", session="st")
    state = await backend.get_state(pid, session="st")
    assert set(state) == {"summarize", "classify", "answer", "metadata"}
    state["answer"]["signature"]["instructions"] = "Answer in one word."
    state["answer"]["demos"] = [{"summary": "s", "topic": "t", "answer": "a"}]
    await backend.load_state(pid, state, session="st")
    assert (await backend.get_state(pid, session="st"))["answer"]["demos"] == state["answer"]["demos"]
    described = await backend.get_program(pid, session="st")
    assert described["predictors"][-1]["instructions"] == "Answer in one word."
    with pytest.raises(InvalidParams, match="has no entry for the program's predictor 'classify'"):
        await backend.load_state(pid, {"summarize": state["summarize"]}, session="st")
