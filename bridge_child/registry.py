"""Program modules: how an operator's application gives the pool its programs, tools and metrics.

A **program module** is any importable Python module the operator names (``open_pool(programs=[...])``,
``dspex-trio serve --programs myapp.programs``, ``DSPEX_PROGRAMS``). It exposes plain module-level
dicts, by name::

    PROGRAMS = {"rag": RAG}            # factories: no arguments, each call returns a new dspy.Module
    TOOLS = {"search": search}         # plain functions: name, docstring and type hints are the schema
    METRICS = {"exact": exact_match}   # metric(example, prediction, trace=None) -> float | bool

or uses the decorators of this module, which fill the same dicts (``@program("rag")``, ``@tool``,
``@metric``). Anything else it needs (a retriever's index, a client) is its own business: built at
import, once, in the zygote template (every forked worker shares it); or lazily, once per worker.

Clients never send code: they name what is registered here. :func:`load_registry` imports the modules
and checks what they registered (one :class:`RegistryError` naming the module otherwise); the zygote
template calls it before it forks (so workers start with everything imported), a subprocess worker at
start, the mock backend in-process. :func:`program_interface` says what a registered program takes and
returns (its inputs, outputs and predictors), read from the module's ``signature`` attribute when it has
one, else from its ``forward`` and its predictors.

Importing this module imports neither dspy nor trio (the program modules it loads may).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import threading
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from bridge_child import wire
from bridge_child._context import MethodError
from bridge_child._modules import NAME_RE, PredictorLayout, RegistryNames, builtin_name
from bridge_child._signatures import MAX_FIELDS, FieldSpec, TypeSpec

__all__ = [
    "EMPTY",
    "EXIT_PROGRAMS",
    "FAILED_PREFIX",
    "KINDS",
    "MAX_REGISTERED",
    "RESERVED_TOOL_NAMES",
    "ProgramFactoryError",
    "ProgramInterface",
    "Registry",
    "RegistryError",
    "activate",
    "check_module_names",
    "current",
    "describe_interface",
    "describe_registry",
    "instantiate",
    "load_registry",
    "metric",
    "program",
    "program_interface",
    "tool",
    "type_of",
]

KINDS: Final = ("PROGRAMS", "TOOLS", "METRICS")
"""The module-level dicts a program module may define."""
MAX_REGISTERED: Final = 1024
"""Names of one kind (programs, tools or metrics) all program modules together may register."""
RESERVED_TOOL_NAMES: Final = frozenset({"finish", "submit"})
"""Tool names DSPy's agents use for themselves."""
MAX_DESCRIPTION_CHARS: Final = 2000
"""Longest docstring quoted in a description, in characters."""
EXIT_PROGRAMS: Final = 78
"""Exit code (``EX_CONFIG``) of a worker or zygote template whose program modules cannot be used."""
FAILED_PREFIX: Final = "bridge_child: program modules: "
"""How the one stderr line of such a worker starts (the :class:`RegistryError` message follows)."""

F = TypeVar("F", bound=Callable[..., Any])


class RegistryError(Exception):
    """A program module cannot be used: it does not import, or what it registered is not valid.

    ``module`` names it; the message says what is wrong and what to do."""

    def __init__(self, module: str, message: str) -> None:
        super().__init__(f"program module {module!r}: {message}")
        self.module = module
        self.reason = message


class ProgramFactoryError(MethodError):
    """A registered program's factory raised, or returned something that is not a ``dspy.Module``
    (fails the call with ``program_error``, type ``ProgramFactoryError``)."""

    def __init__(self, message: str) -> None:
        super().__init__(wire.ErrorCode.PROGRAM_ERROR, message, type="ProgramFactoryError")


# -- the decorators ---------------------------------------------------------------------------------


def _register(kind: str, name: str | None, func: Any) -> Any:
    module = sys.modules.get(getattr(func, "__module__", "") or "")
    if module is None:  # pragma: no cover - decorators run while their module is being imported
        raise RuntimeError(f"cannot register {func!r}: its module is not importable")
    table = vars(module).setdefault(kind, {})
    table[name or func.__name__] = func
    return func


def _decorator(kind: str, name: str | Callable[..., Any] | None) -> Any:
    if callable(name):  # used bare: @tool
        return _register(kind, None, name)
    return lambda func: _register(kind, name, func)


@typing.overload
def program(name: F) -> F: ...
@typing.overload
def program(name: str | None = None) -> Callable[[F], F]: ...
def program(name: Any = None) -> Any:
    """Register a program factory (a ``dspy.Module`` subclass, or a function returning a new module) in
    its module's ``PROGRAMS``, under ``name`` (default: its own name)."""
    return _decorator("PROGRAMS", name)


