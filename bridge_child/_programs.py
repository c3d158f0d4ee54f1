"""DSPy in the worker: programs and LMs. dspy is imported lazily, so importing ``bridge_child`` never
imports it.

The host owns every program spec and LM configuration; a worker only caches what it materialised:

- ``configure_lm {"lm": {...}}``: the worker's default LM configuration (``"offline"``, the embedded
  deterministic LM, when nothing is configured). A call's own ``"lm"`` wins over it. ``dspy.LM`` clients
  are built lazily, one per distinct configuration, and kept in ``worker.state["lms"]``.
- ``validate_program {"spec": {...}}``: parse and build a spec, and describe it (nothing is cached).
- ``execute {"program": ref, "inputs": {...}, "lm": optional}``: run a program, optionally streamed
  (``flags & STREAM``: its chunk and status events, ``bridge_child._streaming``); the result is every
  declared output as JSON by its declared type, then the entries the program ``include``s.
- ``get_state`` (DSPy's JSON state, as ``program.save("p.json")`` writes it), ``available`` (what the
  program modules registered), ``list_cached``, ``forget``, ``worker_lm``.

Specs, signatures, inputs and LM configurations are parsed and checked by the program-spec layer
(:mod:`bridge_child.spec`, no DSPy); ``bridge_child._builtins`` builds what they describe with DSPy, from
the operator's registered programs, tools and metrics (:mod:`bridge_child.registry`, loaded when the
worker started). A state is checked against the program's predictors before ``load_state`` (plain JSON,
no LM, no arbitrary attributes). Every call runs under its own ``dspy.context(lm=...)``:
``dspy.configure`` is never called.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from bridge_child import _lmcache, wire
from bridge_child._builtins import build_module
from bridge_child._cache import program_cache
from bridge_child._context import CallContext, Method, MethodError
from bridge_child._lmrules import redact, secrets_of
from bridge_child._streaming import run_streamed
from bridge_child._tools import ExecutionStopped, running
from bridge_child.registry import (
    ProgramInterface,
    describe_interface,
    describe_registry,
    program_interface,
)
from bridge_child.registry import current as current_registry
from bridge_child.spec import (
    OFFLINE,
    FieldSpec,
    InvalidState,
    ProgramSpec,
    SpecError,
    check_inputs,
    check_lm_config,
    check_state,
    describe_lm,
    parse_spec,
)

if TYPE_CHECKING:
    from bridge_child._server import Worker

MAX_CACHED_LMS: Final = 64
MAX_ERROR_MESSAGE_CHARS: Final = 8192

_lm_lock = threading.Lock()
_import_lock = threading.Lock()


def preload() -> None:
    """Import dspy and what it loads lazily, so a forked worker pays none of it on its first call.

    Safe before ``fork``: starts no thread, opens no cache and no network client, imports no litellm.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    import dspy

    from bridge_child import _lmguard

    _lmguard.install()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    for name in (
        "anyio._backends._trio",
        "anyio.from_thread",
        "dspy.clients.costs",
        "dspy.streaming",
        "bridge_child._offline_lm",
    ):
        try:
            __import__(name)
        except ImportError:  # pragma: no cover - optional pieces of other versions
            pass
    assert "litellm" not in sys.modules, "preloading dspy imported litellm"


def _import_dspy() -> Any:
    """Import dspy the way ``preload`` does (a worker started without ``--preload`` gets here first)."""
    if "dspy" not in sys.modules:
        with _import_lock:
            if "dspy" not in sys.modules:
                preload()
    import dspy

    return dspy


# -- LM configuration (checked by ``spec.check_lm_config``) ----------------------------------------


