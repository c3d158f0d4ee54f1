"""MIPROv2 on the pool: DSPy's loop on the host, its bootstraps, proposals and evaluations on the workers.

``pool.compile(program, optimizer="mipro_v2", ...)`` does what ``dspy.MIPROv2(metric, ...).compile(
student, trainset=..., valset=...)`` does, with the same random draws, in three steps:

1. **Demo sets** (``create_n_fewshot_demo_sets``): DSPy's candidates (zero-shot, labeled only, an
   unshuffled bootstrap, then bootstraps of the trainset shuffled by the optimizer's generator with a
   random number of demos), each bootstrap a ``BootstrapFewShot`` run as :class:`~dspex_trio._compile.
   CompileJob` runs it (examples on every worker, answers replayed in DSPy's order). The generator's
   draws do not depend on the answers, so they are all drawn first, in DSPy's order, and the sets are
   bootstrapped ``CANDIDATES_AT_ONCE`` at a time.
2. **Instructions**: one ``propose_instructions`` call (``bridge_child._propose``): DSPy's
   ``GroundedProposer`` with the session's LM in a worker, the generator's state sent with the call and
   taken back from its answer.
3. **Search**: optuna's ``TPESampler(seed=seed, multivariate=True)`` in the host (ask and tell, the
   trials one after another, as ``study.optimize`` runs them; its sampling, CPU work that grows with
   the trials, in a thread so that the event loop goes on serving), each trial an evaluation job on a
   minibatch of the valset drawn by the generator, every ``minibatch_full_eval_steps + 1``-th trial
   followed by a full evaluation of the best-averaging candidate not yet fully evaluated, added to the
   study as DSPy adds it. The best full score wins (the student's own score first: a later candidate
   must beat it).

What DSPy does with an LM in the loop (instruction proposals) runs in a worker, so the host holds no
LM and imports no DSPy; it needs ``optuna`` (the ``mipro`` extra). A worker's death loses nothing: every
call is idempotent and sent again. Candidate programs live in the job's session only while they are
evaluated; the result is a new program holding the best state.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
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
from dspex_trio._jobs import MAX_EXAMPLE_ATTEMPTS, _single, error_info

if TYPE_CHECKING:
    from dspex_trio._compile import CompileJob, CompileResult

OPTIONS: Final = {
    "auto": "light",
    "num_candidates": None,
    "num_trials": None,
    "max_bootstrapped_demos": 4,
    "max_labeled_demos": 4,
    "seed": 9,
    "init_temperature": 1.0,
    "metric_threshold": None,
    "minibatch": True,
    "minibatch_size": 35,
    "minibatch_full_eval_steps": 5,
    "view_data_batch_size": 10,
    "program_aware_proposer": True,
    "data_aware_proposer": True,
    "tip_aware_proposer": True,
    "fewshot_aware_proposer": True,
}
"""MIPROv2's options (its constructor's and ``compile``'s) and DSPy's defaults for them."""

PROPOSER_FLAGS: Final = tuple(name for name in OPTIONS if name.endswith("_proposer"))
"""The options that switch parts of the instruction proposer on or off."""
AUTO_RUN_SETTINGS: Final = {
    "light": {"n": 6, "val_size": 100},
    "medium": {"n": 12, "val_size": 300},
    "heavy": {"n": 18, "val_size": 1000},
}
"""DSPy's ``auto`` presets: candidates and the valset's size."""
MIN_MINIBATCH_SIZE: Final = 50
"""With ``auto``, trials use minibatches when the valset holds more examples than this (DSPy's)."""
BOOTSTRAPPED_IN_CONTEXT: Final = 3
"""Bootstrapped demos of a zero-shot run's demo sets (they only inform the proposals; DSPy's)."""
MAX_MIPRO_CANDIDATES: Final = 64
"""Most candidates (``num_candidates``): demo sets and instructions per predictor."""
MAX_TRIALS: Final = 1000
"""Most trials (``num_trials``)."""
MAX_MINIBATCH: Final = 10_000
"""Most examples of a trial's minibatch (``minibatch_size``)."""
MAX_FULL_EVAL_STEPS: Final = 1000
"""Most trials between full evaluations (``minibatch_full_eval_steps``)."""
MAX_VIEW_BATCH: Final = 100
"""Most examples per step of the proposer's dataset summary (``view_data_batch_size``); it reads ten
steps at most, so a proposal carries at most ``10 * view_data_batch_size`` examples."""


def _integer(merged: dict[str, Any], name: str, lowest: int, highest: int, *, null: bool = False) -> None:
    value = merged[name]
    if null and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
        raise InvalidParams(
            f"{name} must be an integer within [{lowest}, {highest}]" + (" or null" if null else "")
        )


def check_mipro_options(options: dict[str, Any]) -> dict[str, Any]:
    """MIPROv2's options, DSPy's defaults filled in, checked as ``MIPROv2`` checks them (``InvalidParams``
    naming the option). The result also holds ``max_rounds`` (1, as MIPROv2's bootstraps run)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidParams(
            f"unknown option(s) {', '.join(map(repr, unknown))} of mipro_v2; options: {', '.join(OPTIONS)}"
        )
    from dspex_trio._compile import MAX_DEMOS

    merged = {**OPTIONS, **options}
    if merged["auto"] not in (None, *AUTO_RUN_SETTINGS):
        raise InvalidParams(f"auto must be one of {', '.join(AUTO_RUN_SETTINGS)} or null")
    _integer(merged, "num_candidates", 1, MAX_MIPRO_CANDIDATES, null=True)
    _integer(merged, "num_trials", 1, MAX_TRIALS, null=True)
    _integer(merged, "max_bootstrapped_demos", 0, MAX_DEMOS)
    _integer(merged, "max_labeled_demos", 0, MAX_DEMOS)
    _integer(merged, "seed", 0, 2**32 - 1)
    _integer(merged, "minibatch_size", 1, MAX_MINIBATCH)
    _integer(merged, "minibatch_full_eval_steps", 1, MAX_FULL_EVAL_STEPS)
    _integer(merged, "view_data_batch_size", 1, MAX_VIEW_BATCH)
    for name in ("init_temperature", "metric_threshold"):
        value = merged[name]
        if (value is not None or name == "init_temperature") and (
            not isinstance(value, int | float) or isinstance(value, bool)
        ):
            raise InvalidParams(
                f"{name} must be a number" + (" or null" if name == "metric_threshold" else "")
            )
    for name in ("minibatch", *PROPOSER_FLAGS):
        if not isinstance(merged[name], bool):
            raise InvalidParams(f"{name} must be a boolean")
    if merged["auto"] is None and (merged["num_candidates"] is None or merged["num_trials"] is None):
        raise InvalidParams("mipro_v2 with auto null needs num_candidates and num_trials")
    if merged["auto"] is not None and (
        merged["num_candidates"] is not None or merged["num_trials"] is not None
    ):
        raise InvalidParams(
            "mipro_v2 takes num_candidates and num_trials only with auto null (auto sets them)"
        )
    if merged["max_bootstrapped_demos"] == 0 and merged["max_labeled_demos"] > 0:
        raise InvalidParams(
            "mipro_v2 needs max_bootstrapped_demos >= 1 unless max_labeled_demos is 0 too "
            "(DSPy draws each shuffled demo set's size from 1 to max_bootstrapped_demos)"
        )
    return {**merged, "max_rounds": 1}


def split(
    options: dict[str, Any], trainset: list[dict[str, Any]], valset: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """MIPROv2's trainset and valset (``_set_and_validate_datasets``): without a valset, the last 80 %
    of the trainset (at most 1,000 examples) is the valset. ``InvalidParams`` when that cannot be, or
    when the minibatch is larger than the valset."""
    if valset is None:
        if len(trainset) < 2:
            raise InvalidParams("mipro_v2 needs at least 2 trainset examples when no valset is given")
        size = min(1000, max(1, int(len(trainset) * 0.80)))
        cutoff = len(trainset) - size
        trainset, valset = trainset[:cutoff], trainset[cutoff:]
    auto = options["auto"]
    size = len(valset) if auto is None else min(AUTO_RUN_SETTINGS[auto]["val_size"], len(valset))
    minibatch = options["minibatch"] if auto is None else size > MIN_MINIBATCH_SIZE
    if minibatch and options["minibatch_size"] > size:
        raise InvalidParams(
            f"minibatch_size ({options['minibatch_size']}) cannot exceed the valset's size ({size})"
        )
    return trainset, valset


def _sample(rng: random.Random, examples: list[Any], size: int) -> list[Any]:
    """``create_minibatch``: ``size`` examples drawn by ``rng`` (all of them, shuffled, if fewer)."""
    return [examples[i] for i in rng.sample(range(len(examples)), min(size, len(examples)))]


def import_optuna() -> Any:
    """The ``optuna`` module (``InvalidParams`` saying how to install it when it is missing)."""
    try:
        import optuna
    except ModuleNotFoundError:  # pragma: no cover - the test environment has it
        raise InvalidParams("mipro_v2 needs optuna on the host: pip install 'dspex-trio[mipro]'") from None
    return optuna


class MiproRun:
    """One MIPROv2 run of a compile job (its loop: :meth:`run`)."""

    def __init__(self, job: CompileJob) -> None:
        self.job = job
        self.options = job.options
        self.names = job.names
        self.rng = random.Random(self.options["seed"])
        self.zeroshot = self.options["max_bootstrapped_demos"] == 0 and self.options["max_labeled_demos"] == 0
        self.trials: list[dict[str, Any]] = []

    # -- step 1 ---------------------------------------------------------------------------------------
    async def demo_sets(self, trainset: list[dict[str, Any]], count: int) -> list[dict[str, list[Any]]]:
        """``create_n_fewshot_demo_sets``: ``count`` demo sets, each demos per predictor name."""
        from dspex_trio._compile import CANDIDATES_AT_ONCE, _labeled

        o = self.options
        labeled = 0 if self.zeroshot else o["max_labeled_demos"]
        bootstrapped = BOOTSTRAPPED_IN_CONTEXT if self.zeroshot else o["max_bootstrapped_demos"]
        plans: list[tuple[str, list[dict[str, Any]], int]] = []
        for seed in range(-3, count - 3):  # DSPy's draws, in its order (they never depend on answers)
            examples = list(trainset)
            if seed == -3:
                plans.append(("zero-shot", examples, 0))
            elif seed == -2 and labeled > 0:
                plans.append(("labeled", examples, 0))
            elif seed == -1:
                plans.append(("bootstrap", examples, bootstrapped))
            else:
                self.rng.shuffle(examples)
                plans.append(("bootstrap", examples, self.rng.randint(1, bootstrapped)))
        job = self.job
        job._update(stage="bootstrap", done=0, total=len(plans))
        outcomes: dict[int, dict[str, list[Any]] | BaseException] = {}
        arrived = trio.Event()
        limiter = trio.Semaphore(CANDIDATES_AT_ONCE)

        async def make(index: int) -> None:
            nonlocal arrived
            kind, examples, size = plans[index]
            async with limiter:
                try:
                    if kind == "zero-shot":
                        outcomes[index] = {}
                    elif kind == "labeled":
                        outcomes[index] = _labeled(examples, self.names, labeled, True)
                    else:
                        outcomes[index] = await job._bootstrap_few_shot(examples, size)
                except DspexError as exc:  # raised below in DSPy's order
                    outcomes[index] = exc
            arrived.set()
            arrived = trio.Event()

        sets: list[dict[str, list[Any]]] = []
        job._report = False  # bootstraps overlap: only finished sets are published
        try:
            async with trio.open_nursery() as nursery:
                for index in range(len(plans)):
                    nursery.start_soon(make, index)
                for index in range(len(plans)):
                    while index not in outcomes:
                        await arrived.wait()
                    outcome = outcomes[index]
                    if isinstance(outcome, BaseException):
                        raise outcome
                    sets.append(outcome)
                    job._update(done=index + 1)
        finally:
            job._report = True
        return sets

    # -- step 2 ---------------------------------------------------------------------------------------
    async def propose(
        self, trainset: list[dict[str, Any]], sets: list[dict[str, list[Any]]], n: int
    ) -> list[list[str]]:
        """``_propose_instructions``: ``n`` instructions per predictor, proposed in a worker."""
        job = self.job
        o = self.options
        job._update(stage="propose", done=0, total=1)
        view = o["view_data_batch_size"]
        params = {
            "program": job.program,
            "trainset": trainset[: 10 * view],  # all the dataset summary reads
            "demo_candidates": [[demo_set.get(name, []) for demo_set in sets] for name in self.names],
            "n": n,
            "rng": _rng_state(self.rng),
            "options": {
                name: o[name] for name in ("view_data_batch_size", "init_temperature", *PROPOSER_FLAGS)
            },
            **job.backend._lm_params(job.session),
        }
        sent = 0
        while True:
            try:
                answer: dict[str, Any] = await job.backend._job_call(
                    "propose_instructions", params, session=job.session, timeout=None
                )
                break
            except (WorkerCrashed, WorkerClosed) as exc:
                sent += exc.attempts
                if sent >= MAX_EXAMPLE_ATTEMPTS:
                    raise JobFailed(f"the instruction proposal failed: {_describe(exc)}") from None
            except (ProgramError, CallTimeout) as exc:
                raise JobFailed(f"the instruction proposal failed: {_describe(exc)}") from None
        version, internal, gauss = answer["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        job._update(done=1)
        return [list(found) for found in answer["instructions"]]

    # -- step 3 ---------------------------------------------------------------------------------------
    def _candidate(self, instructions: list[str], demos: list[list[Any]] | None) -> dict[str, Any]:
        """The student's state with an instruction (and a demo set) per predictor."""
        state = copy.deepcopy(self.job.state)
        for i, name in enumerate(self.names):
            target = state if self.job.flat else state[name]
            target.setdefault("signature", {})["instructions"] = instructions[i]
            if demos is not None:
                target["demos"] = demos[i]
        return state

    async def _score(self, state: dict[str, Any] | None, examples: list[dict[str, Any]]) -> float:
        """``eval_candidate_program``'s score of a candidate (the student when ``state`` is None): an
        evaluation job; 0.0 when it stopped at ``max_errors``, as DSPy's evaluation does."""
        job = self.job
        program = job.program if state is None else await job._create(state)
        try:
            return await job._evaluate(program, examples)
        except BaseException as exc:  # the evaluation's nursery wraps its JobFailed in a group
            if isinstance(_single(exc), JobFailed):
                return 0.0
            raise
        finally:
            if state is not None:
                with trio.CancelScope(shield=True):
                    await job._forget_one(program)

    async def run(self) -> CompileResult:
        from dspex_trio._compile import CompileResult

        optuna = import_optuna()
        job = self.job
        o = self.options
        trainset, valset = split(o, job.trainset, job.valset)
        n_predictors = len(self.names)
        if o["auto"] is None:
            num_trials, minibatch = o["num_trials"], o["minibatch"]
            num_instruct = num_fewshot = o["num_candidates"]
        else:
            n = AUTO_RUN_SETTINGS[o["auto"]]["n"]
            valset = _sample(self.rng, valset, AUTO_RUN_SETTINGS[o["auto"]]["val_size"])
            minibatch = len(valset) > MIN_MINIBATCH_SIZE
            num_instruct = n if self.zeroshot else int(n * 0.5)
            num_fewshot = n
            variables = n_predictors * (1 if self.zeroshot else 2)
            num_trials = int(max(2 * variables * math.log2(n), 1.5 * n))
        steps = o["minibatch_full_eval_steps"]
        adjusted = (
            num_trials + num_trials // steps + 1 + (1 if num_trials % steps else 0)
            if minibatch
            else num_trials
        )

        sets = await self.demo_sets(trainset, num_fewshot)
        instructions = await self.propose(trainset, sets, num_instruct)
        demo_sets = None if self.zeroshot else [[s.get(name, []) for s in sets] for name in self.names]

        job._update(stage="search", trials=0, total_trials=adjusted, done=0, total=len(valset))
        best_score = await self._score(None, valset)
        best_state: dict[str, Any] | None = None  # None: the student itself
        self._record(1, best_score, True, None)
        job._update(trials=1, best_score=best_score, score=best_score)

        distributions = {}
        for i in range(n_predictors):
            distributions[f"{i}_predictor_instruction"] = optuna.distributions.CategoricalDistribution(
                range(len(instructions[i]))
            )
            if demo_sets:
                distributions[f"{i}_predictor_demos"] = optuna.distributions.CategoricalDistribution(
                    range(len(demo_sets[i]))
                )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # multivariate is "experimental" in optuna, DSPy uses it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=o["seed"], multivariate=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        default = {f"{i}_predictor_instruction": 0 for i in range(n_predictors)}
        if demo_sets:
            default.update({f"{i}_predictor_demos": 0 for i in range(n_predictors)})
        study.add_trial(
            optuna.trial.create_trial(params=default, distributions=distributions, value=best_score)
        )

        by_params: dict[str, list[tuple[float, dict[str, Any], dict[str, Any]]]] = {}
        fully_evaluated: set[str] = set()

        def ask() -> tuple[Any, dict[str, int]]:
            """The next trial and its parameters, in the order MIPROv2's objective suggests them."""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                trial = study.ask()
                raw = {}
                for i in range(n_predictors):
                    name = f"{i}_predictor_instruction"
                    raw[name] = trial.suggest_categorical(name, range(len(instructions[i])))
                    if demo_sets:
                        name = f"{i}_predictor_demos"
                        raw[name] = trial.suggest_categorical(name, range(len(demo_sets[i])))
            return trial, raw

        # optuna's sampling is CPU work that grows with the trials: in a thread, not in the event loop
        # (only this task touches the study, one call at a time)
        for _ in range(num_trials):
            trial, raw = await trio.to_thread.run_sync(ask)
            trial_num = trial.number + 1
            chosen = []
            picked_instructions, picked_demos = [], []
            for i in range(n_predictors):
                index = raw[f"{i}_predictor_instruction"]
                picked_instructions.append(instructions[i][index])
                chosen.append(f"Predictor {i}: Instruction {index}")
                if demo_sets:
                    index = raw[f"{i}_predictor_demos"]
                    picked_demos.append(demo_sets[i][index])
                    chosen.append(f"Predictor {i}: Few-Shot Set {index}")
            state = self._candidate(picked_instructions, picked_demos if demo_sets else None)
            size = o["minibatch_size"] if minibatch else len(valset)
            batch = valset if size >= len(valset) else _sample(self.rng, valset, size)
            score = await self._score(state, batch)
            if not minibatch and score > best_score:
                best_score, best_state = score, state
            self._record(trial_num, score, size >= len(valset), raw)
            job._update(trials=len(self.trials), best_score=best_score, score=score)
            by_params.setdefault(",".join(chosen), []).append((score, state, raw))
            if minibatch and (trial_num % (steps + 1) == 0 or trial_num == adjusted - 1):
                key, params, candidate = _highest_average(by_params, fully_evaluated)
                full = await self._score(candidate, valset)
                full_trial = optuna.trial.create_trial(params=params, distributions=distributions, value=full)
                await trio.to_thread.run_sync(study.add_trial, full_trial)
                fully_evaluated.add(key)
                self._record(trial_num + 1, full, True, params)
                if full > best_score:
                    best_score, best_state = full, candidate
                job._update(trials=len(self.trials), best_score=best_score, score=full)
            await trio.to_thread.run_sync(study.tell, trial, score)
        program = await job._create(best_state if best_state is not None else copy.deepcopy(job.state))
        await job._forget(program)
        state = await job.backend.get_state(program, session=job.session)
        return CompileResult(program, state, best_score, tuple(self.trials))

    def _record(self, trial: int, score: float, full_eval: bool, params: dict[str, Any] | None) -> None:
        self.trials.append({"trial": trial, "score": score, "full_eval": full_eval, "params": params})


def _highest_average(
    by_params: dict[str, list[tuple[float, dict[str, Any], dict[str, Any]]]], done: set[str]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``get_program_with_highest_avg_score``: the parameters (and a candidate) with the best mean
    minibatch score that were not fully evaluated yet (the first of equal means)."""
    means = [(key, sum(v[0] for v in values) / len(values), values[0]) for key, values in by_params.items()]
    for key, _mean, (_score, state, params) in sorted(means, key=lambda m: m[1], reverse=True):
        if key not in done:
            return key, params, state
    raise JobFailed("mipro_v2 found no candidate left to evaluate fully (DSPy raises here too)")


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _describe(exc: DspexError) -> str:
    info = error_info(exc)
    return f"{info['type']}: {info['message']}"