@typing.overload
def tool(name: F) -> F: ...
@typing.overload
def tool(name: str | None = None) -> Callable[[F], F]: ...
def tool(name: Any = None) -> Any:
    """Register a plain function as a tool in its module's ``TOOLS`` (default name: the function's)."""
    return _decorator("TOOLS", name)


@typing.overload
def metric(name: F) -> F: ...
@typing.overload
def metric(name: str | None = None) -> Callable[[F], F]: ...
def metric(name: Any = None) -> Any:
    """Register ``metric(example, prediction, trace=None)`` in its module's ``METRICS``."""
    return _decorator("METRICS", name)


# -- loading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    """What the program modules registered, by name, merged (names are unique across modules)."""

    modules: tuple[str, ...] = ()
    programs: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    tools: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    metrics: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    origin: Mapping[str, str] = field(default_factory=dict)
    """``"KIND:name"`` -> the module that registered it."""

    def names(self) -> RegistryNames:
        return RegistryNames(frozenset(self.programs), frozenset(self.tools), frozenset(self.metrics))


EMPTY: Final = Registry()
_loaded: dict[tuple[str, ...], Registry] = {}
"""Every registry this process loaded, by its module names."""
_current: Registry = EMPTY
_lock = threading.Lock()


def current() -> Registry:
    """The registry this worker serves (:func:`activate`; empty when it was given no program modules)."""
    return _current


def activate(modules: Sequence[str], *, single_threaded: bool = False) -> Registry:
    """Load the program modules (:func:`load_registry`) and make them what this process serves."""
    global _current
    registry = load_registry(modules, single_threaded=single_threaded)
    _current = registry
    return registry


def check_module_names(modules: Sequence[str]) -> tuple[str, ...]:
    """Program module names as a tuple, each a dotted Python module name; ``ValueError`` otherwise."""
    if isinstance(modules, str | bytes):
        raise TypeError(f"programs must be a sequence of module names, not one string ({modules!r})")
    names = tuple(modules)
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise ValueError(f"programs: {name!r} is not a Python module name (e.g. 'myapp.programs')")
    if len(set(names)) != len(names):
        raise ValueError("programs: a module is named twice")
    return names


def load_registry(modules: Sequence[str], *, single_threaded: bool = False) -> Registry:
    """Import the program modules and check what they registered (once per process and list of names:
    the same names give the same registry). ``single_threaded`` (the zygote template, which forks
    afterwards): a module that leaves a thread running is refused too.

    Raises:
        RegistryError: a module does not import, imports litellm (never in a worker: it costs seconds
            and starts threads), starts a thread where that is refused, or registers something invalid.
        ValueError: ``modules`` is not a list of module names.
    """
    names = check_module_names(modules)
    with _lock:
        registry = _loaded.get(names)
        if registry is None:
            registry = _merge([(name, _import(name, single_threaded=single_threaded)) for name in names])
            _loaded[names] = registry
        return registry


def _import(name: str, *, single_threaded: bool) -> types.ModuleType:
    had_litellm = "litellm" in sys.modules
    threads_before = set(threading.enumerate())
    try:
        module = importlib.import_module(name)
    except BaseException as exc:  # a SystemExit at import is as fatal to start-up as an ImportError
        where = ""
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(".py"):
                where = f" (at {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
            tb = tb.tb_next
        raise RegistryError(name, f"cannot import it: {type(exc).__name__}: {exc}{where}") from exc
    if not had_litellm and "litellm" in sys.modules:
        raise RegistryError(
            name,
            "importing it imported litellm, which workers never load (seconds of start-up and background "
            "threads); use dspy.LM's own client (the default), and import litellm nowhere in the module",
        )
    started = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    if single_threaded and started:
        running = ", ".join(t.name for t in started)
        raise RegistryError(
            name,
            f"importing it started a thread ({running}); the zygote template forks every worker and must "
            "stay single-threaded: create clients and threads lazily, in the worker (e.g. in a "
            "functools.cache'd function), or use launcher='subprocess'",
        )
    return module


def _merge(modules: list[tuple[str, types.ModuleType]]) -> Registry:
    tables: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
    origin: dict[str, str] = {}
    for name, module in modules:
        found = [kind for kind in KINDS if kind in vars(module)]
        if not found:
            raise RegistryError(
                name, "it defines none of PROGRAMS, TOOLS, METRICS (module-level dicts of name -> callable)"
            )
        for kind in found:
            table = vars(module)[kind]
            if not isinstance(table, Mapping):
                raise RegistryError(
                    name, f"{kind} must be a dict of name -> callable, not {type(table).__name__}"
                )
            for key, value in table.items():
                _check_entry(name, kind, key, value)
                other = origin.get(f"{kind}:{key}")
                if other is not None:
                    raise RegistryError(name, f"{kind[:-1].lower()} {key!r} is registered by {other!r} too")
                origin[f"{kind}:{key}"] = name
                tables[kind][key] = value
            if len(tables[kind]) > MAX_REGISTERED:
                raise RegistryError(name, f"more than {MAX_REGISTERED} {kind.lower()} in all")
    return Registry(
        tuple(name for name, _ in modules),
        tables["PROGRAMS"],
        tables["TOOLS"],
        tables["METRICS"],
        origin,
    )


