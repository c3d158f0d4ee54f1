"""DSPy in the worker: programs and LMs. dspy is imported lazily, so importing ``bridge_child`` never
imports it.

The host owns every program spec and LM configuration; a worker only caches what it materialised:

- ``configure_lm {"lm": {...}}``: the worker's default LM configuration (``"offline"``, the embedded
  deterministic LM, when nothing is configured). A call's own ``"lm"`` wins over it. ``dspy.LM`` clients
  are built lazily, one per distinct configuration, and kept in ``worker.state["lms"]``.
- ``validate_program {"spec": {...}}``: parse and build a spec, and describe it (nothing is cached).
- ``execute {"program": ref, "inputs": {...}, "lm": optional}``: run a program, optionally streamed
  (``flags & STREAM``: one ``{"field", "chunk"}`` event per chunk of each ``str`` output field).
- ``get_state``, ``list_cached``, ``forget``, ``worker_lm``.

A spec is ``{"signature": str | {"inputs", "outputs", "instructions"}, "module": "predict" |
"chain_of_thought", "instructions": str?, "state": dump_state() dict?}``. Signatures are parsed without
``eval`` (``bridge_child._signatures``); state is sanitised before ``load_state`` (no LM, no arbitrary
attributes). Every call runs under its own ``dspy.context(lm=...)``: ``dspy.configure`` is never called.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from bridge_child import wire
from bridge_child._context import CallContext, MethodError, invalid_params
from bridge_child._signatures import STR, FieldSpec, InvalidSignature, SignatureSpec, parse_signature

if TYPE_CHECKING:
    from bridge_child._methods import Method
    from bridge_child._server import Worker

OFFLINE: Final = "offline"
"""The model name of the embedded deterministic LM (the default)."""
MODULES: Final = {
    "predict": "predict",
    "chain_of_thought": "chain_of_thought",
    "chainofthought": "chain_of_thought",
    "cot": "chain_of_thought",
}
SPEC_KEYS: Final = frozenset({"signature", "module", "instructions", "state", "name", "description"})
LM_KEYS: Final = {
    "model": (str,),
    "api_base": (str, type(None)),
    "api_key": (str, type(None)),
    "num_retries": (int,),
    "timeout": (int, float, type(None)),
    "temperature": (int, float, type(None)),
    "max_tokens": (int, type(None)),
}
MAX_CACHED_LMS: Final = 64
MAX_ERROR_MESSAGE_CHARS: Final = 8192
MAX_DEMOS: Final = 1000

_lm_lock = threading.Lock()
_import_lock = threading.Lock()


def preload() -> None:
    """Import dspy and what it loads lazily, so a forked worker pays none of it on its first call.

    Safe before ``fork``: starts no thread, opens no cache and no network client, imports no litellm.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    import dspy

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


# -- LM configuration -------------------------------------------------------------------------------


def check_lm_config(raw: Any, where: str = "lm") -> dict[str, Any]:
    """A validated LM configuration (``{"model": ...}`` plus client settings). Never echoes the key."""
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise invalid_params(f"{where} must be an object {{'model': ..., ...}}")
    unknown = sorted(set(raw) - set(LM_KEYS))
    if unknown:
        raise invalid_params(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(LM_KEYS)}"
        )
    for key, kinds in LM_KEYS.items():
        if key in raw and (not isinstance(raw[key], kinds) or isinstance(raw[key], bool)):
            raise invalid_params(f"{where}: {key!r} has the wrong type ({type(raw[key]).__name__})")
    model = raw.get("model")
    if not model:
        raise invalid_params(f"{where}: 'model' is required")
    if model != OFFLINE and "/" not in model:
        raise invalid_params(
            f"{where}: model must be 'offline' or 'provider/name', e.g. 'openai/gpt-4o-mini'"
        )
    return {k: v for k, v in raw.items() if v is not None}


