"""Scenario 7 of ``python -m benchmarks``: executions over the websocket endpoint, against what it runs on.

One server process (the measuring one) holds a 2-worker pool (offline LM, ChainOfThought ``question ->
answer``) and two endpoints over it:

- ``websocket``: ``serve_websocket``, the real endpoint (JSON-RPC, limits, events, sessions);
- ``bare_forwarder``: a minimal trio-websocket server that reads one JSON message, awaits
  ``pool.execute``, writes one JSON message: the transport and the pool, nothing else.

Clients run in a **separate process** (``python -m benchmarks.ws --client KIND ...``), K connections each
sending one execution after the other for a fixed time, in one of these kinds:

- ``trio_run``: hand-written JSON-RPC over trio-websocket, ``execution/run`` (one message each way). It
  drives ``websocket`` and ``bare_forwarder`` alike (the forwarder reads the same request).
- ``trio_submit``: the same, but ``execution/submit`` then its events up to the terminal one: the
  exchange ``dspex_trio.connect`` makes (an execution handle, so that a cancelled caller cancels it).
- ``websockets_submit`` / ``websockets_run``: the same two exchanges with the ``websockets`` library
  (asyncio), the raw client the remote client is measured against.
- ``remote``: ``dspex_trio.connect``, one client (one connection) per K, ``execute`` back to back.

The ``in_process`` anchor drives the same pool with K tasks calling ``pool.execute`` in the server's
process.

**Layouts** (a 2-CPU machine: CPU A, CPU B). ``pinned`` (the targets' layout; needs 2 CPUs or more): after
the pool started, the server process (every thread) is pinned to its first allowed CPU (A) and the client
processes to the others (B); the workers keep every CPU (they were started before the pinning, and each
takes about as much CPU per execution as the server and the client together), so the clients never share
the server's CPU, and the workers fill what either leaves. ``isolated`` (the layout of the in-process
targets 7b-c; 2 CPUs or more): the whole server side, the server process and its descendants (the
template and the workers, every thread of each), is pinned to the first half of the allowed CPUs (A) and
the client processes to the rest (B), so the clients' CPU comes out of neither the server's nor the
workers'; the ``in_process`` anchor runs in the same layout (server and workers on A). ``unpinned``: every
process on every CPU, the scheduler decides. ``isolated`` and ``unpinned`` measure ``in_process``,
``websocket`` and ``bare_forwarder`` (rows ``*_isolated``, ``*_unpinned``).

**The client's overhead** is measured apart, in **interleaved pairs**: one client process runs ``remote``
and ``websockets_submit`` one after the other, ``pairs`` times, in the order A B, B A, A B... (each run
its own connections and a short warm-up); per pair, the ratio of the rates and the ratio of the client
process's CPU time per execution (``getrusage``); the median over pairs is the figure
(``rate_ratio_to_raw``, ``client_cpu_ratio_to_raw``), so that a load that comes and goes on this shared
machine hits both sides of a pair alike.

The server's CPU time per execution (``/proc/PID/stat`` of the server process over each run) and the client
process's are reported beside the rates, with the workers'.

Rows: ``7_websocket`` (every implementation against ``in_process``, pinned), ``7_websocket_cost``
(``websocket`` against ``bare_forwarder``), ``7_websocket_isolated`` / ``7_websocket_cost_isolated`` and
``7_websocket_unpinned`` / ``7_websocket_cost_unpinned`` (the same, in those layouts),
``7_websocket_client`` (``remote`` and ``trio_submit`` against ``websockets_submit``; the interleaved
pairs' ratios), each at 1, 16 and 64 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

from benchmarks._common import summarize_run
from benchmarks.dspy_exec import COT, MAX_CALLS, drive

IMPLEMENTATIONS = (
    "in_process",
    "websocket",
    "bare_forwarder",
    "trio_submit",
    "websockets_run",
    "websockets_submit",
    "remote",
)
"""Every implementation of the family, in the order one round measures them (rotated per round)."""
UNPINNED = ("in_process", "websocket", "bare_forwarder")
"""The implementations also measured in the ``isolated`` and ``unpinned`` layouts."""
PAIRED = ("remote", "websockets_submit")
"""Measured in interleaved pairs in one client process (the client's overhead), not in the main loop."""
CLIENT_KIND = {
    "websocket": ("trio_run", "real"),
    "bare_forwarder": ("trio_run", "bare"),
    "trio_submit": ("trio_submit", "real"),
    "websockets_run": ("websockets_run", "real"),
    "websockets_submit": ("websockets_submit", "real"),
    "remote": ("remote", "real"),
}
"""Implementation -> (client kind, endpoint)."""
DESCRIPTIONS = {
    "in_process": "pool.execute from tasks in the server's process",
    "websocket": "execution/run over serve_websocket; clients: trio-websocket, hand-written JSON-RPC",
    "bare_forwarder": "a minimal trio-websocket server awaiting pool.execute per message; same client",
    "trio_submit": "execution/submit + its events over serve_websocket; trio-websocket, hand-written",
    "websockets_run": "execution/run over serve_websocket; clients: the websockets library (asyncio)",
    "websockets_submit": "execution/submit + its events; clients: the websockets library (asyncio)",
    "remote": "dspex_trio.connect (RemoteBackend.execute) over serve_websocket, one client per connection",
}
WARMUP_S = 0.3
"""Clients connect and run one execution each, then wait this long (plus 10 ms per client) to start."""
START_SLACK_S = 0.01


# -- clients (the client process) -------------------------------------------------------------------------


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _request(rid: int, method: str, program: str, session: str, question: str) -> str:
    params = {"program": program, "inputs": {"question": question}, "session": session}
    if method == "execution/submit":
        params["stream"] = False
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})


