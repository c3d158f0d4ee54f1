"""Scenario 9 of ``python -m benchmarks``: programs from the operator's program module (issue 15).

- **CPU-bound** (``9_programs_cpu``): the registered three-predictor module of
  ``benchmarks/program_module.py`` (``pipeline``: three ``dspy.Predict`` calls per execution), offline LM,
  a 2-worker pool started with ``programs=[...]`` and driven by 16 concurrent callers, vs the same module
  run in-process on one thread (built and run exactly as a worker's ``execute`` does). Target: the pool
  >= 70 % of 2x the single-thread rate (as scenario 6 for a one-predictor program).
- **Start-up** (``9_programs_cold``): 16 workers ready with that program module (which also imports numpy
  and builds a 10 MB index at import) through the zygote, vs one cold ``python -c "import dspy, numpy"``.
  Target: <= 1.5x.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.dspy_exec import MAX_CALLS, drive

MODULE = "benchmarks.program_module"
PROGRAM = "pipeline"


def single_thread_rate(seconds: float, warmup: int = 20) -> dict[str, float]:
    """Executions/s of the registered module in this process, on this thread, with the offline LM."""
    import dspy

    from bridge_child import registry
    from bridge_child._offline_lm import offline_lm
    from bridge_child._programs import _arguments, _import_dspy, _outputs, materialize

    _import_dspy()
    registry.activate([MODULE])
    program = materialize({"module": PROGRAM})
    lm = offline_lm()

    def once(i: int) -> None:
        kwargs = _arguments(program, {"text": f"Text number {i} about trio and dspy."})
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter(), track_usage=True, disable_history=True):
            prediction = program.module(**kwargs)
        assert _outputs(program, prediction)["answer"]

    for i in range(warmup):
        once(i)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline and n < MAX_CALLS:
        once(n)
        n += 1
    return {"rate": n / (time.perf_counter() - t0), "calls": n}


async def pool_rate(seconds: float, concurrency: int) -> dict[str, Any]:
    import dspex_trio

    async with dspex_trio.open_pool(workers=2, programs=[MODULE]) as pool:
        pid = await pool.create_program(module=PROGRAM)

        async def call(i: int) -> Any:
            return await pool.execute(pid, {"text": f"Text number {i} about trio and dspy."})

        return await drive(call, concurrency, seconds, warmup=concurrency)


async def ready_with_programs(n: int, time_limit: float) -> float:
    import trio

    import dspex_trio

    t0 = time.perf_counter()
    with trio.fail_after(time_limit):
        async with dspex_trio.open_pool(workers=n, programs=[MODULE], launcher="zygote") as pool:
            ready = time.perf_counter() - t0
            stats = pool.statistics()
            if stats.ready != n:
                raise RuntimeError(f"{stats.ready} of {n} workers ready ({stats.circuit_reason})")
    return ready


def cold_import(code: str) -> float:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    return time.perf_counter() - t0


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    facts: dict[str, Any] = {}
    for part in spec["implementations"]:
        try:
            if part == "cpu":
                seconds, callers = spec["seconds"], spec["callers"]
                single = single_thread_rate(seconds)
                got = trio.run(pool_rate, seconds, callers)
                facts["cpu"] = {"single": single, "pool": got}
                base: dict[str, Any] = {
                    "scenario": "9_programs_cpu",
                    "metric": "executions_per_s",
                    "unit": "exec/s",
                }
                rows += [
                    {
                        **base,
                        "implementation": "in_process_1_thread",
                        "value": single["rate"],
                        "description": f"registered {PROGRAM} (3 predictors) in-process, one thread, offline LM",
                    },
                    {
                        **base,
                        "implementation": "2x_in_process_1_thread",
                        "value": 2 * single["rate"],
                        "description": "twice the single-thread rate: the ideal of 2 workers",
                    },
                    {
                        **base,
                        "implementation": "pool_2w",
                        "value": got["rate"],
                        "p50_ms": got["p50_ms"],
                        "description": f"open_pool(workers=2, programs=[...]).execute, {callers} callers",
                    },
                ]
                if got["errors"]:
                    errors.append(f"programs_cpu: {got['errors']} failed executions ({got['first_error']})")
            elif part == "cold":
                n = spec["workers"]
                baseline = cold_import("import dspy, numpy")
                ready = trio.run(ready_with_programs, n, spec["time_limit"])
                facts["cold"] = {"import_dspy_numpy_s": baseline, "ready_s": ready, "workers": n}
                base = {"scenario": "9_programs_cold", "metric": "seconds_to_ready", "unit": "ms"}
                rows += [
                    {
                        **base,
                        "implementation": "import_dspy_numpy",
                        "x": 1,
                        "value": baseline * 1000,
                        "description": 'one cold python -c "import dspy, numpy"',
                    },
                    {
                        **base,
                        "implementation": "zygote",
                        "x": n,
                        "value": ready * 1000,
                        "description": f"open_pool(workers={n}, programs=[{MODULE}], launcher='zygote')",
                    },
                ]
        except Exception as exc:
            errors.append(f"programs/{part}: {type(exc).__name__}: {exc}")
    return {"rows": rows, "errors": errors, "facts": {"programs": facts, "pid": os.getpid()}}