def _lm_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def lm_for(worker: Worker, config: dict[str, Any] | None) -> Any:
    """The ``dspy.LM`` for ``config`` (the offline LM when None), built once per configuration."""
    if config is None:
        config = {"model": OFFLINE}
    key = _lm_key(config)
    with _lm_lock:
        lms: dict[str, Any] = worker.state.setdefault("lms", {})
        lm = lms.get(key)
        if lm is not None:
            return lm
    lm = _build_lm(config, getattr(worker, "leases", None))  # stand-in workers in tests have none
    with _lm_lock:
        lms = worker.state.setdefault("lms", {})
        if len(lms) >= MAX_CACHED_LMS:
            lms.clear()
        return lms.setdefault(key, lm)


def _build_lm(config: dict[str, Any], leases: Any = None) -> Any:
    """A ``dspy.LM`` for ``config``; ``leases`` (the worker's, with ``--lease-lms``) makes every request
    of a network LM wait for the host's lease (``bridge_child._lmguard``)."""
    dspy = _import_dspy()
    if config.get("fallbacks"):  # a chain: each LM built as below, tried in order
        from bridge_child._lm_fallback import FallbackLM, lm_name

        chain = [{k: v for k, v in config.items() if k != "fallbacks"}, *config["fallbacks"]]
        return FallbackLM([(lm_name(c), _build_lm(c, leases)) for c in chain], secrets_of(config))
    settings = {k: v for k, v in config.items() if k != "model"}
    if config["model"] == OFFLINE:
        from bridge_child._offline_lm import offline_lm

        client_settings = {k: settings[k] for k in ("temperature", "max_tokens") if k in settings}
        return offline_lm(**client_settings)
    try:
        from bridge_child._lmguard import guarded_lm

        # Every network LM goes through the guarded transport: a cancel closes its requests'
        # connections (bridge_child._inflight), and with leases each request waits for the host's.
        return guarded_lm(dspy, config, leases)
    except Exception as exc:
        raise MethodError(
            wire.ErrorCode.INVALID_PARAMS,
            _redact(f"cannot build an LM for {config['model']!r}: {exc}", config),
            type="InvalidLMConfig",
        ) from exc


NO_KEY_ERROR: Final = "LMNotConfiguredError"
"""DSPy's error for an LM that has no key (its message tells a Python user to edit ``dspy.LM(...)``)."""


def no_key_message(model: str) -> str:
    """Where an LM's key comes from, for every kind of user (the worker cannot know which one asked)."""
    return (
        f"the LM {model!r} has no API key. Give it with the LM configuration: in Python "
        "configure_lm(..., api_key=...) (or open_pool(worker_env=['OPENAI_API_KEY']) to let workers read "
        "the variable); with dspex-trio serve or run: --lm-api-key-file PATH, DSPEX_LM_API_KEY or "
        "OPENAI_API_KEY; over the websocket: lm/configure with your api_key, or lm/select a server LM"
    )


def _redact(message: str, config: dict[str, Any] | None) -> str:
    """``message`` without the configuration's key, its base's password, secret-named environment
    values or bearer tokens (``bridge_child._lmrules``), cut to ``MAX_ERROR_MESSAGE_CHARS``."""
    message = redact(message, secrets_of(config))
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "... (truncated)"
    return message


def configure_lm(worker: Worker, ctx: CallContext) -> Any:
    config = check_lm_config(ctx.param("lm", (dict, str)))
    worker.state["lm_config"] = config
    return {"ok": True, "model": config["model"]}


def validate_lm(worker: Worker, ctx: CallContext) -> Any:
    """Check an LM configuration without installing it; describes it (never with its key)."""
    return describe_lm(check_lm_config(ctx.param("lm", (dict, str))))


def worker_lm(worker: Worker, ctx: CallContext) -> Any:
    return {**describe_lm(worker.state.get("lm_config")), "pid": os.getpid(), "worker_id": worker.worker_id}