async def _trio_clients(
    kind: str, url: str, clients: int, seconds: float, program: str, session: str
) -> dict[str, Any]:
    """K connections (trio-websocket, or dspex_trio.connect for ``remote``), back to back."""
    import trio

    latencies: list[float] = []
    errors: list[str] = []
    start = trio.Event()
    window: dict[str, float] = {}

    async def timed(k: int, run: Any) -> None:
        await run(f"warm-up {k}")
        await start.wait()
        deadline = window["t0"] + seconds
        j = 0
        while time.perf_counter() < deadline and j < MAX_CALLS:
            j += 1
            s = time.perf_counter()
            try:
                await run(f"What is item {k}-{j}?")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - s)

    async def raw(k: int) -> None:
        from trio_websocket import open_websocket_url

        method = "execution/run" if kind == "trio_run" else "execution/submit"
        async with open_websocket_url(url, subprotocols=["dspex.v1"]) as ws:
            rid = 0

            async def run(question: str) -> None:
                nonlocal rid
                rid += 1
                await ws.send_message(_request(rid, method, program, session, question))
                execution = None
                while True:
                    message = json.loads(await ws.get_message())
                    if message.get("id") == rid:
                        if "error" in message:
                            raise RuntimeError(message["error"].get("message"))
                        if method == "execution/run":
                            return
                        execution = message["result"]["execution"]
                    elif message.get("method") == "execution/event":
                        params = message["params"]
                        if params["execution"] == execution and params["event"] != "started":
                            if params["event"] != "completed":
                                raise RuntimeError(str(params["data"]))
                            return

            await timed(k, run)

    async def remote(k: int) -> None:
        import dspex_trio

        async with dspex_trio.connect(url) as client:

            async def run(question: str) -> None:
                await client.execute(program, {"question": question}, session=session)

            await timed(k, run)

    one = remote if kind == "remote" else raw
    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for k in range(clients):
                nursery.start_soon(one, k)
            await trio.sleep(WARMUP_S + START_SLACK_S * clients)  # connected and warmed up
            cpu0 = _cpu_s()
            window["t0"] = time.perf_counter()
            start.set()
    elapsed = time.perf_counter() - window["t0"]
    return {**summarize_run(latencies, errors, elapsed), "cpu_s": _cpu_s() - cpu0}


