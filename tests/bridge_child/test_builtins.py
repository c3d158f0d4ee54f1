"""The worker's DSPy layer in-process (real DSPy, the offline LM, no worker process): built-in and
registered programs as the worker builds and runs them (``execute`` on a stand-in worker), their
outputs and state, streamed events, and tools bounded by their execution.

The same through real workers and the pool: tests/dspex_trio/test_program_modules.py."""

from __future__ import annotations

import json
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

from bridge_child import _programs, registry, wire
from bridge_child._builtins import build_module
from bridge_child._context import CallContext, MethodError
from bridge_child._offline_lm import output_fields
from bridge_child.registry import load_registry, program_interface
from bridge_child.spec import parse_spec, parse_type
from tests import program_module

APP = "tests.program_module"
REGISTRY = load_registry([APP])

BUILTINS = [
    {"signature": "question -> answer", "module": "predict"},
    {"signature": "question -> answer, n: int", "module": "chain_of_thought"},
    {"signature": "question -> answer", "module": "react", "tools": ["lookup", "word_count"], "max_iters": 3},
    {"signature": "question -> answer", "module": "multi_chain_comparison", "n": 2},
    {"signature": "question -> answer", "module": "best_of_n", "reward": "short_answer", "base": "cot"},
    {"signature": "question -> answer", "module": "refine", "reward": "short_answer", "n": 2},
]
REGISTERED = {
    "rag": {"question": "What is Trio?"},
    "two_hop": {"question": "What does a zygote share?"},
    "judge": {"text": "What a lovely day."},
    "chat": {"history": [{"question": "Hi?", "answer": "Hello."}], "question": "And then?"},
    "pipeline": {"text": "Trio nurseries and cancel scopes."},
    "agent": {"question": "How long is this question?"},
}


@pytest.fixture
def served() -> Iterator[Any]:
    """A stand-in worker serving the test program module (``execute`` needs only its ``state``)."""
    before = registry.current()
    registry.activate([APP])
    try:
        yield types.SimpleNamespace(state={})
    finally:
        registry._current = before


_ids = iter(range(1, 1_000_000))


def call(worker: Any, spec: dict[str, Any], inputs: dict[str, Any], **flags: Any) -> tuple[Any, list[Any]]:
    """Run ``execute`` as the worker would; its result and the events it emitted."""
    events: list[Any] = []
    ref = {"id": f"p{next(_ids)}", "version": 1, "spec": spec}
    frame = wire.Call(
        1,
        "execute",
        {"program": ref, "inputs": inputs},
        timeout=flags.get("timeout"),
        flags=wire.FLAG_STREAM if flags.get("stream") else 0,
    )
    ctx = CallContext(frame, lambda _ctx, data: events.append(data))
    if flags.get("ctx_out") is not None:
        flags["ctx_out"].append(ctx)
    return _programs.execute(worker, ctx), events


@pytest.mark.parametrize("raw", BUILTINS, ids=lambda raw: raw["module"])
def test_the_spec_layer_names_the_predictors_dspy_builds(raw: dict[str, Any]) -> None:
    """The mock backend describes built-ins, and checks their states, from the pure layout: it must be
    what DSPy builds (predictor names, fields) and what its state holds."""
    parsed = parse_spec(raw, REGISTRY.names())
    module = build_module(parsed, REGISTRY)
    layout = parsed.layout()
    found = program_interface(module)
    assert [(p.name, set(p.inputs), p.outputs) for p in layout.predictors] == [
        (p.name, set(p.inputs), p.outputs) for p in found.predictors
    ]
    assert layout.flat == found.flat
    if not layout.flat:
        assert set(module.dump_state()) == {p.name for p in layout.predictors}


