"""Jobs: evaluating a program on a devset, spread over every worker of a backend.

``pool.evaluate(program, devset, metric=...)`` is what ``dspy.Evaluate`` does, with its examples run
as idempotent calls of the worker method ``score_example`` (``bridge_child._jobs``: run the program on
one example, score it with the metric the operator registered in ``METRICS``), at most ``concurrency``
at once, placed by the backend like any call. So:

- a worker's death loses nothing: an example whose worker died is sent again (the dispatch retries an
  idempotent call once elsewhere; the job sends it again up to ``MAX_EXAMPLE_ATTEMPTS`` times in all),
  and its score is recorded once, when its one answer arrives;
- a failed example counts as DSPy counts it: its score is ``failure_score`` (0.0) and it is one error;
  when ``max_errors`` examples have failed (``dspy.settings.max_errors``, 10, by default) the job stops
  with :class:`~dspex_trio.JobFailed`, as ``dspy.Evaluate`` raises;
- the overall score is DSPy's: ``round(100 * sum(scores) / len(devset), 2)``;
- leaving the job's ``async with`` block (or cancelling it) cancels every pending example in its worker.

Devsets are lists of ``{"inputs": {...}, "labels": {...}}``, checked against the program's inputs before
the first example is sent (:func:`check_examples`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from bridge_child.spec import SpecError, parse_type
from dspex_trio._errors import (
    CallTimeout,
    DspexError,
    InvalidParams,
    JobCancelled,
    JobFailed,
    ProgramError,
    WorkerClosed,
    WorkerCrashed,
)
from dspex_trio._util import open_service_nursery

if TYPE_CHECKING:
    from dspex_trio._programs_host import ProgramHost

DEFAULT_MAX_ERRORS: Final = 10
"""Failed examples that stop a job when the caller gives no ``max_errors`` (``dspy.settings.max_errors``)."""
MAX_EXAMPLE_ATTEMPTS: Final = 6
"""Times one example (or one call of several) is sent to a worker, in all, while its workers die under
it (each send by the dispatch counts, its idempotent retry included); past it the example failed
(``WorkerCrashed``)."""
MAX_JOB_CONCURRENCY: Final = 4096
"""Most examples of one job in flight at once."""
MAX_EXAMPLES: Final = 1_000_000
"""Most examples of one job from Python (the websocket's own limit is lower: ``WebsocketOptions``)."""
CPU_BATCH: Final = 8
"""Examples per worker call when they are CPU-bound (the offline LM): a worker runs them one after
another on its CPU lane anyway, so a call's fixed cost (framing, dispatch) is paid once per 8."""
CPU_BATCH_MIN_CALLS: Final = 16
"""Calls a CPU-bound job's examples are spread over at least (when it has that many examples)."""
FAILURE_SCORE: Final = 0.0
"""The score of a failed example (``dspy.Evaluate``'s default ``failure_score``)."""


@attrs.frozen
class JobProgress:
    """Where a job stands: published after every example (coalesced for a consumer that lags)."""

    done: int
    """Examples finished (scored or failed)."""
    total: int
    """Examples in the job."""
    errors: int
    """Examples that failed."""
    score_sum: float
    """Sum of the finished examples' scores."""

    @property
    def score(self) -> float:
        """The running score: ``100 * score_sum / done`` (0.0 before the first example)."""
        return 100 * self.score_sum / self.done if self.done else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "total": self.total,
            "errors": self.errors,
            "score": round(self.score, 2),
        }


@attrs.frozen
class ExampleResult:
    """One example of an evaluation: its outputs and score, or its error."""

    index: int
    """Its position in the devset."""
    outputs: dict[str, Any] | None
    """The program's outputs (None when it failed)."""
    score: float | int | bool
    """The metric's value (``FAILURE_SCORE`` when it failed)."""
    error: dict[str, Any] | None = None
    """``{"type", "message", "stage"}`` when the example failed (``stage``: ``program``, ``metric`` or
    ``worker``), else None."""

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "outputs": self.outputs, "score": self.score, "error": self.error}


@attrs.frozen
class EvaluationResult:
    """The outcome of an evaluation, as ``dspy.Evaluate``'s ``EvaluationResult``."""

    score: float
    """``round(100 * sum(scores) / len(devset), 2)``, a percentage."""
    results: tuple[ExampleResult, ...]
    """One per example, in devset order."""
    errors: int
    """Examples that failed."""

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "errors": self.errors,
            "results": [r.to_json() for r in self.results],
        }


def cpu_bound(lm_params: dict[str, Any]) -> bool:
    """Whether a job's executions are CPU-bound: the offline LM (they run one at a time on each worker's
    CPU lane, in arrival order), not an LM over the network (they wait on it, many at once)."""
    lm = lm_params.get("lm")
    model = lm if isinstance(lm, str) or lm is None else lm.get("model")
    return model in (None, "offline")


