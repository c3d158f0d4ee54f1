"""One example of an evaluation or optimization job, in the worker: run the program, score it with a
metric the operator registered (``METRICS``). The host spreads a job's examples over the workers as
idempotent calls of these methods; no code crosses the wire, only the metric's name and the data.

- ``score_examples {"program": ref, "examples": [{"inputs", "labels"}, ...], "metric": name, "lm":
  optional}``: what ``dspy.Evaluate``'s ``process_item`` does, for each example in turn: ``prediction =
  program(**inputs)``, ``score = metric(example, prediction)``. The answer is ``{"results": [...]}``,
  each ``{"outputs", "score"}`` or, when the program or the metric raised, ``{"error": {"type",
  "message", "stage"}}`` (``stage``: ``program`` or ``metric``): the host counts it as DSPy counts a
  failed example. (The host sends several examples per call when they are CPU-bound: one worker runs
  them one after another anyway, and the call's fixed cost is paid once.)
- ``bootstrap_example {... "round": int, "threshold": number | null}``: what ``BootstrapFewShot``'s
  ``_bootstrap_one_example`` does for one example with the program as its teacher: run it under a
  trace, score it with ``metric(example, prediction, trace)``, and, when it passes, each predictor's
  demos from the trace (DSPy's own sampling when a predictor ran more than once). The answer is
  ``{"success": bool, "demos": {predictor name: [demo, ...]}}``.

The example is a ``dspy.Example`` of the inputs and labels, with the inputs as its input keys, as
``dspy.Evaluate`` and the optimizers receive it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from bridge_child import wire
from bridge_child._context import CallContext, Method, MethodError, invalid_params
from bridge_child._programs import (
    Program,
    _arguments,
    _import_dspy,
    _outputs,
    _redact,
    lm_for,
    on_cpu_lane,
    plain,
    resolve,
)
from bridge_child.registry import current as current_registry
from bridge_child.spec import SpecError, check_inputs, check_lm_config

if TYPE_CHECKING:
    from bridge_child._server import Worker


STAGE_PROGRAM: Final = "program"
STAGE_METRIC: Final = "metric"


def _metric(name: str) -> Any:
    metrics = current_registry().metrics
    found = metrics.get(name)
    if found is None:
        known = ", ".join(sorted(metrics)) or "none"
        raise invalid_params(f"unknown metric {name!r}; registered metrics: {known}")
    return found


def _example(ctx: CallContext, program: Program, raw: Any) -> tuple[Any, dict[str, Any]]:
    """An example as a ``dspy.Example`` (inputs, then labels; the inputs its input keys) and the
    program's keyword arguments. An example the program cannot take is ``InvalidParams``."""
    if not isinstance(raw, dict):
        raise invalid_params(f"{ctx.method}: an example must be {{'inputs': {{...}}, 'labels': {{...}}}}")
    inputs = raw.get("inputs")
    labels = raw.get("labels", {})
    if not isinstance(inputs, dict) or not isinstance(labels, dict):
        raise invalid_params(f"{ctx.method}: example must be {{'inputs': {{...}}, 'labels': {{...}}}}")
    check_inputs(program.inputs, inputs)
    dspy = _import_dspy()
    example = dspy.Example(**inputs, **labels).with_inputs(*inputs)
    return example, _arguments(program, inputs)


def _lm(worker: Worker, ctx: CallContext) -> tuple[Any, dict[str, Any] | None]:
    raw_lm = ctx.param("lm", (dict, str), None)
    config: dict[str, Any] | None
    if raw_lm is not None:
        config = check_lm_config(raw_lm)
    elif ctx.captured is not None:
        config = ctx.captured["worker_lm"]
    else:
        config = worker.state.get("lm_config")
    return lm_for(worker, config), config


def _error(stage: str, exc: BaseException, config: dict[str, Any] | None) -> dict[str, Any]:
    """A failed example's error, as data (the message without the LM's secrets)."""
    return {
        "type": type(exc).__name__,
        "message": _redact(str(exc) or type(exc).__name__, config),
        "stage": stage,
    }


def _failed(stage: str, exc: BaseException, config: dict[str, Any] | None) -> MethodError:
    error = _error(stage, exc, config)
    return MethodError(
        wire.ErrorCode.PROGRAM_ERROR, error["message"], type=error["type"], details={"stage": stage}
    )


def _score_value(score: Any) -> Any:
    """A metric's value as JSON: a bool, int or float as it is (DSPy sums them as they are); any other
    number as its float."""
    if isinstance(score, bool | int | float):
        return plain(score) if isinstance(score, float) else score
    return float(score)


MAX_BATCH: Final = 64
"""Most examples of one ``score_examples`` call."""


