"""Which modules a program spec may name, their options, and the fields and predictors each produces.

Pure data and checks (no dspy, no trio): the worker builds what these describe with DSPy
(``bridge_child._builtins``), the mock backend answers from them, and both refuse the same specs with
the same messages. Import the names from :mod:`bridge_child.spec`.

A spec's ``module`` is a **built-in** (:data:`BUILTIN_MODULES`: DSPy's own modules, built from the
spec's signature) or the name of a **registered program** (a factory in an operator's program module,
``PROGRAMS``; it has its own signatures, so the spec has none). Built-ins that need an outside runtime
are listed with the reason they are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from bridge_child._signatures import STR, FieldSpec, InvalidSignature, SignatureSpec

MAX_NAME_CHARS: Final = 64
"""Longest name of a registered program, tool or metric, and of an ``include`` entry, in characters."""
NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
"""What such a name looks like (it is also a Python identifier)."""
MAX_TOOLS: Final = 32
"""Tools one ``react`` program may use."""
DEFAULT_MAX_ITERS: Final = 20
"""``react``'s ``max_iters`` when the spec gives none (DSPy's own default)."""
MAX_ITERS: Final = 50
"""Largest ``max_iters`` (tool-calling rounds of one ``react`` execution)."""
DEFAULT_ATTEMPTS: Final = 3
"""``n`` when the spec gives none: attempts of ``best_of_n``/``refine``, chains of
``multi_chain_comparison``."""
MAX_ATTEMPTS: Final = 16
"""Largest ``n``."""
DEFAULT_THRESHOLD: Final = 1.0
"""``best_of_n``/``refine``: a reward at or above this ends the attempts early."""
MAX_INCLUDE: Final = 16
"""Extra prediction entries one program may ``include`` in its outputs."""

REASONING: Final = "reasoning"
"""The field ``dspy.ChainOfThought`` adds before the outputs (a ``str`` unless the signature declares it)."""
RATIONALE: Final = "rationale"
"""The field ``dspy.MultiChainComparison`` adds before the outputs."""
TRAJECTORY: Final = "trajectory"
"""``dspy.ReAct``'s record of its tool calls: an input of its predictors, an extra entry of its prediction."""

DENO: Final = (
    "it runs LM-written Python in DSPy's sandbox, which needs the Deno runtime (and Pyodide); dspex-trio "
    "workers do not provide it"
)


@dataclass(frozen=True)
class BuiltinModule:
    """One DSPy module a spec may name, with the options it takes."""

    name: str
    summary: str
    options: tuple[str, ...] = ()
    """Spec keys it takes besides ``signature``, ``instructions``, ``state`` and ``include``."""
    first_outputs: tuple[str, ...] = ()
    """Output fields the module adds before the signature's (``reasoning``)."""
    extras: tuple[str, ...] = ()
    """Entries of its prediction that are not outputs, which ``include`` may ask for."""
    refusal: str | None = None
    """Why it cannot run in a worker (None: it can)."""


BUILTIN_MODULES: Final[Mapping[str, BuiltinModule]] = {
    m.name: m
    for m in (
        BuiltinModule("predict", "dspy.Predict: one LM call from the signature"),
        BuiltinModule(
            "chain_of_thought", "dspy.ChainOfThought: reasons step by step first", first_outputs=(REASONING,)
        ),
        BuiltinModule(
            "react",
            "dspy.ReAct: an agent calling the registered tools named by `tools`, up to `max_iters` rounds",
            options=("tools", "max_iters"),
            first_outputs=(REASONING,),
            extras=(TRAJECTORY,),
        ),
        BuiltinModule(
            "multi_chain_comparison",
            "dspy.MultiChainComparison over `n` chain-of-thought attempts",
            options=("n",),
            first_outputs=(RATIONALE,),
        ),
        BuiltinModule(
            "best_of_n",
            "dspy.BestOfN: `n` attempts of `base`, the best by the registered metric `reward`",
            options=("n", "reward", "threshold", "base"),
        ),
        BuiltinModule(
            "refine",
            "dspy.Refine: like best_of_n, with feedback from the LM between attempts",
            options=("n", "reward", "threshold", "base"),
        ),
        BuiltinModule("program_of_thought", "dspy.ProgramOfThought", refusal=DENO),
        BuiltinModule("code_act", "dspy.CodeAct", refusal=DENO),
        BuiltinModule("rlm", "dspy.RLM", refusal=DENO),
        BuiltinModule("flex", "dspy.Flex", refusal=DENO),
        BuiltinModule(
            "knn",
            "dspy.KNN",
            refusal="it needs a trainset and an embedding function: build it in a program module (PROGRAMS) "
            "and create it by its registered name",
        ),
        BuiltinModule(
            "parallel",
            "dspy.Parallel",
            refusal="it runs other programs in threads and is not a program itself: the pool already runs "
            "executions in parallel",
        ),
    )
}
"""Every built-in module name, runnable or refused."""
BASE_MODULES: Final = ("predict", "chain_of_thought")
"""Built-ins that ``best_of_n``/``refine`` may run as their ``base`` (a registered program may, too)."""
OPTION_KEYS: Final = frozenset(option for m in BUILTIN_MODULES.values() for option in m.options)
"""Every module option a spec may hold."""
MODULES: Final = {
    **{name: name for name, m in BUILTIN_MODULES.items() if m.refusal is None},
    "chainofthought": "chain_of_thought",
    "cot": "chain_of_thought",
}
"""Accepted spellings (lower case, ``-`` read as ``_``) of the runnable built-ins, and the module each means."""
_SPELLINGS: Final = {
    **{name.replace("_", ""): name for name in BUILTIN_MODULES},
    "cot": "chain_of_thought",
}


