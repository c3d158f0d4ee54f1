"""The program-spec layer (``bridge_child.spec``): specs, the output-field order, inputs, LM
configurations and DSPy prompt sections, with no DSPy and no Trio. (The signature parser it re-exports is
tested in test_programs.py.)"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from bridge_child import spec
from bridge_child.spec import (
    MAX_PROMPT_FIELDS,
    STR,
    InvalidSignature,
    SpecError,
    check_inputs,
    check_lm_config,
    describe_lm,
    parse_spec,
    parse_type,
    prompt_output_fields,
    scan_type_text,
)
from tests.metered import MeteredStr

# -- imports ------------------------------------------------------------------------------------------


def test_importing_the_spec_layer_imports_neither_dspy_nor_trio() -> None:
    code = (
        "import sys, bridge_child.spec\n"
        "loaded = {'dspy', 'trio', 'dspex_trio', 'litellm'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_program_methods_import_no_cycle() -> None:
    """``_programs`` no longer imports ``_methods`` (nor patches itself with a module ``__getattr__``):
    its method table exists as soon as it is imported on its own."""
    code = (
        "import sys, bridge_child._programs as programs\n"
        "assert 'bridge_child._methods' not in sys.modules\n"
        "assert '__getattr__' not in vars(programs)\n"
        "assert {'execute', 'configure_lm', 'validate_program'} <= set(vars(programs)['METHODS'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_runtime_imports_only_public_bridge_child_modules() -> None:
    """``dspex_trio`` (the mock backend and the fake LM included) uses ``bridge_child.wire`` and
    ``bridge_child.spec``, never the worker's private modules."""
    import ast
    import pathlib

    import dspex_trio

    private: list[str] = []
    for path in sorted(pathlib.Path(dspex_trio.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] == "bridge_child"
            ):
                modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names if alias.name.split(".")[0] == "bridge_child"]
            else:
                continue
            private += [
                f"{path.name}: {m}" for m in modules if any(p.startswith("_") for p in m.split(".")[1:])
            ]
    assert not private


# -- specs and their output fields --------------------------------------------------------------------


def fields(parsed: spec.ProgramSpec) -> list[tuple[str, str]]:
    return [(f.name, f.type.render()) for f in parsed.outputs]


def test_predict_outputs_are_the_signature_outputs_in_order() -> None:
    parsed = parse_spec({"signature": "q -> b: int, reasoning: list[str], a"})
    assert parsed.module == "predict"
    assert fields(parsed) == [("b", "int"), ("reasoning", "list[str]"), ("a", "str")]
    assert [f.name for f in parsed.inputs] == ["q"]


def test_chain_of_thought_adds_reasoning_first() -> None:
    parsed = parse_spec({"signature": "q -> b: int, a", "module": "cot"})
    assert parsed.module == "chain_of_thought"
    assert fields(parsed) == [("reasoning", "str"), ("b", "int"), ("a", "str")]


