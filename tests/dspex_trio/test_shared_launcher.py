"""``dspex_trio.open_launcher``: one warm zygote template shared by many pools (issue 21).

Real processes in real time: every wait is bounded (``wait_until``, ``fail_after``); no timing is
asserted except the parent-SIGKILL bound the issue names (nothing left within 1 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio import LauncherMismatch, SharedLauncher
from dspex_trio._launcher import WorkerSpec
from dspex_trio._zygote import ZygoteError
from tests.dspex_trio.test_faults import (
    PROJECT_ROOT,
    TAG_VAR,
    proc_children,
    read_json_line,
    tagged_processes,
)
from tests.helpers import child_processes, kill_quietly, open_fds, pid_alive, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, fork and signals")

START_S = 60.0
"""Bound on a template's start (it imports dspy: ~1 s on a busy machine) plus a pool's, in s."""


def worker_pids(pool: dspex_trio.Pool) -> set[int]:
    return {w.pid for w in pool.statistics().workers}


def workers_of(launcher: SharedLauncher) -> set[int]:
    """Live processes forked by the launcher's current template."""
    pid = launcher.template_pid
    return proc_children(pid) if pid is not None else set()


async def test_open_launcher_returns_at_once_and_a_pool_waits_for_the_template() -> None:
    with trio.fail_after(START_S):
        async with dspex_trio.open_launcher("zygote") as launcher:
            assert not launcher.ready  # the template imports in the background
            async with dspex_trio.open_pool(workers=2, launcher=launcher) as pool:
                assert launcher.ready
                assert pool.statistics().launcher == "zygote"
                assert await pool.call("ping") is not None
                assert worker_pids(pool) == workers_of(launcher)  # forked by the shared template
            template = launcher.template_pid
            assert template is not None and pid_alive(template)  # the pool closed, the template lives on
        assert not pid_alive(template)
        assert not child_processes(), child_processes()


async def test_fifty_pools_on_one_launcher_grow_no_fd_thread_or_process() -> None:
    async def cycle() -> None:
        async with dspex_trio.open_pool(workers=2, launcher=launcher) as pool:
            assert await pool.call("ping") is not None
            assert worker_pids(pool) <= workers_of(launcher)

    with trio.fail_after(240):
        async with dspex_trio.open_launcher("zygote") as launcher:
            await cycle()  # warm-up: the template, trio's thread cache
            template = launcher.template_pid
            fds, threads = open_fds(), threading.active_count()
            for _ in range(50):
                await cycle()
            assert launcher.template_pid == template and launcher.restarts == 0
            await wait_until(lambda: not workers_of(launcher), 10, lambda: f"{workers_of(launcher)}")
            await wait_until(
                lambda: threading.active_count() <= threads, 15, lambda: f"{threading.active_count()}"
            )
            after = open_fds()
            assert len(after) <= len(fds), {fd: t for fd, t in after.items() if fds.get(fd) != t}
            assert set(child_processes()) == {template}  # no worker, no zombie: only the template
        assert not child_processes(), child_processes()


async def test_concurrent_pools_fork_from_the_one_template() -> None:
    seen: list[set[int]] = []

    async def one_pool(done: trio.Event) -> None:
        async with dspex_trio.open_pool(workers=2, launcher=launcher) as pool:
            assert await pool.call("ping") is not None
            seen.append(worker_pids(pool))
            await done.wait()  # all four open at the same time

    with trio.fail_after(START_S):
        async with dspex_trio.open_launcher("zygote") as launcher:
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(4):  # opened before the template is ready: they all wait for it
                    nursery.start_soon(one_pool, done)
                await wait_until(lambda: len(seen) == 4, START_S)
                assert set().union(*seen) == workers_of(launcher)
                assert len(set().union(*seen)) == 8
                done.set()
            assert launcher.restarts == 0


async def test_a_killed_template_is_restarted_by_the_next_pool_with_health_events() -> None:
    with trio.fail_after(2 * START_S):
        async with (
            dspex_trio.open_launcher("zygote", start_timeout=START_S) as launcher,
            launcher.subscribe_health() as events,
        ):
            # between pools: the next pool restarts it
            async with dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
                await pool.call("ping")
            first = launcher.template_pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            died = await events.receive()
            assert died.kind == "launcher" and died.data["event"] == "template_died", died
            assert died.data["pid"] == first and "SIGKILL" in died.data["reason"]
            assert not launcher.ready  # never used dead
            async with dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
                assert await pool.call("ping") is not None
                second = launcher.template_pid
                assert second not in (None, first) and worker_pids(pool) == workers_of(launcher)
                restarted = await events.receive()
                assert restarted.data == {
                    "event": "template_restarted",
                    "pid": second,
                    "restarts": 1,
                    "reason": died.data["reason"],
                }
                # while a pool is open: the pool is told too, and a replaced worker comes from a new template
                async with pool.subscribe_health() as pool_events:
                    assert second is not None
                    os.kill(second, signal.SIGKILL)
                    (victim,) = worker_pids(pool)
                    os.kill(victim, signal.SIGKILL)
                    kinds: list[Any] = []
                    async for event in pool_events:
                        if event.kind == "launcher":
                            kinds.append(event.data["event"])
                        if kinds == ["template_died", "template_restarted"]:
                            break
                await wait_until(lambda: worker_pids(pool) - {victim} and launcher.ready, 30)
                assert launcher.restarts == 2 and worker_pids(pool) <= workers_of(launcher)
                assert await pool.call("ping") is not None


