"""The ``dspex-trio`` command line (also ``python -m dspex_trio``)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import trio

import dspex_trio


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspex-trio", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="start a pool, run calls through it, print its statistics")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--calls", type=int, default=2000, help="concurrent no-op calls to run")
    demo.add_argument("--launcher", choices=["auto", "zygote", "subprocess"], default="auto")
    fake = commands.add_parser(
        "fake-lm", help="serve a small OpenAI-compatible LM for tests and benchmarks", add_help=False
    )
    fake.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


async def _demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    async with dspex_trio.open_pool(workers=args.workers, diagnostics=True, launcher=args.launcher) as pool:
        ready = time.perf_counter() - started
        stats = pool.statistics()
        print(f"pool of {stats.size} workers ready in {ready * 1000:.0f} ms (launcher: {stats.launcher})")
        for worker in stats.workers:
            print(f"  {worker.worker_id}: pid {worker.pid}, {worker.state}, capacity {worker.capacity}")

        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await pool.call("echo", {"value": i}, wait=True)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(args.calls):
                nursery.start_soon(one, i)
        elapsed = time.perf_counter() - t0
        assert all(results[i] == i for i in range(args.calls)), "a reply reached the wrong caller"
        print(
            f"{args.calls} concurrent echo calls in {elapsed * 1000:.0f} ms ({args.calls / elapsed:,.0f} calls/s)"
        )
        echo = pool.statistics().latency["echo"]
        print(f"  latency p50 {echo.p50 * 1e3:.2f} ms, p99 {echo.p99 * 1e3:.2f} ms")
    print("pool closed: every worker stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fake-lm"]:
        from dspex_trio._fake_lm import main as fake_lm_main

        return fake_lm_main(argv[1:])
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command == "demo":
            return trio.run(_demo, args)
    except KeyboardInterrupt:
        return 130
    return 2