def _score(
    ctx: CallContext, program: Program, metric: Any, raw: Any, lm: Any, config: dict[str, Any] | None
) -> dict[str, Any]:
    """One example, as ``dspy.Evaluate``'s ``process_item``: ``{"outputs", "score"}``, or ``{"error":
    {"type", "message", "stage"}}`` when the program or the metric raised."""
    try:
        example, kwargs = _example(ctx, program, raw)
    except SpecError as exc:
        raise invalid_params(str(exc)) from None
    dspy = _import_dspy()
    from bridge_child._lmguard import current_call

    settings = {"lm": lm, "adapter": dspy.ChatAdapter(), "disable_history": True}
    with current_call(ctx) as call:
        try:
            with dspy.context(**settings):
                prediction = program.module(**kwargs)
        except Exception as exc:
            return {"error": _error(STAGE_PROGRAM, call.refusal or exc, config)}
    try:
        score = _score_value(metric(example, prediction))
    except Exception as exc:
        return {"error": _error(STAGE_METRIC, exc, config)}
    return {"outputs": _outputs(program, prediction), "score": score}


def score_examples(worker: Worker, ctx: CallContext) -> Any:
    """``{"results": [...]}``: each example of ``examples`` scored in turn (:func:`_score`), stopping
    early when the call is cancelled."""
    program = resolve(worker, ctx)
    metric = _metric(ctx.param("metric", str))
    examples = ctx.param("examples", list)
    if not 1 <= len(examples) <= MAX_BATCH:
        raise invalid_params(f"score_examples: 1 to {MAX_BATCH} examples per call")
    lm, config = _lm(worker, ctx)
    results = []
    for raw in examples:
        if ctx.cancelled.is_set():
            return None
        results.append(_score(ctx, program, metric, raw, lm, config))
    return {"results": results}


def _passes(value: Any, threshold: Any) -> bool:
    """BootstrapFewShot's test of a metric value: truthy, or at least the threshold when one is set
    (as DSPy: a threshold of 0 is no threshold)."""
    return bool(value >= threshold) if threshold else bool(value)


def _store(demo: Any) -> Any:
    """A demo's fields: a loaded state's demos are dicts, DSPy's own are ``dspy.Example``s."""
    return getattr(demo, "_store", demo)


def bootstrap_example(worker: Worker, ctx: CallContext) -> Any:
    """One example of ``BootstrapFewShot._bootstrap_one_example`` with the program as the teacher."""
    program = resolve(worker, ctx)
    metric = _metric(ctx.param("metric", str))
    round_idx = ctx.param("round", int, 0)
    threshold = ctx.param("threshold", (int, float), None)
    try:
        example, kwargs = _example(ctx, program, ctx.param("example", dict))
    except SpecError as exc:
        raise invalid_params(str(exc)) from None
    lm, config = _lm(worker, ctx)
    dspy = _import_dspy()
    from bridge_child._lmguard import current_call

    teacher = program.module
    kept = {
        name: [demo for demo in predictor.demos if _store(demo) != example._store]
        for name, predictor in teacher.named_predictors()
    }
    if any(len(kept[name]) != len(p.demos) for name, p in teacher.named_predictors()):
        # DSPy leaves the example out of its demos (in place; here in a copy: the cached program is
        # shared by the worker's calls). Only then: the copy is ~15 % of a bootstrap call's CPU.
        teacher = teacher.deepcopy()
        for name, predictor in teacher.named_predictors():
            predictor.demos = kept[name]
    if round_idx > 0:
        lm = lm.copy(rollout_id=round_idx, temperature=1.0)
    names = {id(p): name for name, p in teacher.named_predictors()}
    settings = {"lm": lm, "adapter": dspy.ChatAdapter(), "disable_history": True, "trace": []}
    with current_call(ctx) as call:
        try:
            with dspy.context(**settings):
                prediction = teacher(**kwargs)
                trace = list(dspy.settings.trace)
        except Exception as exc:
            raise _failed(STAGE_PROGRAM, call.refusal or exc, config) from exc
    try:
        success = _passes(metric(example, prediction, trace), threshold)
    except Exception as exc:
        raise _failed(STAGE_METRIC, exc, config) from exc
    demos: dict[str, list[Any]] = {}
    if success:
        import random

        from dspy.utils.hasher import Hasher

        by_name: dict[str, list[Any]] = {}
        for predictor, inputs, outputs in trace:
            name = names.get(id(predictor))
            if name is None:  # as DSPy: a traced predictor that is not one of the program's is skipped
                continue
            by_name.setdefault(name, []).append(dspy.Example(augmented=True, **inputs, **outputs))
        for name, found in by_name.items():
            if len(found) > 1:  # as DSPy: 50/50 one of the first N-1 traces or the last
                rng = random.Random(Hasher.hash(tuple(found)))
                found = [rng.choice(found[:-1]) if rng.random() < 0.5 else found[-1]]
            demos[name] = [plain(demo.toDict()) for demo in found]
    if ctx.cancelled.is_set():
        return None
    return {"success": success, "demos": demos}


METHODS: Final = {
    "score_examples": Method(score_examples, lane=on_cpu_lane),
    "bootstrap_example": Method(bootstrap_example, lane=on_cpu_lane),
}
"""The job methods, for the worker's registry (``_methods.build_registry``)."""