# -- programs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """A materialised program: the dspy module, its spec, and its interface (inputs, outputs, predictors)."""

    spec: ProgramSpec
    module: Any
    interface: ProgramInterface

    @property
    def inputs(self) -> tuple[FieldSpec, ...]:
        return self.interface.inputs

    @property
    def outputs(self) -> tuple[FieldSpec, ...]:
        """Every output field the program returns (for a built-in, ``ProgramSpec.outputs``:
        ``reasoning`` first for chain_of_thought)."""
        return self.interface.outputs

    def describe(self) -> dict[str, Any]:
        return {
            "module": self.spec.module,
            **describe_interface(self.interface),
            **({"include": list(self.spec.include)} if self.spec.include else {}),
            **({"options": self.spec.options} if self.spec.options else {}),
        }


def _interface(parsed: ProgramSpec, module: Any) -> ProgramInterface:
    """A registered program's interface is read from its module; a built-in's comes from its spec (its
    predictors from the module); best_of_n/refine over a registered program take that program's."""
    found = program_interface(module)
    if parsed.registered:
        return found
    if parsed.signature is None:  # best_of_n / refine over a registered program
        base = program_interface(module.module)
        return ProgramInterface(base.inputs, base.outputs, found.predictors, python_types=base.python_types)
    return ProgramInterface(parsed.inputs, parsed.outputs, found.predictors, flat=found.flat)


def materialize(spec: dict[str, Any]) -> Program:
    """Build the dspy module a spec describes (the cache's ``materialize``)."""
    registry = current_registry()
    parsed = parse_spec(spec, registry.names())
    _import_dspy()
    module = build_module(parsed, registry)
    interface = _interface(parsed, module)
    if parsed.state is not None:
        _load_state(module, parsed.state, interface)
        interface = _interface(parsed, module)  # the state may change instructions
    return Program(parsed, module, interface)


def _load_state(module: Any, state: dict[str, Any], interface: ProgramInterface) -> None:
    """Load DSPy's JSON state into ``module``: checked against its predictors first, LM dropped."""
    clean = check_state(state, interface.predictors, flat=interface.flat)
    try:
        _apply_state(module, clean)
    except Exception as exc:
        raise InvalidState(f"cannot load the state: {type(exc).__name__}: {exc}") from exc


def _apply_state(module: Any, state: dict[str, Any]) -> None:
    """``module.load_state(state)``, without the trial run DSPy's ``BaseModule.load_state`` makes on a
    deep copy of the module first (so that a failure leaves the module untouched): the module was just
    built for this state and is dropped if loading fails. That trial run (a deep copy, and every
    predictor's signature rebuilt once more) was about half of materialising a program with a state,
    which a compile job does for every teacher and candidate in every worker. Each parameter loads
    its own state as DSPy's loop does; a module class with its own ``load_state`` keeps it."""
    dspy = _import_dspy()
    if type(module).load_state is not dspy.BaseModule.load_state:
        module.load_state(state)
        return
    for name, param in module.named_parameters():
        param.load_state(state[name])


def dump_state(module: Any) -> dict[str, Any]:
    """The module's state in DSPy's JSON format, with the ``metadata`` ``save()`` writes (so the file
    loads with ``program.load("p.json")``)."""
    from dspy.utils.saving import get_dependency_versions

    state = plain(module.dump_state())
    state["metadata"] = {"dependency_versions": get_dependency_versions()}
    return state


def resolve(worker: Worker, ctx: CallContext) -> Program:
    _program_id, program = program_cache(worker).resolve(ctx, materialize)
    if not isinstance(program, Program):  # pragma: no cover - another method cached something else
        raise MethodError(wire.ErrorCode.INTERNAL, "cached object is not a program", type="InternalError")
    return program


def validate_program(worker: Worker, ctx: CallContext) -> Any:
    return materialize(ctx.param("spec", dict)).describe()


def get_state(worker: Worker, ctx: CallContext) -> Any:
    return dump_state(resolve(worker, ctx).module)


def available(worker: Worker, ctx: CallContext) -> Any:
    """What the operator's program modules registered (``program/available``), described once per worker."""
    described = worker.state.get("available")
    if described is None:
        _import_dspy()
        described = worker.state["available"] = describe_registry(current_registry())
    return described