@pytest.mark.parametrize("raw", BUILTINS, ids=lambda raw: raw["module"])
def test_every_builtin_returns_its_declared_outputs_typed(served: Any, raw: dict[str, Any]) -> None:
    answer, _ = call(served, raw, {"question": "What is Trio?"})
    declared = parse_spec(raw, REGISTRY.names()).outputs
    assert list(answer["outputs"]) == [f.name for f in declared]
    for f in declared:
        assert f.type.accepts(answer["outputs"][f.name]), (f.name, answer["outputs"])
    assert answer["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("name", list(REGISTERED))
def test_every_registered_program_returns_its_described_outputs_typed(served: Any, name: str) -> None:
    described = _programs.materialize({"module": name}).describe()
    answer, _ = call(served, {"module": name}, REGISTERED[name])
    assert list(answer["outputs"]) == [f["name"] for f in described["outputs"]]
    for f in _programs.materialize({"module": name}).outputs:
        assert f.type.accepts(answer["outputs"][f.name]), (f.name, answer["outputs"])
    again, _ = call(served, {"module": name}, REGISTERED[name])
    assert again["outputs"] == answer["outputs"]  # the offline LM is deterministic


def test_a_pydantic_output_is_its_json_object(served: Any) -> None:
    answer, _ = call(served, {"module": "judge"}, REGISTERED["judge"])
    verdict = answer["outputs"]["verdict"]
    program_module.Verdict.model_validate(verdict)  # exactly the model's JSON
    assert set(verdict) == {"label", "score", "reasons"} and verdict["label"] in ("positive", "negative")


def test_a_history_input_is_a_list_of_turns(served: Any) -> None:
    with_history, _ = call(served, {"module": "chat"}, REGISTERED["chat"])
    without, _ = call(served, {"module": "chat"}, {**REGISTERED["chat"], "history": []})
    assert isinstance(with_history["outputs"]["answer"], str)
    assert with_history["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]  # the turns were sent
    with pytest.raises(MethodError, match="input 'history' must be History, not dict"):
        call(served, {"module": "chat"}, {**REGISTERED["chat"], "history": {"question": "Hi?"}})


def test_include_returns_an_extra_entry_of_the_prediction(served: Any) -> None:
    spec = {"module": "agent", "include": ["trajectory", "nothing_here"]}
    answer, _ = call(served, spec, REGISTERED["agent"])
    trajectory = answer["outputs"]["trajectory"]
    assert list(answer["outputs"]) == ["answer", "trajectory", "nothing_here"]
    assert answer["outputs"]["nothing_here"] is None
    assert trajectory["tool_name_0"] in ("lookup", "word_count", "finish")
    json.dumps(trajectory)  # JSON-able as it is


def test_a_tool_exception_is_part_of_the_trajectory(served: Any) -> None:
    spec = {
        "signature": "question -> answer",
        "module": "react",
        "tools": ["explode"],
        "max_iters": 2,
        "include": ["trajectory"],
    }
    answer, _ = call(served, spec, {"question": "boom"})  # the offline LM calls explode for this one
    observations = [v for k, v in answer["outputs"]["trajectory"].items() if k.startswith("observation_")]
    assert observations and any("Execution error in explode" in str(o) for o in observations)
    assert isinstance(answer["outputs"]["answer"], str)  # the agent went on, as in DSPy


def test_streamed_events_come_in_program_order_tagged_with_their_predictor(served: Any) -> None:
    plain, _ = call(served, {"module": "pipeline"}, REGISTERED["pipeline"])
    streamed, events = call(served, {"module": "pipeline"}, REGISTERED["pipeline"], stream=True)
    assert streamed["outputs"] == plain["outputs"]  # the same program run, streamed or not
    order = []
    for event in events:
        if event["event"] == "status":
            assert event == {
                "event": "status",
                "status": "predictor",
                "predictor": event["predictor"],
                "message": f"{event['predictor']} started",
            }
            order.append(("start", event["predictor"]))
        else:
            assert set(event) == {"event", "predictor", "field", "chunk"}
            if order[-1] != ("chunks", event["predictor"], event["field"]):
                order.append(("chunks", event["predictor"], event["field"]))
    assert order == [
        ("start", "summarize"),
        ("chunks", "summarize", "summary"),
        ("start", "classify"),
        ("chunks", "classify", "topic"),
        ("start", "answer"),
        ("chunks", "answer", "answer"),
    ]
    answer_chunks = "".join(e["chunk"] for e in events if e.get("predictor") == "answer" and "chunk" in e)
    assert answer_chunks.strip() == plain["outputs"]["answer"]


def test_streaming_a_react_program_reports_its_tool_calls(served: Any) -> None:
    spec = {
        "signature": "question -> answer",
        "module": "react",
        "tools": ["lookup", "word_count"],
        "max_iters": 3,
    }
    # for this question the offline LM calls lookup, then word_count, then finishes
    _, events = call(served, spec, {"question": "What is Trio?"}, stream=True)
    statuses = [e for e in events if e["event"] == "status"]
    calls = [e for e in statuses if e["status"] == "tool_call"]
    results = [e for e in statuses if e["status"] == "tool_result"]
    assert [e["tool"] for e in calls] == ["lookup", "word_count"] and len(results) == 2
    for started, ended in zip(calls, results, strict=True):
        assert started["tool"] == ended["tool"] and started["tool"] in ("lookup", "word_count")
        assert started["message"] == f"calling {started['tool']}" and set(started["args"]) == {"key"}
        assert ended["ok"] is True and ended["message"] == f"{ended['tool']} returned"
    assert {e["predictor"] for e in statuses if e["status"] == "predictor"} == {"react", "extract.predict"}
    chunked = {(e["predictor"], e["field"]) for e in events if e["event"] == "chunk"}
    assert chunked == {
        ("react", "next_thought"),
        ("extract.predict", "reasoning"),
        ("extract.predict", "answer"),
    }


def _hang_and_stop(served: Any, *, cancel: bool) -> BaseException:
    """Run a react program whose tool hangs: stopped by a cancel (set once the tool runs) or a deadline."""
    program_module.stall_started.clear()
    spec = {"signature": "question -> answer", "module": "react", "tools": ["stall"], "max_iters": 1}
    contexts: list[CallContext] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            call(served, spec, {"question": "q"}, timeout=None if cancel else 0.5, ctx_out=contexts)
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert program_module.stall_started.wait(30)  # the tool is hanging now
    if cancel:
        contexts[0].cancelled.set()
    runner.join(30)
    assert not runner.is_alive(), "the execution did not stop with its call"
    return failure[0]


def test_a_hanging_tool_is_bounded_by_the_deadline(served: Any) -> None:
    failure = _hang_and_stop(served, cancel=False)
    assert isinstance(failure, MethodError) and failure.code == wire.ErrorCode.TIMEOUT
    assert failure.message == "the execution was past its deadline while tool 'stall' ran"


def test_a_hanging_tool_is_stopped_with_its_cancelled_execution(served: Any) -> None:
    failure = _hang_and_stop(served, cancel=True)
    assert isinstance(failure, MethodError) and failure.code == wire.ErrorCode.CANCELLED


# -- state ---------------------------------------------------------------------------------------------


def test_get_state_is_dspy_save_format_and_loads_back_into_plain_dspy(served: Any, tmp_path: Any) -> None:

    state = _programs.dump_state(_programs.materialize({"module": "rag"}).module)
    assert set(state) == {"respond.predict", "metadata"}
    assert "dspy" in state["metadata"]["dependency_versions"]
    path = tmp_path / "rag.json"
    path.write_text(json.dumps(state))
    fresh = program_module.RAG()
    fresh.load(str(path))  # DSPy's own loader accepts it
    assert fresh.dump_state() == {k: v for k, v in state.items() if k != "metadata"}


def test_a_state_saved_by_dspy_loads_and_its_demos_reach_the_prompt(served: Any, tmp_path: Any) -> None:
    import dspy

    program = program_module.RAG()
    program.respond.predict.demos = [
        dspy.Example(
            context=["c"], question="What is the demo question?", reasoning="r", answer="demo answer"
        )
    ]
    program.respond.predict.signature = program.respond.predict.signature.with_instructions("Be brief.")
    path = tmp_path / "rag.json"
    program.save(str(path))
    saved = json.loads(path.read_text())
    loaded = _programs.materialize({"module": "rag", "state": saved})
    assert loaded.describe()["instructions"] == "Be brief."
    with_demos, _ = call(served, {"module": "rag", "state": saved}, REGISTERED["rag"])
    without, _ = call(served, {"module": "rag"}, REGISTERED["rag"])
    assert with_demos["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


def test_a_state_for_another_program_is_refused_naming_the_predictor(served: Any) -> None:
    other = _programs.dump_state(_programs.materialize({"module": "pipeline"}).module)
    with pytest.raises(MethodError, match="names predictor 'summarize', which the program does not have"):
        _programs.materialize({"module": "rag", "state": other})


# -- the offline LM's structured answers -----------------------------------------------------------------


def test_the_offline_lm_answers_types_it_reads_from_json_schemas() -> None:
    import dspy

    system = dspy.ChatAdapter().format(
        program_module.JudgeSignature.append("extra", dspy.OutputField(), type_=dict[str, Any]),
        demos=[],
        inputs={"text": "t"},
    )[0]["content"]
    fields = dict(output_fields(system))
    assert (
        fields["verdict"].kind == "json" and json.loads(fields["verdict"].schema or "")["title"] == "Verdict"
    )
    assert fields["extra"].kind == "json"
    assert parse_type("int") == dict(output_fields("Your output fields are:\n1. `n` (int): \n"))["n"]