def describe_lm(config: dict[str, Any] | None) -> dict[str, Any]:
    """What an LM configuration is, without its key."""
    config = config or {"model": OFFLINE}
    out = {k: v for k, v in config.items() if k != "api_key"}
    out["has_api_key"] = "api_key" in config
    return out


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
    lm = _build_lm(config)
    with _lm_lock:
        lms = worker.state.setdefault("lms", {})
        if len(lms) >= MAX_CACHED_LMS:
            lms.clear()
        return lms.setdefault(key, lm)


def _build_lm(config: dict[str, Any]) -> Any:
    dspy = _import_dspy()
    settings = {k: v for k, v in config.items() if k != "model"}
    if config["model"] == OFFLINE:
        from bridge_child._offline_lm import offline_lm

        client_settings = {k: settings[k] for k in ("temperature", "max_tokens") if k in settings}
        return offline_lm(**client_settings)
    try:
        return dspy.LM(config["model"], engine="lm15", cache=False, **settings)
    except Exception as exc:
        raise MethodError(
            wire.ErrorCode.INVALID_PARAMS,
            _redact(f"cannot build an LM for {config['model']!r}: {exc}", config),
            type="InvalidLMConfig",
        ) from exc


def _redact(message: str, config: dict[str, Any] | None) -> str:
    key = (config or {}).get("api_key")
    if key and len(key) >= 4:
        message = message.replace(key, "***")
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
class ProgramSpec:
    signature: SignatureSpec
    module: str
    state: dict[str, Any] | None = None


@dataclass(frozen=True)
class Program:
    """A materialised program: the dspy module, and its fields as the spec declared them."""

    spec: ProgramSpec
    module: Any
    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]
    """Every output field the module produces (``reasoning`` first for chain_of_thought)."""

    def describe(self) -> dict[str, Any]:
        predictors = self.module.predictors()
        instructions = predictors[0].signature.instructions if predictors else None
        return {
            "module": self.spec.module,
            "inputs": [f.describe() for f in self.inputs],
            "outputs": [f.describe() for f in self.outputs],
            "instructions": instructions,
        }


def parse_spec(spec: Any) -> ProgramSpec:
    if not isinstance(spec, dict):
        raise InvalidSignature(f"a program spec must be an object, not {type(spec).__name__}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise InvalidSignature(
            f"unknown key(s) in program spec: {', '.join(map(str, unknown))}; known: {', '.join(sorted(SPEC_KEYS))}"
        )
    if "signature" not in spec:
        raise InvalidSignature("a program spec needs a 'signature'")
    instructions = spec.get("instructions")
    signature = parse_signature(spec["signature"], instructions)
    module_name = spec.get("module", "predict")
    if not isinstance(module_name, str) or module_name.lower().replace("-", "_") not in MODULES:
        raise InvalidSignature(f"unknown module {module_name!r}; use 'predict' or 'chain_of_thought'")
    module = MODULES[module_name.lower().replace("-", "_")]
    state = spec.get("state")
    if state is not None and not isinstance(state, dict):
        raise InvalidSignature("a program's 'state' must be an object (as dump_state() returns)")
    return ProgramSpec(signature, module, state or None)


def materialize(spec: dict[str, Any]) -> Program:
    """Build the dspy module a spec describes (the cache's ``materialize``)."""
    from bridge_child._signatures import build_signature

    parsed = parse_spec(spec)
    dspy = _import_dspy()
    signature = build_signature(parsed.signature)
    outputs = parsed.signature.outputs
    if parsed.module == "chain_of_thought":
        module = dspy.ChainOfThought(signature)
        if not any(f.name == "reasoning" for f in outputs):
            outputs = (FieldSpec("reasoning", STR), *outputs)
        else:  # ChainOfThought keeps a declared reasoning field, moved first
            outputs = (
                *(f for f in outputs if f.name == "reasoning"),
                *(f for f in outputs if f.name != "reasoning"),
            )
    else:
        module = dspy.Predict(signature)
    if parsed.state is not None:
        _load_state(module, parsed.state, parsed.module)
    return Program(parsed, module, parsed.signature.inputs, outputs)