def list_cached(worker: Worker, ctx: CallContext) -> Any:
    return {"programs": program_cache(worker).snapshot()}


def forget(worker: Worker, ctx: CallContext) -> Any:
    return {"forgotten": program_cache(worker).forget(ctx.param("program_id", str))}


# -- execute ----------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """JSON-shaped data (what the wire carries) from whatever DSPy returned (pydantic models as their
    JSON objects, predictions and examples as theirs)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        try:
            return plain(model_dump(mode="json"))
        except Exception:  # a model that cannot be dumped as JSON: its repr, like any other object
            return str(value)
    to_dict = getattr(value, "toDict", None)
    if callable(to_dict):
        return plain(to_dict())
    return str(value)


def _output_value(f: FieldSpec, value: Any) -> Any:
    value = plain(value)
    if f.type.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_adapters: dict[Any, Any] = {}


def _validator(annotation: Any) -> Any:
    """pydantic's ``TypeAdapter`` for ``annotation`` (built once per type: building one costs ~1 ms)."""
    adapter = _adapters.get(annotation)
    if adapter is None:
        import pydantic

        adapter = _adapters[annotation] = pydantic.TypeAdapter(annotation)
    return adapter


def _arguments(program: Program, inputs: dict[str, Any]) -> dict[str, Any]:
    """The module's keyword arguments from checked JSON inputs: a ``History`` from its list of turns, a
    pydantic model (or any other declared Python type) validated from its JSON."""
    kwargs = dict(inputs)
    python_types = program.interface.python_types
    for f in program.inputs:
        if f.name not in kwargs:
            continue
        if f.type.kind == "history":
            import dspy

            kwargs[f.name] = dspy.History(messages=kwargs[f.name])
        elif f.name in python_types:
            try:
                kwargs[f.name] = _validator(python_types[f.name]).validate_python(kwargs[f.name])
            except Exception as exc:
                first = str(exc).splitlines()
                raise SpecError(
                    f"execute: input {f.name!r} is not a valid {f.type.render()}: "
                    f"{' '.join(first[:3])[:MAX_ERROR_MESSAGE_CHARS]}"
                ) from None
    return kwargs


def _outputs(program: Program, prediction: Any) -> dict[str, Any]:
    """Every declared output of the prediction, as JSON by its declared type, then the ``include``d
    entries (a prediction's other fields, or its public attributes) that the program asked for."""
    get = getattr(prediction, "get", None)
    if not callable(get):
        raise MethodError(
            wire.ErrorCode.PROGRAM_ERROR,
            f"the program returned a {type(prediction).__name__}, not a dspy.Prediction",
            type="InvalidPrediction",
        )
    outputs = {f.name: _output_value(f, get(f.name)) for f in program.outputs}
    for name in program.spec.include:
        value = get(name)
        if value is None and not name.startswith("_"):
            attribute = getattr(prediction, name, None)
            value = None if callable(attribute) else attribute
        outputs[name] = plain(value)
    return outputs


def _usage(prediction: Any) -> dict[str, Any] | None:
    get = getattr(prediction, "get_lm_usage", None)
    usage = get() if callable(get) else None
    if not usage:
        return None
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for per_model in usage.values():
        for key in totals:
            n = (per_model or {}).get(key)
            if isinstance(n, int):
                totals[key] += n
    return {**totals, "by_model": plain(usage)}