async def test_a_pool_whose_needs_differ_gets_a_clear_error_not_a_cold_start() -> None:
    with trio.fail_after(START_S):
        async with dspex_trio.open_launcher("zygote", worker_env=["DSPEX_SOME_NAME"]) as launcher:
            await launcher.wait_ready()
            for needs, named in [
                ({"programs": ["tests.program_module"]}, "programs"),
                ({}, "worker_env"),
                ({"worker_env": ["DSPEX_SOME_NAME"], "python": "/usr/bin/python3-other"}, "python"),
            ]:
                with pytest.raises(LauncherMismatch, match=named):
                    async with dspex_trio.open_pool(workers=1, launcher=launcher, **needs):
                        pytest.fail("a mismatched pool opened")
            assert not child_processes(include_zombies=False).keys() - {launcher.template_pid}
            async with dspex_trio.open_pool(workers=1, launcher=launcher, worker_env=["DSPEX_SOME_NAME"]):
                pass
    assert issubclass(LauncherMismatch, dspex_trio.DspexError)
    with pytest.raises(ValueError, match="launcher kind"):
        async with dspex_trio.open_launcher("fork"):
            pass  # pragma: no cover


async def test_closing_the_launcher_ends_the_template_and_workers_still_alive() -> None:
    with trio.fail_after(START_S):
        async with dspex_trio.open_launcher("zygote") as launcher:
            await launcher.wait_ready()
            spec = WorkerSpec(worker_id="stray")
            stray = await launcher.launch(spec)  # a worker nobody closes
            template = launcher.template_pid
            assert template is not None and pid_alive(stray.pid)
        assert not pid_alive(stray.pid) and not pid_alive(template)
        await stray.aclose()
        with pytest.raises(OSError, match="closed"):
            await launcher.launch(spec)


async def test_subprocess_kind_starts_cold_workers_and_checks_needs_too() -> None:
    with trio.fail_after(START_S):
        async with dspex_trio.open_launcher("subprocess") as launcher:
            assert launcher.ready and launcher.name == "subprocess"
            async with dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
                assert pool.statistics().launcher == "subprocess"
                assert worker_pids(pool) <= set(child_processes())
            with pytest.raises(LauncherMismatch):
                async with dspex_trio.open_pool(workers=1, launcher=launcher, worker_env=["X_NAME"]):
                    pass  # pragma: no cover


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio, dspex_trio

    async def main():
        async with dspex_trio.open_launcher("zygote") as launcher:
            async with dspex_trio.open_pool(workers=2, launcher=launcher) as a:
                async with dspex_trio.open_pool(workers=2, launcher=launcher) as b:
                    await a.call("ping"); await b.call("ping")
                    pids = [w.pid for p in (a, b) for w in p.statistics().workers]
                    print(json.dumps({"template": launcher.template_pid, "workers": pids}), flush=True)
                    await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_parent_sigkill_with_a_warm_launcher_and_two_pools_leaves_nothing_within_1s() -> None:
    tag = uuid.uuid4().hex
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", PARENT_SCRIPT],
        stdout=subprocess.PIPE,
        cwd=PROJECT_ROOT,
        env={**os.environ, TAG_VAR: tag},
    )
    try:
        assert process.stdout is not None
        report = await read_json_line(process.stdout, bytearray(), START_S)
        everything = tagged_processes(tag)
        assert {report["template"], *report["workers"]} <= everything and len(report["workers"]) == 4
        process.kill()
        assert await process.wait() == -signal.SIGKILL
        took = await wait_until(
            lambda: not tagged_processes(tag), 1.0, lambda: f"still alive: {sorted(tagged_processes(tag))}"
        )
        assert took < 1.0
    finally:
        kill_quietly(process.pid)
        for pid in tagged_processes(tag):
            kill_quietly(pid)
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def test_serve_starts_the_template_before_it_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    from dspex_trio import _cli
    from dspex_trio._cli_settings import CliError, Secrets, ServeSettings

    templates_at_bind: list[list[int]] = []

    async def listen(host: str, port: int) -> list[trio.SocketListener]:
        templates_at_bind.append([pid for pid in child_processes() if "bridge_child._zygote" in cmdline(pid)])
        raise CliError("stop at the bind")

    monkeypatch.setattr(_cli, "_listen", listen)
    with trio.fail_after(START_S), pytest.raises(CliError, match="stop at the bind"):
        await _cli._serve(ServeSettings(), Secrets(token=None, admin_token=None, lm_key=None, lms={}))
    assert len(templates_at_bind) == 1 and len(templates_at_bind[0]) == 1, templates_at_bind
    assert not pid_alive(templates_at_bind[0][0])  # and it ended with the command


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def test_a_template_never_ready_fails_the_wait_at_start_timeout(tmp_path: Path) -> None:
    """A pool opened before the template is ready waits for it, bounded by ``start_timeout``: an
    interpreter that never says ready makes the wait (and a launch) fail with ``ZygoteError``, and the
    template is killed."""
    stuck = tmp_path / "stuck-python"
    stuck.write_text("#!/bin/sh\nexec sleep 60\n")
    stuck.chmod(0o755)
    with trio.fail_after(START_S):
        async with dspex_trio.open_launcher("zygote", python=str(stuck), start_timeout=0.5) as launcher:
            with pytest.raises(ZygoteError, match=r"ready within 0\.5 s"):
                await launcher.wait_ready()
            with pytest.raises(ZygoteError):
                await launcher.launch(WorkerSpec(worker_id="never"))
            assert not launcher.ready
        await wait_until(
            lambda: not child_processes(include_zombies=False), 5, lambda: f"{child_processes()}"
        )
