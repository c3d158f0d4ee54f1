"""Compile jobs: DSPy's few-shot optimizers, their loop on the host, their executions on every worker.

``pool.compile(program, optimizer=..., trainset=..., valset=None, metric=..., options={})`` runs
``bootstrap_few_shot`` (``dspy.BootstrapFewShot``) or ``bootstrap_few_shot_with_random_search``
(``dspy.BootstrapFewShotWithRandomSearch``) and ends by creating a new program in the session with the
optimized state (DSPy's JSON state: ``get_state`` exports it).

**Where the loop runs.** In the host, in the caller's Trio task (this module: pure Python, no DSPy). It
is DSPy's loop restated over data: every random draw is DSPy's (``random.Random(0)`` / ``(seed)`` on the
same lists in the same order), and what needs DSPy runs in a worker:

- each ``_bootstrap_one_example`` is a ``bootstrap_example`` call (``bridge_child._jobs``): the teacher
  (the student with DSPy's labeled demos: a program created with that state) runs the example under a
  trace, the metric judges it, and the worker returns each predictor's demos. The host sends examples
  ahead of the sequential loop (at most ``concurrency``, and never many more than the demos still
  needed) and replays the answers in trainset order, so the demos, the error count and where the loop
  stops are DSPy's;
- each candidate's evaluation is an evaluation job (``dspex_trio._jobs``) over the valset.

So a worker's death loses nothing (every call is idempotent and sent again), and the death of what runs
the loop is the death of the caller's process (the job's task and its caller go together; over the
websocket, a closed connection cancels its jobs): never a hang. Cancelling the caller cancels every
pending call in its worker. ``mipro_v2`` runs the same way (``dspex_trio._compile_mipro``: its
instruction proposals in a worker, optuna's search in the host), and ``gepa`` too
(``dspex_trio._compile_gepa``: the ``gepa`` package's engine in a host thread, its evaluations, traces
and proposals in the workers).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from dspex_trio._compile_gepa import GepaRun, check_gepa, check_gepa_options, metric_calls
from dspex_trio._compile_mipro import MiproRun, check_mipro_options, import_optuna, split
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
from dspex_trio._jobs import (
    DEFAULT_MAX_ERRORS,
    MAX_EXAMPLE_ATTEMPTS,
    MAX_EXAMPLES,
    EvaluationJob,
    Job,
    _single,
    check_examples,
    check_job_limits,
    check_metric,
    cpu_bound,
    error_info,
)
from dspex_trio._programs_host import check_state_size

if TYPE_CHECKING:
    from dspex_trio._programs_host import ProgramHost


OPTIMIZERS: Final = (
    "bootstrap_few_shot",
    "bootstrap_few_shot_with_random_search",
    "mipro_v2",
    "gepa",
)
"""The optimizers a compile job runs (``mipro_v2``: ``dspex_trio._compile_mipro``; ``gepa``:
``dspex_trio._compile_gepa``)."""
NOT_PROVIDED: Final[dict[str, str]] = {}
"""Optimizers named but not provided, and why (none now)."""
MAX_DEMOS: Final = 1000
"""Most demos of one predictor (``max_bootstrapped_demos``, ``max_labeled_demos``)."""
MAX_CANDIDATES: Final = 256
"""Most candidate programs of a random search (``num_candidate_programs``)."""
MAX_ROUNDS: Final = 16
"""Most rounds per example (``max_rounds``)."""
CANDIDATES_AT_ONCE: Final = 4
"""Candidate demo sets of ``mipro_v2`` bootstrapped at once (``dspex_trio._compile_mipro``)."""
SEARCH_CANDIDATES_AT_ONCE: Final = 16
"""Candidates of a random search bootstrapped and evaluated at once (their outcomes are then taken in
DSPy's order: the best, ``stop_at_score`` and a failure are decided as its loop decides them). All of
DSPy's 4 + 3 by default: every candidate's bootstrap starts at once, so the search's critical path
(bootstrap, then evaluation, of the last candidate) does not wait for earlier candidates."""
SEARCH_BOOTSTRAPS_AHEAD_PER_DEMO: Final = 1
"""A random search's bootstrap calls sent ahead of its replay, per candidate: this many per demo it
still needs (a lone ``bootstrap_few_shot`` sends ``2 * needed + 2``). With every candidate
bootstrapping at once (and evaluation calls filling the workers between them), more would only be
executions past the last demo needed, thrown away: CPU the other candidates wait for."""
SEARCH_EVALUATION_CALLS_PER_WORKER: Final = 2
"""A random search's evaluation calls in flight at once, per worker of the pool. Its bootstrap calls
are not limited: each worker's CPU lane runs calls in arrival order, so a bootstrap call (on the
search's critical path: its replay waits for it) queues behind at most this many evaluation calls per
worker, while these keep every worker busy between bootstrap calls. Only for CPU-bound executions (the
offline LM, as ``SEARCH_BOOTSTRAPS_AHEAD_PER_DEMO``): with an LM over the network a worker runs many
calls at once, each waiting on the LM, and the job's ``concurrency`` is the limit."""

_OPTIONS: Final = {
    "bootstrap_few_shot": {
        "max_bootstrapped_demos": 4,
        "max_labeled_demos": 16,
        "max_rounds": 1,
        "metric_threshold": None,
    },
    "bootstrap_few_shot_with_random_search": {
        "max_bootstrapped_demos": 4,
        "max_labeled_demos": 16,
        "max_rounds": 1,
        "metric_threshold": None,
        "num_candidate_programs": 16,
        "stop_at_score": None,
        "labeled_sample": True,
    },
}
"""Each optimizer's options and DSPy's defaults for them."""


@attrs.frozen
class CompileProgress:
    """Where a compile job stands."""

    stage: str
    """``bootstrap`` (bootstrap_few_shot) or ``search`` (random search: ``done`` / ``total`` count
    candidates)."""
    trials: int
    """Candidates evaluated (random search), or 0."""
    total_trials: int
    """Candidates to evaluate (random search), or 0."""
    bootstrapped: int
    """Examples whose traces became demos (the bootstrap in progress)."""
    best_score: float | None
    """The best candidate's score so far (random search)."""
    done: int = 0
    """Examples of the current stage finished."""
    total: int = 0
    """Examples of the current stage."""
    score: float | None = None
    """The last trial's score (mipro_v2: a minibatch or a full evaluation), else None."""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class CompileResult:
    """The outcome of a compile job."""

    program: str
    """The new program (in the job's session), with the optimized state."""
    state: dict[str, Any]
    """Its DSPy JSON state (what ``get_state`` returns)."""
    score: float | None
    """The best candidate's score on the valset (random search), else None."""
    candidates: tuple[dict[str, Any], ...] = ()
    """Each candidate: ``{"seed", "score"}``, in evaluation order (random search)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "program": self.program,
            "state": self.state,
            "score": self.score,
            "candidates": list(self.candidates),
        }


def check_options(optimizer: str, options: Any) -> dict[str, Any]:
    """The optimizer's options, DSPy's defaults filled in (``InvalidParams`` for an unknown optimizer or
    option, or a value out of bounds)."""
    if optimizer in NOT_PROVIDED:
        raise InvalidParams(f"optimizer {optimizer!r} is not provided: {NOT_PROVIDED[optimizer]}")
    if optimizer not in OPTIMIZERS:
        raise InvalidParams(f"unknown optimizer {optimizer!r}; optimizers: {', '.join(OPTIMIZERS)}")
    if not isinstance(options, dict):
        raise InvalidParams("options must be an object")
    if optimizer == "mipro_v2":
        return check_mipro_options(options)
    if optimizer == "gepa":
        return check_gepa_options(options)
    defaults = _OPTIONS[optimizer]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InvalidParams(
            f"unknown option(s) {', '.join(map(repr, unknown))} of {optimizer}; options: {', '.join(defaults)}"
        )
    merged = {**defaults, **options}
    for name, bound in (
        ("max_bootstrapped_demos", MAX_DEMOS),
        ("max_labeled_demos", MAX_DEMOS),
        ("max_rounds", MAX_ROUNDS),
        ("num_candidate_programs", MAX_CANDIDATES),
    ):
        value = merged.get(name, 0)
        lowest = 1 if name == "max_rounds" else 0
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= bound:
            raise InvalidParams(f"{name} must be an integer within [{lowest}, {bound}]")
    for name in ("metric_threshold", "stop_at_score"):
        value = merged.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise InvalidParams(f"{name} must be a number or null")
    if not isinstance(merged.get("labeled_sample", True), bool):
        raise InvalidParams("labeled_sample must be a boolean")
    return merged


def _labeled(
    trainset: Sequence[dict[str, Any]], names: Sequence[str], k: int, sample: bool
) -> dict[str, Any]:
    """``dspy.LabeledFewShot(k).compile(...)``'s demos per predictor: one ``random.Random(0)`` drawing for
    each predictor in turn (or the first ``k``), each demo the example's fields."""
    rng = random.Random(0)
    demos = {}
    for name in names:
        chosen = rng.sample(list(trainset), min(k, len(trainset))) if sample else list(trainset)[:k]
        demos[name] = [_fields(e) for e in chosen]
    return demos if trainset else {name: [] for name in names}


def _fields(example: dict[str, Any]) -> dict[str, Any]:
    """An example as a demo of DSPy's state (``Example.toDict()``: its inputs, then its labels)."""
    return {**example["inputs"], **example["labels"]}


class CompileJob(Job):
    """A compile job in progress (from ``pool.compile``)."""

    def __init__(
        self,
        backend: ProgramHost,
        program: str,
        *,
        optimizer: str,
        options: dict[str, Any],
        trainset: list[dict[str, Any]],
        valset: list[dict[str, Any]] | None,
        metric: str,
        session: str | None,
        max_errors: int,
        concurrency: int,
        state: dict[str, Any],
    ) -> None:
        super().__init__(len(trainset))
        self.backend = backend
        self.program = program
        self.optimizer = optimizer
        self.options = options
        self.trainset = trainset
        self.valset = valset
        self.metric = metric
        self.session = session
        self.max_errors = max_errors
        self.concurrency = concurrency
        self.state = state
        """The student's DSPy state (its predictors' names, and their signatures)."""
        self.flat = "demos" in state
        self.names = ["self"] if self.flat else [k for k in state if k != "metadata"]
        self._progress = CompileProgress("search" if optimizer == "gepa" else "bootstrap", 0, 0, 0, None)
        self._created: list[str] = []
        self._report = True

    @property
    def result(self) -> CompileResult:
        if not self._finished.is_set():
            raise RuntimeError("the compile job has not finished")
        if self._error is not None:
            raise self._error
        result: CompileResult = self._outcome
        return result

    def _update(self, **changes: Any) -> None:
        self._publish(attrs.evolve(self._progress, **changes))

    def _detail(self, **changes: Any) -> None:
        """Progress inside one bootstrap or evaluation: published unless candidates overlap."""
        if self._report:
            self._update(**changes)

    # -- programs -------------------------------------------------------------------------------------
    def _with_demos(self, demos: dict[str, list[Any]]) -> dict[str, Any]:
        """The student's state, its demos replaced (as ``reset_copy`` and then the optimizer set them)."""
        state = copy.deepcopy(self.state)
        for name in self.names:
            target = state if self.flat else state[name]
            target["demos"] = demos.get(name, [])
            for key in ("traces", "train"):
                if key in target:
                    target[key] = []
        return state

    async def _create(self, state: dict[str, Any]) -> str:
        """A program of the session: the student with ``state`` (a teacher, a candidate, the result).

        Not validated by a worker first, as ``create_program`` does: its spec is the student's, and its
        state the student's own with demos the workers made, checked by each worker that builds it
        (the first call naming it). It is described as the student is."""
        await trio.lowlevel.checkpoint()
        check_state_size(state)
        backend = self.backend
        student = backend.sessions.program(self.session, self.program)
        created = backend.sessions.add_program(self.session, {**student.spec, "state": state})
        backend._descriptions[created.id, created.version] = backend._descriptions.get(
            (student.id, student.version), {}
        )
        self._created.append(created.id)
        return created.id

    async def _forget_one(self, program: str) -> None:
        """Delete one program this job created."""
        if program in self._created:
            self._created.remove(program)
            if self.backend.has_program(program, session=self.session):
                await self.backend.delete_program(program, session=self.session)

    async def _forget(self, keep: str | None) -> None:
        for program in self._created:
            if program != keep and self.backend.has_program(program, session=self.session):
                await self.backend.delete_program(program, session=self.session)
        self._created = [keep] if keep is not None else []

    # -- the job --------------------------------------------------------------------------------------
    async def run(self) -> CompileResult:
        try:
            outcome = await self._run()
        except BaseException as exc:
            error = _single(exc)
            with trio.CancelScope(shield=True):
                await self._forget(None)
            if isinstance(error, trio.Cancelled):
                self._finish(error=JobCancelled("the compile job was cancelled"))
                raise
            self._finish(error=error)
            raise error from None
        self._finish(outcome)
        return outcome

    async def _run(self) -> CompileResult:
        o = self.options
        if self.optimizer == "mipro_v2":
            return await MiproRun(self).run()
        if self.optimizer == "gepa":
            return await GepaRun(self).run()
        if self.optimizer == "bootstrap_few_shot":
            found = await self._bootstrap_few_shot(self.trainset, o["max_bootstrapped_demos"])
            program = await self._create(self._with_demos(found))
            await self._forget(program)
            return CompileResult(program, await self.backend.get_state(program, session=self.session), None)
        valset = self.valset or self.trainset
        seeds = list(range(-3, o["num_candidate_programs"]))
        self._update(stage="search", total_trials=len(seeds), done=0, total=len(seeds))
        self._report = False  # candidates overlap: only trials and the best score are published
        outcomes: dict[int, tuple[str, float] | BaseException] = {}
        arrived = trio.Event()
        limiter = trio.Semaphore(SEARCH_CANDIDATES_AT_ONCE)
        # Both only for CPU-bound executions (FIFO lanes); over the network many wait on the LM at once.
        cpu = cpu_bound(self.backend._lm_params(self.session))
        gate = trio.CapacityLimiter(SEARCH_EVALUATION_CALLS_PER_WORKER * max(1, self.backend._job_workers()))
        per_demo = SEARCH_BOOTSTRAPS_AHEAD_PER_DEMO if cpu else None

        async def candidate(seed: int) -> None:
            nonlocal arrived
            async with limiter:
                try:
                    outcomes[seed] = await self._candidate(seed, valset, gate if cpu else None, per_demo)
                except DspexError as exc:  # the replay raises it in DSPy's order
                    outcomes[seed] = exc
            arrived.set()
            arrived = trio.Event()

        best: tuple[float, str] | None = None
        candidates = []
        async with trio.open_nursery() as nursery:
            for seed in seeds:
                nursery.start_soon(candidate, seed)
            for seed in seeds:  # DSPy's loop, in its order, over the candidates' outcomes
                while seed not in outcomes:
                    await arrived.wait()
                outcome = outcomes[seed]
                if isinstance(outcome, BaseException):
                    raise outcome
                program, score = outcome
                candidates.append({"seed": seed, "score": score})
                if best is None or score > best[0]:
                    best = (score, program)
                self._update(trials=len(candidates), best_score=best[0], done=len(candidates))
                if o["stop_at_score"] is not None and score >= o["stop_at_score"]:
                    break
            nursery.cancel_scope.cancel()
        assert best is not None
        await self._forget(best[1])
        state = await self.backend.get_state(best[1], session=self.session)
        return CompileResult(best[1], state, best[0], tuple(candidates))

    async def _candidate(
        self,
        seed: int,
        valset: list[dict[str, Any]],
        gate: trio.CapacityLimiter | None = None,
        per_demo: int | None = None,
    ) -> tuple[str, float]:
        """One candidate of the random search (DSPy's ``seed``): its program and its score (its
        evaluation calls each held by ``gate``, its bootstrap sent ``per_demo`` ahead, when given)."""
        o = self.options
        trainset = list(self.trainset)
        if seed == -3:
            demos: dict[str, list[Any]] = {}
        elif seed == -2:
            demos = _labeled(trainset, self.names, o["max_labeled_demos"], o["labeled_sample"])
        elif seed == -1:
            demos = await self._bootstrap_few_shot(trainset, o["max_bootstrapped_demos"], per_demo=per_demo)
        else:
            random.Random(seed).shuffle(trainset)
            size = random.Random(seed).randint(1, o["max_bootstrapped_demos"])
            demos = await self._bootstrap_few_shot(trainset, size, per_demo=per_demo)
        program = await self._create(self._with_demos(demos))
        return program, await self._evaluate(program, valset, gate)

    async def _evaluate(
        self, program: str, valset: list[dict[str, Any]], gate: trio.CapacityLimiter | None = None
    ) -> float:
        job = EvaluationJob(
            self.backend,
            program,
            valset,
            metric=self.metric,
            session=self.session,
            max_errors=self.max_errors,
            concurrency=self.concurrency,
            timeout=None,
            gate=gate,
        )
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for progress in job:
                    self._detail(done=progress.done)

            nursery.start_soon(follow)
            result = await job.run()
        return result.score

    # -- BootstrapFewShot -----------------------------------------------------------------------------
    async def _bootstrap_few_shot(
        self, trainset: list[dict[str, Any]], max_bootstraps: int, *, per_demo: int | None = None
    ) -> dict[str, list[Any]]:
        """``dspy.BootstrapFewShot(max_bootstrapped_demos=max_bootstraps, ...).compile(student,
        trainset=trainset)``'s demos per predictor (each optimizer counts its own errors). Examples
        are sent ahead of the replay: ``2 * needed + 2`` of them, or ``per_demo * needed`` (at least
        one) when given."""
        o = self.options
        errors = [0]
        self._detail(stage="bootstrap", bootstrapped=0, done=0, total=len(trainset))
        if o["max_labeled_demos"]:
            teacher = await self._create(
                self._with_demos(_labeled(trainset, self.names, o["max_labeled_demos"], True))
            )
        else:
            teacher = self.program
        outcomes: dict[int, list[dict[str, Any]]] = {}
        arrived = trio.Event()
        state = {"next": 0, "replayed": 0, "bootstrapped": 0, "done": False}
        name2traces: dict[str, list[Any]] = {name: [] for name in self.names}
        bootstrapped: set[int] = set()

        def wanted() -> bool:
            ahead = state["next"] - state["replayed"]
            needed = max_bootstraps - state["bootstrapped"]
            most = 2 * needed + 2 if per_demo is None else max(1, per_demo * needed)
            return not state["done"] and state["next"] < len(trainset) and ahead < min(self.concurrency, most)

        async def runner() -> None:
            nonlocal arrived
            while True:
                while not wanted():
                    if state["done"] or state["next"] >= len(trainset):
                        return
                    await arrived.wait()
                index = state["next"]
                state["next"] += 1
                outcomes[index] = await self._rounds(teacher, trainset[index])
                arrived.set()
                arrived = trio.Event()

        async def replay() -> None:
            nonlocal arrived
            index = 0
            while index < len(trainset) and len(bootstrapped) < max_bootstraps:
                while index not in outcomes:
                    await arrived.wait()
                for outcome in outcomes.pop(index):
                    if "error" in outcome:
                        errors[0] += 1
                        if errors[0] >= self.max_errors:
                            raise JobFailed(
                                f"the optimizer stopped: {errors[0]} examples failed (max_errors "
                                f"{self.max_errors}); the last: {outcome['error']['type']}: "
                                f"{outcome['error']['message']}"
                            )
                    elif outcome["success"]:
                        bootstrapped.add(index)
                        for name, demos in outcome["demos"].items():
                            name2traces.setdefault(name, []).extend(demos)
                        break
                index += 1
                state["replayed"] = index
                state["bootstrapped"] = len(bootstrapped)
                self._detail(bootstrapped=len(bootstrapped), done=index)
                arrived.set()
                arrived = trio.Event()
            state["done"] = True
            arrived.set()

        most_ahead = 2 * max_bootstraps + 2 if per_demo is None else max(1, per_demo * max_bootstraps)
        async with trio.open_nursery() as nursery:
            for _ in range(min(self.concurrency, len(trainset), most_ahead)):  # no more can be ahead
                nursery.start_soon(runner)
            await replay()
            nursery.cancel_scope.cancel()
        if teacher != self.program:
            await self.backend.delete_program(teacher, session=self.session)
            self._created.remove(teacher)
        # _train: the augmented demos, then a sample of the examples that were not bootstrapped
        validation = [e for i, e in enumerate(trainset) if i not in bootstrapped]
        random.Random(0).shuffle(validation)
        rng = random.Random(0)
        demos = {}
        for name in self.names:
            augmented = name2traces[name][:max_bootstraps]
            size = max(0, min(o["max_labeled_demos"] - len(augmented), len(validation)))
            demos[name] = augmented + [_fields(e) for e in rng.sample(validation, size)]
        return demos

    async def _rounds(self, teacher: str, example: dict[str, Any]) -> list[dict[str, Any]]:
        """The outcomes of one example's rounds, up to its first success."""
        outcomes = []
        for round_idx in range(self.options["max_rounds"]):
            outcome = await self._bootstrap_one(teacher, example, round_idx)
            outcomes.append(outcome)
            if outcome.get("success"):
                break
        return outcomes

    async def _bootstrap_one(self, teacher: str, example: dict[str, Any], round_idx: int) -> dict[str, Any]:
        params = {
            "program": teacher,
            "example": example,
            "metric": self.metric,
            "round": round_idx,
            **self.backend._lm_params(self.session),
        }
        if self.options["metric_threshold"] is not None:
            params["threshold"] = self.options["metric_threshold"]
        sent = 0
        while True:
            try:
                answer: dict[str, Any] = await self.backend._job_call(
                    "bootstrap_example", params, session=self.session, timeout=None
                )
                return answer
            except ProgramError as exc:
                return {"error": error_info(exc)}
            except (WorkerCrashed, WorkerClosed, CallTimeout) as exc:
                sent += exc.attempts
                if isinstance(exc, CallTimeout) or sent >= MAX_EXAMPLE_ATTEMPTS:
                    return {"error": error_info(exc)}


async def start_compile(
    backend: ProgramHost,
    program: str,
    *,
    optimizer: str,
    trainset: Any,
    valset: Any,
    metric: str,
    options: Any,
    session: str | None,
    max_errors: int | None,
    concurrency: int | None,
    limit: int = MAX_EXAMPLES,
) -> CompileJob:
    """A :class:`CompileJob`, its program, optimizer, options, metric and examples checked (not started).

    Raises:
        ProgramNotFound: no such program in the session.
        InvalidParams: an unknown optimizer, option or metric, an empty trainset, an example the
            program cannot take.
    """
    description = await backend.get_program(program, session=session)
    merged = check_options(optimizer, options)
    await check_metric(backend, metric)
    inputs = description.get("inputs", [])
    train = check_examples(trainset, inputs, what="trainset", limit=limit)
    val = None if valset is None else check_examples(valset, inputs, what="valset", limit=limit - len(train))
    if optimizer == "bootstrap_few_shot" and val is not None:
        raise InvalidParams(
            "bootstrap_few_shot takes no valset (only the random search evaluates candidates)"
        )
    if optimizer == "mipro_v2":
        split(merged, train, val)
        await trio.to_thread.run_sync(import_optuna)  # ~0.6 s the first time: not in the event loop
    if optimizer == "gepa":
        await check_gepa(backend, metric, merged, session)
    concurrency = check_job_limits(backend, max_errors, concurrency)
    state = await backend.get_state(program, session=session)
    job = CompileJob(
        backend,
        program,
        optimizer=optimizer,
        options=merged,
        trainset=train,
        valset=val,
        metric=metric,
        session=session,
        max_errors=DEFAULT_MAX_ERRORS if max_errors is None else max_errors,
        concurrency=concurrency,
        state=state,
    )
    if optimizer == "gepa":  # its budget, as DSPy computes it, within the limit
        if not job.names:
            raise InvalidParams("gepa optimizes the instructions of predictors; the program has none")
        metric_calls(merged, job.names, len(train), None if val is None else len(val))
    return job