def execute(worker: Worker, ctx: CallContext) -> Any:
    program = resolve(worker, ctx)
    inputs = ctx.param("inputs", dict)
    check_inputs(program.inputs, inputs)
    kwargs = _arguments(program, inputs)
    raw_lm = ctx.param("lm", (dict, str), None)
    lm_config: dict[str, Any] | None
    if raw_lm is not None:
        lm_config = check_lm_config(raw_lm)
    elif ctx.captured is not None:  # the worker's LM when the call was read
        lm_config = ctx.captured["worker_lm"]
    else:
        lm_config = worker.state.get("lm_config")
    lm = lm_for(worker, lm_config)
    dspy = _import_dspy()
    from bridge_child._lmguard import current_call

    settings = {"lm": lm, "adapter": dspy.ChatAdapter(), "track_usage": True, "disable_history": True}
    recorder = _recorder(ctx)
    if recorder is not None:
        settings["callbacks"] = [recorder.dspy_callback()]
    from bridge_child._lm_fallback import annotate, recording

    mode = _lmcache.call_mode(ctx)
    with (
        current_call(ctx) as call,
        running(ctx),
        recording() as answered,
        _lmcache.scope(mode, ctx, coalesce=not ctx.stream) as hits,
    ):
        try:
            with dspy.context(**settings), _traced(recorder):
                prediction = (
                    run_streamed(ctx, program.module, kwargs, plain)
                    if ctx.stream
                    else program.module(**kwargs)
                )
        except MethodError as exc:
            raise _with_spans(exc, recorder)
        except ExecutionStopped as exc:  # a tool outlived the execution's cancel or deadline
            code = wire.ErrorCode.TIMEOUT if exc.reason == "deadline" else wire.ErrorCode.CANCELLED
            raise _with_spans(MethodError(code, str(exc), type="ExecutionStopped"), recorder) from None
        except Exception as exc:
            cause = call.refusal or exc  # a guard's refusal is named as itself, not LMUnexpectedError
            message = str(cause) or type(cause).__name__
            if (
                type(cause).__name__ == NO_KEY_ERROR
            ):  # DSPy's text speaks of dspy.LM(...): say where a key goes
                message = no_key_message((lm_config or {}).get("model", ""))
            error = MethodError(
                wire.ErrorCode.PROGRAM_ERROR, _redact(message, lm_config), type=type(cause).__name__
            )
            raise _with_spans(error, recorder) from exc
    if ctx.cancelled.is_set():  # its terminal frame was already sent
        return None
    try:
        usage = _lmcache.with_hits(annotate(_usage(prediction), answered), hits)
        answer = {"outputs": _outputs(program, prediction), "usage": usage}
    except MethodError as exc:
        raise _with_spans(exc, recorder)
    if recorder is not None:
        answer["trace_spans"] = recorder.finished()
    return answer


def _recorder(ctx: CallContext) -> Any:
    """A span recorder for a traced call (``bridge_child/_tracing.py``), else None."""
    if not ctx.trace:
        return None
    from bridge_child._tracing import SpanRecorder, parse_traceparent_untrusted

    parsed = parse_traceparent_untrusted(ctx.trace)
    return None if parsed is None else SpanRecorder(*parsed)


def _with_spans(error: MethodError, recorder: Any) -> MethodError:
    """``error`` carrying the spans of its traced call (``recorder``) in its details' ``trace_spans``:
    the host exports them and takes them out before the error reaches the caller."""
    if recorder is not None and (error.details is None or isinstance(error.details, dict)):
        error.details = {**(error.details or {}), "trace_spans": recorder.finished()}
    return error


def _traced(recorder: Any) -> Any:
    if recorder is None:
        return contextlib.nullcontext()
    return recorder.span("dspex.worker execute", **{"dspex.worker.pid": os.getpid()})


