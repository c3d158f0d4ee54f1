"""The worker's DSPy layer: safe signature parsing, the offline LM, and the program methods end to end.
(The rest of the program-spec layer, ``bridge_child.spec``: tests/bridge_child/test_spec.py.)"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import trio

import dspex_trio
from bridge_child._builtins import build_signature
from bridge_child._offline_lm import output_fields, reply_text
from bridge_child.spec import InvalidSignature, parse_signature, parse_type

COMPLEX = "input: str, context: list[str] -> result: str, reasoning: list[str], confidence: float"
INPUTS = {"input": "What is Trio?", "context": ["Trio is an async library.", "It has nurseries."]}


def spec(module: str = "predict", signature: Any = COMPLEX, **extra: Any) -> dict[str, Any]:
    return {"signature": signature, "module": module, **extra}


def ref(program_id: str, version: int = 1, program_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": program_id, "version": version}
    if program_spec is not None:
        out["spec"] = program_spec
    return out


# -- signature parsing (no dspy) ----------------------------------------------------------------------


def test_parse_simple_signature_defaults_to_str() -> None:
    parsed = parse_signature("question -> answer")
    assert [(f.name, f.type.render()) for f in parsed.inputs] == [("question", "str")]
    assert [(f.name, f.type.render()) for f in parsed.outputs] == [("answer", "str")]
    assert parsed.instructions is None


def test_parse_complex_signature() -> None:
    parsed = parse_signature(COMPLEX, "Answer from the context.")
    assert [(f.name, f.type.render()) for f in parsed.inputs] == [("input", "str"), ("context", "list[str]")]
    assert [(f.name, f.type.render()) for f in parsed.outputs] == [
        ("result", "str"),
        ("reasoning", "list[str]"),
        ("confidence", "float"),
    ]
    assert parsed.instructions == "Answer from the context."


@pytest.mark.parametrize(
    ("annotation", "rendered"),
    [
        ("str", "str"),
        (" int ", "int"),
        ("float", "float"),
        ("bool", "bool"),
        ("dict", "dict"),
        ("dict[str, int]", "dict[str, int]"),
        ("list[bool]", "list[bool]"),
        ("List[float]", "list[float]"),
        ("Literal['a', 'b']", "Literal['a', 'b']"),
        ('Literal["yes", "no",]', "Literal['yes', 'no']"),
        ("Literal[1, -2, True, 'x']", "Literal[1, -2, True, 'x']"),
        ("list[Literal['low', 'high']]", "list[Literal['low', 'high']]"),
        ("Literal['a, b', 'c -> d']", "Literal['a, b', 'c -> d']"),
    ],
)
def test_parse_allowed_types(annotation: str, rendered: str) -> None:
    parsed = parse_type(annotation)
    assert parsed.render() == rendered
    assert parse_type(rendered) == parsed  # render() reads back


def test_literal_python_type_and_accepts() -> None:
    from typing import Literal, get_args, get_origin

    t = parse_type("Literal['a', 1, True]")
    py = t.to_python()
    assert get_origin(py) is Literal and get_args(py) == ("a", 1, True)
    assert t.accepts("a") and t.accepts(1) and t.accepts(True)
    assert not t.accepts("b") and not t.accepts(1.0)
    assert parse_type("list[str]").to_python() == list[str]
    assert parse_type("list[int]").accepts([1, 2]) and not parse_type("list[int]").accepts([1, True])
    assert parse_type("float").accepts(1) and not parse_type("int").accepts(1.5)


def test_literal_with_separators_inside_a_signature() -> None:
    parsed = parse_signature("q -> label: Literal['a, b', 'c -> d'], n: int")
    assert parsed.outputs[0].type.values == ("a, b", "c -> d")
    assert parsed.outputs[1].type.render() == "int"


@pytest.mark.parametrize(
    "annotation",
    [
        "__import__('os')",
        "eval('1')",
        "__import__('os').system('true')",
        "os.system",
        "MyClass",
        "typing.List[str]",
        "list[list[str]]",
        "dict[int, str]",
        "dict[str, list[str]]",
        "list",
        "Literal",
        "Literal[str]",
        "Literal[1.5]",
        "Literal[]",
        "Literal['a' 'b']",
        "Literal['a', 'a']",
        "str[int]",
        "list[str",
        "list[str]]",
        "Optional[str]",
        "str | None",
        "lambda: 1",
        "'str'",
        "Literal['\\x41']",
        "x" * 2000,
        "",
    ],
)
def test_refuses_unsafe_or_unknown_types(annotation: str) -> None:
    with pytest.raises(InvalidSignature) as info:
        parse_type(annotation)
    assert info.value.type == "InvalidSignature"
    assert info.value.code == "invalid_params"


@pytest.mark.parametrize(
    ("signature", "fragment"),
    [
        ("question -> answer: __import__('os')", "unsupported type annotation"),
        ("question -> answer: eval('2+2')", "unsupported type annotation"),
        ("question -> answer: MyClass", "unknown type 'MyClass'"),
        ("q, q -> a", "duplicate field name 'q'"),
        ("q -> q", "duplicate field name 'q'"),
        ("q -> a, a: int", "duplicate field name 'a'"),
        ("1q -> a", "invalid field name"),
        ("q-x -> a", "invalid field name"),
        ("q.x -> a", "invalid field name"),
        ("_private -> a", "invalid field name"),
        ("class -> a", "Python keyword"),
        ("q -> a -> b", "exactly one '->'"),
        ("q, a", "exactly one '->'"),
        ("q ->", "at least one output"),
        ("q, -> a", "empty field"),
        ("q -> a: list[str", "unbalanced"),
        ("q -> a: Literal['x]", "unterminated quote"),
    ],
)
def test_refuses_bad_signatures(signature: str, fragment: str) -> None:
    with pytest.raises(InvalidSignature) as info:
        parse_signature(signature)
    assert fragment in info.value.message


def test_structured_signature() -> None:
    parsed = parse_signature(
        {
            "inputs": [{"name": "question", "desc": "What to answer"}, "context: list[str]"],
            "outputs": [
                {"name": "answer", "type": "str", "desc": "A short answer"},
                {"name": "label", "type": "Literal['good', 'bad']"},
            ],
            "instructions": "Be brief.",
        }
    )
    assert parsed.describe() == {
        "inputs": [
            {"name": "question", "type": "str", "desc": "What to answer"},
            {"name": "context", "type": "list[str]", "desc": None},
        ],
        "outputs": [
            {"name": "answer", "type": "str", "desc": "A short answer"},
            {"name": "label", "type": "Literal['good', 'bad']", "desc": None},
        ],
        "instructions": "Be brief.",
    }


@pytest.mark.parametrize(
    "signature",
    [
        {"inputs": [{"name": "q"}], "outputs": []},
        {"inputs": [{"name": "q"}], "outputs": [{"name": "a", "type": "os.system"}]},
        {"inputs": [{"name": "q", "evil": 1}], "outputs": [{"name": "a"}]},
        {"inputs": [{"name": "q"}], "outputs": [{"name": "q"}]},
        {"inputs": [{"name": "a b"}], "outputs": [{"name": "a"}]},
        {"inputs": [{"name": 3}], "outputs": [{"name": "a"}]},
        {"inputs": "q", "outputs": [{"name": "a"}]},
        {"inputs": [], "outputs": [{"name": "a", "desc": 5}]},
        {"fields": []},
        42,
    ],
)
def test_refuses_bad_structured_signatures(signature: Any) -> None:
    with pytest.raises(InvalidSignature):
        parse_signature(signature)


def test_importing_the_program_layer_does_not_import_dspy() -> None:
    code = (
        "import sys, bridge_child, bridge_child._programs, bridge_child.spec, bridge_child._signatures, "
        "bridge_child._offline_lm, bridge_child._methods, bridge_child._lane, bridge_child._server\n"
        "assert 'dspy' not in sys.modules, 'dspy imported'\n"
        "assert 'dspex_trio' not in sys.modules\n"
        "from bridge_child import _programs\n"
        "assert {'execute', 'configure_lm', 'validate_program'} <= set(_programs.METHODS)\n"
        "assert 'dspy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the offline LM, in process --------------------------------------------------------------------


def test_offline_lm_reads_output_fields_from_the_chat_adapter_prompt() -> None:
    system = (
        "Your input fields are:\n1. `q` (str):\nYour output fields are:\n1. `answer` (str): \n"
        "2. `n` (int): \n3. `kind` (Literal['a', 'b']): \n4. `tags` (list[str]):\n"
        "All interactions will be structured in the following way\n[[ ## completed ## ]]"
    )
    fields = output_fields(system)
    assert [(n, t.render()) for n, t in fields] == [
        ("answer", "str"),
        ("n", "int"),
        ("kind", "Literal['a', 'b']"),
        ("tags", "list[str]"),
    ]

    class Msg:
        role = "user"
        text = "[[ ## q ## ]]\nhello"

    class Req:
        messages = (Msg(),)

    Req.system = system  # type: ignore[attr-defined]
    text, prompt_words = reply_text(Req())
    assert text == reply_text(Req())[0]  # deterministic
    assert text.startswith("[[ ## answer ## ]]\nThe answer is ")
    assert text.endswith("[[ ## completed ## ]]")
    assert prompt_words > 0


def test_offline_lm_with_dspy_modules_and_adapters() -> None:
    import dspy

    from bridge_child._offline_lm import offline_lm

    lm = offline_lm()
    signature = build_signature(
        parse_signature(COMPLEX[: -len("confidence: float")] + "kind: Literal['x', 'y'], ok: bool, n: int")
    )
    for adapter in (dspy.ChatAdapter(), dspy.JSONAdapter()):
        with dspy.context(lm=lm, adapter=adapter):
            out = dspy.ChainOfThought(signature)(**INPUTS)
        assert isinstance(out.result, str) and isinstance(out.reasoning, list)
        assert out.kind in ("x", "y") and isinstance(out.ok, bool) and isinstance(out.n, int)


def test_build_signature_refuses_names_reserved_by_dspy() -> None:
    with pytest.raises(InvalidSignature, match="reserved"):
        build_signature(parse_signature("instructions -> answer"))


# -- end to end in a real worker process -----------------------------------------------------------


def assert_complex_outputs(outputs: dict[str, Any], module: str) -> None:
    expected = ["reasoning", "result", "confidence"] if module == "chain_of_thought" else None
    if expected is not None:
        assert list(outputs) == expected
    assert set(outputs) == {"result", "reasoning", "confidence"}
    assert isinstance(outputs["result"], str) and outputs["result"]
    assert isinstance(outputs["reasoning"], list) and outputs["reasoning"]
    assert all(isinstance(item, str) for item in outputs["reasoning"])
    assert isinstance(outputs["confidence"], float) and 0.0 <= outputs["confidence"] <= 1.0


async def test_execute_predict_and_chain_of_thought_offline() -> None:
    async with dspex_trio.open_worker() as worker:
        for n, module in enumerate(("predict", "chain_of_thought")):
            program = ref(f"p{n}", 1, spec(module))
            first = await worker.call("execute", {"program": program, "inputs": INPUTS})
            assert_complex_outputs(first["outputs"], module)
            usage = first["usage"]
            assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
            # deterministic: same inputs, same outputs (cached program, by ref only, and rebuilt)
            again = await worker.call("execute", {"program": ref(f"p{n}", 1), "inputs": INPUTS})
            assert again["outputs"] == first["outputs"]
            rebuilt = await worker.call(
                "execute", {"program": ref(f"p{n}", 2, spec(module)), "inputs": INPUTS}
            )
            assert rebuilt["outputs"] == first["outputs"]
            other = await worker.call(
                "execute", {"program": ref(f"p{n}", 2), "inputs": {**INPUTS, "input": "Something else"}}
            )
            assert other["outputs"] != first["outputs"]

        # a structured signature with Literal/int/bool outputs
        structured = {
            "inputs": [{"name": "text", "desc": "Some text"}],
            "outputs": [
                {"name": "label", "type": "Literal['good', 'bad']"},
                {"name": "score", "type": "int"},
                {"name": "ok", "type": "bool"},
                {"name": "tags", "type": "list[str]"},
            ],
            "instructions": "Classify the text.",
        }
        out = await worker.call(
            "execute", {"program": ref("s", 1, spec("predict", structured)), "inputs": {"text": "fine"}}
        )
        outputs = out["outputs"]
        assert outputs["label"] in ("good", "bad")
        assert isinstance(outputs["score"], int) and isinstance(outputs["ok"], bool)
        assert isinstance(outputs["tags"], list)

        state = await worker.call("get_state", {"program": ref("p1", 2)})
        assert state["predict"]["signature"]["instructions"]
        assert state["predict"]["demos"] == []
        assert (await worker.call("list_cached"))["programs"] == {"p0": 2, "p1": 2, "s": 1}
        assert await worker.call("forget", {"program_id": "p0"}) == {"forgotten": True}
        assert await worker.call("forget", {"program_id": "p0"}) == {"forgotten": False}


async def test_execute_streams_chunks_before_the_result() -> None:
    async with dspex_trio.open_worker() as worker:
        params = {"program": ref("p1", 1, spec("chain_of_thought")), "inputs": INPUTS}
        plain = await worker.call("execute", params)
        events = []
        async with worker.stream("execute", params) as stream:
            async for event in stream:
                events.append(event)
            result = await stream.result()
        chunks = [e for e in events if e["event"] == "chunk"]
        assert len(chunks) >= 2
        # every str output of the predictor, each chunk tagged with it (ChainOfThought's is "predict")
        assert all(set(e) == {"event", "predictor", "field", "chunk"} for e in chunks)
        assert {(e["predictor"], e["field"]) for e in chunks} == {("predict", "result")}
        assert "".join(e["chunk"] for e in chunks).strip() == result["outputs"]["result"]
        assert events[0] == {
            "event": "status",
            "status": "predictor",
            "predictor": "predict",
            "message": "predict started",
        }
        assert result["outputs"] == plain["outputs"]
        assert_complex_outputs(result["outputs"], "chain_of_thought")

        # several streamed calls at once (each runs its own event loop in its own worker thread)
        collected: dict[int, tuple[int, Any]] = {}

        async def one(i: int) -> None:
            async with worker.stream("execute", {"program": ref("p1", 1), "inputs": INPUTS}) as stream:
                n = 0
                async for _event in stream:
                    n += 1
                collected[i] = (n, (await stream.result())["outputs"])

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        assert all(n == len(events) and outputs == plain["outputs"] for n, outputs in collected.values())


async def test_errors_are_clear_and_typed() -> None:
    async with dspex_trio.open_worker() as worker:
        # cache miss: a ref without spec that the worker does not hold
        with pytest.raises(dspex_trio.WorkerError) as miss:
            await worker.call("execute", {"program": ref("nope", 1), "inputs": INPUTS})
        assert type(miss.value).__name__ == "CacheMiss"

        # invalid signature: refused at validation and at execution, with a clear message
        with pytest.raises(dspex_trio.InvalidParams, match="unknown type 'MyClass'"):
            await worker.call("validate_program", {"spec": spec(signature="q -> a: MyClass")})
        with pytest.raises(dspex_trio.InvalidParams, match="unsupported type annotation"):
            await worker.call(
                "execute",
                {"program": ref("bad", 1, spec(signature="q -> a: __import__('os')")), "inputs": {"q": "x"}},
            )
        with pytest.raises(dspex_trio.InvalidParams, match="unknown module 'reactor'"):
            await worker.call("validate_program", {"spec": spec("reactor")})

        described = await worker.call(
            "validate_program", {"spec": spec("chain_of_thought", "q -> a: float", instructions="Do it.")}
        )
        assert described["instructions"] == "Do it."
        assert [(f["name"], f["type"]) for f in described["outputs"]] == [
            ("reasoning", "str"),
            ("a", "float"),
        ]
        assert (await worker.call("list_cached"))["programs"] == {}  # validation caches nothing

        program = ref("p1", 1, spec())
        with pytest.raises(dspex_trio.InvalidParams, match="missing input field"):
            await worker.call("execute", {"program": program, "inputs": {"input": "only this"}})
        with pytest.raises(dspex_trio.InvalidParams, match="must be list"):
            await worker.call("execute", {"program": program, "inputs": {**INPUTS, "context": "no"}})

        # state is sanitised: an LM in it is ignored (the call's LM applies), unknown keys are refused
        fields = [{"prefix": f"{name}:", "description": name} for name in ("i", "c", "r", "re", "co")]
        state = {"demos": [], "signature": {"instructions": "x", "fields": fields}, "lm": {"model": "x/y"}}
        ignored = await worker.call(
            "execute", {"program": ref("lm-in-state", 1, spec(state=state)), "inputs": INPUTS}
        )
        assert_complex_outputs(ignored["outputs"], "predict")  # the offline LM answered, not "x/y"
        assert (await worker.call("get_state", {"program": ref("lm-in-state", 1)}))["lm"] is None
        with pytest.raises(dspex_trio.InvalidParams, match="unknown key"):
            await worker.call("validate_program", {"spec": spec(state={**state, "py/object": "os.system"})})

        # an LM error is a ProgramError naming the original type; the key is never echoed
        secret = "sk-test-not-a-real-key-0123"
        unreachable = {
            "model": "openai/some-model",
            "api_base": "http://127.0.0.1:9/v1",
            "api_key": secret,
            "num_retries": 0,
            "timeout": 5,
        }
        assert await worker.call("configure_lm", {"lm": unreachable}) == {
            "ok": True,
            "model": "openai/some-model",
        }
        described_lm = await worker.call("worker_lm")
        assert described_lm["model"] == "openai/some-model" and described_lm["has_api_key"] is True
        assert secret not in repr(described_lm)
        with pytest.raises(dspex_trio.ProgramError) as failed:
            await worker.call("execute", {"program": program, "inputs": INPUTS})
        assert failed.value.error_type == "LMTransportError"
        assert secret not in str(failed.value)
        # the call's own LM wins over the worker default
        out = await worker.call("execute", {"program": program, "inputs": INPUTS, "lm": {"model": "offline"}})
        assert_complex_outputs(out["outputs"], "predict")
        with pytest.raises(dspex_trio.InvalidParams, match="unknown key"):
            await worker.call("configure_lm", {"lm": {"model": "offline", "api_secret": "x"}})


async def test_state_round_trip_applies_demos_and_instructions() -> None:
    async with dspex_trio.open_worker() as worker:
        state = await worker.call("get_state", {"program": ref("p1", 1, spec("predict", "q -> a"))})
        state["signature"]["instructions"] = "Answer in one word."
        state["demos"] = [{"q": "2+2?", "a": "four"}]
        new_spec = spec("predict", "q -> a", state=state)
        described = await worker.call("validate_program", {"spec": new_spec})
        assert described["instructions"] == "Answer in one word."
        loaded = await worker.call("get_state", {"program": ref("p1", 2, new_spec)})
        assert loaded["demos"] == [{"q": "2+2?", "a": "four"}]
        out = await worker.call("execute", {"program": ref("p1", 2), "inputs": {"q": "3+3?"}})
        assert isinstance(out["outputs"]["a"], str)


async def test_concurrent_executes_in_one_worker() -> None:
    async with dspex_trio.open_worker() as worker:
        program = ref("p1", 1, spec("chain_of_thought"))
        await worker.call("execute", {"program": program, "inputs": INPUTS})
        results: list[Any] = []

        async def one(i: int) -> None:
            inputs = {**INPUTS, "input": f"question {i % 4}"}
            out = await worker.call("execute", {"program": ref("p1", 1), "inputs": inputs})
            results.append((i % 4, out["outputs"]))

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(one, i)
        by_input: dict[int, Any] = {}
        for key, outputs in results:
            assert by_input.setdefault(key, outputs) == outputs
        assert len(by_input) == 4
