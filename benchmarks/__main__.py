"""Every benchmark scenario of dspex-trio beside its anchors, in one run.

``python -m benchmarks [--quick] [--output results.json] [--plots DIR] [--check]``

Writes the results as JSON (rows ``{scenario, implementation, metric, value, unit, anchor, ratio}``,
the targets, machine facts), prints a summary table, and draws one PNG per scenario family into a folder
next to the JSON (``results/`` for ``results.json``). ``--quick`` takes under 3 minutes on 2 cores;
``--check`` exits 1 when a target is missed (or could not be measured), printing which. Method:
``docs/benchmarks.md``.

Every round of every family runs in a fresh measuring subprocess on a snapshot of the code (see
``benchmarks/_common.py``); after each, the driver checks that no process it started is left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from typing import Any

from benchmarks import _common

# -- the families: module, rounds, and the spec of each round ---------------------------------------------
NOOP_RT = [
    "raw_pipe",
    "trio_pipe",
    "open_worker",
    "pool",
    "trio_parallel",
    "process_pool_executor",
    "anyio_to_process",
    "dspex_way",
]
NOOP_TP = [
    "raw_pipelined",
    "trio_pipe",
    "open_worker",
    "pool",
    "trio_parallel",
    "process_pool_executor",
    "anyio_to_process",
    "dspex_way",
]
COLD = ["zygote", "subprocess", "subprocess_preload", "import_dspy", "dspex_way", "warm"]


def plan(
    args: argparse.Namespace, cpu: int, all_cpus: list[int]
) -> list[tuple[str, str, dict[str, Any], float]]:
    """(family, module, spec, estimated seconds) of every round, in the order they run."""
    q = args.quick
    only = set(args.only.split(",")) if args.only else None
    impl = set(args.impl.split(",")) if args.impl else None

    def pick(names: list[str]) -> list[str]:
        return [n for n in names if impl is None or n in impl]

    steps: list[tuple[str, str, dict[str, Any], float]] = []

    def want(family: str) -> bool:
        return only is None or family in only

    rounds = args.rounds
    if want("noop"):
        for r in range(rounds or (2 if q else 5)):
            limit = 30.0 if q else 120.0
            if pick(NOOP_RT):
                spec = {
                    "scenario": "round_trip",
                    "implementations": _common.rotate(pick(NOOP_RT), r),
                    "warmup": 200,
                    "n": args.n or (1_000 if q else 5_000),
                    "cpus": [cpu],
                    "time_limit": limit,
                }
                steps.append(("noop", "benchmarks.noop", spec, 10.0 if q else 25.0))
            if pick(NOOP_TP):
                spec = {
                    "scenario": "throughput",
                    "implementations": _common.rotate(pick(NOOP_TP), r),
                    "warmup": 640,
                    "n": args.calls or (6_400 if q else 32_000),
                    "cpus": all_cpus,
                    "time_limit": limit,
                }
                steps.append(("noop", "benchmarks.noop", spec, 12.0 if q else 40.0))
    if want("cold_start") and pick(COLD):
        for r in range(rounds or (1 if q else 3)):
            spec = {
                "implementations": _common.rotate(pick(COLD), r),
                "sizes": [1, 4, 16],
                "dspex_way_max": 4 if q else 16,
                "time_limit": 120.0,
                "warm_sizes": [2, 16],  # issue 21: pools on a warm launcher
                "warm_pools": 20,
            }
            steps.append(("cold_start", "benchmarks.lifecycle", spec, 30.0 if q else 60.0))
    if want("recovery"):
        for _ in range(rounds or 1):
            spec = {
                "implementations": pick(["zygote", "subprocess"]),
                "kills": {"zygote": 10 if q else 20, "subprocess": 5 if q else 20},
                "callers": 16,
                "time_limit": 120.0,
            }
            steps.append(("recovery", "benchmarks.lifecycle", spec, 12.0 if q else 40.0))
    if want("memory"):
        for r in range(rounds or (1 if q else 2)):
            spec = {"implementations": _common.rotate(pick(["zygote", "subprocess"]), r), "workers": 2}
            steps.append(("memory", "benchmarks.lifecycle", spec, 6.0))
    if want("dspy"):
        for r in range(rounds or (1 if q else 2)):
            spec = {
                "implementations": _common.rotate(pick(["cpu", "io"]), r),
                "seconds": 2.0 if q else 5.0,
                "cpu_concurrency": [16, 8],  # the first is the target's (saturating) load
                "latency": 0.1,
                "concurrency": [1, 16, 64, 256],
            }
            steps.append(("dspy", "benchmarks.dspy_exec", spec, 25.0 if q else 60.0))
    if want("programs"):
        for r in range(rounds or (1 if q else 2)):
            spec = {
                "implementations": _common.rotate(pick(["cpu", "cold"]), r),
                "seconds": 2.0 if q else 5.0,
                "callers": 16,
                "workers": 16,
                "time_limit": 120.0,
            }
            steps.append(("programs", "benchmarks.programs", spec, 25.0 if q else 45.0))
    if want("websocket"):
        from benchmarks.ws import IMPLEMENTATIONS as WS

        for r in range(rounds or (1 if q else 2)):
            spec = {
                "clients": [1, 16, 64],
                "seconds": 2.0 if q else 5.0,
                "implementations": _common.rotate(pick(list(WS)), r),
                # the targets' layouts first (benchmarks/ws.py)
                "layouts": ["isolated", "pinned", "unpinned"],
                "pairs": 3 if q else 5,  # the client's overhead: interleaved pairs of 1 s / 2 s runs
                "pair_seconds": 1.0 if q else 2.0,
                "time_limit": 900.0,
            }
            steps.append(("websocket", "benchmarks.ws", spec, 140.0 if q else 320.0))
    if want("metrics"):
        for _ in range(rounds or (1 if q else 3)):
            spec = {
                "implementations": pick(["scrape", "noop"]),
                "workers": 64,
                "scrapes": 50 if q else 200,
                "warmup": 64,
                "calls": 1_600 if q else 3_200,
                "pairs": 6 if q else 12,
                "cpus": all_cpus,
                "time_limit": 300.0,
            }
            steps.append(("metrics", "benchmarks.metrics", spec, 30.0 if q else 60.0))
    if want("lm_layer"):
        for r in range(rounds or 1):
            spec = {
                "implementations": _common.rotate(pick(["async", "threads"]), r),
                "in_flight": 4_096,
                "latency": 20.0,  # the figure: ideal 205/s, under the CPU ceiling of 2 workers
                "window": 20.0 if q else 40.0,
                # 12_lm_cancel: the 1,000 on the lane; the thread path at 100 (64 per worker)
                "cancel": {
                    impl: {"async": 1_000, "threads": 100}[impl] for impl in pick(["async", "threads"])
                },
            }
            steps.append(("lm_layer", "benchmarks.lm_layer", spec, 130.0 if q else 170.0))
    if want("jobs"):
        for r in range(rounds or (1 if q else 2)):
            spec = {
                "implementations": _common.rotate(pick(["cpu", "io", "random_search", "mipro"]), r),
                "examples": 500 if q else 2000,
                "io_examples": 1280 if q else 5120,
                "latency": 0.1,
                "in_flight": 256,
                "train": 50,
                "val": 50,
                "time_limit": 300.0,
            }
            steps.append(("jobs", "benchmarks.jobs", spec, 40.0 if q else 90.0))
    return steps


def measure(family: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The body of one measuring subprocess: one round of one family."""
    if family == "noop":
        from benchmarks import noop

        result = noop.measure(spec)
    elif family in ("cold_start", "recovery", "memory"):
        from benchmarks import lifecycle

        fn = {
            "cold_start": lifecycle.measure_cold_start,
            "recovery": lifecycle.measure_recovery,
            "memory": lifecycle.measure_memory,
        }[family]
        result = fn(spec)
    elif family == "dspy":
        from benchmarks import dspy_exec

        result = dspy_exec.measure(spec)
    elif family == "programs":
        from benchmarks import programs

        result = programs.measure(spec)
    elif family == "websocket":
        from benchmarks import ws

        result = ws.measure(spec)
    elif family == "metrics":
        from benchmarks import metrics

        result = metrics.measure(spec)
    elif family == "lm_layer":
        from benchmarks import lm_layer

        result = lm_layer.measure(spec)
    elif family == "jobs":
        from benchmarks import jobs

        result = jobs.measure(spec)
    else:
        raise SystemExit(f"unknown family {family!r}")
    result.setdefault("facts", {})["code_under_test"] = _common.code_under_test()
    result["facts"]["imported_from"] = _common.imported_from()
    return result