async def _websockets_clients(
    kind: str, url: str, clients: int, seconds: float, program: str, session: str
) -> dict[str, Any]:
    """K connections of the ``websockets`` library (asyncio), back to back."""
    import asyncio

    from websockets.asyncio.client import connect

    latencies: list[float] = []
    errors: list[str] = []
    start = asyncio.Event()
    window: dict[str, float] = {}
    method = "execution/run" if kind == "websockets_run" else "execution/submit"

    async def one(k: int) -> None:
        async with connect(url, subprotocols=["dspex.v1"], max_size=16 * 1024 * 1024) as ws:  # type: ignore[list-item]
            rid = 0

            async def run(question: str) -> None:
                nonlocal rid
                rid += 1
                await ws.send(_request(rid, method, program, session, question))
                execution = None
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("id") == rid:
                        if "error" in message:
                            raise RuntimeError(message["error"].get("message"))
                        if method == "execution/run":
                            return
                        execution = message["result"]["execution"]
                    elif message.get("method") == "execution/event":
                        params = message["params"]
                        if params["execution"] == execution and params["event"] != "started":
                            if params["event"] != "completed":
                                raise RuntimeError(str(params["data"]))
                            return

            await run(f"warm-up {k}")
            await start.wait()
            deadline = window["t0"] + seconds
            j = 0
            while time.perf_counter() < deadline and j < MAX_CALLS:
                j += 1
                s = time.perf_counter()
                try:
                    await run(f"What is item {k}-{j}?")
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - s)

    async def main() -> dict[str, Any]:
        tasks = [asyncio.create_task(one(k)) for k in range(clients)]
        await asyncio.sleep(WARMUP_S + START_SLACK_S * clients)
        cpu0 = _cpu_s()
        window["t0"] = time.perf_counter()
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 60)
        elapsed = time.perf_counter() - window["t0"]
        return {**summarize_run(latencies, errors, elapsed), "cpu_s": _cpu_s() - cpu0}

    return await main()


