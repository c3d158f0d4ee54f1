"""GEPA's executions in the worker: DSPy's ``DspyAdapter`` evaluation, trace capture and proposals.

The host runs the ``gepa`` package's engine (``dspex_trio._compile_gepa``); what needs DSPy runs here:

- ``gepa_metric {"metric"}`` answers ``{"feedback": bool}``: whether the registered metric takes GEPA's
  five arguments ``(gold, pred, trace, pred_name, pred_trace)``, as ``dspy.GEPA`` checks it.
- ``gepa_evaluate {"program", "examples", "metric", "capture", "feedback", "failure_score", "lm"}`` runs
  each example as ``DspyAdapter.evaluate`` does: without ``capture``, as ``dspy.Evaluate``
  (``metric(example, prediction)``; a program or metric that raises is a failure); with ``capture``, as
  ``bootstrap_trace_data`` (the program under a trace, ``metric(example, prediction, trace)``; an
  example whose program or metric raised is dropped: ``"traced": false``). With ``feedback`` each traced
  example also carries, per predictor of the program, every trace instance of a predictor with its
  signature (DSPy matches them by signature) as the reflective dataset's record: its inputs, its
  outputs, and the feedback DSPy's ``feedback_fn`` would give it (the metric called with the predictor's
  name and its sub-trace). The host picks among them with the adapter's generator, as
  ``make_reflective_dataset`` does, so DSPy's draws stay DSPy's.
- ``gepa_propose {"candidate", "reflective_dataset", "components", "lm"}`` runs DSPy's built-in
  ``InstructionProposer`` with that LM (the reflection LM) and answers ``{"texts": {name: str}}``.

Records travel as JSON: inputs and outputs of custom types (``dspy.History``, images, pydantic models)
reach the proposer as their JSON form, not as the objects DSPy's in-process adapter hands it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Final

from bridge_child._context import CallContext, Method, invalid_params
from bridge_child._jobs import STAGE_PROGRAM, _example, _failed, _lm, _metric, _score_value
from bridge_child._programs import _import_dspy, _outputs, on_cpu_lane, plain, resolve
from bridge_child.spec import SpecError

if TYPE_CHECKING:
    from bridge_child._server import Worker

MAX_BATCH: Final = 64
"""Most examples of one ``gepa_evaluate`` call."""
MAX_COMPONENTS: Final = 256
"""Most components (predictors) of one proposal."""
MAX_RECORDS: Final = 10_000
"""Most reflective records of one component in one proposal."""


def takes_feedback_arguments(metric: Any) -> bool:
    """Whether ``metric`` accepts GEPA's five positional arguments (``dspy.GEPA``'s own check)."""
    try:
        inspect.signature(metric).bind(None, None, None, None, None)
    except (TypeError, ValueError):
        return False
    return True


def gepa_metric(worker: Worker, ctx: CallContext) -> Any:
    return {"feedback": takes_feedback_arguments(_metric(ctx.param("metric", str)))}


def _score(raw: Any) -> tuple[Any, dict[str, Any]]:
    """``_extract_score_and_objective_scores``: a metric's value (a ``dspy.Prediction`` with ``score``
    and maybe ``objective_scores``, or a number) as JSON, and its objective scores."""
    dspy = _import_dspy()
    if isinstance(raw, dspy.Prediction):
        score = raw.score
        objectives = {str(k): _score_value(v) for k, v in dict(raw.get("objective_scores") or {}).items()}
        return (None if score is None else _score_value(score)), objectives
    return (None if raw is None else _score_value(raw)), {}


def _feedback(metric: Any, example: Any, prediction: Any, trace: Any, name: str, instance: Any) -> str:
    """DSPy's ``feedback_fn``: the metric's feedback for one predictor's trace instance."""
    found = metric(example, prediction, trace, name, [instance])
    if hasattr(found, "feedback"):
        if found["feedback"] is None:
            return f"This trajectory got a score of {found['score']}."
        return str(found["feedback"])
    return f"This trajectory got a score of {found}."


def _records(program: Any, metric: Any, example: Any, prediction: Any, trace: list[Any]) -> dict[str, Any]:
    """Per predictor name, each trace instance of its signature as a reflective record."""
    dspy = _import_dspy()
    from dspy.teleprompt.bootstrap_trace import FailedPrediction

    records: dict[str, list[dict[str, Any]]] = {}
    for name, predictor in program.module.named_predictors():
        found = []
        for instance in trace:
            if not instance[0].signature.equals(predictor.signature):
                continue
            inputs, outputs = instance[1], instance[2]
            record: dict[str, Any] = {"inputs": plain(dict(inputs)), "failed": False}
            if isinstance(outputs, FailedPrediction):
                record["failed"] = True
                record["outputs"] = (
                    "Couldn't parse the output as per the expected output format. The model's raw response "
                    f"was:\n```\n{outputs.completion_text}\n```\n\n"
                )
                structure = "".join(
                    f"{m['role']}: {m['content']}\n"
                    for m in dspy.ChatAdapter().format(predictor.signature, [], {})
                )
                record["feedback"] = "Your output failed to parse. Follow this structure:\n" + structure
            else:
                record["outputs"] = {str(k): plain(v) for k, v in outputs.items()}
                try:
                    record["feedback"] = _feedback(
                        metric, example, prediction, trace, name, (predictor, inputs, outputs)
                    )
                except Exception as exc:
                    record["feedback_error"] = f"{type(exc).__name__}: {exc}"
            found.append(record)
        records[name] = found
    return records


