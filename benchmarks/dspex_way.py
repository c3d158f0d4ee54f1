"""The DSPex way, as a baseline: how DSPex V2 ran Python workers, rebuilt small enough to measure.

- **Cold-spawned workers**: every worker start is a fresh interpreter (``python -m benchmarks.dspex_way
  --child``) that imports dspy before it says it is ready, like DSPex's Python bridge; no zygote. DSPex
  pre-warmed its workers one after another, so :func:`open_dspex_way_pool` does too (``sequential=True``).
- **Check-out**: a worker serves one call at a time; a caller checks an idle worker out, writes its
  request, reads the reply, and checks the worker back in.
- **No acks**: a raw request/response over pipes, one JSON object per line (``{"id", "command",
  "args"}`` -> ``{"id", "success", "result"}``), like DSPex's port protocol.

Used by scenario 8 of ``python -m benchmarks`` (no-op throughput and cold start beside dspex-trio's).
Run ``python -m benchmarks.dspex_way [--workers N] [--calls C]`` for a quick look on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from benchmarks._common import close_child

READ_CHUNK = 64 * 1024
START_TIMEOUT_S = 60.0


def child_main(import_dspy: bool) -> int:
    """The worker: import dspy, say ready, then answer one JSON line per request until stdin ends."""
    if import_dspy:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
        import dspy  # noqa: F401

    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        if request.get("command") == "echo":
            reply = {"id": request["id"], "success": True, "result": request["args"]["value"]}
        else:
            reply = {
                "id": request["id"],
                "success": False,
                "error": f"unknown command {request.get('command')}",
            }
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()
    return 0


def child_argv(import_dspy: bool = True) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.dspex_way", "--child"]
    return argv if import_dspy else [*argv, "--no-dspy"]


class LineWorker:
    """One cold-spawned worker: a process, its pipes, a line buffer."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = process.stdout
        self.buf = bytearray()

    async def read_line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            data = await self.stdout.receive_some(READ_CHUNK)
            if not data:
                raise EOFError("dspex_way worker exited")
            self.buf += data
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return line

    async def request(self, call_id: int, command: str, args: dict[str, Any]) -> Any:
        await self.stdin.send_all(
            json.dumps({"id": call_id, "command": command, "args": args}).encode() + b"\n"
        )
        reply = json.loads(await self.read_line())
        if reply.get("id") != call_id:
            raise RuntimeError(f"reply id {reply.get('id')} for request {call_id}")
        if not reply.get("success"):
            raise RuntimeError(reply.get("error"))
        return reply["result"]

    async def aclose(self) -> None:
        await close_child(self.process, self.stdin, self.stdout)


async def spawn(import_dspy: bool = True) -> LineWorker:
    """Start one worker and wait for its ready line."""
    process = await trio.lowlevel.open_process(
        child_argv(import_dspy), stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
    )
    worker = LineWorker(process)
    try:
        with trio.fail_after(START_TIMEOUT_S):
            ready = json.loads(await worker.read_line())
        if not ready.get("ready"):
            raise RuntimeError(f"unexpected first line {ready!r}")
    except BaseException:
        await worker.aclose()
        raise
    return worker


class DspexWayPool:
    """Check-out pool: one call at a time per worker."""

    def __init__(self, workers: list[LineWorker]) -> None:
        self.workers = workers
        self._send, self._idle = trio.open_memory_channel[LineWorker](len(workers))
        for w in workers:
            self._send.send_nowait(w)
        self._next_id = 0

    async def call(self, command: str, args: dict[str, Any]) -> Any:
        worker = await self._idle.receive()
        try:
            self._next_id += 1
            return await worker.request(self._next_id, command, args)
        finally:
            self._send.send_nowait(worker)


@asynccontextmanager
async def open_dspex_way_pool(
    workers: int = 2, *, sequential: bool = True, import_dspy: bool = True
) -> AsyncIterator[DspexWayPool]:
    """Start ``workers`` cold workers (one after another when ``sequential``, as DSPex pre-warmed them)."""
    started: list[LineWorker] = []
    try:
        if sequential:
            for _ in range(workers):
                started.append(await spawn(import_dspy))
        else:

            async def one() -> None:
                started.append(await spawn(import_dspy))

            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(one)
        yield DspexWayPool(started)
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for w in started:
                    nursery.start_soon(w.aclose)


async def _demo(workers: int, calls: int) -> None:
    t0 = time.perf_counter()
    async with open_dspex_way_pool(workers) as pool:
        ready = time.perf_counter() - t0
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(64):

                async def caller(k: int = k) -> None:
                    for j in range(calls // 64):
                        assert await pool.call("echo", {"value": k * 1_000_000 + j}) == k * 1_000_000 + j

                nursery.start_soon(caller)
        rate = (calls // 64) * 64 / (time.perf_counter() - t0)
    print(f"{workers} workers ready in {ready:.2f} s (sequential cold spawns); {rate:,.0f} no-op calls/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dspex_way", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-dspy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=6400)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(not args.no_dspy)
    trio.run(_demo, args.workers, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