def test_chain_of_thought_moves_a_declared_reasoning_first_keeping_its_type() -> None:
    parsed = parse_spec({"signature": "q -> b: int, reasoning: list[str], a", "module": "Chain-Of-Thought"})
    assert fields(parsed) == [("reasoning", "list[str]"), ("b", "int"), ("a", "str")]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("q -> a", "must be an object"),
        ({"signature": "q -> a", "evil": 1}, "unknown key(s) in program spec: evil"),
        ({"module": "predict"}, "needs a 'signature'"),
        ({"signature": "q -> a", "module": "reactor"}, "unknown module 'reactor'"),
        ({"signature": "q -> a", "state": []}, "'state' must be an object"),
        ({"signature": "q -> a: os.system"}, "unsupported type annotation"),
    ],
)
def test_parse_spec_refuses(raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidSignature, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_spec(raw)
    assert isinstance(info.value, SpecError) and info.value.code == "invalid_params"


# -- modules, options, include ------------------------------------------------------------------------

NAMES = spec.RegistryNames(
    programs=frozenset({"rag"}), tools=frozenset({"search", "lookup"}), metrics=frozenset({"exact"})
)


def test_every_runnable_builtin_and_its_spellings() -> None:
    runnable = [n for n, m in spec.BUILTIN_MODULES.items() if m.refusal is None]
    assert runnable == [
        "predict",
        "chain_of_thought",
        "react",
        "multi_chain_comparison",
        "best_of_n",
        "refine",
    ]
    for spelling, name in [
        ("ChainOfThought", "chain_of_thought"),
        ("cot", "chain_of_thought"),
        ("ReAct", "react"),
        ("best-of-n", "best_of_n"),
        ("BestOfN", "best_of_n"),
        ("MultiChainComparison", "multi_chain_comparison"),
    ]:
        assert spec.builtin_name(spelling) == name


def test_a_registered_program_has_no_signature_and_takes_no_options() -> None:
    parsed = parse_spec({"module": "rag", "include": ["context"], "state": {"x": {}}}, NAMES)
    assert parsed.registered and parsed.module == "rag" and parsed.signature is None
    assert parsed.inputs == () and parsed.outputs == () and parsed.include == ("context",)
    assert parsed.state == {"x": {}}
    with pytest.raises(InvalidSignature, match="registered with its own signatures and takes no signature"):
        parse_spec({"module": "rag", "signature": "q -> a"}, NAMES)
    with pytest.raises(InvalidSignature, match="takes no n"):
        parse_spec({"module": "rag", "n": 3}, NAMES)
    with pytest.raises(InvalidSignature, match="unknown module 'rag'"):  # without the registry
        parse_spec({"module": "rag"})


def test_react_options_and_outputs() -> None:
    parsed = parse_spec({"signature": "question -> answer", "module": "react", "tools": ["search"]}, NAMES)
    assert parsed.options == {"tools": ["search"], "max_iters": 20}
    assert fields(parsed) == [("reasoning", "str"), ("answer", "str")]
    layout = parsed.layout()
    assert [(p.name, p.inputs, p.outputs) for p in layout.predictors] == [
        ("react", ("question", "trajectory"), ("next_thought", "next_tool_name", "next_tool_args")),
        ("extract.predict", ("question", "trajectory"), ("reasoning", "answer")),
    ]
    assert not layout.flat


def test_best_of_n_refine_and_multi_chain_comparison_options() -> None:
    parsed = parse_spec({"signature": "q -> a", "module": "best_of_n", "reward": "exact", "n": 4}, NAMES)
    assert parsed.options == {"n": 4, "reward": "exact", "threshold": 1.0, "base": "predict"}
    assert fields(parsed) == [("a", "str")]
    assert [p.name for p in parsed.layout().predictors] == ["module"]
    cot = parse_spec({"signature": "q -> a", "module": "refine", "reward": "exact", "base": "cot"}, NAMES)
    assert fields(cot) == [("reasoning", "str"), ("a", "str")]
    assert [p.name for p in cot.layout().predictors] == ["module.predict"]
    over = parse_spec({"module": "best_of_n", "base": "rag", "reward": "exact", "threshold": 0.5}, NAMES)
    assert over.signature is None and over.options["base"] == "rag" and over.layout().registered_base == "rag"
    mcc = parse_spec({"signature": "q -> a", "module": "multi_chain_comparison", "n": 2}, NAMES)
    assert fields(mcc) == [("rationale", "str"), ("a", "str")]
    assert [(p.name, p.inputs) for p in mcc.layout().predictors] == [
        ("generate.predict", ("q",)),
        ("compare.predict", ("q", "reasoning_attempt_1", "reasoning_attempt_2")),
    ]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (
            {"signature": "q -> a", "module": "react"},
            "'tools' must be a list of 1 to 32 registered tool names",
        ),
        (
            {"signature": "q -> a", "module": "react", "tools": ["nope"]},
            "react: unknown tool 'nope'; available tools: lookup, search",
        ),
        ({"signature": "q -> a", "module": "react", "tools": ["search", "search"]}, "a tool is named twice"),
        (
            {"signature": "q -> a", "module": "react", "tools": ["search"], "max_iters": 0},
            "'max_iters' must be an integer from 1 to 50",
        ),
        (
            {"signature": "q -> a", "module": "predict", "tools": ["search"]},
            "module 'predict' takes no options, not tools",
        ),
        (
            {"signature": "q -> a", "module": "best_of_n"},
            "'reward' (the name of a registered metric) is required",
        ),
        (
            {"signature": "q -> a", "module": "refine", "reward": "nope"},
            "unknown metric 'nope'; available metrics: exact",
        ),
        (
            {"signature": "q -> a", "module": "best_of_n", "reward": "exact", "n": 17},
            "'n' must be an integer from 1 to 16",
        ),
        (
            {"signature": "q -> a", "module": "best_of_n", "reward": "exact", "threshold": True},
            "'threshold' must be a finite number",
        ),
        (
            {"signature": "q -> a", "module": "best_of_n", "reward": "exact", "base": "react"},
            "'base' must be one of predict, chain_of_thought or a registered program",
        ),
        (
            {"module": "best_of_n", "reward": "exact", "base": "rag", "signature": "q -> a"},
            "takes no signature",
        ),
        (
            {"signature": "q -> rationale", "module": "multi_chain_comparison"},
            "uses the field name 'rationale' itself",
        ),
        (
            {"signature": "trajectory -> a", "module": "react", "tools": ["search"]},
            "uses the field name 'trajectory' itself",
        ),
        (
            {"signature": "q -> a", "module": "program_of_thought"},
            "module 'program_of_thought' cannot run in a dspex-trio worker: it runs LM-written Python in DSPy's sandbox, which needs the Deno runtime",
        ),
        ({"signature": "q -> a", "module": "knn"}, "it needs a trainset and an embedding function"),
        (
            {"signature": "q -> a", "module": "nope"},
            "unknown module 'nope'; built-in modules: predict, chain_of_thought, react, multi_chain_comparison, best_of_n, refine; registered programs: rag",
        ),
        ({"signature": "q -> a", "include": "trajectory"}, "'include' must be a list of at most 16 names"),
        ({"signature": "q -> a", "include": ["a"]}, "'include' names 'a', which is an output already"),
        ({"signature": "q -> a", "include": ["x y"]}, "include entry 'x y' is not a name"),
        ({"signature": "q -> a: History"}, "History is a type for inputs only"),
    ],
)
def test_module_options_are_refused_with_one_message(raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidSignature) as info:
        parse_spec(raw, NAMES)
    assert fragment in info.value.message