def _signature(func: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # builtins and some C callables have none: nothing to check
        return None


def _check_entry(module: str, kind: str, key: Any, value: Any) -> None:
    what = kind[:-1].lower()
    if not isinstance(key, str) or not NAME_RE.match(key) or len(key) > 64:
        raise RegistryError(
            module,
            f"{kind}: {key!r} is not a valid name (letters, digits and underscores, starting with a letter, "
            "at most 64 characters)",
        )
    if not callable(value):
        raise RegistryError(module, f"{what} {key!r} must be callable, not {type(value).__name__}")
    sig = _signature(value)
    if kind == "PROGRAMS":
        if builtin_name(key) is not None:
            raise RegistryError(
                module,
                f"program {key!r} has the name of the built-in module {builtin_name(key)!r}; rename it",
            )
        if sig is not None and any(
            p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in sig.parameters.values()
        ):
            raise RegistryError(
                module, f"program {key!r}: a factory is called with no arguments, but it needs some"
            )
    elif kind == "TOOLS":
        if key in RESERVED_TOOL_NAMES:
            raise RegistryError(module, f"tool name {key!r} is DSPy's own (finish, submit); rename it")
        if inspect.isclass(value) or inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            raise RegistryError(module, f"tool {key!r} must be a plain (synchronous) function")
    elif kind == "METRICS" and sig is not None:
        try:
            sig.bind(None, None)
        except TypeError:
            raise RegistryError(
                module, f"metric {key!r} must accept (example, prediction, trace=None)"
            ) from None


# -- registered programs ----------------------------------------------------------------------------


def instantiate(registry: Registry, name: str) -> Any:
    """A new instance of the registered program ``name`` (its factory's result).

    Raises:
        ProgramFactoryError: the factory raised, or returned something that is not a ``dspy.Module``.
    """
    import dspy

    factory = registry.programs[name]
    try:
        module = factory()
    except Exception as exc:
        raise ProgramFactoryError(
            f"the factory of program {name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, dspy.Module):
        raise ProgramFactoryError(
            f"the factory of program {name!r} returned {type(module).__name__}, not a dspy.Module"
        )
    return module


@dataclass(frozen=True)
class ProgramInterface:
    """What a program takes and returns, and its predictors (as its DSPy state names them)."""

    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]
    predictors: tuple[PredictorLayout, ...]
    flat: bool = False
    """The program is a bare ``dspy.Predict``: its DSPy state is its one predictor's."""
    python_types: Mapping[str, Any] = field(default_factory=dict)
    """The Python types of the inputs and outputs that are not plain JSON types (pydantic models, ...),
    by field name: inputs are converted to them, outputs dumped from them."""

    @property
    def instructions(self) -> str | None:
        return self.predictors[0].instructions if self.predictors else None


def _label(annotation: Any) -> str:
    try:
        from dspy.adapters.utils import get_annotation_name

        return str(get_annotation_name(annotation))
    except Exception:  # pragma: no cover - any annotation DSPy cannot name
        return re.sub(r"\b[\w.]+\.(\w+)", r"\1", repr(annotation))


def _json_schema(annotation: Any) -> str | None:
    try:
        import pydantic

        return json.dumps(pydantic.TypeAdapter(annotation).json_schema(), sort_keys=True)
    except Exception:
        return None


def type_of(annotation: Any) -> TypeSpec:
    """The spec layer's type for a Python annotation: a modelled type where one fits (``str``,
    ``list[int]``, ``Literal[...]``, ``dspy.History``), else ``json`` with the annotation's JSON schema."""
    import dspy

    scalars = {str: "str", int: "int", float: "float", bool: "bool"}
    if annotation in (None, inspect.Parameter.empty, Any):
        return TypeSpec("json")
    if annotation in scalars:
        return TypeSpec(scalars[annotation])  # type: ignore[arg-type]
    if annotation is dict:
        return TypeSpec("dict")
    if inspect.isclass(annotation) and issubclass(annotation, dspy.History):
        return TypeSpec("history")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal and args and all(isinstance(a, str | int | bool) for a in args):
        return TypeSpec("literal", values=tuple(args))
    if origin in (list, dict) and args:
        item = type_of(args[-1])
        keys_ok = origin is list or args[0] is str
        if keys_ok and item.kind in ("str", "int", "float", "bool", "literal"):
            return TypeSpec("list" if origin is list else "dict", item=item)
    return TypeSpec("json", label=_label(annotation), schema=_json_schema(annotation))


def _desc(info: Any, name: str) -> str | None:
    desc = (getattr(info, "json_schema_extra", None) or {}).get("desc")
    return desc if isinstance(desc, str) and desc and desc != f"${{{name}}}" else None


def _fields(fields: Mapping[str, Any], types_: dict[str, Any]) -> tuple[FieldSpec, ...]:
    specs = []
    for name, info in fields.items():
        spec = FieldSpec(name, type_of(info.annotation), _desc(info, name))
        if spec.type.kind == "json":
            types_[name] = info.annotation
        specs.append(spec)
    return tuple(specs)


def program_interface(module: Any) -> ProgramInterface:
    """The interface of a ``dspy.Module``: from its ``signature`` attribute when it has one (a
    ``dspy.Signature`` class or string); otherwise its inputs are ``forward``'s parameters (typed by their
    annotations, or by a predictor's input field of the same name) and its outputs are those of its last
    predictor (``named_predictors()`` order)."""
    import dspy
    from dspy.signatures.signature import ensure_signature

    named = module.named_predictors()
    predictors = tuple(
        PredictorLayout(
            name,
            tuple(p.signature.input_fields),
            tuple(p.signature.output_fields),
            p.signature.instructions or None,
        )
        for name, p in named
    )
    python_types: dict[str, Any] = {}
    declared = getattr(module, "signature", None)
    if isinstance(declared, str) or (inspect.isclass(declared) and issubclass(declared, dspy.Signature)):
        signature = ensure_signature(declared)
        inputs = _fields(signature.input_fields, python_types)
        outputs = _fields(signature.output_fields, python_types)
    else:
        outputs = _fields(named[-1][1].signature.output_fields, python_types) if named else ()
        inputs = _forward_inputs(module, named, python_types)
    return ProgramInterface(
        inputs[:MAX_FIELDS],
        outputs[:MAX_FIELDS],
        predictors,
        flat=isinstance(module, dspy.Predict),
        python_types=python_types,
    )


def _forward_inputs(
    module: Any, named: list[tuple[str, Any]], types_: dict[str, Any]
) -> tuple[FieldSpec, ...]:
    forward = getattr(type(module), "forward", None)  # not module.forward: DSPy warns on that access
    sig = _signature(forward) if forward is not None else None
    params = [
        p
        for p in (sig.parameters.values() if sig is not None else ())
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    ]
    if not params and named:  # forward(**kwargs): the first predictor's inputs
        return _fields(named[0][1].signature.input_fields, types_)
    try:
        hints = typing.get_type_hints(forward)
    except Exception:
        hints = {}
    predictor_fields = {n: f for _, p in named for n, f in p.signature.input_fields.items()}
    specs = []
    for p in params:
        annotation = hints.get(p.name, p.annotation)
        info = predictor_fields.get(p.name)
        if annotation is p.empty and info is not None:
            annotation = info.annotation
        type_ = type_of(annotation)
        if type_.kind == "json":
            types_[p.name] = annotation
        specs.append(
            FieldSpec(p.name, type_, _desc(info, p.name) if info else None, p.default is not p.empty)
        )
    return tuple(specs)


# -- descriptions -----------------------------------------------------------------------------------


def _doc(func: Any) -> str | None:
    doc = inspect.getdoc(func)
    return doc[:MAX_DESCRIPTION_CHARS] if doc else None


def describe_interface(interface: ProgramInterface) -> dict[str, Any]:
    return {
        "inputs": [f.describe() for f in interface.inputs],
        "outputs": [f.describe() for f in interface.outputs],
        "predictors": [p.describe() for p in interface.predictors],
        "instructions": interface.instructions,
    }


def describe_registry(registry: Registry) -> dict[str, Any]:
    """What ``program/available`` lists: each registered program (inputs, outputs, predictors; a
    factory that fails is listed with its ``error``), tool (description, JSON schema of its arguments)
    and metric (description). Instantiates each program once."""
    programs = []
    for name in sorted(registry.programs):
        entry: dict[str, Any] = {"name": name, "description": _doc(registry.programs[name])}
        try:
            entry.update(describe_interface(program_interface(instantiate(registry, name))))
        except ProgramFactoryError as exc:
            entry["error"] = exc.message
        programs.append(entry)
    tools = []
    for name in sorted(registry.tools):
        import dspy  # (only with tools to describe: an empty registry imports nothing)

        described = dspy.Tool(registry.tools[name], name=name)
        tools.append({"name": name, "description": _doc(registry.tools[name]), "args": described.args})
    metrics = [
        {"name": name, "description": _doc(registry.metrics[name])} for name in sorted(registry.metrics)
    ]
    return {"programs": programs, "tools": tools, "metrics": metrics, "modules": list(registry.modules)}