def _invalid_state(message: str) -> MethodError:
    return MethodError(wire.ErrorCode.INVALID_PARAMS, message, type="InvalidState")


def _sanitize_predictor_state(state: Any, where: str) -> dict[str, Any]:
    """Only demos and signature text (instructions, prefixes, descriptions); never an LM."""
    if not isinstance(state, dict):
        raise _invalid_state(f"state of {where} must be an object")
    unknown = sorted(set(state) - {"demos", "signature", "traces", "train", "lm"})
    if unknown:
        raise _invalid_state(f"state of {where}: unsupported key(s) {', '.join(map(str, unknown))}")
    if state.get("lm") is not None:
        raise _invalid_state(f"state of {where}: 'lm' must be null (LMs are configured with configure_lm)")
    demos = state.get("demos", [])
    if not isinstance(demos, list) or len(demos) > MAX_DEMOS:
        raise _invalid_state(f"state of {where}: demos must be a list of at most {MAX_DEMOS} objects")
    for demo in demos:
        if not isinstance(demo, dict) or not all(isinstance(k, str) for k in demo):
            raise _invalid_state(f"state of {where}: each demo must be an object with string keys")
    signature = state.get("signature")
    if not isinstance(signature, dict):
        raise _invalid_state(f"state of {where}: 'signature' must be an object")
    instructions = signature.get("instructions")
    fields = signature.get("fields", [])
    if not isinstance(instructions, str) or not isinstance(fields, list):
        raise _invalid_state(f"state of {where}: signature needs 'instructions' (str) and 'fields' (list)")
    clean_fields = []
    for f in fields:
        if not (
            isinstance(f, dict) and isinstance(f.get("prefix"), str) and isinstance(f.get("description"), str)
        ):
            raise _invalid_state(f"state of {where}: each signature field needs 'prefix' and 'description'")
        clean_fields.append({"prefix": f["prefix"], "description": f["description"]})
    return {
        "traces": [],
        "train": [],
        "demos": demos,
        "signature": {"instructions": instructions, "fields": clean_fields},
        "lm": None,
    }


def _load_state(module: Any, state: dict[str, Any], kind: str) -> None:
    if kind == "predict":
        clean: dict[str, Any] = _sanitize_predictor_state(state, "predict")
    else:
        names = [name for name, _ in module.named_predictors()]
        unknown = sorted(set(state) - set(names))
        if unknown or not set(names) <= set(state):
            raise _invalid_state(
                f"state must have exactly the predictor key(s) {names} (as dump_state() gives)"
            )
        clean = {name: _sanitize_predictor_state(state[name], name) for name in names}
    try:
        module.load_state(clean)
    except Exception as exc:
        raise _invalid_state(f"cannot load state: {type(exc).__name__}: {exc}") from exc


def program_cache(worker: Worker) -> Any:
    from bridge_child._methods import program_cache as cache

    return cache(worker)


def resolve(worker: Worker, ctx: CallContext) -> Program:
    _program_id, program = program_cache(worker).resolve(ctx, materialize)
    if not isinstance(program, Program):  # pragma: no cover - another method cached something else
        raise MethodError(wire.ErrorCode.INTERNAL, "cached object is not a program", type="InternalError")
    return program


def validate_program(worker: Worker, ctx: CallContext) -> Any:
    return materialize(ctx.param("spec", dict)).describe()


def get_state(worker: Worker, ctx: CallContext) -> Any:
    return plain(resolve(worker, ctx).module.dump_state())


def list_cached(worker: Worker, ctx: CallContext) -> Any:
    return {"programs": program_cache(worker).snapshot()}


def forget(worker: Worker, ctx: CallContext) -> Any:
    return {"forgotten": program_cache(worker).forget(ctx.param("program_id", str))}


# -- execute ----------------------------------------------------------------------------------------