# -- anchors and targets ----------------------------------------------------------------------------------
# scenario -> (anchor implementation, x of the anchor: "same" or a fixed value)
ANCHORS: dict[str, tuple[str, Any]] = {
    "1_round_trip": ("raw_pipe", "same"),
    "2_throughput": ("raw_pipelined", "same"),
    "3_cold_start": ("import_dspy", 1),
    "4_recovery": ("subprocess", "same"),
    "5_memory": ("subprocess", "same"),
    "6_dspy_cpu": ("2x_in_process_1_thread", "same"),
    "6_dspy_io": ("ideal", "same"),
    "7_websocket": ("in_process", "same"),
    "7_websocket_cost": ("bare_forwarder", "same"),
    "7_websocket_client": ("websockets_submit", "same"),
    "7_websocket_isolated": ("in_process", "same"),
    "7_websocket_cost_isolated": ("bare_forwarder", "same"),
    "7_websocket_unpinned": ("in_process", "same"),
    "7_websocket_cost_unpinned": ("bare_forwarder", "same"),
    "8_dspex_way": ("dspex_way", "same"),
    "9_programs_cpu": ("2x_in_process_1_thread", "same"),
    "9_programs_cold": ("import_dspy_numpy", 1),
    "11_scrape": ("statistics", "same"),
    "11_noop_metrics": ("metrics_off", "same"),
    "12_lm_in_flight": ("ideal", "same"),
    "10_evaluate_cpu": ("dspy_evaluate_8_threads", "same"),
    "10_evaluate_io": ("ideal", "same"),
    "10_random_search": ("in_process_8_threads", "same"),
    "10_mipro": ("in_process_8_threads", "same"),
}

