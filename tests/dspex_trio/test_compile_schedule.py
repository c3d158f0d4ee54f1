"""The random search's schedule on the workers (``dspex_trio._compile``), on a fake backend in this
process (no workers, the autojump clock): every candidate starts at once, its evaluation calls in
flight are limited per worker while its bootstrap calls are not, each candidate sends bootstrap
examples only as far ahead as the demos it still needs, and the candidates are still taken in DSPy's
order. (That the demos and scores are DSPy's: tests/dspex_trio/test_compile.py, on real workers.)
"""

from __future__ import annotations

import collections
from typing import Any

import trio

from dspex_trio._compile import (
    SEARCH_BOOTSTRAPS_AHEAD_PER_DEMO,
    SEARCH_EVALUATION_CALLS_PER_WORKER,
    CompileJob,
    check_options,
)

CALL_S = 0.01
"""Each fake call's duration (virtual time)."""
WORKERS = 2


def devset(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {"inputs": {"question": f"q{i}"}, "labels": {"answer": f"a{i}"}} for i in range(offset, offset + n)
    ]


class FakeBackend:
    """Answers job calls after ``CALL_S``: a bootstrap succeeds for every ``every``-th example (by its
    number), an example scores 1 when its number is even. Records what was in flight at each send."""

    def __init__(self, every: int = 3, lm: dict[str, Any] | None = None) -> None:
        self.every = every
        self.lm = lm
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.by_program: collections.Counter[str] = collections.Counter()
        self.sends: list[tuple[str, str, dict[str, int]]] = []
        self.most_by_program: dict[str, int] = {}
        self.first_evaluation_done: set[str] | None = None
        """The programs of the bootstrap calls sent before the first evaluation call was answered."""

    def _job_workers(self) -> int:
        return WORKERS

    def _lm_params(self, session: str | None) -> dict[str, Any]:
        return {} if self.lm is None else {"lm": self.lm}

    async def _job_call(self, method: str, params: Any, *, session: str | None, timeout: float | None) -> Any:
        program = params["program"]
        self.in_flight[method] += 1
        self.by_program[program] += 1
        self.most_by_program[program] = max(self.most_by_program.get(program, 0), self.by_program[program])
        self.sends.append((method, program, dict(self.in_flight)))
        try:
            await trio.sleep(CALL_S)
        finally:
            self.in_flight[method] -= 1
            self.by_program[program] -= 1
        if method == "bootstrap_example":
            number = int(params["example"]["inputs"]["question"][1:])
            fields = {**params["example"]["inputs"], **params["example"]["labels"]}
            success = number % self.every == 0
            return {"success": success, "demos": {"self": [fields]} if success else {}}
        if self.first_evaluation_done is None:
            self.first_evaluation_done = {p for m, p, _ in self.sends if m == "bootstrap_example"}
        scores = [float(int(e["inputs"]["question"][1:]) % 2 == 0) for e in params["examples"]]
        return {"results": [{"outputs": {}, "score": s} for s in scores]}

    def has_program(self, program: str, *, session: str | None = None) -> bool:
        return False

    async def delete_program(self, program: str, *, session: str | None = None) -> None:
        await trio.lowlevel.checkpoint()

    async def get_state(self, program: str, *, session: str | None = None) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"program": program}


def search(backend: FakeBackend, candidates: int) -> CompileJob:
    options = check_options(
        "bootstrap_few_shot_with_random_search",
        {"num_candidate_programs": candidates, "max_bootstrapped_demos": 4, "max_labeled_demos": 4},
    )
    job = CompileJob(
        backend,  # type: ignore[arg-type]
        "student",
        optimizer="bootstrap_few_shot_with_random_search",
        options=options,
        trainset=devset(40),
        valset=devset(30, offset=100),
        metric="m",
        session=None,
        max_errors=10,
        concurrency=128,
        state={"demos": [], "signature": {"instructions": "", "fields": []}},
    )
    made = iter(range(10_000))

    async def create(state: dict[str, Any]) -> str:
        await trio.lowlevel.checkpoint()
        program = f"p{next(made)}"
        job._created.append(program)
        return program

    job._create = create  # type: ignore[method-assign]
    return job


async def test_every_candidate_starts_at_once_and_bootstrap_calls_pass_the_evaluation_gate(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = FakeBackend()
    job = search(backend, candidates=6)  # 3 fixed + 6 seeds: 7 of them bootstrap (-1, 0..5)
    result = await job.run()
    assert [c["seed"] for c in result.candidates] == list(range(-3, 6)), "DSPy's order"
    # every bootstrapping candidate (its teacher program) sent a call before any evaluation ended
    teachers = {p for m, p, _ in backend.sends if m == "bootstrap_example"}
    assert len(teachers) == 7, teachers
    assert backend.first_evaluation_done == teachers, (backend.first_evaluation_done, teachers)
    gate = SEARCH_EVALUATION_CALLS_PER_WORKER * WORKERS
    most_evaluations = max(seen.get("score_examples", 0) for _, _, seen in backend.sends)
    assert most_evaluations == gate, most_evaluations
    most_bootstraps = max(seen.get("bootstrap_example", 0) for _, _, seen in backend.sends)
    assert most_bootstraps > gate, "bootstrap calls are not held by the evaluation gate"


async def test_each_candidate_sends_bootstraps_only_as_far_ahead_as_the_demos_it_needs(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = FakeBackend(every=1)  # every example gives a demo: DSPy's loop takes 1 to 4 of them
    job = search(backend, candidates=4)
    await job.run()
    sent = collections.Counter(p for m, p, _ in backend.sends if m == "bootstrap_example")
    assert len(sent) == 5, sent
    for teacher, count in sent.items():  # never more in flight than demos still needed: none wasted
        assert count <= 4 and backend.most_by_program[teacher] <= SEARCH_BOOTSTRAPS_AHEAD_PER_DEMO * 4, (
            teacher,
            count,
            backend.most_by_program[teacher],
        )


async def test_with_an_lm_over_the_network_evaluation_calls_are_not_held_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = FakeBackend(lm={"model": "openai/some-model"})  # examples wait on the LM, many at once
    job = search(backend, candidates=4)
    result = await job.run()
    assert [c["seed"] for c in result.candidates] == list(range(-3, 4))
    most_evaluations = max(seen.get("score_examples", 0) for _, _, seen in backend.sends)
    assert most_evaluations > SEARCH_EVALUATION_CALLS_PER_WORKER * WORKERS, most_evaluations