def batch_size(lm_params: dict[str, Any], examples: int) -> int:
    """Examples per worker call: up to ``CPU_BATCH`` with the offline LM (while that leaves
    ``CPU_BATCH_MIN_CALLS`` calls to spread), else one (an LM over the network: each example waits on
    its own)."""
    if not cpu_bound(lm_params):
        return 1
    return max(1, min(CPU_BATCH, examples // CPU_BATCH_MIN_CALLS))


def check_examples(
    examples: Any, inputs: Sequence[dict[str, Any]], *, what: str = "devset", limit: int = MAX_EXAMPLES
) -> list[dict[str, Any]]:
    """``examples`` as a list of ``{"inputs": {...}, "labels": {...}}``, checked against the program's
    input fields (its description's ``inputs``): every required input present, none unknown.

    Raises:
        InvalidParams: not a non-empty list of such examples, more than ``limit``, or an example the
            program cannot take (the message names its index and fields).
    """
    if not isinstance(examples, list | tuple):
        raise InvalidParams(f"the {what} must be a list of {{'inputs': {{...}}, 'labels': {{...}}}}")
    if not examples:
        raise InvalidParams(f"the {what} must contain at least one example, got an empty {what}")
    if len(examples) > limit:
        raise InvalidParams(f"the {what} holds {len(examples)} examples; at most {limit} are allowed")
    names = [f["name"] for f in inputs]
    types = {}
    for f in inputs:  # as the worker checks them (a type the host cannot read: the worker checks it)
        if "schema" not in f:
            try:
                types[f["name"]] = parse_type(f.get("type", "str"))
            except SpecError:
                pass
    required = [f["name"] for f in inputs if not f.get("optional")]
    checked = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict) or not isinstance(example.get("inputs"), dict):
            raise InvalidParams(f"{what}[{index}] must be {{'inputs': {{...}}, 'labels': {{...}}}}")
        labels = example.get("labels", {})
        extra = sorted(set(example) - {"inputs", "labels"})
        if not isinstance(labels, dict) or extra:
            raise InvalidParams(
                f"{what}[{index}] must be {{'inputs': {{...}}, 'labels': {{...}}}}"
                + (f"; unknown key(s) {', '.join(map(repr, extra))}" if extra else "")
            )
        given = example["inputs"]
        missing = [name for name in required if name not in given]
        if missing:
            raise InvalidParams(
                f"{what}[{index}] is missing input field(s) {', '.join(map(repr, missing))}; "
                f"the program's inputs are {', '.join(names)}"
            )
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InvalidParams(
                f"{what}[{index}] has unknown input field(s) {', '.join(map(repr, unknown))}; "
                f"the program's inputs are {', '.join(names)}"
            )
        for name, type_ in types.items():
            if name in given and not type_.accepts(given[name]):
                raise InvalidParams(
                    f"{what}[{index}]: input {name!r} must be {type_.render()}, "
                    f"not {type(given[name]).__name__}"
                )
        checked.append({"inputs": given, "labels": labels})
    return checked


async def check_metric(backend: ProgramHost, metric: str) -> None:
    """``InvalidParams`` unless the operator's program modules registered ``metric``."""
    if not isinstance(metric, str):
        raise InvalidParams("metric must be the name of a registered metric")
    known = sorted(m["name"] for m in (await backend.available_programs()).get("metrics", []))
    if metric not in known:
        raise InvalidParams(f"unknown metric {metric!r}; registered metrics: {', '.join(known) or 'none'}")


def check_job_limits(backend: ProgramHost, max_errors: int | None, concurrency: int | None) -> int:
    """Check a job's ``max_errors`` (None: the default) and ``concurrency`` (None: the backend's); the
    concurrency to use. ``InvalidParams`` if either is out of range."""
    if max_errors is not None and (not isinstance(max_errors, int) or max_errors < 1):
        raise InvalidParams("max_errors must be a positive integer")
    if concurrency is None:
        concurrency = backend._job_concurrency()
    if not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_JOB_CONCURRENCY:
        raise InvalidParams(f"concurrency must be an integer within [1, {MAX_JOB_CONCURRENCY}]")
    return concurrency


def error_info(exc: DspexError) -> dict[str, Any]:
    """What an example's error is, as data: its type, message and stage."""
    if isinstance(exc, ProgramError):
        details = exc.details if isinstance(exc.details, dict) else {}
        message = str(exc)
        prefix = f"{exc.error_type}: "
        return {
            "type": exc.error_type or "ProgramError",
            "message": message[len(prefix) :] if message.startswith(prefix) else message,
            "stage": details.get("stage", "program"),
        }
    if isinstance(exc, WorkerCrashed):  # its text may hold the worker's stderr: not for a client
        status = f" ({exc.exit_status.describe()})" if exc.exit_status is not None else ""
        message = f"the worker running it died{status}, {exc.attempts} time(s)"
    else:
        message = str(exc)
    return {"type": type(exc).__name__, "message": message, "stage": "worker"}


class Job:
    """A running job's progress: ``async for progress in job`` yields :class:`JobProgress` snapshots
    (coalesced: a consumer that lags sees the latest) and ends when the job does, raising its error if
    it failed; ``await job.wait()`` waits for its outcome."""

    def __init__(self, total: int) -> None:
        self._progress: Any = JobProgress(done=0, total=total, errors=0, score_sum=0.0)
        self._version = 0
        self._changed = trio.Event()
        self._finished = trio.Event()
        self._error: BaseException | None = None
        self._outcome: Any = None

    @property
    def progress(self) -> Any:
        """The latest progress (``JobProgress`` of an evaluation, ``CompileProgress`` of a compile job)."""
        return self._progress

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def _publish(self, progress: Any) -> None:
        self._progress = progress
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()

    def _finish(self, outcome: Any = None, error: BaseException | None = None) -> None:
        self._outcome, self._error = outcome, error
        self._finished.set()
        self._changed.set()

    async def run(self) -> Any:
        """Run the job to its outcome (an object with ``to_json()``), in the caller's task."""
        raise NotImplementedError

    async def wait(self) -> Any:
        """The job's outcome, once it ended; its error (``JobFailed``, ``InvalidParams``, ...) if it failed."""
        await self._finished.wait()
        if self._error is not None:
            raise self._error
        return self._outcome

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        seen = -1
        while True:
            if self._version != seen:
                seen = self._version
                yield self._progress
                continue
            if self._finished.is_set():
                break
            await self._changed.wait()
        if self._error is not None:
            raise self._error


class EvaluationJob(Job):
    """An evaluation in progress (from ``pool.evaluate``); ``result`` once it completed."""

    def __init__(
        self,
        backend: ProgramHost,
        program: str,
        devset: list[dict[str, Any]],
        *,
        metric: str,
        session: str | None,
        max_errors: int,
        concurrency: int,
        timeout: float | None,
        gate: trio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__(len(devset))
        self.backend = backend
        self.program = program
        self.devset = devset
        self.metric = metric
        self.session = session
        self.max_errors = max_errors
        self.concurrency = concurrency
        self.timeout = timeout
        self._results: list[ExampleResult | None] = [None] * len(devset)
        self._next = 0
        self.batch = min(batch_size(backend._lm_params(session), len(devset)), concurrency)
        """Examples per worker call (never more than ``concurrency``)."""
        self.gate = gate
        """Held around each ``score_examples`` call when given (a compile job's: its evaluation calls in
        flight, so they do not queue deep in the workers ahead of its bootstrap calls)."""
        self.attempts = 0
        """Calls of ``score_examples`` the job made, in all (a call sent again after its worker died
        counts again; the dispatch's own re-sends inside one call do not)."""

    @property
    def result(self) -> EvaluationResult:
        """The outcome (``RuntimeError`` before the job completed; its error if it failed)."""
        if not self._finished.is_set():
            raise RuntimeError("the evaluation has not finished")
        if self._error is not None:
            raise self._error
        result: EvaluationResult = self._outcome
        return result

    async def run(self) -> EvaluationResult:
        """Run every example to its one outcome; the result, or ``JobFailed`` at ``max_errors`` failures."""
        try:
            async with trio.open_nursery() as nursery:
                calls = -(-min(self.concurrency, len(self.devset)) // self.batch)
                for _ in range(calls):
                    nursery.start_soon(self._runner)
        except BaseException as exc:
            error = _single(exc)
            if isinstance(error, trio.Cancelled):
                self._finish(error=JobCancelled("the evaluation was cancelled"))
                raise
            self._finish(error=error)
            raise error from None
        results = tuple(r for r in self._results if r is not None)
        assert len(results) == len(self.devset), "every example has exactly one result"
        total = math.fsum(float(r.score) for r in results)
        outcome = EvaluationResult(
            score=round(100 * total / len(results), 2),
            results=results,
            errors=self._progress.errors,
        )
        self._finish(outcome)
        return outcome

    async def _runner(self) -> None:
        while self._next < len(self.devset):
            first = self._next
            self._next = min(first + self.batch, len(self.devset))
            for result in await self._score(range(first, self._next)):
                self._record(result)

    async def _score(self, indices: range) -> list[ExampleResult]:
        params = {
            "program": self.program,
            "examples": self.devset[indices.start : indices.stop],
            "metric": self.metric,
            **self.backend._lm_params(self.session),
        }
        sent = 0
        while True:
            self.attempts += 1
            try:
                if self.gate is None:
                    value = await self.backend._job_call(
                        "score_examples", params, session=self.session, timeout=self.timeout
                    )
                else:
                    async with self.gate:
                        value = await self.backend._job_call(
                            "score_examples", params, session=self.session, timeout=self.timeout
                        )
            except (WorkerCrashed, WorkerClosed, CallTimeout, ProgramError) as exc:
                sent += exc.attempts
                retry = isinstance(exc, WorkerCrashed | WorkerClosed) and sent < MAX_EXAMPLE_ATTEMPTS
                if retry:
                    continue
                return [ExampleResult(i, None, FAILURE_SCORE, error_info(exc)) for i in indices]
            return [
                ExampleResult(i, None, FAILURE_SCORE, {**r["error"]})
                if "error" in r
                else ExampleResult(i, r["outputs"], r["score"])
                for i, r in zip(indices, value["results"], strict=True)
            ]

    def _record(self, result: ExampleResult) -> None:
        assert self._results[result.index] is None, "an example is scored once"
        self._results[result.index] = result
        old = self._progress
        failed = result.error is not None
        progress = JobProgress(
            done=old.done + 1,
            total=old.total,
            errors=old.errors + failed,
            score_sum=old.score_sum + float(result.score),
        )
        self._publish(progress)
        if failed and progress.errors >= self.max_errors:
            raise JobFailed(
                f"the evaluation stopped: {progress.errors} examples failed (max_errors {self.max_errors}); "
                f"the last: {result.error['type'] if result.error else ''}: "
                f"{result.error['message'] if result.error else ''}",
                results=[r for r in self._results if r is not None],
            )


def _single(exc: BaseException) -> BaseException:
    """The one error a job's nursery raised (its first leaf that is not a cancellation, if any)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_single(e) for e in exc.exceptions]
        for leaf in leaves:
            if not isinstance(leaf, trio.Cancelled):
                return leaf
        return leaves[0]
    return exc


async def start_evaluation(
    backend: ProgramHost,
    program: str,
    devset: Any,
    *,
    metric: str,
    session: str | None,
    max_errors: int | None,
    concurrency: int | None,
    timeout: float | None,
    limit: int = MAX_EXAMPLES,
) -> EvaluationJob:
    """An :class:`EvaluationJob`, its program, metric and devset checked (not started).

    Raises:
        ProgramNotFound: no such program in the session.
        InvalidParams: an unknown metric, an empty devset, an example the program cannot take, a
            ``max_errors`` or ``concurrency`` below 1.
    """
    description = await backend.get_program(program, session=session)
    await check_metric(backend, metric)
    examples = check_examples(devset, description.get("inputs", []), limit=limit)
    concurrency = check_job_limits(backend, max_errors, concurrency)
    return EvaluationJob(
        backend,
        program,
        examples,
        metric=metric,
        session=session,
        max_errors=DEFAULT_MAX_ERRORS if max_errors is None else max_errors,
        concurrency=concurrency,
        timeout=timeout,
    )


@asynccontextmanager
async def open_job(job: Job) -> AsyncIterator[Job]:
    """Run a checked ``job`` while the block runs. In the block, ``async for progress in job`` follows
    it and ``await job.wait()`` gives its outcome (or raises its error); after the block, ``job.result``
    holds it. Leaving the block before the job ended cancels every call still pending, in its worker."""
    async with open_service_nursery() as nursery:
        nursery.start_soon(_quietly, job.run)
        try:
            yield job
        finally:
            nursery.cancel_scope.cancel()
    if not job.finished:
        job._finish(error=JobCancelled("the job was cancelled"))


@asynccontextmanager
async def open_evaluation(
    backend: ProgramHost,
    program: str,
    devset: Any,
    *,
    metric: str,
    session: str | None = None,
    max_errors: int | None = None,
    concurrency: int | None = None,
    timeout: float | None = None,
) -> AsyncIterator[EvaluationJob]:
    """Evaluate ``program`` on ``devset`` while the block runs (``pool.evaluate``; see the module doc and
    :func:`open_job`). The checks come first: ``InvalidParams`` and ``ProgramNotFound`` raise at
    ``async with``, before any example is sent."""
    job = await start_evaluation(
        backend,
        program,
        devset,
        metric=metric,
        session=session,
        max_errors=max_errors,
        concurrency=concurrency,
        timeout=timeout,
    )
    async with open_job(job):
        yield job


async def _quietly(run: Any) -> None:
    """Run a job; its outcome (or error) is the job's, read by ``wait()``, not the nursery's."""
    try:
        await run()
    except DspexError:
        pass
