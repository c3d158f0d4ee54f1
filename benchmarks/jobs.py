"""Scenario 10 of ``python -m benchmarks``: evaluation and optimization jobs on the pool (issue 16).

The program is ``benchmarks/jobs_module.py``'s registered ``pipeline`` (three ``dspy.Predict`` calls per
execution) scored by its ``agrees`` metric; in-process runs use the same module, metric and data with
the offline LM (``dspy.context(lm=offline_lm(), adapter=dspy.ChatAdapter())``, as a worker runs it).

- **10a, CPU-bound** (``10_evaluate_cpu``): ``pool.evaluate`` of ``n`` examples (2,000 in a full run),
  offline LM, 2 workers, vs ``dspy.Evaluate(num_threads=8)`` in-process. Target: >= 1.6x its rate.
- **10b, I/O-bound** (``10_evaluate_io``): the same with ``fake-lm --latency 0.1`` (a separate process),
  256 examples in flight (a pool of 2 workers of capacity 128), vs the ideal ``min(256 / latency, CPU
  ceiling)``, the ceiling measured the same way against a fake-lm with no latency. Target: >= 90 % of
  the ideal; ``dspy.Evaluate(num_threads=256)`` in-process is shown beside it.
- **10c, optimizer** (``10_random_search``): ``bootstrap_few_shot_with_random_search`` with 4 candidate
  programs (DSPy's 4 + its 3 fixed candidates: zero-shot, labeled, unshuffled), 50 training and 50
  validation examples, offline LM, 2 workers, vs the same optimizer in-process with ``num_threads=8``.
  Target: wall time <= 0.65x.
- **10d, MIPROv2** (``10_mipro``): ``mipro_v2`` (``MIPRO`` below: 6 candidates, 10 trials on
  minibatches of 25, full evaluations every 5), same data, offline LM, 2 workers, vs ``dspy.MIPROv2(
  num_threads=8)`` in-process. No target (the issue sets none): shown; a round fails if the trials'
  scores differ.

Both sides of each comparison run in the same measuring process, one after the other.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from typing import Any

from benchmarks import jobs_module
from benchmarks.dspy_exec import FakeLMProcess

MODULE = "benchmarks.jobs_module"
PROGRAM = "pipeline"
IO_CAPACITY = 128
"""Per-worker capacity of the I/O-bound pool (2 workers: 256 examples in flight)."""


def _quiet() -> contextlib.AbstractContextManager[Any]:
    """DSPy's optimizers print and log per candidate; the benchmark's own output stays readable."""
    logging.getLogger("dspy").setLevel(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())


def _lm(url: str | None) -> Any:
    import dspy

    from bridge_child._offline_lm import offline_lm

    if url is None:
        return offline_lm()
    return dspy.LM("openai/fake", api_base=url, api_key="x", num_retries=0, cache=False)


def in_process_evaluate(n: int, threads: int, url: str | None = None) -> dict[str, Any]:
    """``dspy.Evaluate(num_threads=threads)`` of ``n`` examples in this process: its rate and score."""
    import dspy

    dataset = jobs_module.examples(jobs_module.devset(n))
    evaluate = dspy.Evaluate(devset=dataset, metric=jobs_module.agrees, num_threads=threads)
    with _quiet(), dspy.context(lm=_lm(url), adapter=dspy.ChatAdapter(), disable_history=True):
        evaluate(jobs_module.Pipeline(), devset=dataset[: min(n, 32)])  # warm-up
        t0 = time.perf_counter()
        result = evaluate(jobs_module.Pipeline())
        seconds = time.perf_counter() - t0
    return {"rate": n / seconds, "seconds": seconds, "score": result.score}


async def pool_evaluate(
    n: int, url: str | None = None, concurrency: int | None = None, capacity: int | None = None
) -> dict[str, Any]:
    """``pool.evaluate`` of ``n`` examples on a 2-worker pool: its rate and score."""
    import dspex_trio

    options: dict[str, Any] = {"workers": 2, "programs": [MODULE]}
    if capacity is not None:
        options["capacity"] = capacity
    async with dspex_trio.open_pool(**options) as pool:
        if url is not None:
            await pool.configure_lm("openai/fake", api_base=url, api_key="x", num_retries=0)
        pid = await pool.create_program(module=PROGRAM)
        warm = jobs_module.devset(min(n, 64), offset=n)
        async with pool.evaluate(pid, warm, metric="agrees", concurrency=concurrency) as job:
            await job.wait()
        t0 = time.perf_counter()
        async with pool.evaluate(pid, jobs_module.devset(n), metric="agrees", concurrency=concurrency) as job:
            result = await job.wait()
        seconds = time.perf_counter() - t0
    return {"rate": n / seconds, "seconds": seconds, "score": result.score, "errors": result.errors}


RANDOM_SEARCH = {"num_candidate_programs": 4, "max_bootstrapped_demos": 4, "max_labeled_demos": 16}


def in_process_random_search(train: int, val: int, threads: int) -> dict[str, Any]:
    import dspy

    trainset = jobs_module.examples(jobs_module.devset(train))
    valset = jobs_module.examples(jobs_module.devset(val, offset=train))
    optimizer = dspy.BootstrapFewShotWithRandomSearch(
        metric=jobs_module.agrees, num_threads=threads, **RANDOM_SEARCH
    )
    with _quiet(), dspy.context(lm=_lm(None), adapter=dspy.ChatAdapter(), disable_history=True):
        t0 = time.perf_counter()
        best = optimizer.compile(jobs_module.Pipeline(), trainset=trainset, valset=valset)
        seconds = time.perf_counter() - t0
    scores = {c["seed"]: c["score"] for c in best.candidate_programs}
    return {"seconds": seconds, "scores": scores}


async def pool_random_search(train: int, val: int) -> dict[str, Any]:
    import dspex_trio

    async with dspex_trio.open_pool(workers=2, programs=[MODULE]) as pool:
        pid = await pool.create_program(module=PROGRAM)
        warm = jobs_module.devset(32, offset=train + val)
        async with pool.evaluate(pid, warm, metric="agrees") as job:
            await job.wait()
        t0 = time.perf_counter()
        async with pool.compile(
            pid,
            optimizer="bootstrap_few_shot_with_random_search",
            trainset=jobs_module.devset(train),
            valset=jobs_module.devset(val, offset=train),
            metric="agrees",
            options=RANDOM_SEARCH,
        ) as job:
            result = await job.wait()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "scores": {c["seed"]: c["score"] for c in result.candidates}}


MIPRO = {
    "auto": None,
    "num_candidates": 6,
    "num_trials": 10,
    "max_bootstrapped_demos": 4,
    "max_labeled_demos": 4,
    "minibatch_size": 25,
    "minibatch_full_eval_steps": 5,
}
_MIPRO_COMPILE = ("num_trials", "minibatch_size", "minibatch_full_eval_steps")


def mipro_options(val: int) -> dict[str, Any]:
    """``MIPRO``, its minibatch no larger than the valset (the smoke test's tiny one)."""
    return {**MIPRO, "minibatch_size": min(MIPRO["minibatch_size"], val)}


def in_process_mipro(train: int, val: int, threads: int) -> dict[str, Any]:
    import warnings

    import dspy

    trainset = jobs_module.examples(jobs_module.devset(train))
    valset = jobs_module.examples(jobs_module.devset(val, offset=train))
    options = mipro_options(val)
    constructor = {k: v for k, v in options.items() if k not in _MIPRO_COMPILE}
    with warnings.catch_warnings(), _quiet(), dspy.context(lm=_lm(None), adapter=dspy.ChatAdapter()):
        warnings.simplefilter("ignore")
        logging.getLogger("optuna").setLevel(logging.ERROR)
        optimizer = dspy.MIPROv2(metric=jobs_module.agrees, num_threads=threads, **constructor)
        t0 = time.perf_counter()
        best = optimizer.compile(
            jobs_module.Pipeline(),
            trainset=trainset,
            valset=valset,
            **{k: options[k] for k in _MIPRO_COMPILE},
        )
        seconds = time.perf_counter() - t0
    scores = [log.get("full_eval_score", log.get("mb_score")) for _, log in sorted(best.trial_logs.items())]
    return {"seconds": seconds, "scores": scores}


async def pool_mipro(train: int, val: int) -> dict[str, Any]:
    import dspex_trio

    async with dspex_trio.open_pool(workers=2, programs=[MODULE]) as pool:
        pid = await pool.create_program(module=PROGRAM)
        warm = jobs_module.devset(32, offset=train + val)
        async with pool.evaluate(pid, warm, metric="agrees") as job:
            await job.wait()
        t0 = time.perf_counter()
        async with pool.compile(
            pid,
            optimizer="mipro_v2",
            trainset=jobs_module.devset(train),
            valset=jobs_module.devset(val, offset=train),
            metric="agrees",
            options=mipro_options(val),
        ) as job:
            result = await job.wait()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "scores": [c["score"] for c in result.candidates]}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    facts: dict[str, Any] = {}
    for part in spec["implementations"]:
        try:
            if part == "cpu":
                n = spec["examples"]
                theirs = in_process_evaluate(n, 8)
                ours = trio.run(pool_evaluate, n)
                facts["cpu"] = {"in_process": theirs, "pool": ours}
                if ours["score"] != theirs["score"]:
                    errors.append(f"evaluate_cpu: scores differ ({ours['score']} vs {theirs['score']})")
                base: dict[str, Any] = {
                    "scenario": "10_evaluate_cpu",
                    "metric": "examples_per_s",
                    "unit": "ex/s",
                }
                rows += [
                    {
                        **base,
                        "implementation": "dspy_evaluate_8_threads",
                        "value": theirs["rate"],
                        "description": f"dspy.Evaluate(num_threads=8) in-process, {n} examples, offline LM",
                    },
                    {
                        **base,
                        "implementation": "pool_2w",
                        "value": ours["rate"],
                        "description": f"pool.evaluate, 2 workers, {n} examples, offline LM",
                    },
                ]
            elif part == "io":
                n, latency, inflight = spec["io_examples"], spec["latency"], spec["in_flight"]
                fake = FakeLMProcess(latency)
                fake0 = FakeLMProcess(0.0)
                try:
                    ours = trio.run(pool_evaluate, n, fake.url, inflight, IO_CAPACITY)
                    ceiling = trio.run(pool_evaluate, n, fake0.url, inflight, IO_CAPACITY)
                    theirs = in_process_evaluate(n, inflight, fake.url)
                finally:
                    fake.close()
                    fake0.close()
                ideal = min(inflight / latency, ceiling["rate"])
                facts["io"] = {"pool": ours, "ceiling": ceiling, "in_process": theirs, "latency_s": latency}
                base = {
                    "scenario": "10_evaluate_io",
                    "metric": "examples_per_s",
                    "unit": "ex/s",
                    "x": inflight,
                }
                rows += [
                    {
                        **base,
                        "implementation": "ideal",
                        "value": ideal,
                        "description": f"min({inflight} in flight / {latency} s, CPU ceiling {ceiling['rate']:.0f}/s)",
                    },
                    {
                        **base,
                        "implementation": "pool_2w",
                        "value": ours["rate"],
                        "description": f"pool.evaluate, 2 workers x {IO_CAPACITY}, {inflight} in flight, "
                        f"fake-lm at {latency * 1000:.0f} ms, {n} examples",
                    },
                    {
                        **base,
                        "implementation": "dspy_evaluate_256_threads",
                        "value": theirs["rate"],
                        "description": f"dspy.Evaluate(num_threads={inflight}) in-process, same fake-lm",
                    },
                ]
                if ours["errors"]:
                    errors.append(f"evaluate_io: {ours['errors']} failed examples")
            elif part == "random_search":
                train, val = spec["train"], spec["val"]
                theirs = in_process_random_search(train, val, 8)
                ours = trio.run(pool_random_search, train, val)
                facts["random_search"] = {"in_process": theirs, "pool": ours}
                if {int(k): v for k, v in ours["scores"].items()} != theirs["scores"]:
                    errors.append(
                        f"random_search: candidate scores differ ({ours['scores']} vs {theirs['scores']})"
                    )
                base = {"scenario": "10_random_search", "metric": "seconds", "unit": "s"}
                rows += [
                    {
                        **base,
                        "implementation": "in_process_8_threads",
                        "value": theirs["seconds"],
                        "description": f"dspy.BootstrapFewShotWithRandomSearch(num_candidate_programs=4, "
                        f"num_threads=8), {train}/{val} examples, offline LM",
                    },
                    {
                        **base,
                        "implementation": "pool_2w",
                        "value": ours["seconds"],
                        "description": "pool.compile(optimizer='bootstrap_few_shot_with_random_search'), 2 workers",
                    },
                ]
            elif part == "mipro":
                train, val = spec["train"], spec["val"]
                theirs = in_process_mipro(train, val, 8)
                ours = trio.run(pool_mipro, train, val)
                facts["mipro"] = {"in_process": theirs, "pool": ours}
                if ours["scores"] != theirs["scores"]:
                    errors.append(f"mipro: trial scores differ ({ours['scores']} vs {theirs['scores']})")
                base = {"scenario": "10_mipro", "metric": "seconds", "unit": "s"}
                rows += [
                    {
                        **base,
                        "implementation": "in_process_8_threads",
                        "value": theirs["seconds"],
                        "description": f"dspy.MIPROv2(num_candidates=6, num_threads=8), 10 trials, {train}/{val} "
                        "examples, offline LM",
                    },
                    {
                        **base,
                        "implementation": "pool_2w",
                        "value": ours["seconds"],
                        "description": "pool.compile(optimizer='mipro_v2'), 2 workers",
                    },
                ]
        except Exception as exc:
            errors.append(f"jobs/{part}: {type(exc).__name__}: {exc}")
    return {"rows": rows, "errors": errors, "facts": {"jobs": facts, "pid": os.getpid()}}