def test_history_is_an_input_type_of_json_turns() -> None:
    parsed = parse_spec({"signature": "history: History, question -> answer"})
    (history, _question) = parsed.inputs
    assert history.type.kind == "history" and history.type.render() == "History"
    assert parse_type("dspy.History") == history.type
    check_inputs(parsed.inputs, {"history": [{"question": "q", "answer": "a"}], "question": "q"})
    with pytest.raises(SpecError, match="input 'history' must be History, not str"):
        check_inputs(parsed.inputs, {"history": "no", "question": "q"})
    with pytest.raises(SpecError, match="must be History"):
        check_inputs(parsed.inputs, {"history": [["not", "a", "turn"]], "question": "q"})


def test_optional_inputs_may_be_left_out() -> None:
    fields_ = (spec.FieldSpec("q"), spec.FieldSpec("k", spec.TypeSpec("int"), optional=True))
    check_inputs(fields_, {"q": "x"})
    with pytest.raises(SpecError, match="input 'k' must be int"):
        check_inputs(fields_, {"q": "x", "k": "2"})
    assert fields_[1].describe() == {"name": "k", "type": "int", "desc": None, "optional": True}


# -- program state -------------------------------------------------------------------------------------

DEEP: Any = "x"
for _ in range(40):
    DEEP = [DEEP]
LAYOUT = parse_spec({"signature": "q -> a", "module": "cot"}).layout()
"""ChainOfThought over "q -> a": one predictor, "predict", with fields q, reasoning, a."""