def _run_one(
    ctx: CallContext, program: Any, metric: Any, raw: Any, lm: Any, options: dict[str, Any]
) -> dict[str, Any]:
    try:
        example, kwargs = _example(ctx, program, raw)
    except SpecError as exc:
        raise invalid_params(str(exc)) from None
    dspy = _import_dspy()
    from dspy.teleprompt.bootstrap_trace import FailedPrediction
    from dspy.utils.exceptions import AdapterParseError

    from bridge_child._lmguard import current_call

    settings = {"lm": lm, "adapter": dspy.ChatAdapter(), "disable_history": True}
    if not options["capture"]:  # dspy.Evaluate's process_item
        with current_call(ctx):
            try:
                with dspy.context(**settings):
                    prediction = program.module(**kwargs)
                score, objectives = _score(metric(example, prediction))
            except Exception:
                return {"output": None, "score": None}
        return {"output": _outputs(program, prediction), "score": score, "objectives": objectives}
    failure = options["failure_score"]
    trace: list[Any]
    with current_call(ctx):
        try:
            with dspy.context(**settings, trace=[]):
                try:
                    prediction = program.module(**kwargs)
                    trace = list(dspy.settings.trace)
                except AdapterParseError as exc:
                    if exc.parsed_result:  # DSPy divides two lists here: the example is dropped
                        raise
                    found = [p for p in program.module.predictors() if p.signature == exc.signature]
                    if not found:
                        raise
                    prediction = FailedPrediction(completion_text=exc.lm_response, format_reward=failure)
                    trace = [*dspy.settings.trace, (found[0], kwargs, prediction)]
            if isinstance(prediction, FailedPrediction):
                score, objectives = _score(prediction.format_reward or failure)
            else:
                score, objectives = _score(metric(example, prediction, trace))
        except Exception:
            return {"output": None, "score": None, "traced": False}
    failed = isinstance(prediction, FailedPrediction)
    result = {
        "output": None if failed else _outputs(program, prediction),
        "score": score,
        "objectives": objectives,
        "traced": True,
        "failed_prediction": failed,
    }
    if options["feedback"]:
        result["records"] = _records(program, metric, example, prediction, trace)
    return result


def gepa_evaluate(worker: Worker, ctx: CallContext) -> Any:
    """``{"results": [...]}``: each example of ``examples`` as ``DspyAdapter.evaluate`` runs it."""
    program = resolve(worker, ctx)
    metric = _metric(ctx.param("metric", str))
    examples = ctx.param("examples", list)
    if not 1 <= len(examples) <= MAX_BATCH:
        raise invalid_params(f"gepa_evaluate: 1 to {MAX_BATCH} examples per call")
    failure_score = ctx.param("failure_score", (int, float), 0.0)
    options = {
        "capture": ctx.param("capture", bool, False),
        "feedback": ctx.param("feedback", bool, False),
        "failure_score": failure_score,
    }
    if options["feedback"] and not takes_feedback_arguments(metric):
        raise invalid_params("gepa_evaluate: the metric does not take GEPA's five arguments")
    lm, _config = _lm(worker, ctx)
    results = []
    for raw in examples:
        if ctx.cancelled.is_set():
            return None
        results.append(_run_one(ctx, program, metric, raw, lm, options))
    return {"results": results}


def gepa_propose(worker: Worker, ctx: CallContext) -> Any:
    """DSPy's ``InstructionProposer`` over the reflective dataset, with the call's LM."""
    candidate = ctx.param("candidate", dict)
    dataset = ctx.param("reflective_dataset", dict)
    components = ctx.param("components", list)
    if not 1 <= len(components) <= MAX_COMPONENTS or not all(isinstance(c, str) for c in components):
        raise invalid_params(f"gepa_propose: 1 to {MAX_COMPONENTS} component names")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in candidate.items()):
        raise invalid_params("gepa_propose: candidate must map component names to texts")
    for name, records in dataset.items():
        if not isinstance(records, list) or len(records) > MAX_RECORDS:
            raise invalid_params(f"gepa_propose: at most {MAX_RECORDS} records per component")
        if not all(isinstance(r, dict) for r in records):
            raise invalid_params(f"gepa_propose: the records of {name!r} must be objects")
    lm, config = _lm(worker, ctx)
    dspy = _import_dspy()
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    from bridge_child._lmguard import current_call

    with current_call(ctx) as call:
        try:
            with dspy.context(lm=lm, disable_history=True):
                texts = InstructionProposer()(
                    candidate=candidate, reflective_dataset=dataset, components_to_update=components
                )
        except Exception as exc:
            raise _failed(STAGE_PROGRAM, call.refusal or exc, config) from exc
    if ctx.cancelled.is_set():
        return None
    return {"texts": {str(k): str(v) for k, v in texts.items()}}


METHODS: Final = {
    "gepa_metric": Method(gepa_metric),
    "gepa_evaluate": Method(gepa_evaluate, lane=on_cpu_lane),
    "gepa_propose": Method(gepa_propose, lane=on_cpu_lane),
}
"""GEPA's methods, for the worker's registry (``_methods.build_registry``)."""
