"""Scenario 7 of ``python -m benchmarks``: executions over the websocket endpoint vs in-process.

The server (``serve_websocket`` over a 2-worker pool, offline LM, ChainOfThought ``question -> answer``)
runs in the measuring process; the clients run in a **separate process** (``python -m benchmarks.ws
--client``, trio-websocket), so they do not share the server's event loop. Each of K clients (one
connection each) sends ``execution/run`` back to back for a fixed time. The in-process comparison drives
the same pool with K tasks calling ``pool.execute`` for the same time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks._common import summarize_run
from benchmarks.dspy_exec import COT, drive


async def client_main(url: str, clients: int, seconds: float, program: str) -> dict[str, Any]:
    """K connections, each sending ``execution/run`` back to back until ``seconds`` have passed."""
    import trio
    from trio_websocket import open_websocket_url

    latencies: list[float] = []
    errors: list[str] = []
    start = trio.Event()
    t0 = [0.0]

    async def one(k: int) -> None:
        async with open_websocket_url(url, subprotocols=["dspex.v1"]) as ws:
            rid = 0

            async def run(question: str) -> None:
                nonlocal rid
                rid += 1
                request = {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "method": "execution/run",
                    "params": {"program": program, "inputs": {"question": question}},
                }
                await ws.send_message(json.dumps(request))
                while True:
                    reply = json.loads(await ws.get_message())
                    if reply.get("id") == rid:
                        break
                if "error" in reply:
                    raise RuntimeError(reply["error"].get("message"))

            await run(f"warm-up {k}")
            await start.wait()
            deadline = t0[0] + seconds
            j = 0
            while time.perf_counter() < deadline and j < 200_000:
                j += 1
                s = time.perf_counter()
                try:
                    await run(f"What is item {k}-{j}?")
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - s)

    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for k in range(clients):
                nursery.start_soon(one, k)
            await trio.sleep(0.3 + 0.01 * clients)  # connected and warmed up
            t0[0] = time.perf_counter()
            start.set()
    elapsed = time.perf_counter() - t0[0]
    return summarize_run(latencies, errors, elapsed)


async def _measure(clients_list: list[int], seconds: float, time_limit: float) -> dict[str, Any]:
    import trio

    import dspex_trio

    out: dict[str, Any] = {"websocket": {}, "in_process": {}}
    with trio.fail_after(time_limit):
        async with dspex_trio.open_pool(workers=2) as pool, trio.open_nursery() as nursery:
            server = await nursery.start(dspex_trio.serve_websocket, pool, "127.0.0.1", 0)
            pid = await pool.create_program(COT["signature"], module=COT["module"])

            async def call(i: int) -> Any:
                return await pool.execute(pid, {"question": f"What is item {i}?"})

            for k in clients_list:
                got = await drive(call, k, seconds, warmup=k)
                out["in_process"][k] = got
                argv = [
                    sys.executable,
                    "-m",
                    "benchmarks.ws",
                    "--client",
                    server.url,
                    str(k),
                    str(seconds),
                    pid,
                ]
                result = await trio.run_process(argv, capture_stdout=True, check=False)
                if result.returncode != 0:
                    raise RuntimeError(f"websocket client process exited {result.returncode}")
                out["websocket"][k] = json.loads(result.stdout)
            nursery.cancel_scope.cancel()
    return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        got = trio.run(_measure, spec["clients"], spec["seconds"], spec["time_limit"])
    except Exception as exc:
        return {"rows": [], "errors": [f"websocket: {type(exc).__name__}: {exc}"]}
    for impl, desc in (
        ("websocket", "execution/run over serve_websocket; clients in a separate process (trio-websocket)"),
        ("in_process", "pool.execute from tasks in the server's process"),
    ):
        for k, r in got[impl].items():
            base = {
                "scenario": "7_websocket",
                "implementation": impl,
                "x": int(k),
                "description": f"{desc}; {k} clients, 2-worker pool, offline LM, ChainOfThought",
            }
            rows.append({**base, "metric": "executions_per_s", "value": r["rate"], "unit": "exec/s"})
            if r["p50_ms"] is not None:
                rows.append({**base, "metric": "latency_p50", "value": r["p50_ms"], "unit": "ms"})
                rows.append({**base, "metric": "latency_p99", "value": r["p99_ms"], "unit": "ms"})
            if r["errors"]:
                errors.append(f"websocket/{impl} k={k}: {r['errors']} failed ({r['first_error']})")
    return {"rows": rows, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ws")
    parser.add_argument("--client", nargs=4, metavar=("URL", "CLIENTS", "SECONDS", "PROGRAM"), required=True)
    args = parser.parse_args(argv)
    import trio

    url, clients, seconds, program = args.client
    print(json.dumps(trio.run(client_main, url, int(clients), float(seconds), program)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
