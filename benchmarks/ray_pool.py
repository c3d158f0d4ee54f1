"""Family 13: workers on Ray over TCP beside the local zygote pool, in one run (issue 19).

``python -m benchmarks.ray_pool [--quick] [--rounds N] [--output results.json]``

- **13a, no-op throughput, 64 callers, 2 workers**: ``RayLauncher`` (2 workers placed by Ray on this
  machine, frames over TCP) vs ``open_pool(launcher="zygote")`` (target: >= 0.8x), with the TCP path
  without Ray (``TcpLauncher``) as a third row.
- **13b, one worker ready** (from the launch to its ``hello``), p50 of ``--starts`` starts: a worker on a
  node whose agent is up (its placement, a fork of the node's zygote template asked of the agent, its
  connection authenticated; the first start, which starts the agent, is not timed) vs a fork of an
  already running local zygote template (target: <= 2x).

Ray must not bind the machine's external address: run as root, this module re-runs itself in a network
namespace with only loopback up (``unshare -n``), where it starts a local Ray instance of its own. The
rows alternate their order from round to round; the figures are medians over rounds. Not wired into
``python -m benchmarks`` yet (see docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Final

import trio

from benchmarks.roundtrip import _callers

WORKERS: Final = 2
IN_NETNS_ENV: Final = "DSPEX_RAY_NETNS"
TARGET_THROUGHPUT_RATIO: Final = 0.8
TARGET_READY_RATIO: Final = 2.0


async def throughput(kind: str, warmup: int, total: int) -> float:
    import dspex_trio
    from dspex_trio._ray_launcher import RayLauncher
    from dspex_trio._tcp_worker import TcpLauncher, open_worker_listener

    async def run(launcher: Any) -> float:
        async with dspex_trio.open_pool(workers=WORKERS, diagnostics=True, launcher=launcher) as pool:

            async def call(value: int) -> Any:
                return await pool.call("echo", {"value": value})

            return await _callers(call, warmup, total)

    if kind == "zygote":
        return await run("zygote")
    if kind == "tcp":
        async with open_worker_listener() as listener:
            return await run(TcpLauncher(listener))
    async with RayLauncher(address=None, num_cpus=1) as ray_launcher:
        return await run(ray_launcher)


async def ready_times(kind: str, starts: int) -> list[float]:
    """Seconds from each launch to its worker's hello (the launcher already up)."""
    from dspex_trio._launcher import WorkerSpec
    from dspex_trio._options import WorkerOptions
    from dspex_trio._pool_launcher import open_launcher
    from dspex_trio._ray_launcher import RayLauncher
    from dspex_trio._worker import start_worker

    async def measure(launcher: Any) -> list[float]:
        out = []
        for i in range(starts + 1):  # the first one warms up (Ray starts its worker processes)
            async with trio.open_nursery() as nursery:
                t0 = time.perf_counter()
                worker = await start_worker(
                    nursery,
                    launcher=launcher,
                    spec=WorkerSpec(f"b{i}", diagnostics=True),
                    options=WorkerOptions(),
                )
                elapsed = time.perf_counter() - t0
                await worker.aclose()
            if i:
                out.append(elapsed)
        return out

    if kind == "zygote":
        async with open_launcher("zygote") as launcher:
            return await measure(launcher)
    async with RayLauncher(address=None, num_cpus=1) as ray_launcher:
        return await measure(ray_launcher)


def run_round(order: list[str], warmup: int, total: int, starts: int) -> dict[str, Any]:
    results: dict[str, Any] = {"throughput": {}, "ready": {}}
    for kind in order:
        results["throughput"][kind] = trio.run(throughput, kind, warmup, total)
    for kind in [k for k in order if k != "tcp"]:
        results["ready"][kind] = trio.run(ready_times, kind, starts)
    return results


def main_inside(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rounds = []
        kinds = ["zygote", "ray", "tcp"]
        for r in range(args.rounds):
            order = kinds[r % 3 :] + kinds[: r % 3]
            rounds.append(run_round(order, args.warmup, args.calls, args.starts))
    finally:
        ray.shutdown()
    tp = {k: statistics.median(r["throughput"][k] for r in rounds) for k in kinds}
    ready = {k: statistics.median(t for r in rounds for t in r["ready"][k]) for k in ("zygote", "ray")}
    summary = {
        "13a_throughput_calls_per_s": tp,
        "13a_ratio_ray_vs_zygote": tp["ray"] / tp["zygote"],
        "13a_ratio_tcp_vs_zygote": tp["tcp"] / tp["zygote"],
        "13a_target": f">= {TARGET_THROUGHPUT_RATIO}",
        "13b_ready_p50_ms": {k: v * 1000 for k, v in ready.items()},
        "13b_ratio_ray_vs_zygote": ready["ray"] / ready["zygote"],
        "13b_target": f"<= {TARGET_READY_RATIO}",
        "rounds": rounds,
        "settings": {
            "calls": args.calls,
            "warmup": args.warmup,
            "starts": args.starts,
            "rounds": args.rounds,
        },
    }
    summary["13a_met"] = summary["13a_ratio_ray_vs_zygote"] >= TARGET_THROUGHPUT_RATIO
    summary["13b_met"] = summary["13b_ratio_ray_vs_zygote"] <= TARGET_READY_RATIO
    return summary


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_pool")
    parser.add_argument("--quick", action="store_true", help="small rounds (about a minute)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None, help="timed calls per throughput row")
    parser.add_argument("--warmup", type=int, default=640)
    parser.add_argument("--starts", type=int, default=None, help="timed worker starts per ready row")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.calls = args.calls or (6_400 if args.quick else 32_000)
    args.starts = args.starts or (5 if args.quick else 15)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if os.environ.get(IN_NETNS_ENV) != "1":
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            print(
                "benchmarks.ray_pool: needs root and unshare (Ray in a loopback-only namespace)",
                file=sys.stderr,
            )
            return 2
        command = 'ip link set lo up && exec "$0" -m benchmarks.ray_pool "$@"'
        env = {**os.environ, IN_NETNS_ENV: "1", "RAY_USAGE_STATS_ENABLED": "0"}
        return subprocess.run(
            ["unshare", "-n", "sh", "-c", command, sys.executable, *argv], env=env, check=False
        ).returncode
    summary = main_inside(args)
    text = json.dumps(summary, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    brief = {k: v for k, v in summary.items() if k != "rounds"}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