def check_inputs(program: Program, inputs: dict[str, Any]) -> None:
    names = [f.name for f in program.inputs]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise invalid_params(f"execute: missing input field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise invalid_params(
            f"execute: unknown input field(s) {', '.join(map(repr, unknown))}; inputs are {', '.join(names)}"
        )
    for f in program.inputs:
        if not f.type.accepts(inputs[f.name]):
            raise invalid_params(
                f"execute: input {f.name!r} must be {f.type.render()}, not {type(inputs[f.name]).__name__}"
            )


def plain(value: Any) -> Any:
    """JSON-shaped data (what the wire carries) from whatever DSPy returned."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    dump = getattr(value, "model_dump", None) or getattr(value, "toDict", None)
    if callable(dump):
        return plain(dump())
    return str(value)


def _output_value(f: FieldSpec, value: Any) -> Any:
    value = plain(value)
    if f.type.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


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
    check_inputs(program, inputs)
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
    try:
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter(), track_usage=True, disable_history=True):
            prediction = _run_streamed(ctx, program, inputs) if ctx.stream else program.module(**inputs)
    except MethodError:
        raise
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        raise MethodError(
            wire.ErrorCode.PROGRAM_ERROR,
            _redact(message, lm_config),
            type=type(exc).__name__,
        ) from exc
    if prediction is None:  # cancelled while streaming: the terminal frame was already sent
        return None
    outputs = {f.name: _output_value(f, prediction.get(f.name)) for f in program.outputs}
    return {"outputs": outputs, "usage": _usage(prediction)}


def on_cpu_lane(worker: Worker, ctx: CallContext) -> bool:
    """An execution is CPU-bound when its LM is the in-process offline LM (no I/O to wait on): it runs
    on the worker's CPU lane. Executions with a real LM wait on the network and run in the pool.
    Called when the call is read: the worker's LM configuration then is the one the call runs with."""
    params = ctx.params if isinstance(ctx.params, dict) else {}
    ctx.captured = {"worker_lm": worker.state.get("lm_config")}
    config = params.get("lm") or ctx.captured["worker_lm"] or OFFLINE
    return (config if isinstance(config, str) else config.get("model")) == OFFLINE


def _run_streamed(ctx: CallContext, program: Program, inputs: dict[str, Any]) -> Any:
    """Run under ``dspy.streamify`` in this thread's own asyncio loop, emitting chunks as they come."""
    import asyncio

    dspy = _import_dspy()
    from dspy.streaming import StreamListener, StreamResponse

    listeners = [StreamListener(signature_field_name=f.name) for f in program.outputs if f.type.kind == "str"]
    streamed = dspy.streamify(program.module, stream_listeners=listeners, is_async_program=True)

    async def consume() -> Any:
        final = None
        stream = streamed(**inputs)
        try:
            async for item in stream:
                if ctx.cancelled.is_set():
                    return None
                if isinstance(item, StreamResponse):
                    if item.chunk:
                        ctx.emit({"field": item.signature_field_name, "chunk": item.chunk})
                elif isinstance(item, dspy.Prediction):
                    final = item
        finally:
            await stream.aclose()
        return final

    return asyncio.run(consume())


def methods() -> dict[str, Method]:
    """The DSPy methods (programs, LMs), for the worker's registry."""
    from bridge_child._methods import Method

    return {
        "configure_lm": Method(configure_lm, inline=True),
        "worker_lm": Method(worker_lm, inline=True),
        "validate_lm": Method(validate_lm, inline=True),
        "validate_program": Method(validate_program),
        "execute": Method(execute, lane=on_cpu_lane),
        "get_state": Method(get_state),
        "list_cached": Method(list_cached, inline=True),
        "forget": Method(forget, inline=True),
    }


def __getattr__(name: str) -> Any:
    """``METHODS`` is built on first access: ``_methods`` (which defines ``Method``) imports this module
    before it defines ``Method``, so the table cannot be built at import time (PEP 562)."""
    if name == "METHODS":
        table = globals()["METHODS"] = methods()
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
