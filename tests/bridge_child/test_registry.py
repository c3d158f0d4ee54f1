"""Program modules (``bridge_child.registry``): loading and checking what an operator's modules register,
the decorators, and what a registered program takes and returns (its interface)."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from bridge_child import registry
from bridge_child.registry import RegistryError, load_registry, program_interface, type_of
from bridge_child.spec import TypeSpec

GOOD = "tests.program_module"


def test_importing_the_registry_imports_neither_dspy_nor_trio() -> None:
    code = (
        "import sys, bridge_child.registry\n"
        "loaded = {'dspy', 'trio', 'dspex_trio', 'litellm'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_test_program_module_registers_programs_tools_and_metrics() -> None:
    loaded = load_registry([GOOD])
    assert load_registry([GOOD]) is loaded  # imported once per process and list of names
    assert loaded.modules == (GOOD,)
    assert set(loaded.programs) == {
        "rag", "two_hop", "agent", "judge", "chat", "pipeline", "broken", "not_a_module",
    }  # fmt: skip
    assert set(loaded.tools) == {"lookup", "word_count", "explode", "noisy", "stall"}
    assert set(loaded.metrics) == {"exact_match", "short_answer"}
    assert loaded.origin["TOOLS:lookup"] == GOOD
    names = loaded.names()
    assert "rag" in names.programs and "lookup" in names.tools and "exact_match" in names.metrics


@pytest.fixture
def fake_module() -> Iterator[Any]:
    """Make in-memory modules importable by name (removed afterwards)."""
    made: list[str] = []

    def make(name: str, **attributes: Any) -> str:
        module = types.ModuleType(name)
        vars(module).update(attributes)
        sys.modules[name] = module
        made.append(name)
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)
        registry._loaded.pop((name,), None)


async def _async_tool(key: str) -> str:
    return key


@pytest.mark.parametrize(
    ("attributes", "fragment"),
    [
        ({"VALUE": 1}, "defines none of PROGRAMS, TOOLS, METRICS"),
        ({"PROGRAMS": ["rag"]}, "PROGRAMS must be a dict of name -> callable, not list"),
        ({"PROGRAMS": {"value": 42}}, "program 'value' must be callable, not int"),
        ({"PROGRAMS": {"needs": lambda name: name}}, "called with no arguments, but it needs some"),
        (
            {"PROGRAMS": {"ChainOfThought": lambda: None}},
            "has the name of the built-in module 'chain_of_thought'",
        ),
        ({"TOOLS": {"no spaces": len}}, "'no spaces' is not a valid name"),
        ({"TOOLS": {"fetch": _async_tool}}, "tool 'fetch' must be a plain (synchronous) function"),
        ({"TOOLS": {"finish": len}}, "tool name 'finish' is DSPy's own"),
        ({"METRICS": {"one": lambda prediction: 1.0}}, "must accept (example, prediction, trace=None)"),
    ],
)
def test_a_bad_registry_is_refused_naming_the_module(
    fake_module: Any, attributes: dict[str, Any], fragment: str
) -> None:
    name = fake_module("bad_registry_for_test", **attributes)
    with pytest.raises(RegistryError) as info:
        load_registry([name])
    assert info.value.module == name
    assert str(info.value).startswith(f"program module {name!r}: ")
    assert fragment in str(info.value)


def test_a_name_registered_by_two_modules_is_refused() -> None:
    with pytest.raises(
        RegistryError, match=re.escape("tool 'lookup' is registered by 'tests.program_module' too")
    ):
        load_registry([GOOD, "tests.bad_programs.duplicate"])


def test_a_module_that_does_not_import_is_named_with_the_error() -> None:
    with pytest.raises(RegistryError) as info:
        load_registry(["tests.bad_programs.import_error"])
    message = str(info.value)
    assert message.startswith("program module 'tests.bad_programs.import_error': cannot import it: ")
    assert "ModuleNotFoundError" in message and "no_such_dependency_anywhere" in message
    assert "import_error.py:" in message  # where it failed


@pytest.mark.parametrize("modules", [["not a module"], ["a..b"], ["x", "x"], "tests.program_module", [1]])
def test_module_names_are_checked(modules: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        load_registry(modules)


def _load_in_subprocess(module: str, *, single_threaded: bool) -> str:
    code = (
        "from bridge_child.registry import RegistryError, load_registry\n"
        "try:\n"
        f"    load_registry([{module!r}], single_threaded={single_threaded})\n"
        "except RegistryError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('loaded')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_a_module_starting_a_thread_is_refused_only_where_workers_are_forked() -> None:
    name = "tests.bad_programs.starts_thread"
    out = _load_in_subprocess(name, single_threaded=True)
    assert out.startswith(f"program module {name!r}: importing it started a thread (import-time-thread)")
    assert "stay single-threaded" in out and "launcher='subprocess'" in out
    assert _load_in_subprocess(name, single_threaded=False).strip() == "loaded"


def test_a_module_importing_litellm_is_refused() -> None:
    out = _load_in_subprocess("tests.bad_programs.imports_litellm", single_threaded=False)
    assert "importing it imported litellm, which workers never load" in out


def test_decorators_fill_the_module_dicts(fake_module: Any) -> None:
    name = fake_module("decorated_programs_for_test")

    def answer_factory() -> Any:
        return None

    def search(key: str) -> str:
        """Search."""
        return key

    def match(example: Any, prediction: Any, trace: Any = None) -> bool:
        return True

    for func in (answer_factory, search, match):
        func.__module__ = name
    assert registry.program("answer")(answer_factory) is answer_factory
    assert registry.tool(search) is search  # bare: its own name
    assert registry.metric()(match) is match
    module = sys.modules[name]
    assert {"answer": answer_factory} == module.PROGRAMS
    assert {"search": search} == module.TOOLS
    assert {"match": match} == module.METRICS
    assert set(load_registry([name]).tools) == {"search"}


# -- interfaces (real DSPy, no LM call) ----------------------------------------------------------------


def _interface(name: str) -> Any:
    return program_interface(registry.instantiate(load_registry([GOOD]), name))


def _fields(fields: Any) -> list[tuple[str, str]]:
    return [(f.name, f.type.render()) for f in fields]


def test_the_interface_of_a_module_comes_from_forward_and_its_last_predictor() -> None:
    rag = _interface("rag")
    assert _fields(rag.inputs) == [("question", "str")]
    assert _fields(rag.outputs) == [("reasoning", "str"), ("answer", "str")]
    assert [(p.name, p.inputs, p.outputs) for p in rag.predictors] == [
        ("respond.predict", ("context", "question"), ("reasoning", "answer"))
    ]
    assert not rag.flat
    two_hop = _interface("two_hop")
    assert [p.name for p in two_hop.predictors] == ["generate_query.predict", "answer.predict"]
    assert _fields(two_hop.outputs) == [("reasoning", "str"), ("answer", "str")]
    assert [p.name for p in _interface("pipeline").predictors] == ["summarize", "classify", "answer"]


def test_the_interface_of_a_module_with_a_signature_is_that_signature() -> None:
    agent = _interface("agent")  # dspy.ReAct keeps the signature it was built from
    assert _fields(agent.inputs) == [("question", "str")] and _fields(agent.outputs) == [("answer", "str")]
    assert [p.name for p in agent.predictors] == ["react", "extract.predict"]
    chat = _interface("chat")  # a bare Predict: its state is flat
    assert chat.flat and [p.name for p in chat.predictors] == ["self"]
    assert _fields(chat.inputs) == [("history", "History"), ("question", "str")]


def test_a_pydantic_output_is_described_by_its_json_schema() -> None:
    judge = _interface("judge")
    (verdict,) = judge.outputs
    assert verdict.name == "verdict" and verdict.type.kind == "json" and verdict.type.render() == "Verdict"
    described = verdict.describe()
    assert described["schema"]["properties"]["label"]["enum"] == ["positive", "negative"]
    assert set(described["schema"]["required"]) == {"label", "score", "reasons"}
    assert judge.python_types["verdict"].__name__ == "Verdict"


def test_a_factory_that_fails_is_a_program_factory_error() -> None:
    loaded = load_registry([GOOD])
    with pytest.raises(
        registry.ProgramFactoryError, match="raised RuntimeError: the retriever index is missing"
    ):
        registry.instantiate(loaded, "broken")
    with pytest.raises(registry.ProgramFactoryError, match=re.escape("returned int, not a dspy.Module")):
        registry.instantiate(loaded, "not_a_module")


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (str, TypeSpec("str")),
        (float, TypeSpec("float")),
        (dict, TypeSpec("dict")),
        (list[int], TypeSpec("list", item=TypeSpec("int"))),
        (dict[str, bool], TypeSpec("dict", item=TypeSpec("bool"))),
        (Literal["a", 1], TypeSpec("literal", values=("a", 1))),
    ],
)
def test_type_of_models_what_the_spec_layer_knows(annotation: Any, expected: TypeSpec) -> None:
    assert type_of(annotation) == expected


def test_type_of_anything_else_is_json_with_its_schema() -> None:
    import dspy

    assert type_of(dspy.History).kind == "history"
    nested = type_of(list[list[str]])
    assert nested.kind == "json" and nested.render() == "list[list[str]]"
    assert nested.schema is not None and "array" in nested.schema
    assert type_of(int | None).kind == "json"


def test_describe_registry_lists_programs_tools_and_metrics() -> None:
    described = registry.describe_registry(load_registry([GOOD]))
    programs = {p["name"]: p for p in described["programs"]}
    assert programs["rag"]["description"] == "Answer a question from the documents the retriever finds."
    assert [f["name"] for f in programs["rag"]["outputs"]] == ["reasoning", "answer"]
    assert programs["broken"]["error"].startswith("the factory of program 'broken' raised RuntimeError")
    tools = {t["name"]: t for t in described["tools"]}
    assert tools["lookup"]["args"] == {"key": {"type": "string"}}
    assert tools["lookup"]["description"].startswith("Look a term up")
    assert {m["name"] for m in described["metrics"]} == {"exact_match", "short_answer"}
    assert described["modules"] == [GOOD]
