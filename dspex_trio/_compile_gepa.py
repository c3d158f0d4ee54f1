"""GEPA on the pool: the ``gepa`` package's engine on the host, DSPy's adapter work on the workers.

``pool.compile(program, optimizer="gepa", ...)`` does what ``dspy.GEPA(metric, ...).compile(student,
trainset=..., valset=...)`` does. The engine is the ``gepa`` package DSPy itself drives (``gepa.optimize``:
its Pareto-front candidate selection, minibatches, acceptance and merges, with its own random draws),
run in a host thread (pure Python: it imports no DSPy and no LM client) with :class:`PoolAdapter` as
its adapter in place of DSPy's ``DspyAdapter``:

- ``evaluate(batch, candidate, capture_traces)``: the candidate (an instruction per predictor) is a
  program of the job's session while it is evaluated (the student's state with those instructions),
  and its examples are
  ``gepa_evaluate`` calls (``bridge_child._gepa``) spread over the workers, idempotent and sent again
  when a worker dies; with ``capture_traces`` the worker runs them as ``bootstrap_trace_data`` does and
  returns each predictor's trace instances, with the metric's feedback, as plain data;
- ``make_reflective_dataset``: DSPy's selection over those records, on the host, with the adapter's own
  generator (``random.Random(seed)``), so its draws are DSPy's;
- ``propose_new_texts``: one ``gepa_propose`` call, DSPy's ``InstructionProposer`` in a worker with the
  reflection LM (the session's LM, or the LM configured for the session named by ``reflection_lm``).

The engine's thread reaches the pool through ``trio.from_thread``; cancelling the job raises
``trio.Cancelled`` in it at its next call (the engine lets it through), so the job ends promptly.
Metric: a registered metric taking GEPA's five arguments ``(gold, pred, trace, pred_name, pred_trace)``
(another one is refused before anything runs, as ``dspy.GEPA`` refuses it).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from dspex_trio._errors import (
    CallTimeout,
    DspexError,
    InvalidParams,
    JobFailed,
    ProgramError,
    WorkerClosed,
    WorkerCrashed,
)
from dspex_trio._jobs import MAX_EXAMPLE_ATTEMPTS, error_info
from dspex_trio._sessions import MINTED_PREFIX

if TYPE_CHECKING:
    from dspex_trio._compile import CompileJob, CompileResult
    from dspex_trio._programs_host import ProgramHost

logger = logging.getLogger(__name__)

OPTIONS: Final = {
    "auto": None,
    "max_full_evals": None,
    "max_metric_calls": None,
    "reflection_minibatch_size": 3,
    "candidate_selection_strategy": "pareto",
    "reflection_lm": None,
    "skip_perfect_score": True,
    "add_format_failure_as_feedback": False,
    "component_selector": "round_robin",
    "use_merge": True,
    "max_merge_invocations": 5,
    "failure_score": 0.0,
    "perfect_score": 1.0,
    "seed": 0,
}
"""GEPA's options (``dspy.GEPA``'s constructor's) and DSPy's defaults for them."""

AUTO_RUN_SETTINGS: Final = {"light": {"n": 6}, "medium": {"n": 12}, "heavy": {"n": 18}}
"""DSPy's ``auto`` presets: the candidates its budget is computed for."""
MAX_METRIC_CALLS: Final = 100_000
"""Most metric calls (program executions) of one GEPA run, whichever option set the budget."""
MAX_MINIBATCH: Final = 1000
"""Most examples of one reflection minibatch (``reflection_minibatch_size``)."""
MAX_MERGES: Final = 100
"""Most merge invocations (``max_merge_invocations``)."""
EXAMPLES_PER_CALL: Final = 8
"""Most examples of one ``gepa_evaluate`` call (fewer when that leaves workers idle)."""
SELECTORS: Final = ("pareto", "current_best")
COMPONENT_SELECTORS: Final = ("round_robin", "all")


