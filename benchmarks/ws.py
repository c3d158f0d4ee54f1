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
process. Where the machine has 2 CPUs or more, the server process (every thread) is pinned to its
first allowed CPU and the client processes to the others (``os.sched_setaffinity``), after the pool
started: the workers keep every CPU, the clients never share the server's. The server's CPU time per
execution (``getrusage`` of the server process over each run) and the client process's are reported
beside the rates, with the workers' (``/proc/PID/stat``).

Rows: ``7_websocket`` (``websocket`` and the others against ``in_process``), ``7_websocket_cost``
(``websocket`` against ``bare_forwarder``), ``7_websocket_client`` (``remote`` against
``websockets_submit``), each at 1, 16 and 64 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _pin_all_threads(cpus: set[int]) -> None:
    """Pin every thread of this process (``sched_setaffinity`` is per thread on Linux)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass


def _process_cpu_s(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (``/proc/PID/stat``), in s."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


async def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    import dspex_trio

    clients_list: list[int] = spec["clients"]
    seconds: float = spec["seconds"]
    implementations: list[str] = spec.get("implementations", list(IMPLEMENTATIONS))
    allowed = sorted(os.sched_getaffinity(0))
    pin = spec.get("pin", True) and len(allowed) >= 2
    server_cpus, client_cpus = ({allowed[0]}, set(allowed[1:])) if pin else (set(allowed), set(allowed))
    out: dict[str, Any] = {"results": {}, "facts": {}}
    with trio.fail_after(spec["time_limit"]):
        async with dspex_trio.open_pool(workers=2) as pool, trio.open_nursery() as nursery:
            real = await nursery.start(dspex_trio.serve_websocket, pool, "127.0.0.1", 0)
            bare = await nursery.start(serve_bare_forwarder, pool)
            urls = {"real": real.url, "bare": f"ws://127.0.0.1:{bare.port}"}
            session = await pool.open_session()  # a minted session: the clients hold its id
            pid = await pool.create_program(COT["signature"], module=COT["module"], session=session)
            if pin:
                _pin_all_threads(server_cpus)
            out["facts"] = {
                "server_cpus": sorted(server_cpus),
                "client_cpus": sorted(client_cpus),
                "workers_cpus": "all (started before the pinning)",
                "load_before": os.getloadavg()[0],
            }

            async def call(i: int) -> Any:
                return await pool.execute(pid, {"question": f"What is item {i}?"}, session=session)

            for k in clients_list:
                for impl in implementations:
                    workers = [w.pid for w in pool.statistics().workers]
                    server0, workers0 = _process_cpu_s([os.getpid()]), _process_cpu_s(workers)
                    if impl == "in_process":
                        got = await drive(call, k, seconds, warmup=k)
                        client_cpu = None
                    else:
                        kind, endpoint = CLIENT_KIND[impl]
                        argv = [sys.executable, "-m", "benchmarks.ws", "--client", kind, urls[endpoint]]
                        argv += [
                            str(k),
                            str(seconds),
                            pid,
                            session,
                            "--cpus",
                            ",".join(map(str, client_cpus)),
                        ]
                        result = await trio.run_process(argv, capture_stdout=True, check=False)
                        if result.returncode != 0:
                            raise RuntimeError(f"{impl} client process exited {result.returncode}")
                        got = json.loads(result.stdout)
                        client_cpu = got.pop("cpu_s")
                    server_cpu = _process_cpu_s([os.getpid()]) - server0
                    worker_cpu = _process_cpu_s(workers) - workers0
                    got["server_cpu_s"], got["worker_cpu_s"], got["client_cpu_s"] = (
                        server_cpu,
                        worker_cpu,
                        client_cpu,
                    )
                    out["results"].setdefault(impl, {})[k] = got
            nursery.cancel_scope.cancel()
    return out


def _rows_of(impl: str, k: int, r: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one measured point: under ``7_websocket``, and (for the endpoint's own comparison and
    the client's) under ``7_websocket_cost`` / ``7_websocket_client``."""
    scenarios = ["7_websocket"]
    if impl in ("websocket", "bare_forwarder"):
        scenarios.append("7_websocket_cost")
    if impl in ("remote", "websockets_submit", "trio_submit"):
        scenarios.append("7_websocket_client")
    rows: list[dict[str, Any]] = []
    calls = r["calls"] or 1
    for scenario in scenarios:
        base = {
            "scenario": scenario,
            "implementation": impl,
            "x": int(k),
            "description": f"{DESCRIPTIONS[impl]}; {k} clients, 2-worker pool, offline LM, ChainOfThought",
        }
        rows.append({**base, "metric": "executions_per_s", "value": r["rate"], "unit": "exec/s"})
        if r["p50_ms"] is not None:
            rows.append({**base, "metric": "latency_p50", "value": r["p50_ms"], "unit": "ms"})
            rows.append({**base, "metric": "latency_p99", "value": r["p99_ms"], "unit": "ms"})
        rows.append(
            {**base, "metric": "server_cpu_per_exec", "value": r["server_cpu_s"] / calls * 1e6, "unit": "us"}
        )
        rows.append(
            {**base, "metric": "worker_cpu_per_exec", "value": r["worker_cpu_s"] / calls * 1e6, "unit": "us"}
        )
        if r.get("client_cpu_s") is not None:
            rows.append(
                {
                    **base,
                    "metric": "client_cpu_per_exec",
                    "value": r["client_cpu_s"] / calls * 1e6,
                    "unit": "us",
                }
            )
    return rows


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        got = trio.run(_measure, spec)
    except Exception as exc:
        return {"rows": [], "errors": [f"websocket: {type(exc).__name__}: {exc}"]}
    for impl, by_k in got["results"].items():
        for k, r in by_k.items():
            rows += _rows_of(impl, k, r)
            if r["errors"]:
                errors.append(f"websocket/{impl} k={k}: {r['errors']} failed ({r['first_error']})")
    return {"rows": rows, "errors": errors, "facts": got["facts"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ws")
    parser.add_argument(
        "--client",
        nargs=6,
        metavar=("KIND", "URL", "CLIENTS", "SECONDS", "PROGRAM", "SESSION"),
        required=True,
        help="run K clients of KIND (trio_run, trio_submit, websockets_run, websockets_submit, remote)",
    )
    parser.add_argument("--cpus", default="", help="pin this process to these CPUs (comma-separated)")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    kind, url, clients, seconds, program, session = args.client
    print(json.dumps(client_main(kind, url, int(clients), float(seconds), program, session)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
