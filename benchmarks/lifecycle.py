"""Scenarios 3, 4 and 5 of ``python -m benchmarks``: worker lifecycle.

3. Cold start to N ready workers (N = 1, 4, 16): the zygote launcher (the template's start included),
   the subprocess launcher (ready = handshake; dspy is imported on first use), the subprocess launcher
   with ``--preload`` (ready = dspy imported), N x ``python -c "import dspy"`` in parallel, and the
   DSPex way (N cold workers importing dspy, started one after another as DSPex pre-warmed them).
4. Recovery after SIGKILL under load: 16 callers keep a 2-worker pool busy with no-op calls; a worker is
   killed, and the time from the kill to its replacement being ready is taken from the pool's health
   events (``worker_state`` ... -> failed, then a new worker starting -> ready, with their time stamps).
5. Memory per worker after one DSPy execute (ChainOfThought, offline LM): USS (Private_Clean +
   Private_Dirty) and PSS from ``/proc/<pid>/smaps_rollup``.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks._common import percentile

COT = {"signature": "question -> answer", "module": "chain_of_thought"}


# -- 3. cold start ---------------------------------------------------------------------------------------
async def _pool_ready(n: int, launcher: Any) -> float:
    import dspex_trio

    t0 = time.perf_counter()
    async with dspex_trio.open_pool(workers=n, launcher=launcher) as pool:
        ready = time.perf_counter() - t0
        stats = pool.statistics()
        if stats.ready != n:
            raise RuntimeError(f"{stats.ready} of {n} workers ready ({stats.circuit_reason})")
    return ready


def _import_dspy_parallel(n: int) -> float:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", "import dspy"], env=env) for _ in range(n)]
    try:
        for p in procs:
            if p.wait(timeout=120) != 0:
                raise RuntimeError(f"python -c 'import dspy' exited {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return time.perf_counter() - t0


async def _dspex_way_ready(n: int) -> float:
    from benchmarks.dspex_way import open_dspex_way_pool

    t0 = time.perf_counter()
    async with open_dspex_way_pool(n, sequential=True):
        return time.perf_counter() - t0


async def _warm_pools(n: int, pools: int) -> list[float]:
    """Issue 21: ``pools`` pools of ``n`` workers opened one after another on one warm launcher; for
    each, the time from before ``open_pool`` to its first call answered (the template's own start, and
    one warm-up pool, are not counted: that is the point of a launcher that outlives pools)."""
    import dspex_trio

    async with dspex_trio.open_launcher("zygote") as launcher:
        await launcher.wait_ready()
        async with dspex_trio.open_pool(workers=n, launcher=launcher) as pool:  # warm-up
            await pool.call("ping")
        times = []
        for _ in range(pools):
            t0 = time.perf_counter()
            async with dspex_trio.open_pool(workers=n, launcher=launcher) as pool:
                await pool.call("ping")
                times.append(time.perf_counter() - t0)
    return times


COLD_START = {
    "zygote": "open_pool(launcher='zygote'): template start (imports dspy) + N forks + handshakes",
    "subprocess": "open_pool(launcher='subprocess'): N x python -m bridge_child, ready at the handshake "
    "(dspy imported on first use)",
    "subprocess_preload": "SubprocessLauncher(extra_args=['--preload']): ready with dspy imported",
    "import_dspy": 'N x python -c "import dspy" started at once, until all exit',
    "dspex_way": "DSPex way: N cold workers importing dspy, started one after another",
    "warm": "open_pool(launcher=<a warm open_launcher('zygote')>) to its first call answered, "
    "p50 (p99) over 20 pools opened one after another on it (issue 21)",
}


def measure_cold_start(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    from dspex_trio._launcher import SubprocessLauncher

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for name in spec["implementations"]:
        for n in spec["sizes"]:
            if name == "dspex_way" and n > spec.get("dspex_way_max", 16):
                continue
            if name == "warm":
                continue  # at its own sizes, below
            try:
                if name == "import_dspy":
                    seconds = _import_dspy_parallel(n)
                elif name == "dspex_way":
                    seconds = trio.run(_dspex_way_ready, n)
                else:
                    launcher: Any = name
                    if name == "subprocess_preload":
                        launcher = SubprocessLauncher(extra_args=("--preload",))

                    async def run(n: int = n, launcher: Any = launcher) -> float:
                        with trio.fail_after(spec["time_limit"]):
                            return await _pool_ready(n, launcher)

                    seconds = trio.run(run)
            except Exception as exc:
                errors.append(f"cold_start/{name}/N={n}: {type(exc).__name__}: {exc}")
                continue
            rows.append(
                {
                    "scenario": "3_cold_start",
                    "implementation": name,
                    "metric": "seconds_to_ready",
                    "x": n,
                    "value": seconds * 1000,
                    "unit": "ms",
                    "description": COLD_START[name],
                }
            )
    if "warm" in spec["implementations"]:
        rows += _measure_warm(spec, errors)
    return {"rows": rows, "errors": errors}


def _measure_warm(spec: dict[str, Any], errors: list[str]) -> list[dict[str, Any]]:
    import trio

    rows: list[dict[str, Any]] = []
    for n in spec.get("warm_sizes", [2, 16]):

        async def run(n: int = n) -> list[float]:
            with trio.fail_after(spec["time_limit"]):
                return await _warm_pools(n, spec.get("warm_pools", 20))

        try:
            times = trio.run(run)
        except Exception as exc:
            errors.append(f"cold_start/warm/N={n}: {type(exc).__name__}: {exc}")
            continue
        base = {"scenario": "3_cold_start", "implementation": "warm", "x": n, "unit": "ms"}
        base["description"] = COLD_START["warm"]
        rows.append({**base, "metric": "seconds_to_ready", "value": statistics.median(times) * 1000})
        rows.append({**base, "metric": "seconds_to_ready_p99", "value": percentile(times, 99) * 1000})
    return rows


# -- 4. recovery after SIGKILL under load ----------------------------------------------------------------
async def _recovery(launcher: str, kills: int, callers: int, time_limit: float) -> dict[str, Any]:
    import trio

    import dspex_trio

    events: list[Any] = []
    changed = [trio.Event()]
    recover_s: list[float] = []
    detect_s: list[float] = []
    load_calls = [0, 0]  # ok, failed

    async with (
        dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool,
        pool.subscribe_health(buffer=4096) as sub,
        trio.open_nursery() as nursery,
    ):

        async def collect() -> None:
            async for event in sub:
                events.append(event)
                changed[0].set()
                changed[0] = trio.Event()

        async def load(k: int) -> None:
            j = 0
            while True:
                j += 1
                try:
                    await pool.call("echo", {"value": j})
                    load_calls[0] += 1
                except dspex_trio.DspexError:
                    load_calls[1] += 1
                    await trio.sleep(0.001)

        async def wait_for(pred: Any, limit: float) -> Any:
            with trio.fail_after(limit):
                while True:
                    for e in events:
                        if pred(e):
                            return e
                    await changed[0].wait()

        async def stable() -> None:
            with trio.fail_after(15):
                while True:
                    stats = pool.statistics()
                    if stats.ready == 2 and all(w.calls_served > 0 for w in stats.workers):
                        return
                    await trio.sleep(0.005)

        nursery.start_soon(collect)
        for k in range(callers):
            nursery.start_soon(load, k)
        with trio.fail_after(time_limit):
            for k in range(kills):
                await stable()
                await trio.sleep(0.05)
                victim = pool.workers()[k % 2]
                vid, vpid = victim.worker_id, victim.pid
                events.clear()
                t0 = time.time()
                os.kill(vpid, signal.SIGKILL)
                failed = await wait_for(
                    lambda e, vid=vid: (
                        e.kind == "worker_state" and e.data["worker_id"] == vid and e.data["to"] == "failed"
                    ),
                    10,
                )
                ready = await wait_for(
                    lambda e, vid=vid: (
                        e.kind == "worker_state"
                        and e.data["worker_id"] != vid
                        and e.data["from"] == "starting"
                        and e.data["to"] == "ready"
                    ),
                    20,
                )
                detect_s.append(failed.time - t0)
                recover_s.append(ready.time - t0)
        stats = pool.statistics()
        nursery.cancel_scope.cancel()
    return {
        "recover_s": recover_s,
        "detect_s": detect_s,
        "load_ok": load_calls[0],
        "load_failed": load_calls[1],
        "restarts": stats.restarts,
        "circuit": str(stats.circuit),
    }


def measure_recovery(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    facts: dict[str, Any] = {}
    for launcher in spec["implementations"]:
        kills = spec["kills"][launcher]
        try:
            got = trio.run(_recovery, launcher, kills, spec["callers"], spec["time_limit"])
        except Exception as exc:
            errors.append(f"recovery/{launcher}: {type(exc).__name__}: {exc}")
            continue
        facts[launcher] = {k: v for k, v in got.items() if not k.endswith("_s")}
        rec = [x * 1000 for x in got["recover_s"]]
        det = [x * 1000 for x in got["detect_s"]]
        base = {
            "scenario": "4_recovery",
            "implementation": launcher,
            "unit": "ms",
            "samples": len(rec),
            "description": f"SIGKILL a worker of a 2-worker {launcher} pool under load "
            f"({spec['callers']} callers); kill -> replacement ready, from health events",
        }
        rows.append({**base, "metric": "kill_to_ready_p50", "value": statistics.median(rec)})
        rows.append({**base, "metric": "kill_to_ready_p99", "value": percentile(rec, 99)})
        rows.append({**base, "metric": "kill_to_failed_p50", "value": statistics.median(det)})
        rows.append({**base, "metric": "kill_to_ready_samples", "value": rec, "unit": "ms (list)"})
    return {"rows": rows, "errors": errors, "facts": {"recovery": facts}}


# -- 5. memory -------------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, int]:
    """USS (Private_Clean + Private_Dirty + Private_Hugetlb), PSS and RSS of ``pid``, in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0) + fields.get("Private_Hugetlb", 0)
    return {"uss": uss, "pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0)}


async def _memory(launcher: str, workers: int) -> dict[str, Any]:
    import trio

    import dspex_trio

    async with dspex_trio.open_pool(workers=workers, launcher=launcher) as pool:
        # One DSPy execute on every worker (directly on each, so every one has run one).
        params = {"program": {"id": "p_bench_mem", "version": 1, "spec": COT}, "inputs": {"question": "Why?"}}
        for worker in pool.workers():
            answer = await worker.call("execute", params)
            assert "answer" in answer["outputs"], answer
        await trio.sleep(0.2)
        per_worker = [smaps_rollup(w.pid) for w in pool.workers()]
        template = None
        zygote_pid = getattr(pool._launcher, "pid", None)
        if launcher == "zygote" and zygote_pid:
            template = smaps_rollup(zygote_pid)
    return {"workers": per_worker, "template": template}


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    facts: dict[str, Any] = {}
    for launcher in spec["implementations"]:
        try:
            got = trio.run(_memory, launcher, spec["workers"])
        except Exception as exc:
            errors.append(f"memory/{launcher}: {type(exc).__name__}: {exc}")
            continue
        facts[launcher] = got
        base = {
            "scenario": "5_memory",
            "implementation": launcher,
            "unit": "MB",
            "description": f"per worker of a {spec['workers']}-worker {launcher} pool after one "
            "ChainOfThought execute (offline LM); mean over the workers",
        }
        for key in ("uss", "pss", "rss"):
            value = statistics.mean(w[key] for w in got["workers"]) / 1e6
            rows.append({**base, "metric": key, "value": value})
        if got["template"]:
            rows.append(
                {
                    **base,
                    "implementation": "zygote_template",
                    "metric": "uss",
                    "value": got["template"]["uss"] / 1e6,
                    "description": "the zygote's template process (one per pool)",
                }
            )
    return {"rows": rows, "errors": errors, "facts": {"memory": facts}}