# (id, scenario, implementation, metric, x, op, threshold, versus: (implementation, x) or None, what)
TARGETS: list[tuple[str, str, str, str, Any, str, float, tuple[str, Any] | None, str]] = [
    (
        "1",
        "1_round_trip",
        "open_worker",
        "p50",
        None,
        "<=",
        0.8,
        ("trio_parallel", None),
        "open_worker round trip <= 0.8x trio_parallel",
    ),
    (
        "2a",
        "2_throughput",
        "open_worker",
        "calls_per_s",
        None,
        ">=",
        2.5,
        ("trio_parallel", None),
        "one worker >= 2.5x trio_parallel",
    ),
    (
        "2b",
        "2_throughput",
        "pool",
        "calls_per_s",
        None,
        ">=",
        2.5,
        ("trio_parallel", None),
        "pool of 2 >= 2.5x trio_parallel",
    ),
    (
        "2c",
        "2_throughput",
        "pool",
        "calls_per_s",
        None,
        ">=",
        3.0,
        ("process_pool_executor", None),
        "pool of 2 >= 3x ProcessPoolExecutor",
    ),
    (
        "3",
        "3_cold_start",
        "zygote",
        "seconds_to_ready",
        16,
        "<=",
        1.5,
        ("import_dspy", 1),
        "16 zygote workers ready <= 1.5x one cold `python -c 'import dspy'`",
    ),
    (
        "4",
        "4_recovery",
        "zygote",
        "kill_to_ready_p99",
        None,
        "<=",
        50.0,
        None,
        "zygote recovery p99 <= 50 ms",
    ),
    ("5", "5_memory", "zygote", "uss", None, "<=", 45.0, None, "zygote worker USS <= 45 MB"),
    (
        "6a",
        "6_dspy_cpu",
        "pool_2w",
        "executions_per_s",
        None,
        ">=",
        0.7,
        ("2x_in_process_1_thread", None),
        "CPU-bound pool >= 70% of 2x single-thread",
    ),
    (
        "6b",
        "6_dspy_io",
        "pool_2w",
        "executions_per_s",
        256,
        ">=",
        0.8,
        ("ideal", 256),
        "I/O-bound at 256 >= 80% of the ideal",
    ),
    (
        "9a",
        "9_programs_cpu",
        "pool_2w",
        "executions_per_s",
        None,
        ">=",
        0.7,
        ("2x_in_process_1_thread", None),
        "registered 3-predictor module: pool >= 70% of 2x single-thread",
    ),
    (
        "9b",
        "9_programs_cold",
        "zygote",
        "seconds_to_ready",
        16,
        "<=",
        1.5,
        ("import_dspy_numpy", 1),
        "16 workers with a numpy program module <= 1.5x `import dspy, numpy`",
    ),
    # 7a (1 client) was dropped by issue 20: its ratio stays in the rows (7_websocket_isolated, x 1), the
    # 0.6 target holds at 16 and 64 clients, with the clients off the server's and the workers' CPUs.
    (
        "7b",
        "7_websocket_isolated",
        "websocket",
        "executions_per_s",
        16,
        ">=",
        0.6,
        ("in_process", 16),
        "websocket >= 60% of in-process (clients off the server's and workers' CPU), 16 clients",
    ),
    (
        "7c",
        "7_websocket_isolated",
        "websocket",
        "executions_per_s",
        64,
        ">=",
        0.6,
        ("in_process", 64),
        "websocket >= 60% of in-process (clients off the server's and workers' CPU), 64 clients",
    ),
    *(
        (
            f"7{tid}",
            "7_websocket_cost",
            "websocket",
            "executions_per_s",
            k,
            ">=",
            0.9,
            ("bare_forwarder", k),
            f"websocket >= 0.9x the bare forwarder, {k} client{'s' if k > 1 else ''}",
        )
        for tid, k in (("d", 1), ("e", 16), ("f", 64))
    ),
    *(
        (
            f"7{tid}",
            "7_websocket_client",
            "remote",
            "rate_ratio_to_raw",  # the median of interleaved pairs' ratios (benchmarks/ws.py)
            k,
            ">=",
            0.909,
            None,
            f"remote client overhead <= 10% of the raw websockets client, {k} client{'s' if k > 1 else ''}",
        )
        for tid, k in (("g", 1), ("h", 16), ("i", 64))
    ),
    ("11a", "11_scrape", "collector", "p50", None, "<=", 5.0, None, "one scrape of 64 workers < 5 ms"),
    (
        "11b",
        "11_noop_metrics",
        "metrics_on",
        "ratio_to_off",
        None,
        ">=",
        0.95,
        None,
        "no-op throughput with metrics on >= 0.95x off (median of neighbouring runs)",
    ),
    (
        "12a",
        "12_lm_in_flight",
        "async",
        "executions_per_s",
        4_096,
        ">=",
        0.9,
        ("ideal", 4_096),
        "4,096 LM calls in flight on 2 workers >= 90% of the ideal (asynchronous lane)",
    ),
    (
        "12b",
        "12_lm_in_flight",
        "async",
        "worker_rss_growth",
        4_096,
        "<=",
        300.0,
        None,
        "4,096 LM calls in flight: workers' RSS growth <= 300 MB (asynchronous lane)",
    ),
    (
        "12c",
        "12_lm_cancel",
        "async",
        "p99",
        1_000,
        "<=",
        100.0,
        None,
        "1,000 LM calls in flight cancelled: every connection closed within 100 ms at p99 (as fake-lm sees it)",
    ),
    (
        "3w",
        "3_cold_start",
        "warm",
        "seconds_to_ready",
        2,
        "<=",
        100.0,
        None,
        "pool of 2 on a warm launcher to its first call answered, p50 of 20 pools <= 100 ms (issue 21)",
    ),
    (
        "10a",
        "10_evaluate_cpu",
        "pool_2w",
        "examples_per_s",
        None,
        ">=",
        1.6,
        ("dspy_evaluate_8_threads", None),
        "pool.evaluate, CPU-bound, 2 workers >= 1.6x dspy.Evaluate(num_threads=8)",
    ),
    (
        "10b",
        "10_evaluate_io",
        "pool_2w",
        "examples_per_s",
        256,
        ">=",
        0.9,
        ("ideal", 256),
        "pool.evaluate, fake-lm 100 ms, 256 in flight >= 90% of the ideal",
    ),
    (
        "10c",
        "10_random_search",
        "pool_2w",
        "seconds",
        None,
        "<=",
        0.65,
        ("in_process_8_threads", None),
        "random search (4 candidates, 50/50), 2 workers: wall <= 0.65x in-process num_threads=8",
    ),
]