@dataclass(frozen=True)
class RegistryNames:
    """The names the operator's program modules registered (what a spec may refer to)."""

    programs: frozenset[str] = frozenset()
    tools: frozenset[str] = frozenset()
    metrics: frozenset[str] = frozenset()


NO_REGISTRY: Final = RegistryNames()


def builtin_name(name: str) -> str | None:
    """The built-in module ``name`` spells (``ChainOfThought``, ``chain-of-thought``, ``cot``), or None."""
    return _SPELLINGS.get(name.lower().replace("-", "").replace("_", ""))


def _available(names: RegistryNames) -> str:
    builtins = ", ".join(n for n, m in BUILTIN_MODULES.items() if m.refusal is None)
    registered = ", ".join(sorted(names.programs)) or "none"
    return f"built-in modules: {builtins}; registered programs: {registered}"


def resolve_module(name: Any, names: RegistryNames) -> tuple[str, bool]:
    """``(module, registered)`` for a spec's ``module``. Raises :class:`InvalidSignature` for a name that
    is neither, or a built-in that cannot run here (saying why)."""
    if not isinstance(name, str) or not name:
        raise InvalidSignature(f"'module' must be a module name; {_available(names)}")
    if name in names.programs:
        return name, True
    builtin = builtin_name(name)
    if builtin is None:
        raise InvalidSignature(f"unknown module {name[:80]!r}; {_available(names)}")
    refusal = BUILTIN_MODULES[builtin].refusal
    if refusal is not None:
        raise InvalidSignature(f"module {builtin!r} cannot run in a dspex-trio worker: {refusal}")
    return builtin, False


# -- options ----------------------------------------------------------------------------------------


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > MAX_NAME_CHARS:
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidSignature(
            f"{what} {shown!r} is not a name (letters, digits and underscores, starting with a letter, "
            f"at most {MAX_NAME_CHARS} characters)"
        )
    return value


def _int_option(spec: Mapping[str, Any], key: str, default: int, maximum: int, module: str) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise InvalidSignature(f"{module}: '{key}' must be an integer from 1 to {maximum}")
    return value


def _known(name: str, known: frozenset[str], what: str, where: str) -> str:
    if name not in known:
        listed = ", ".join(sorted(known)) or "none is registered"
        raise InvalidSignature(f"{where}: unknown {what} {name!r}; available {what}s: {listed}")
    return name


def parse_options(module: str, spec: Mapping[str, Any], names: RegistryNames) -> dict[str, Any]:
    """The options of a built-in ``module`` in ``spec`` (defaults filled in), checked against the
    registered names. Raises :class:`InvalidSignature`."""
    allowed = BUILTIN_MODULES[module].options if module in BUILTIN_MODULES else ()
    given = sorted(k for k in OPTION_KEYS & set(spec) if k not in allowed)
    if given:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
        raise InvalidSignature(f"module {module!r} {takes}, not {', '.join(given)}")
    options: dict[str, Any] = {}
    if module == "react":
        tools = spec.get("tools")
        if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
            raise InvalidSignature(f"react: 'tools' must be a list of 1 to {MAX_TOOLS} registered tool names")
        for tool in tools:
            _known(check_name(tool, "tool"), names.tools, "tool", "react")
        if len(set(tools)) != len(tools):
            raise InvalidSignature("react: a tool is named twice in 'tools'")
        options["tools"] = list(tools)
        options["max_iters"] = _int_option(spec, "max_iters", DEFAULT_MAX_ITERS, MAX_ITERS, module)
    elif module == "multi_chain_comparison":
        options["n"] = _int_option(spec, "n", DEFAULT_ATTEMPTS, MAX_ATTEMPTS, module)
    elif module in ("best_of_n", "refine"):
        options["n"] = _int_option(spec, "n", DEFAULT_ATTEMPTS, MAX_ATTEMPTS, module)
        if "reward" not in spec:
            raise InvalidSignature(f"{module}: 'reward' (the name of a registered metric) is required")
        options["reward"] = _known(check_name(spec["reward"], "metric"), names.metrics, "metric", module)
        threshold = spec.get("threshold", DEFAULT_THRESHOLD)
        if (
            not isinstance(threshold, int | float)
            or isinstance(threshold, bool)
            or not math.isfinite(threshold)
        ):
            raise InvalidSignature(f"{module}: 'threshold' must be a finite number")
        options["threshold"] = float(threshold)
        base = spec.get("base", "predict")
        if not isinstance(base, str):
            raise InvalidSignature(f"{module}: 'base' must be a module name")
        if base in names.programs:
            options["base"] = base
        elif builtin_name(base) in BASE_MODULES:
            options["base"] = builtin_name(base)
        else:
            raise InvalidSignature(
                f"{module}: 'base' must be one of {', '.join(BASE_MODULES)} or a registered program, not "
                f"{base[:80]!r}"
            )
    return options