def predictor_state(n_fields: int = 3, **extra: Any) -> dict[str, Any]:
    fields_ = [{"prefix": f"F{i}:", "description": f"field {i}"} for i in range(n_fields)]
    return {
        "traces": [],
        "train": [],
        "demos": [{"q": "2+2?", "reasoning": "adding", "a": "4", "augmented": True}],
        "signature": {"instructions": "Be brief.", "fields": fields_},
        "lm": None,
        **extra,
    }


def test_check_state_cleans_a_dspy_state() -> None:
    saved = {"predict": predictor_state(lm={"model": "openai/gpt-4o", "api_base": "http://evil/"})}
    saved["metadata"] = {"dependency_versions": {"dspy": "3.4.1"}}
    clean = spec.check_state(saved, LAYOUT.predictors, flat=False)
    assert set(clean) == {"predict"}  # metadata dropped
    assert clean["predict"]["lm"] is None  # the LM inside a state is ignored
    assert clean["predict"]["demos"] == saved["predict"]["demos"]
    assert clean["predict"]["signature"]["instructions"] == "Be brief."
    flat = parse_spec({"signature": "q -> a"}).layout()
    assert flat.flat and spec.check_state(predictor_state(2), flat.predictors, flat=True)["demos"]


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        ("gASVAAAA", "must be an object (DSPy's JSON state"),
        (
            {"predict": predictor_state(), "generate": predictor_state()},
            "names predictor 'generate', which the program does not have (its predictors: predict)",
        ),
        ({}, "has no entry for the program's predictor 'predict'"),
        (
            {"predict": predictor_state(4)},
            "has 4 signature field(s) but the program's predictor has 3 (q, reasoning, a): is it the state of another program?",
        ),
        ({"predict": predictor_state(**{"py/object": "os.system"})}, "unknown key(s) 'py/object'"),
        (
            {"predict": {**predictor_state(), "demos": [{"q": {"py/reduce": ["os.system", ["ls"]]}}]}},
            "holds a serialized Python object ('py/reduce')",
        ),
        (
            {"predict": {**predictor_state(), "demos": [{"q": {"__reduce__": "x"}}]}},
            "serialized Python object ('__reduce__')",
        ),
        (
            {"predict": {**predictor_state(), "demos": [{"q": b"\x80\x04"}]}},
            "holds a bytes; a state is plain JSON data",
        ),
        ({"predict": {**predictor_state(), "demos": [{"q": float("nan")}]}}, "which is not JSON"),
        ({"predict": {**predictor_state(), "demos": "x"}}, "'demos' must be a list of at most 1000 objects"),
        (
            {"predict": {**predictor_state(), "demos": [{}] * 1001}},
            "'demos' must be a list of at most 1000 objects",
        ),
        (
            {"predict": {**predictor_state(), "signature": {"fields": []}}},
            "needs 'instructions' (a string) and 'fields'",
        ),
        ({"predict": {**predictor_state(), "demos": [{"q": DEEP}]}}, "nested more than 32 levels deep"),
    ],
)
def test_check_state_refuses_naming_what_is_wrong(state: Any, fragment: str) -> None:
    with pytest.raises(spec.InvalidState) as info:
        spec.check_state(state, LAYOUT.predictors, flat=False)
    assert fragment in info.value.message
    assert info.value.type == "InvalidState" and info.value.code == "invalid_params"


# -- fake values from JSON schemas ---------------------------------------------------------------------


def test_fake_from_schema_fits_the_schema_and_is_deterministic() -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative"]},
            "score": {"type": "number"},
            "reasons": {"type": "array", "items": {"type": "string"}, "minItems": 3},
            "when": {"type": "string", "format": "date-time"},
            "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "item": {"$ref": "#/$defs/Item"},
        },
        "$defs": {"Item": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    }
    value = spec.fake_from_schema(schema, "verdict", "seed")
    assert value == spec.fake_from_schema(schema, "verdict", "seed")
    assert value["label"] in ("positive", "negative") and isinstance(value["score"], float)
    assert len(value["reasons"]) == 3 and all(isinstance(r, str) for r in value["reasons"])
    assert value["when"] == "2024-01-01T00:00:00Z" and isinstance(value["maybe"], int)
    assert isinstance(value["item"]["ok"], bool)
    assert spec.fake_from_schema({}, "x", "s") == {
        "key": spec.fake_from_schema({"type": "string"}, "x.key", "s")
    }


