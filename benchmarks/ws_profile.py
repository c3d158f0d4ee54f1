"""Where the websocket path's CPU goes: a profiling helper for family 7 (not a scenario of its own).

``python -m benchmarks.ws_profile [--side server|client] [--impl websocket] [--clients 16] [--seconds 3]``

One process holds a 2-worker pool (offline LM, ChainOfThought, as ``benchmarks.ws``) with both endpoints
(``serve_websocket`` and the bare forwarder). A client process of ``benchmarks.ws`` drives the chosen
implementation (``websocket``, ``bare_forwarder``, ``trio_submit``, ``websockets_submit``, ``remote``...)
for ``--seconds``; the side named by ``--side`` runs under ``cProfile`` for that window only, and its
functions are printed by own time per execution (the server's Trio thread, or the client process).
``time.process_time`` deltas of the server process per execution are printed either way, for a profiled
and an unprofiled run, so the profile's own overhead shows.

Every loop is bounded in time (``--seconds``, and a ``fail_after`` over the whole run).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

from benchmarks.dspy_exec import COT
from benchmarks.ws import CLIENT_KIND, serve_bare_forwarder

TIME_LIMIT_S = 180.0
"""Bound of one whole profiling run, in s."""


def _client_argv(impl: str, url: str, clients: int, seconds: float, program: str, session: str) -> list[str]:
    kind, _ = CLIENT_KIND[impl]
    return [
        sys.executable,
        "-m",
        "benchmarks.ws",
        "--client",
        kind,
        url,
        str(clients),
        str(seconds),
        program,
        session,
    ]


async def _run(args: argparse.Namespace) -> None:
    import trio

    import dspex_trio

    with trio.fail_after(TIME_LIMIT_S):
        async with dspex_trio.open_pool(workers=2) as pool, trio.open_nursery() as nursery:
            real = await nursery.start(dspex_trio.serve_websocket, pool, "127.0.0.1", 0)
            bare = await nursery.start(serve_bare_forwarder, pool)
            urls = {"real": real.url, "bare": f"ws://127.0.0.1:{bare.port}"}
            session = await pool.open_session()
            pid = await pool.create_program(COT["signature"], module=COT["module"], session=session)
            url = urls[CLIENT_KIND[args.impl][1]]
            for profiled in (False, True):
                argv = _client_argv(args.impl, url, args.clients, args.seconds, pid, session)
                if profiled and args.side == "client":
                    argv += ["--profile", str(args.top)]
                profile = cProfile.Profile(time.thread_time) if profiled and args.side == "server" else None
                cpu0 = time.process_time()
                if profile is not None:
                    profile.enable()
                result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
                if profile is not None:
                    profile.disable()
                cpu = time.process_time() - cpu0
                if result.returncode != 0:
                    raise RuntimeError(f"client exited {result.returncode}: {result.stderr.decode()[-2000:]}")
                got = json.loads(result.stdout)
                calls = got["calls"] or 1
                label = "profiled" if profiled else "plain"
                print(
                    f"[{label}] {args.impl}, {args.clients} clients: {got['rate']:.0f} exec/s, "
                    f"server CPU {cpu / calls * 1e6:.0f} us/exec (process_time, incl. the whole window), "
                    f"client CPU {got['cpu_s'] / calls * 1e6:.0f} us/exec"
                )
                if profile is not None:
                    _print_stats(profile, calls, args.top)
                    if args.dump:
                        profile.dump_stats(args.dump)
                if profiled and args.side == "client":
                    sys.stdout.write(result.stderr.decode())
            nursery.cancel_scope.cancel()


def _print_stats(profile: cProfile.Profile, calls: int, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    by_file: dict[str, float] = {}
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        key = function if filename == "~" else _short(filename)
        by_file[key] = by_file.get(key, 0.0) + row[2]  # tottime
    print(f"own time per execution by module (us; {calls} executions, profiler overhead included):")
    for key, total in sorted(by_file.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {total / calls * 1e6:9.1f}  {key}")
    stats.sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def _short(filename: str) -> str:
    """A module's path from its package on (``trio/_core/_run.py``), not the machine's."""
    parts = filename.replace(os.sep, "/").split("/")
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) :])
    for package in ("dspex_trio", "bridge_child", "benchmarks"):
        if package in parts:
            return "/".join(parts[parts.index(package) :])
    return parts[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ws_profile")
    parser.add_argument("--side", choices=("server", "client"), default="server")
    parser.add_argument("--impl", choices=sorted(CLIENT_KIND), default="websocket")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--dump", default="", help="also write the server's profile (pstats) to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import trio

    trio.run(_run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