def pairs_main(
    url: str, clients: int, seconds: float, program: str, session: str, pairs: int
) -> dict[str, list[dict[str, Any]]]:
    """``pairs`` interleaved runs of ``remote`` and ``websockets_submit`` (A B, B A, A B, ...)."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in PAIRED}
    for i in range(pairs):
        for kind in PAIRED if i % 2 == 0 else PAIRED[::-1]:
            runs[kind].append(client_main(kind, url, clients, seconds, program, session))
    return runs


def client_main(
    kind: str, url: str, clients: int, seconds: float, program: str, session: str
) -> dict[str, Any]:
    if kind.startswith("websockets_"):
        import asyncio

        return asyncio.run(_websockets_clients(kind, url, clients, seconds, program, session))
    import trio

    return trio.run(_trio_clients, kind, url, clients, seconds, program, session)


# -- the server (the measuring process) ------------------------------------------------------------------


async def serve_bare_forwarder(pool: Any, *, task_status: Any) -> None:
    """The bare forwarder: per connection, read one JSON message, await ``pool.execute``, write one."""
    import trio_websocket

    async def handler(request: Any) -> None:
        ws = await request.accept(subprotocol="dspex.v1")
        try:
            while True:
                message = json.loads(await ws.get_message())
                p = message["params"]
                answer = await pool.execute(p["program"], p["inputs"], session=p["session"], with_usage=True)
                result = {"outputs": answer["outputs"], "usage": answer["usage"]}
                await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}))
        except trio_websocket.ConnectionClosed:
            pass

    await trio_websocket.serve_websocket(handler, "127.0.0.1", 0, ssl_context=None, task_status=task_status)


def _pin_all_threads(cpus: set[int], pid: int | None = None) -> None:
    """Pin every thread of process ``pid`` (this one by default; ``sched_setaffinity`` is per thread on
    Linux)."""
    try:
        tids = os.listdir(f"/proc/{pid or 'self'}/task")
    except OSError:  # a process that just ended
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...), or None (gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()  # the name may hold spaces and parentheses


def _descendants(root: int) -> list[int]:
    """Every living descendant of process ``root`` (``/proc/PID/stat``'s parent field)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None:
            parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += sorted(frontier)
    return found


def _process_cpu_s(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (``/proc/PID/stat``), in s."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        if (fields := _stat_fields(pid)) is not None:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _paired(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The interleaved pairs' figures: per side the medians of its runs, and the medians of the per-pair
    ratios (``remote`` over ``websockets_submit``) of the rates and of the client CPU per execution."""
    mine, raw = runs["remote"], runs["websockets_submit"]
    out: dict[str, Any] = {}
    for impl, side in runs.items():
        out[impl] = {
            "rate": _median([r["rate"] for r in side]),
            "calls": sum(r["calls"] for r in side),
            "errors": sum(r["errors"] for r in side),
            "first_error": next((r["first_error"] for r in side if r["first_error"]), None),
            "p50_ms": _median([r["p50_ms"] for r in side if r["p50_ms"] is not None]),
            "p99_ms": _median([r["p99_ms"] for r in side if r["p99_ms"] is not None]),
            "client_cpu_per_exec_us": _median([r["cpu_s"] / r["calls"] * 1e6 for r in side if r["calls"]]),
            "runs": [round(r["rate"], 1) for r in side],
        }
    pairs = [(a, b) for a, b in zip(mine, raw, strict=True) if a["calls"] and b["calls"]]
    out["remote"]["rate_ratio_to_raw"] = _median([a["rate"] / b["rate"] for a, b in pairs])
    out["remote"]["client_cpu_ratio_to_raw"] = _median(
        [(a["cpu_s"] / a["calls"]) / (b["cpu_s"] / b["calls"]) for a, b in pairs if b["cpu_s"] > 0]
    )
    return out


async def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    import dspex_trio

    clients_list: list[int] = spec["clients"]
    seconds: float = spec["seconds"]
    implementations: list[str] = spec.get("implementations", list(IMPLEMENTATIONS))
    allowed = sorted(os.sched_getaffinity(0))
    can_pin = len(allowed) >= 2
    layouts = [lay for lay in spec.get("layouts", ["pinned"]) if lay == "unpinned" or can_pin]
    out: dict[str, Any] = {"results": {}, "pairs": {}, "facts": {}}
    with trio.fail_after(spec["time_limit"]):
        async with dspex_trio.open_pool(workers=2) as pool, trio.open_nursery() as nursery:
            real = await nursery.start(dspex_trio.serve_websocket, pool, "127.0.0.1", 0)
            bare = await nursery.start(serve_bare_forwarder, pool)
            urls = {"real": real.url, "bare": f"ws://127.0.0.1:{bare.port}"}
            session = await pool.open_session()  # a minted session: the clients hold its id
            pid = await pool.create_program(COT["signature"], module=COT["module"], session=session)
            half = max(1, len(allowed) // 2)
            out["facts"] = {
                "layouts": layouts,
                "pinned_layout": {
                    "server_cpus": allowed[:1],
                    "client_cpus": allowed[1:],
                    "workers_cpus": "all (started before the pinning)",
                }
                if can_pin
                else "not measured: fewer than 2 CPUs",
                "isolated_layout": {
                    "server_and_workers_cpus": allowed[:half],
                    "client_cpus": allowed[half:],
                }
                if can_pin
                else "not measured: fewer than 2 CPUs",
                "load_before": os.getloadavg()[0],
            }

            def layout(name: str) -> set[int]:
                """Pin this process's threads, and its descendants' (the template and the workers) for
                ``isolated``; the CPUs for the client processes."""
                server = {"pinned": allowed[:1], "isolated": allowed[:half]}.get(name, allowed)
                _pin_all_threads(set(server))
                for child in _descendants(os.getpid()):
                    _pin_all_threads(set(server if name == "isolated" else allowed), child)
                return set(allowed) - set(server) or set(allowed)

            async def call(i: int) -> Any:
                return await pool.execute(pid, {"question": f"What is item {i}?"}, session=session)

            async def client(argv: list[str], cpus: set[int]) -> Any:
                argv = [sys.executable, "-m", "benchmarks.ws", *argv, "--cpus", ",".join(map(str, cpus))]
                result = await trio.run_process(argv, capture_stdout=True, check=False)
                if result.returncode != 0:
                    raise RuntimeError(f"{argv[4]} client process exited {result.returncode}")
                return json.loads(result.stdout)

            for name in layouts:
                client_cpus = layout(name)
                for k in clients_list:
                    for impl in implementations:
                        if impl in PAIRED or (name != "pinned" and impl not in UNPINNED):
                            continue
                        workers = [w.pid for w in pool.statistics().workers]
                        server0, workers0 = _process_cpu_s([os.getpid()]), _process_cpu_s(workers)
                        if impl == "in_process":
                            got = await drive(call, k, seconds, warmup=k)
                            client_cpu = None
                        else:
                            kind, endpoint = CLIENT_KIND[impl]
                            argv = ["--client", kind, urls[endpoint], str(k), str(seconds), pid, session]
                            got = await client(argv, client_cpus)
                            client_cpu = got.pop("cpu_s")
                        got["server_cpu_s"] = _process_cpu_s([os.getpid()]) - server0
                        got["worker_cpu_s"] = _process_cpu_s(workers) - workers0
                        got["client_cpu_s"] = client_cpu
                        out["results"].setdefault(name, {}).setdefault(impl, {})[k] = got
            if any(impl in PAIRED for impl in implementations):
                client_cpus = layout("pinned" if can_pin else "unpinned")
                pair_seconds = spec.get("pair_seconds", seconds)
                for k in clients_list:
                    argv = ["--client", "pairs", urls["real"], str(k), str(pair_seconds), pid, session]
                    argv += ["--pairs", str(spec.get("pairs", 3))]
                    out["pairs"][k] = _paired(await client(argv, client_cpus))
            layout("unpinned")  # this process's threads and its workers' back on every CPU it had
            nursery.cancel_scope.cancel()
    return out


SCENARIOS = {
    "pinned": ("7_websocket", "7_websocket_cost"),
    "isolated": ("7_websocket_isolated", "7_websocket_cost_isolated"),
    "unpinned": ("7_websocket_unpinned", "7_websocket_cost_unpinned"),
}
"""Layout -> (the rows against in-process, the endpoint's against the bare forwarder)."""


def _rows_of(layout: str, impl: str, k: int, r: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one measured point of the main loop: under ``7_websocket`` (or ``_unpinned``), and for
    the endpoint's own comparison and the client's under ``7_websocket_cost`` / ``7_websocket_client``."""
    main, cost = SCENARIOS[layout]
    scenarios = [main]
    if impl in ("websocket", "bare_forwarder"):
        scenarios.append(cost)
    if impl == "trio_submit" and layout == "pinned":
        scenarios.append("7_websocket_client")
    calls = r["calls"] or 1
    per_exec = {
        "server_cpu_per_exec": r["server_cpu_s"] / calls * 1e6,
        "worker_cpu_per_exec": r["worker_cpu_s"] / calls * 1e6,
        "client_cpu_per_exec": None if r["client_cpu_s"] is None else r["client_cpu_s"] / calls * 1e6,
    }
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        base = {
            "scenario": scenario,
            "implementation": impl,
            "x": int(k),
            "description": f"{DESCRIPTIONS[impl]}; {k} clients, 2-worker pool, offline LM, ChainOfThought, "
            f"{layout}",
        }
        rows.append({**base, "metric": "executions_per_s", "value": r["rate"], "unit": "exec/s"})
        if r["p50_ms"] is not None:
            rows.append({**base, "metric": "latency_p50", "value": r["p50_ms"], "unit": "ms"})
            rows.append({**base, "metric": "latency_p99", "value": r["p99_ms"], "unit": "ms"})
        for metric, value in per_exec.items():
            if value is not None:
                rows.append({**base, "metric": metric, "value": value, "unit": "us"})
    return rows


def _pair_rows(k: int, by_impl: dict[str, Any]) -> list[dict[str, Any]]:
    """The interleaved pairs' rows: each side under ``7_websocket_client`` (and ``7_websocket``), and
    the remote client's median per-pair ratios."""
    rows: list[dict[str, Any]] = []
    for impl, r in by_impl.items():
        for scenario in ("7_websocket", "7_websocket_client"):
            base = {
                "scenario": scenario,
                "implementation": impl,
                "x": int(k),
                "description": f"{DESCRIPTIONS[impl]}; {k} clients, interleaved pairs (medians), pinned",
                "pair_runs": r["runs"],
            }
            metrics = [
                ("executions_per_s", r["rate"], "exec/s"),
                ("latency_p50", r["p50_ms"], "ms"),
                ("latency_p99", r["p99_ms"], "ms"),
                ("client_cpu_per_exec", r["client_cpu_per_exec_us"], "us"),
            ]
            if impl == "remote" and scenario == "7_websocket_client":
                metrics.append(("rate_ratio_to_raw", r["rate_ratio_to_raw"], "x"))
                metrics.append(("client_cpu_ratio_to_raw", r["client_cpu_ratio_to_raw"], "x"))
            rows += [{**base, "metric": m, "value": v, "unit": u} for m, v, u in metrics if v is not None]
    return rows


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        got = trio.run(_measure, spec)
    except Exception as exc:
        return {"rows": [], "errors": [f"websocket: {type(exc).__name__}: {exc}"]}
    for layout, by_impl in got["results"].items():
        for impl, by_k in by_impl.items():
            for k, r in by_k.items():
                rows += _rows_of(layout, impl, k, r)
                if r["errors"]:
                    errors.append(
                        f"websocket/{impl} ({layout}) k={k}: {r['errors']} failed ({r['first_error']})"
                    )
    for k, by_impl in got["pairs"].items():
        rows += _pair_rows(k, by_impl)
        for impl, r in by_impl.items():
            if r["errors"]:
                errors.append(f"websocket/{impl} (pairs) k={k}: {r['errors']} failed ({r['first_error']})")
    return {"rows": rows, "errors": errors, "facts": got["facts"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ws")
    parser.add_argument(
        "--client",
        nargs=6,
        metavar=("KIND", "URL", "CLIENTS", "SECONDS", "PROGRAM", "SESSION"),
        required=True,
        help="run K clients of KIND (trio_run, trio_submit, websockets_run, websockets_submit, remote; "
        "pairs: --pairs interleaved pairs of remote and websockets_submit)",
    )
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs of KIND pairs")
    parser.add_argument("--cpus", default="", help="pin this process to these CPUs (comma-separated)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="TOP",
        help="cProfile the client; top TOP functions to stderr",
    )
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    kind, url, clients, seconds, program, session = args.client
    if kind == "pairs":
        print(json.dumps(pairs_main(url, int(clients), float(seconds), program, session, args.pairs)))
        return 0
    if not args.profile:
        print(json.dumps(client_main(kind, url, int(clients), float(seconds), program, session)))
        return 0
    import cProfile
    import pstats

    import dspex_trio  # noqa: F401  # imported before the profile: its import is no per-execution cost

    profile = cProfile.Profile()
    got = profile.runcall(client_main, kind, url, int(clients), float(seconds), program, session)
    print(json.dumps(got))
    print(f"client profile ({got['calls']} executions in the window, warm-up included):", file=sys.stderr)
    pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