def test_fake_from_schema_is_bounded_whatever_the_schema() -> None:
    recursive = {"$ref": "#", "type": "array", "items": {"$ref": "#"}, "minItems": 100}
    value = spec.fake_from_schema(recursive, "x", "s")
    text = repr(value)
    assert len(text) < 1_000_000


# -- inputs -----------------------------------------------------------------------------------------


INPUTS = parse_spec({"signature": "question, context: list[str] -> answer"}).inputs


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "execute: inputs must be an object"),
        ({"question": "q"}, "execute: missing input field(s) 'context'"),
        (
            {"question": "q", "context": [], "extra": 1, "more": 2},
            "execute: unknown input field(s) 'extra', 'more'; inputs are question, context",
        ),
        (
            {"qestion": "q", "context": [], "x": 1},
            "execute: missing input field(s) 'question'; unknown input field(s) 'qestion' (did you mean "
            "'question'?), 'x'",
        ),
        ({"question": "q", "context": "no"}, "execute: input 'context' must be list[str], not str"),
        ({"question": 3, "context": []}, "execute: input 'question' must be str, not int"),
    ],
)
def test_check_inputs_refuses_with_one_message(inputs: Any, message: str) -> None:
    with pytest.raises(SpecError) as info:
        check_inputs(INPUTS, inputs)
    assert info.value.message == message
    assert info.value.type == "InvalidParams" and info.value.code == "invalid_params"


def test_check_inputs_accepts_matching_inputs() -> None:
    check_inputs(INPUTS, {"question": "q", "context": ["a", "b"]})  # no exception
    check_inputs((), {})


# -- LM configuration ---------------------------------------------------------------------------------