def aggregate(samples: dict[tuple[Any, ...], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (scenario, implementation, metric, x): the median over rounds (lists concatenated)."""
    rows = []
    for (scenario, impl, metric, x), runs in samples.items():
        first = runs[0]
        if isinstance(first["value"], list):
            value: Any = [v for r in runs for v in r["value"]]
        else:
            value = statistics.median(r["value"] for r in runs)
        row = {
            "scenario": scenario,
            "implementation": impl,
            "metric": metric,
            "x": x,
            "value": value,
            "unit": first["unit"],
            "anchor": None,
            "ratio": None,
            "runs": [r["value"] for r in runs] if not isinstance(first["value"], list) else None,
        }
        row.update({k: v for k, v in first.items() if k not in row and k != "value"})
        rows.append(row)
    order = {s: i for i, s in enumerate(ANCHORS)}
    rows.sort(key=lambda r: (order.get(r["scenario"], 99), r["metric"], r["x"] if r["x"] is not None else -1))
    return rows


def derive_dspex_way(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scenario 8: the DSPex way's no-op throughput and cold start beside dspex-trio's."""
    out = []
    for r in rows:
        if r["scenario"] == "2_throughput" and r["implementation"] in ("dspex_way", "pool", "open_worker"):
            out.append({**r, "scenario": "8_dspex_way"})
        if r["scenario"] == "3_cold_start" and r["implementation"] in ("dspex_way", "zygote"):
            out.append({**r, "scenario": "8_dspex_way"})
    return out


def attach_ratios(rows: list[dict[str, Any]]) -> None:
    index = {(r["scenario"], r["implementation"], r["metric"], r["x"]): r for r in rows}
    for r in rows:
        anchor = ANCHORS.get(r["scenario"])
        if anchor is None or not isinstance(r["value"], (int, float)):
            continue
        impl, ax = anchor
        base = index.get((r["scenario"], impl, r["metric"], r["x"] if ax == "same" else ax))
        if base is not None and base["value"]:
            r["anchor"] = impl if ax == "same" else f"{impl} (x={ax})"
            r["ratio"] = round(r["value"] / base["value"], 3)


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = {(r["scenario"], r["implementation"], r["metric"], r["x"]): r for r in rows}
    out = []
    for tid, scenario, impl, metric, x, op, threshold, versus, what in TARGETS:
        mine = index.get((scenario, impl, metric, x))
        t: dict[str, Any] = {
            "id": tid,
            "target": what,
            "scenario": scenario,
            "implementation": impl,
            "metric": metric,
            "x": x,
            "op": op,
            "threshold": threshold,
            "versus": versus[0] if versus else None,
        }
        if versus is not None:
            theirs = index.get((scenario, versus[0], metric, versus[1]))
            if mine is None or theirs is None or not theirs["value"]:
                out.append({**t, "value": None, "met": None})
                continue
            value = mine["value"] / theirs["value"]
            t["kind"] = "ratio"
        else:
            if mine is None:
                out.append({**t, "value": None, "met": None})
                continue
            value = mine["value"]
            t["kind"] = f"absolute ({mine['unit']})"
        met = value <= threshold if op == "<=" else value >= threshold
        out.append({**t, "value": round(value, 3), "met": met})
    return out


# -- the report ---------------------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return f"[{len(v)} samples]"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def print_summary(result: dict[str, Any], out: Any = sys.stdout) -> None:
    m, run = result["machine"], result["run"]
    v = m["versions"]
    print(
        f"\n{m['cpu_model']}, {m['cores']} cores; Python {m['python']}; dspy {v.get('dspy')}, trio {v.get('trio')}, "
        f"trio-parallel {v.get('trio-parallel')}, anyio {v.get('anyio')}; commit {run['code_under_test'].get('commit')}",
        file=out,
    )
    print(f"mode {run['mode']}: {run['rounds_done']} rounds, {run['seconds']} s", file=out)
    header = f"{'scenario':<14} {'implementation':<24} {'metric':<20} {'x':>4} {'value':>11} {'unit':<8} {'ratio':>7}  anchor"
    last = None
    for r in result["rows"]:
        if isinstance(r["value"], list):
            continue
        if r["scenario"] != last:
            print("\n" + header, file=out)
            last = r["scenario"]
        x = "" if r["x"] is None else str(r["x"])
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(
            f"{r['scenario']:<14} {r['implementation']:<24} {r['metric']:<20} {x:>4} {fmt(r['value']):>11} "
            f"{r['unit']:<8} {ratio:>7}  {r['anchor'] or ''}",
            file=out,
        )
    print("\ntargets", file=out)
    for t in result["targets"]:
        verdict = "NOT MEASURED" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(
            f"  [{t['id']:>3}] {t['target']:<64} {value:>9} {t['op']} {t['threshold']:<5} {verdict}", file=out
        )
    if run["errors"]:
        print("\nerrors:\n  " + "\n  ".join(run["errors"]), file=out)
    print(f"leftover processes: {run['leftover_processes'] or 'none'}", file=out)
    busy = run["machine_busy_before_rounds"]
    if busy and max(busy) > 0.25:
        print(
            f"WARNING: other load on the machine before some rounds (busy {busy}); compare ratios only",
            file=out,
        )


class Progress:
    """A rich progress bar on a terminal; plain lines on stderr otherwise."""

    def __init__(self, total: int) -> None:
        self.bar: Any = None
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            console = Console(stderr=True)
            if console.is_terminal:
                self.bar = RichProgress(
                    TextColumn("{task.description:<44}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=console,
                )
        except ImportError:  # pragma: no cover - rich comes with the bench extra
            pass
        self.total = total
        self.done = 0
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("benchmarks", total=total)

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)
        else:
            print(f"[{self.done + 1}/{self.total}] {text} ...", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def drive(args: argparse.Namespace, tree: str) -> int:
    all_cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else all_cpus[-1]
    steps = plan(args, cpu, all_cpus)
    budget = args.budget or (170.0 if args.quick else 1500.0)
    started = time.monotonic()
    deadline = started + budget
    tag = uuid.uuid4().hex
    samples: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    errors: list[str] = []
    leftovers: list[int] = []
    busy_before: list[float] = []
    rounds_done: dict[str, int] = {}
    facts: dict[str, Any] = {}
    code_seen: set[str] = set()
    progress = Progress(len(steps))
    try:
        for family, _module, spec, estimate in steps:
            label = family + (f" ({spec['scenario']})" if "scenario" in spec else "")
            remaining = deadline - time.monotonic()
            if rounds_done.get(label) and remaining < estimate:
                errors.append(f"{label}: a round skipped (time budget)")
                progress.advance()
                continue
            busy = _common.wait_quiet(min(args.wait_quiet, max(0.0, remaining - estimate)))
            busy_before.append(round(busy, 2))
            progress.step(f"{label}, round {rounds_done.get(label, 0) + 1}")
            timeout = max(estimate * 4, 60.0)
            result = _common.run_measure(
                "benchmarks", {"family": family, **spec}, tag, timeout, tree, quiet=True
            )
            progress.advance()
            leftovers += result.get("leftovers", [])
            if "error" in result:
                errors.append(f"{label}: {result['error']}")
                continue
            rounds_done[label] = rounds_done.get(label, 0) + 1
            errors += result.get("errors", [])
            f = result.get("facts", {})
            code_seen.add(json.dumps(f.get("code_under_test", {}).get("sha256_12"), sort_keys=True))
            for key, value in f.items():
                if key not in ("code_under_test", "imported_from"):
                    facts.setdefault(family, []).append({key: value})
            for row in result["rows"]:
                key = (row["scenario"], row["implementation"], row["metric"], row.get("x"))
                samples.setdefault(key, []).append(row)
    finally:
        progress.stop()
    leftovers += _common.reap_leftovers(tag)
    if len(code_seen) > 1:
        errors.append(f"the code under test changed during the run ({len(code_seen)} versions): re-run")
    rows = aggregate(samples)
    rows += derive_dspex_way(rows)
    attach_ratios(rows)
    targets = evaluate_targets(rows)
    code = _common.code_under_test(tree)
    machine = _common.machine_facts(cpu, all_cpus)
    result = {
        "schema": 1,
        "machine": machine,
        "run": {
            "mode": "quick" if args.quick else "full",
            "argv": sys.argv[1:],
            "started_at": time.strftime(
                "%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - (time.monotonic() - started))
            ),
            "seconds": round(time.monotonic() - started, 1),
            "rounds_done": rounds_done,
            "code_under_test": code,
            "leftover_processes": sorted(set(leftovers)),
            "machine_busy_before_rounds": busy_before,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "errors": errors,
        },
        "rows": rows,
        "targets": targets,
        "facts": facts,
    }
    output = args.output
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plots_dir = args.plots or os.path.join(
        os.path.dirname(os.path.abspath(output)), os.path.splitext(os.path.basename(output))[0]
    )
    plots: list[str] = []
    if not args.no_plots:
        from benchmarks.plots import make_plots

        subtitle = f"{result['run']['mode']} run, commit {code.get('commit')}, {machine['cores']} cores, {result['run']['started_at']}"
        plots = make_plots(rows, plots_dir, subtitle)
    print_summary(result)
    print(f"\nwrote {output}" + (f"; plots in {plots_dir}/ ({len(plots)})" if plots else ""))
    status = 1 if errors or leftovers else 0
    if args.check:
        missed = [t for t in targets if t["met"] is not True]
        if missed:
            print("\n--check: targets missed or not measured:")
            for t in missed:
                got = "not measured" if t["value"] is None else f"{t['value']:.3f}"
                print(f"  [{t['id']}] {t['target']}: {got} (wanted {t['op']} {t['threshold']})")
            status = 1
        else:
            print("\n--check: every target met")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls (< 3 min on 2 cores)")
    parser.add_argument(
        "--output", default="results.json", metavar="PATH", help="the JSON (default results.json)"
    )
    parser.add_argument(
        "--plots", metavar="DIR", help="PNG folder (default: next to the JSON, named after it)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed or not measured")
    parser.add_argument(
        "--only",
        metavar="F[,F]",
        help="families: noop, cold_start, recovery, memory, dspy, programs, websocket, metrics, lm_layer, jobs",
    )
    parser.add_argument("--impl", metavar="NAME[,NAME]", help="only these implementations (where they apply)")
    parser.add_argument(
        "--rounds", type=int, help="rounds per family (default: depends on the family and mode)"
    )
    parser.add_argument("--n", type=int, help="timed round trips per round (scenario 1)")
    parser.add_argument("--calls", type=int, help="throughput calls per round (scenario 2)")
    parser.add_argument("--cpu", type=int, help="the CPU of the pinned round trips (default: the last)")
    parser.add_argument("--budget", type=float, help="seconds; no further round starts past it")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S s for a quiet machine before each round",
    )
    parser.add_argument(
        "--live-tree", action="store_true", help="measure the working tree (default: a snapshot)"
    )
    parser.add_argument("--_measure", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        spec_text, path = args._measure
        spec = json.loads(spec_text)
        result = measure(spec.pop("family"), spec)
        with open(path, "w") as f:
            json.dump(result, f)
        return 0
    tree = _common.ROOT if args.live_tree else _common.snapshot_tree()
    try:
        return drive(args, tree)
    finally:
        if tree != _common.ROOT:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