def _integer(merged: dict[str, Any], name: str, lowest: int, highest: int, *, null: bool = False) -> None:
    value = merged[name]
    if null and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
        raise InvalidParams(
            f"{name} must be an integer within [{lowest}, {highest}]" + (" or null" if null else "")
        )


def check_gepa_options(options: dict[str, Any]) -> dict[str, Any]:
    """GEPA's options, DSPy's defaults filled in, checked as ``dspy.GEPA`` checks them (``InvalidParams``
    naming the option)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidParams(
            f"unknown option(s) {', '.join(map(repr, unknown))} of gepa; options: {', '.join(OPTIONS)}"
        )
    merged = {**OPTIONS, **options}
    budgets = [name for name in ("auto", "max_full_evals", "max_metric_calls") if merged[name] is not None]
    if len(budgets) != 1:
        raise InvalidParams(
            "gepa needs exactly one of auto, max_full_evals, max_metric_calls"
            + (f" (got {', '.join(budgets)})" if budgets else "")
        )
    if merged["auto"] is not None and merged["auto"] not in AUTO_RUN_SETTINGS:
        raise InvalidParams(f"auto must be one of {', '.join(AUTO_RUN_SETTINGS)} or null")
    _integer(merged, "max_full_evals", 1, MAX_METRIC_CALLS, null=True)
    _integer(merged, "max_metric_calls", 1, MAX_METRIC_CALLS, null=True)
    _integer(merged, "reflection_minibatch_size", 1, MAX_MINIBATCH)
    _integer(merged, "max_merge_invocations", 0, MAX_MERGES)
    _integer(merged, "seed", 0, 2**32 - 1)
    if merged["candidate_selection_strategy"] not in SELECTORS:
        raise InvalidParams(f"candidate_selection_strategy must be one of {', '.join(SELECTORS)}")
    if merged["component_selector"] not in COMPONENT_SELECTORS:
        raise InvalidParams(f"component_selector must be one of {', '.join(COMPONENT_SELECTORS)}")
    for name in ("skip_perfect_score", "add_format_failure_as_feedback", "use_merge"):
        if not isinstance(merged[name], bool):
            raise InvalidParams(f"{name} must be a boolean")
    for name in ("failure_score", "perfect_score"):
        value = merged[name]
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidParams(f"{name} must be a number")
    if merged["reflection_lm"] is not None and not isinstance(merged["reflection_lm"], str):
        raise InvalidParams("reflection_lm must be null (the session's LM) or the name of a session")
    return merged


def auto_budget(num_preds: int, num_candidates: int, valset_size: int) -> int:
    """``dspy.GEPA.auto_budget`` with its defaults (``minibatch_size`` 35, ``full_eval_steps`` 5)."""
    num_trials = int(max(2 * (num_preds * 2) * math.log2(num_candidates), 1.5 * num_candidates))
    minibatch, steps = 35, 5
    total = valset_size + num_candidates * 5 + num_trials * minibatch
    if num_trials == 0:
        return total
    periodic_fulls = (num_trials + 1) // steps + 1
    extra_final = 1 if num_trials < steps else 0
    return total + (periodic_fulls + extra_final) * valset_size


def metric_calls(options: dict[str, Any], names: Sequence[str], train: int, val: int | None) -> int:
    """The run's budget of metric calls, as ``dspy.GEPA.compile`` computes it (``InvalidParams`` above
    ``MAX_METRIC_CALLS``)."""
    if options["auto"] is not None:
        budget = auto_budget(
            max(len(names), 1), AUTO_RUN_SETTINGS[options["auto"]]["n"], val if val is not None else train
        )
    elif options["max_full_evals"] is not None:
        budget = options["max_full_evals"] * (train + (val or 0))
    else:
        budget = options["max_metric_calls"]
    if budget > MAX_METRIC_CALLS:
        raise InvalidParams(f"gepa's budget is {budget} metric calls, above the limit of {MAX_METRIC_CALLS}")
    return int(budget)


async def check_gepa(backend: ProgramHost, metric: str, options: dict[str, Any], session: str | None) -> None:
    """What ``dspy.GEPA`` refuses, checked before anything runs: a metric that does not take its five
    arguments; and (ours) a ``reflection_lm`` naming a session that has no LM, or, from a minted
    session (the websocket's), a session that is not minted."""
    answer = await backend.call("gepa_metric", {"metric": metric}, idempotent=True)
    if not answer.get("feedback"):
        raise InvalidParams(
            f"gepa needs a metric taking five arguments (gold, pred, trace, pred_name, pred_trace); "
            f"{metric!r} does not (docs/jobs.md)"
        )
    name = options["reflection_lm"]
    if name is not None:
        if session is not None and session.startswith(MINTED_PREFIX) and not name.startswith(MINTED_PREFIX):
            # a websocket client names sessions by the minted ids it holds, never the operator's names
            raise InvalidParams("reflection_lm: a job of a minted session names another minted session")
        record = backend.sessions.peek(name)
        if record is None or record.lm is None:
            raise InvalidParams(f"reflection_lm: no session {name!r} with an LM configured")


class _Log:
    """The engine's logger (``gepa``'s default prints to stdout): our log, at debug level."""

    def log(self, message: str) -> None:
        logger.debug("gepa: %s", message)


class PoolAdapter:
    """``DspyAdapter`` over the pool: what the engine's thread calls, each reaching the job's Trio task
    through ``trio.from_thread``."""

    def __init__(self, run: GepaRun) -> None:
        self.run = run
        self.rng = random.Random(run.options["seed"])
        """The adapter's generator (DSPy gives its adapter ``random.Random(seed)``)."""

    # -- the engine's calls (in its thread) ---------------------------------------------------------
    def evaluate(self, batch: list[Any], candidate: dict[str, str], capture_traces: bool = False) -> Any:
        return trio.from_thread.run(self.run.evaluate, batch, candidate, capture_traces)

    def batch_evaluate(self, items: list[Any], *, capture_traces: bool = True) -> list[Any]:
        # DspyAdapter evaluates every pair with traces, each pair at once
        result: list[Any] = trio.from_thread.run(self.run.evaluate_many, items, capture_traces)
        return result

    def make_reflective_dataset(
        self, candidate: dict[str, str], eval_batch: Any, components_to_update: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        """``DspyAdapter.make_reflective_dataset`` over the workers' records."""
        keep_failed = self.run.options["add_format_failure_as_feedback"]
        found: dict[str, list[dict[str, Any]]] = {}
        for name in components_to_update:
            items = []
            for data in eval_batch.trajectories or []:
                if "records" not in data:
                    raise JobFailed("gepa: a reflection minibatch was evaluated without its feedback")
                instances = data["records"].get(name, [])
                if not keep_failed:
                    instances = [r for r in instances if not r["failed"]]
                if not instances:
                    continue
                selected = next((r for r in instances if r["failed"]), None)
                if selected is None:
                    if data["failed_prediction"]:
                        continue
                    selected = self.rng.choice(instances)
                if "feedback_error" in selected:
                    # as DSPy's feedback_fn raising there: the engine logs it and proposes nothing
                    raise RuntimeError(f"the metric raised giving feedback: {selected['feedback_error']}")
                items.append(
                    {
                        "Inputs": selected["inputs"],
                        "Generated Outputs": selected["outputs"],
                        "Feedback": selected["feedback"],
                    }
                )
            if items:
                found[name] = items
        if not found:
            raise Exception("No valid predictions found for any module.")  # DSPy's, caught by the engine
        return found

    def propose_new_texts(
        self,
        candidate: dict[str, str],
        reflective_dataset: dict[str, list[dict[str, Any]]],
        components_to_update: list[str],
    ) -> dict[str, str]:
        result: dict[str, str] = trio.from_thread.run(
            self.run.propose, candidate, reflective_dataset, components_to_update
        )
        return result

    def get_adapter_state(self) -> dict[str, Any]:
        return {"rng_state": self.rng.getstate()}

    def set_adapter_state(self, state: dict[str, Any]) -> None:
        if "rng_state" in state:
            self.rng.setstate(state["rng_state"])


class _Progress:
    """The engine's callbacks (in its thread): the job's progress events."""

    def __init__(self, run: GepaRun) -> None:
        self.run = run

    def _publish(self, **changes: Any) -> None:
        trio.from_thread.run_sync(lambda: self.run.job._update(**changes))

    def on_iteration_start(self, event: Any) -> None:
        self._publish(trials=int(event["iteration"]))

    def on_valset_evaluated(self, event: Any) -> None:
        score = float(event["average_score"])
        best = self.run.job._progress.best_score
        self._publish(score=score, best_score=score if best is None or score > best else best)

    def on_budget_updated(self, event: Any) -> None:
        self._publish(done=int(event["metric_calls_used"]))


class GepaRun:
    """One GEPA run of a compile job (its loop: :meth:`run`)."""

    def __init__(self, job: CompileJob) -> None:
        self.job = job
        self.options = job.options
        self.names = job.names
        self.limiter = trio.Semaphore(max(1, job.concurrency))
        """Calls of the job in flight (evaluations of several candidates share it)."""
        backend = job.backend
        name = self.options["reflection_lm"]
        self.reflection_lm = backend._lm_params(job.session if name is None else name)

    # -- the adapter's work (in the job's task) -----------------------------------------------------
    def _state(self, candidate: dict[str, str]) -> dict[str, Any]:
        state = copy.deepcopy(self.job.state)
        for name in self.names:
            if name in candidate:
                target = state if self.job.flat else state[name]
                target.setdefault("signature", {})["instructions"] = candidate[name]
        return state

    async def _program(self, candidate: dict[str, str]) -> str:
        return await self.job._create(self._state(candidate))

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        """One idempotent call, sent again when its worker dies (``MAX_EXAMPLE_ATTEMPTS`` sends)."""
        job = self.job
        sent = 0
        while True:
            try:
                return await job.backend._job_call(method, params, session=job.session, timeout=None)
            except (WorkerCrashed, WorkerClosed) as exc:
                sent += exc.attempts
                if sent >= MAX_EXAMPLE_ATTEMPTS:
                    raise JobFailed(f"gepa: {method} failed: {_describe(exc)}") from None
            except (ProgramError, CallTimeout, InvalidParams) as exc:
                raise JobFailed(f"gepa: {method} failed: {_describe(exc)}") from None

    async def evaluate(self, batch: list[dict[str, Any]], candidate: dict[str, str], capture: bool) -> Any:
        # the candidate is a program of the session only while it is evaluated (a session holds a
        # bounded number of programs; the engine may keep hundreds of candidates)
        program = await self._program(candidate)
        try:
            return await self._evaluate(program, batch, capture)
        finally:
            with trio.CancelScope(shield=True):
                await self.job._forget_one(program)

    async def _evaluate(self, program: str, batch: list[dict[str, Any]], capture: bool) -> Any:
        from gepa import EvaluationBatch

        o = self.options
        # the traces' feedback is for the reflection minibatches (DspyAdapter asks for it only there)
        feedback = capture and len(batch) <= o["reflection_minibatch_size"]
        size = max(1, min(EXAMPLES_PER_CALL, len(batch) // max(1, self.job.concurrency)))
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
        answers: list[list[dict[str, Any]]] = [[] for _ in chunks]
        base = {
            "program": program,
            "metric": self.job.metric,
            "capture": capture,
            "feedback": feedback,
            "failure_score": o["failure_score"],
            **self.job.backend._lm_params(self.job.session),
        }

        async def one(index: int) -> None:
            async with self.limiter:
                answer = await self._call("gepa_evaluate", {**base, "examples": chunks[index]})
            answers[index] = answer["results"]

        async with trio.open_nursery() as nursery:
            for index in range(len(chunks)):
                nursery.start_soon(one, index)
        results = [r for found in answers for r in found]
        scores = [o["failure_score"] if r["score"] is None else r["score"] for r in results]
        objectives = [r.get("objectives") or {} for r in results]
        trajectories = None
        if capture:
            trajectories = [{**r, "example_ind": i} for i, r in enumerate(results) if r.get("traced")]
        return EvaluationBatch(
            outputs=[r["output"] for r in results],
            scores=scores,
            trajectories=trajectories,
            objective_scores=objectives if any(objectives) else None,
        )

    async def evaluate_many(self, items: list[tuple[dict[str, str], list[Any]]], capture: bool) -> list[Any]:
        found: list[Any] = [None] * len(items)

        async def one(index: int) -> None:
            candidate, batch = items[index]
            found[index] = await self.evaluate(batch, candidate, capture)

        async with trio.open_nursery() as nursery:
            for index in range(len(items)):
                nursery.start_soon(one, index)
        return found

    async def propose(
        self, candidate: dict[str, str], dataset: dict[str, list[dict[str, Any]]], components: list[str]
    ) -> dict[str, str]:
        params = {
            "candidate": candidate,
            "reflective_dataset": dataset,
            "components": components,
            **self.reflection_lm,
        }
        answer = await self._call("gepa_propose", params)
        texts: dict[str, str] = answer["texts"]
        return texts

    # -- the run ------------------------------------------------------------------------------------
    def _optimize(self, trainset: list[Any], valset: list[Any], budget: int) -> Any:
        """``gepa.optimize`` as ``dspy.GEPA.compile`` calls it (in the engine's thread)."""
        import gepa

        o = self.options
        seed_candidate = {name: self._instructions(name) for name in self.names}
        return gepa.optimize(
            seed_candidate=seed_candidate,
            trainset=trainset,
            valset=valset,
            adapter=PoolAdapter(self),  # type: ignore[arg-type]
            candidate_selection_strategy=o["candidate_selection_strategy"],
            skip_perfect_score=o["skip_perfect_score"],
            reflection_minibatch_size=o["reflection_minibatch_size"],
            module_selector=o["component_selector"],
            perfect_score=o["perfect_score"],
            use_merge=o["use_merge"],
            max_merge_invocations=o["max_merge_invocations"],
            max_metric_calls=budget,
            logger=_Log(),
            callbacks=[_Progress(self)],  # type: ignore[list-item]
            track_best_outputs=False,
            display_progress_bar=False,
            raise_on_exception=True,
            seed=o["seed"],
        )

    def _instructions(self, name: str) -> str:
        target = self.job.state if self.job.flat else self.job.state[name]
        return str(target.get("signature", {}).get("instructions", ""))

    async def run(self) -> CompileResult:
        from dspex_trio._compile import CompileResult

        job = self.job
        valset = job.valset or job.trainset
        budget = metric_calls(
            self.options, self.names, len(job.trainset), None if job.valset is None else len(job.valset)
        )
        job._update(stage="search", trials=0, total_trials=0, done=0, total=budget)
        try:
            result = await trio.to_thread.run_sync(self._optimize, job.trainset, valset, budget)
        except DspexError:
            raise
        except Exception as exc:  # the engine's own (as DSPy's: "No valid predictions found ...")
            raise JobFailed(f"gepa stopped: {type(exc).__name__}: {exc}") from exc
        best = dict(result.best_candidate)
        candidates = tuple(
            {
                "candidate": index,
                "instructions": dict(candidate),
                "score": result.val_aggregate_scores[index],
                "parents": list(result.parents[index]),
            }
            for index, candidate in enumerate(result.candidates)
        )
        program = await self._program(best)
        await job._forget(program)
        state = await job.backend.get_state(program, session=job.session)
        return CompileResult(program, state, result.val_aggregate_scores[result.best_idx], candidates)


def _describe(exc: DspexError) -> str:
    info = error_info(exc)
    return f"{info['type']}: {info['message']}"