def parse_include(raw: Any) -> tuple[str, ...]:
    """A spec's ``include``: names of extra prediction entries to return with the outputs."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_INCLUDE:
        raise InvalidSignature(f"'include' must be a list of at most {MAX_INCLUDE} names")
    names = tuple(check_name(name, "include entry") for name in raw)
    if len(set(names)) != len(names):
        raise InvalidSignature("'include' names an entry twice")
    return names


# -- fields and predictors --------------------------------------------------------------------------


def _with_first(first: str, outputs: tuple[FieldSpec, ...], *, keep_declared: bool) -> tuple[FieldSpec, ...]:
    declared = tuple(f for f in outputs if f.name == first)
    if declared and not keep_declared:
        raise InvalidSignature(f"the module adds the output field {first!r}; rename the signature's own")
    return (*(declared or (FieldSpec(first, STR),)), *(f for f in outputs if f.name != first))


def module_outputs(
    module: str, signature: SignatureSpec, options: Mapping[str, Any]
) -> tuple[FieldSpec, ...]:
    """The output fields a built-in produces from ``signature``, in order (``reasoning`` first for
    chain_of_thought and react, ``rationale`` for multi_chain_comparison; a base's for best_of_n and
    refine; a registered base's are the registry's to say: empty here)."""
    if module in ("best_of_n", "refine"):
        base = options.get("base", "predict")
        return module_outputs(base, signature, {}) if base in BUILTIN_MODULES else ()
    outputs = signature.outputs
    for first in reversed(BUILTIN_MODULES[module].first_outputs):
        outputs = _with_first(first, outputs, keep_declared=first == REASONING)
    return outputs


def check_reserved(module: str, signature: SignatureSpec) -> None:
    """Refuse field names a built-in uses for itself."""
    names = {f.name for f in (*signature.inputs, *signature.outputs)}
    reserved = {
        "react": {TRAJECTORY, "next_thought", "next_tool_name", "next_tool_args"},
        "multi_chain_comparison": {RATIONALE} | {n for n in names if n.startswith("reasoning_attempt_")},
    }.get(module, set())
    clash = sorted(names & reserved)
    if clash:
        raise InvalidSignature(f"module {module!r} uses the field name {clash[0]!r} itself; rename yours")


@dataclass(frozen=True)
class PredictorLayout:
    """One predictor of a program, as its DSPy state names it: its fields, inputs then outputs."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    instructions: str | None = None

    @property
    def fields(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "instructions": self.instructions,
        }


@dataclass(frozen=True)
class ModuleLayout:
    """The predictors of a built-in, and whether its state is one predictor's (a bare ``Predict``)."""

    predictors: tuple[PredictorLayout, ...]
    flat: bool = False
    registered_base: str | None = None
    """The registered program whose predictors these are, when it is one (a registered program, or the
    ``base`` of best_of_n/refine, then prefixed ``module.``): the registry's to say, none listed here."""


def builtin_layout(module: str, signature: SignatureSpec, options: Mapping[str, Any]) -> ModuleLayout:
    """The predictors of a built-in module, named as ``named_predictors()`` and its DSPy state name them."""
    inputs = tuple(f.name for f in signature.inputs)
    if module == "predict":
        outputs = tuple(f.name for f in signature.outputs)
        return ModuleLayout((PredictorLayout("self", inputs, outputs),), flat=True)
    cot_outputs = tuple(f.name for f in module_outputs("chain_of_thought", signature, {}))
    if module == "chain_of_thought":
        return ModuleLayout((PredictorLayout("predict", inputs, cot_outputs),))
    if module == "react":
        return ModuleLayout(
            (
                PredictorLayout(
                    "react", (*inputs, TRAJECTORY), ("next_thought", "next_tool_name", "next_tool_args")
                ),
                PredictorLayout("extract.predict", (*inputs, TRAJECTORY), cot_outputs),
            )
        )
    if module == "multi_chain_comparison":
        attempts = tuple(f"reasoning_attempt_{i + 1}" for i in range(options["n"]))
        outputs = tuple(f.name for f in module_outputs(module, signature, options))
        return ModuleLayout(
            (
                PredictorLayout("generate.predict", inputs, cot_outputs),
                PredictorLayout("compare.predict", (*inputs, *attempts), outputs),
            )
        )
    if module in ("best_of_n", "refine"):
        base = options["base"]
        if base not in BUILTIN_MODULES:
            return ModuleLayout((), registered_base=base)
        inner = builtin_layout(base, signature, {})
        return ModuleLayout(
            tuple(
                PredictorLayout("module" if p.name == "self" else f"module.{p.name}", p.inputs, p.outputs)
                for p in inner.predictors
            )
        )
    raise AssertionError(module)  # pragma: no cover - resolve_module admits no other