async def aexecute(worker: Worker, ctx: CallContext) -> Any:
    """``execute`` on the worker's asynchronous lane (``bridge_child._aio``): DSPy's ``acall``, with the
    LM's async client, on the worker's event loop; no thread is held while the LM answers. A module
    without an async form of its own (a custom module's ``forward``) runs in a thread, as ``execute``."""
    program = resolve(worker, ctx)
    dspy = _import_dspy()
    if getattr(type(program.module), "aforward", None) is None:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(worker.executor, execute, worker, ctx)
    inputs = ctx.param("inputs", dict)
    check_inputs(program.inputs, inputs)
    kwargs = _arguments(program, inputs)
    raw_lm = ctx.param("lm", (dict, str), None)
    lm_config: dict[str, Any] | None
    if raw_lm is not None:
        lm_config = check_lm_config(raw_lm)
    elif ctx.captured is not None:
        lm_config = ctx.captured["worker_lm"]
    else:
        lm_config = worker.state.get("lm_config")
    lm = lm_for(worker, lm_config)
    from bridge_child._lmguard import current_call

    settings = {"lm": lm, "adapter": dspy.ChatAdapter(), "track_usage": True, "disable_history": True}
    recorder = _recorder(ctx)  # one per call: its span stack is this execution's alone on the loop
    if recorder is not None:
        settings["callbacks"] = [recorder.dspy_callback()]
    from bridge_child._lm_fallback import annotate, recording

    mode = _lmcache.call_mode(ctx)
    with (
        current_call(ctx) as call,
        recording() as answered,
        _lmcache.scope(mode, ctx, coalesce=True, on_loop=True) as hits,
    ):
        try:
            with dspy.context(**settings), _traced(recorder):
                prediction = await program.module.acall(**kwargs)
        except MethodError as exc:
            raise _with_spans(exc, recorder)
        except Exception as exc:
            cause = call.refusal or exc
            message = str(cause) or type(cause).__name__
            if type(cause).__name__ == NO_KEY_ERROR:
                message = no_key_message((lm_config or {}).get("model", ""))
            error = MethodError(
                wire.ErrorCode.PROGRAM_ERROR, _redact(message, lm_config), type=type(cause).__name__
            )
            raise _with_spans(error, recorder) from exc
    try:
        usage = _lmcache.with_hits(annotate(_usage(prediction), answered), hits)
        answer = {"outputs": _outputs(program, prediction), "usage": usage}
    except MethodError as exc:
        raise _with_spans(exc, recorder)
    if recorder is not None:
        answer["trace_spans"] = recorder.finished()
    return answer


def on_aio_lane(worker: Worker, ctx: CallContext) -> bool:
    """An execution runs on the asynchronous lane (when the worker has one) when it waits on a network
    LM: not streamed (streams keep their own path) and no tools (they may block). Called after
    ``on_cpu_lane``."""
    params = ctx.params if isinstance(ctx.params, dict) else {}
    if ctx.stream:
        return False
    captured = ctx.captured or {}
    config = params.get("lm") or captured.get("worker_lm") or OFFLINE
    if (config if isinstance(config, str) else config.get("model")) == OFFLINE:
        return False
    return not program_cache(worker).uses_tools(params.get("program"))


def on_cpu_lane(worker: Worker, ctx: CallContext) -> bool:
    """An execution is CPU-bound when its LM is the in-process offline LM (no I/O to wait on): it runs
    on the worker's CPU lane. Executions with a real LM wait on the network and run in the pool, and so
    do those of ``react`` programs, whose tools may wait on anything.
    Called when the call is read: the worker's LM configuration then is the one the call runs with."""
    params = ctx.params if isinstance(ctx.params, dict) else {}
    ctx.captured = {"worker_lm": worker.state.get("lm_config")}
    config = params.get("lm") or ctx.captured["worker_lm"] or OFFLINE
    if (config if isinstance(config, str) else config.get("model")) != OFFLINE:
        return False
    return not program_cache(worker).uses_tools(params.get("program"))


METHODS: Final = {
    "configure_lm": Method(configure_lm, inline=True),
    "worker_lm": Method(worker_lm, inline=True),
    "validate_lm": Method(validate_lm, inline=True),
    "validate_program": Method(validate_program),
    "execute": Method(execute, lane=on_cpu_lane, aio=aexecute, on_aio=on_aio_lane),
    "get_state": Method(get_state),
    "available": Method(available),
    "list_cached": Method(list_cached, inline=True),
    "forget": Method(forget, inline=True),
}
"""The DSPy methods (programs, LMs), for the worker's registry (``_methods.build_registry``)."""