def test_lm_config_checks_and_describes_without_the_key() -> None:
    assert check_lm_config("offline") == {"model": "offline"}
    config = check_lm_config({"model": "openai/x", "api_key": "secret", "api_base": None, "num_retries": 0})
    assert config == {"model": "openai/x", "api_key": "secret", "num_retries": 0}
    assert describe_lm(config) == {"model": "openai/x", "num_retries": 0, "has_api_key": True}
    assert describe_lm(None) == {"model": "offline", "has_api_key": False}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (3, "lm must be an object"),
        ({"model": "openai/x", "colour": "red"}, "unknown key(s) colour"),
        ({"model": "openai/x", "num_retries": True}, "'num_retries' has the wrong type (bool)"),
        ({"model": "openai/x", "timeout": "1"}, "'timeout' has the wrong type (str)"),
        ({"api_key": "k"}, "'model' is required"),
        ({"model": "gpt-4o"}, "model must be 'offline' or 'provider/name'"),
    ],
)
def test_lm_config_refuses(raw: Any, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        check_lm_config(raw)
    assert fragment in info.value.message
    assert "secret" not in info.value.message


# -- DSPy prompts ------------------------------------------------------------------------------------


SYSTEM = (
    "Your input fields are:\n1. `q` (str): the question\n"
    "Your output fields are:\n"
    "1. `answer` (str): \n"
    "2. `n` (int): a count\n   spanning two lines. `x` (int) is not a field\n"
    "3. `kind` (Literal['a)', \"b (c]\"]): \n"
    "4. `tags` (list[str]):\n"
    "5. `broken` (dict[str,\n"
    "6. `model` (Item): Type description of Item: ...\n"
    "All interactions will be structured in the following way\n"
    "7. `after` (str): not an output field\n"
    "[[ ## completed ## ]]"
)


def test_prompt_output_fields_reads_the_section() -> None:
    assert prompt_output_fields(SYSTEM) == [
        ("answer", "str"),
        ("n", "int"),
        ("kind", "Literal['a)', \"b (c]\"]"),
        ("tags", "list[str]"),
        ("broken", None),  # the type does not close on its line
        ("model", "Item"),
    ]
    assert prompt_output_fields("no section here") == []
    assert prompt_output_fields("Your output fields are:\n") == []
    assert parse_type(prompt_output_fields(SYSTEM)[2][1] or "").values == ("a)", "b (c]")


def test_prompt_output_fields_are_bounded_in_number_and_size() -> None:
    many = "Your output fields are:\n" + "".join(
        f"{i}. `f{i}` (int): \n" for i in range(MAX_PROMPT_FIELDS + 50)
    )
    assert len(prompt_output_fields(many)) == MAX_PROMPT_FIELDS
    long_name = "Your output fields are:\n1. `" + "n" * 10_000 + "` (str): \n2. `ok` (str):"
    assert prompt_output_fields(long_name) == [("ok", "str")]
    long_type = "Your output fields are:\n1. `a` (" + "x" * 10_000 + "): \n2. `ok` (int):"
    assert prompt_output_fields(long_type) == [("a", None), ("ok", "int")]


def test_scan_type_text_is_bracket_and_quote_aware() -> None:
    text = "(Literal['x)', 'y']) rest"
    assert scan_type_text(text, 1) == ("Literal['x)', 'y']", len("(Literal['x)', 'y'])"))
    assert scan_type_text("(list[str]]", 1) is None  # unbalanced
    assert scan_type_text("(str\n)", 1) is None  # a type ends on its line
    assert scan_type_text("(dict[str, int])", 1, stop=5) is None  # not past stop


PATHOLOGICAL_SYSTEMS = {
    "field heads": "Your output fields are:\n" + "1. `a` (" * 40_000,
    "dots": "Your output fields are:\n" + ". `" * 100_000,
    "unclosed names": "Your output fields are:\n" + "1. `\n" * 60_000,
    "long names": "Your output fields are:\n" + ("1. `" + "n" * 300 + "` (str):\n") * 1_000,
    "open brackets": "Your output fields are:\n1. `a` (" + "[" * 300_000,
    "unterminated quotes": "Your output fields are:\n" + "1. `a` ('\n" * 30_000,
    "no section end": "Your output fields are:\n" + "x" * 300_000,
    "long index": "Your output fields are:\n" + "1" * 300_000 + ". `a` (str):",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL_SYSTEMS))
def test_prompt_output_fields_work_is_linear_in_the_text(name: str) -> None:
    """Measured by characters touched (searches, slices, indexing), not by time: at most a few times
    the text, whatever its shape."""
    system = MeteredStr(PATHOLOGICAL_SYSTEMS[name])
    fields_read = prompt_output_fields(system)
    assert len(fields_read) <= MAX_PROMPT_FIELDS
    assert system.meter.chars <= 4 * len(system) + 50_000, (system.meter.chars, len(system))


def test_output_field_types_read_from_a_prompt_default_to_str() -> None:
    from bridge_child._offline_lm import output_fields

    assert output_fields(SYSTEM) == [
        ("answer", STR),
        ("n", parse_type("int")),
        ("kind", parse_type("Literal['a)', \"b (c]\"]")),
        ("tags", parse_type("list[str]")),
        ("broken", STR),
        ("model", STR),  # a type the safe parser does not model: text
    ]


def test_fake_numbers_respect_the_schema_bounds() -> None:
    for seed in map(str, range(50)):
        assert 1 <= spec.fake_from_schema({"type": "integer", "minimum": 1, "maximum": 3}, "p", seed) <= 3
        assert spec.fake_from_schema({"type": "integer", "exclusiveMaximum": -5}, "n", seed) < -5
        assert 5 <= spec.fake_from_schema({"type": "number", "minimum": 5, "maximum": 10}, "x", seed) <= 10
        assert 0 <= spec.fake_from_schema({"type": "number"}, "x", seed) <= 1
