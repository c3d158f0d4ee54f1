"""Tests of the zygote launcher (``open_zygote``) with real processes: a template that imported dspy,
and workers forked from it.

Real processes mean real time: no autojump clock. Waits are bounded polls or ``trio.fail_after``; timing
asserts are generous bounds (the measured times are printed: run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dspex_trio._errors import ExitStatus, WorkerCrashed, WorkerStartFailed
from dspex_trio._launcher import WorkerSpec
from dspex_trio._options import WorkerOptions
from dspex_trio._pool_launcher import SupervisedZygote, open_launcher
from dspex_trio._worker import Worker, open_worker, start_worker
from dspex_trio._zygote import ZygoteError, open_zygote, zygote_supported
from tests.helpers import (
    child_processes,
    kill_quietly,
    open_fds,
    pid_alive,
    proc_stat,
    process_state,
    process_table,
    read_until,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(not zygote_supported(), reason="the zygote needs Linux (fork, SCM_RIGHTS)"),
    pytest.mark.cold_start,  # the zygote's own tests: the launchers they name start cold
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# -- helpers ----------------------------------------------------------------------------------------


def ppid_of(pid: int) -> int | None:
    stat = proc_stat(pid)
    return None if stat is None else stat.ppid


def processes_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return sorted(pid for pid, stat in process_table().items() if stat.pgid == pgid and stat.state != "Z")


def gone(pid: int) -> bool:
    """Exited: absent, or a zombie (its parent may be an init that does not reap)."""
    return not pid_alive(pid)


@contextmanager
def no_leaks() -> Iterator[list[int]]:
    """Check that the block leaves no fd, no child (zombies included) and no process in any process
    group whose leader's pid was appended to the yielded list (workers, the template) behind."""
    fds_before = open_fds()
    children_before = child_processes()
    groups: list[int] = []
    yield groups
    assert open_fds() == fds_before
    assert child_processes() == children_before
    for pgid in groups:
        assert processes_in_group(pgid) == [], f"process group {pgid} still has processes"
        assert process_state(pgid) is None, f"{pgid} was not reaped (state {process_state(pgid)})"


def spec(worker_id: str, *, fail_at_start: int | None = None) -> WorkerSpec:
    return WorkerSpec(worker_id=worker_id, diagnostics=True, fail_at_start=fail_at_start)


# -- it works, and fast -----------------------------------------------------------------------------


async def test_forked_worker_serves_calls_and_has_dspy_imported() -> None:
    with trio.fail_after(30):
        async with open_zygote() as zygote, open_worker(launcher=zygote, diagnostics=True) as worker:
            assert zygote.alive
            assert zygote.info["versions"]["dspy"]
            assert await worker.call("echo", {"value": {"x": [1, 2, 3]}}) == {"x": [1, 2, 3]}
            assert worker.hello is not None
            assert "dspy" in worker.hello.versions  # reported only when dspy is already in sys.modules
            assert worker.statistics().launcher == "zygote"
            # forked by the template, in its own process group (in the template's session: no terminal)
            assert ppid_of(worker.pid) == zygote.pid
            assert os.getpgid(worker.pid) == worker.pid
            assert os.getsid(worker.pid) == os.getsid(zygote.pid) == zygote.pid
            # only its three pipes are open: stdin, stderr on 1 and 2, and the private frame fd
            worker_fds = {
                int(n): os.readlink(f"/proc/{worker.pid}/fd/{n}")
                for n in os.listdir(f"/proc/{worker.pid}/fd")
            }
            assert len(worker_fds) == 4, worker_fds
            assert worker_fds[1] == worker_fds[2]
            assert all(target.startswith("pipe:") for target in worker_fds.values()), worker_fds
        assert worker.exit_status == ExitStatus(code=0, signal=None)


async def test_sixteen_workers_are_ready_fast() -> None:
    with no_leaks() as groups, trio.fail_after(60):
        async with open_zygote() as zygote:
            groups.append(zygote.pid)
            workers: list[Worker] = []
            async with trio.open_nursery() as nursery:
                started = time.perf_counter()

                async def start(i: int) -> None:
                    workers.append(
                        await start_worker(
                            nursery, launcher=zygote, spec=spec(f"z{i}"), options=WorkerOptions()
                        )
                    )

                async with trio.open_nursery() as starters:
                    for i in range(16):
                        starters.start_soon(start, i)
                elapsed = time.perf_counter() - started
                print(f"\n16 zygote workers ready in {elapsed * 1000:.0f} ms")
                assert elapsed < 10
                assert len({w.pid for w in workers}) == 16
                groups.extend(w.pid for w in workers)
                results = await trio_gather([w.call("echo", {"value": w.worker_id}) for w in workers])
                assert results == [w.worker_id for w in workers]
                assert zygote.running_workers == 16
                for w in workers:
                    nursery.start_soon(w.aclose)
            assert zygote.running_workers == 0
            assert all(w.exit_status == ExitStatus(code=0, signal=None) for w in workers)


async def trio_gather(awaitables: list[Awaitable[Any]]) -> list[Any]:
    results: list[Any] = [None] * len(awaitables)

    async def run(i: int) -> None:
        results[i] = await awaitables[i]

    async with trio.open_nursery() as nursery:
        for i in range(len(awaitables)):
            nursery.start_soon(run, i)
    return results


# -- exit statuses flow through the template --------------------------------------------------------


async def test_exit_code_and_signal_of_a_forked_worker_are_reported() -> None:
    with trio.fail_after(30):
        async with open_zygote() as zygote:
            async with open_worker(launcher=zygote, diagnostics=True) as worker:
                with pytest.raises(WorkerCrashed) as crashed:
                    await worker.call("crash", {"exit_code": 7})
                assert "exit code 7" in str(crashed.value)
                assert crashed.value.exit_status == ExitStatus(code=7, signal=None)
            async with open_worker(launcher=zygote, diagnostics=True) as worker:
                with pytest.raises(WorkerCrashed) as crashed:
                    await worker.call("crash", {"signal": "SIGKILL"})
                assert "SIGKILL" in str(crashed.value)
                assert crashed.value.exit_status == ExitStatus(code=None, signal=signal.SIGKILL)
            async with open_worker(launcher=zygote, diagnostics=True) as worker:
                await worker.call("echo", {"value": 1})
                os.kill(worker.pid, signal.SIGTERM)
                assert await worker.process.wait() == ExitStatus(code=None, signal=signal.SIGTERM)


async def test_worker_failing_at_start_reports_its_exit_code() -> None:
    with trio.fail_after(30):
        async with open_zygote() as zygote, trio.open_nursery() as nursery:
            with pytest.raises(WorkerStartFailed) as failed:
                await start_worker(
                    nursery, launcher=zygote, spec=spec("bad", fail_at_start=5), options=WorkerOptions()
                )
            assert failed.value.exit_status == ExitStatus(code=5, signal=None)
            assert "exit code 5" in str(failed.value)
            assert "failing at start" in str(failed.value)  # its stderr reached us through its own pipe
            assert zygote.alive


# -- the template dies ------------------------------------------------------------------------------


async def test_killed_template_fails_launches_and_running_workers_keep_serving() -> None:
    fds_before, children_before = open_fds(), child_processes()
    with trio.fail_after(30):
        async with open_zygote() as zygote, open_worker(launcher=zygote, diagnostics=True) as worker:
            os.kill(zygote.pid, signal.SIGKILL)
            with trio.fail_after(5):
                await zygote.wait_dead()
            assert not zygote.alive
            assert "SIGKILL" in (zygote.death_reason or "")
            with pytest.raises(ZygoteError, match="not running"):
                await zygote.launch(spec("late"))
            with pytest.raises(WorkerStartFailed, match="not running"):
                async with open_worker(launcher=zygote, diagnostics=True):
                    pass  # pragma: no cover
            # the worker is not the template's child any more, and still serves
            assert await worker.call("echo", {"value": "still here"}) == "still here"
            assert pid_alive(worker.pid)
            pid = worker.pid
        # nobody is left to report its exit: it is seen through its pidfd, status unknown
        assert worker.exit_status == ExitStatus(code=None, signal=None)
        assert worker.exit_status.describe() == "exit status unknown"
        assert gone(pid)
    assert open_fds() == fds_before  # its pidfd too
    assert child_processes() == children_before


async def test_wedged_template_is_killed_after_the_spawn_timeout() -> None:
    with trio.fail_after(30):
        async with open_zygote(spawn_timeout=0.5) as zygote:
            os.kill(zygote.pid, signal.SIGSTOP)
            try:
                started = time.perf_counter()
                with pytest.raises(ZygoteError, match="in time"):
                    await zygote.launch(spec("stuck"))
                assert time.perf_counter() - started < 3
                assert not zygote.alive
            finally:
                kill_quietly(zygote.pid, signal.SIGCONT)
            with trio.fail_after(5):
                await zygote.process.wait()


async def test_template_that_cannot_start_raises_zygote_error(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'no dspy here' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    with no_leaks(), trio.fail_after(30), pytest.raises(ZygoteError) as failed:
        async with open_zygote(python=str(fake_python)):
            pass  # pragma: no cover
    assert isinstance(failed.value, OSError)
    assert "exit code 3" in str(failed.value)
    assert "no dspy here" in str(failed.value)


# -- nothing left behind ----------------------------------------------------------------------------


async def test_leaving_open_zygote_leaves_no_process_and_no_fd() -> None:
    with no_leaks() as groups, trio.fail_after(30):
        async with open_zygote() as zygote:
            groups.append(zygote.pid)
            for _ in range(3):
                async with open_worker(launcher=zygote, diagnostics=True) as worker:
                    groups.append(worker.pid)
                    await worker.call("spawn_child", {"seconds": 60})  # a grandchild in its group
                    await worker.call("echo", {"value": 1})


async def test_leaving_open_zygote_kills_workers_still_running() -> None:
    with no_leaks() as groups, trio.fail_after(30):
        async with open_zygote() as zygote:
            groups.append(zygote.pid)
            process = await zygote.launch(spec("left-running"))
            groups.append(process.pid)
            assert pid_alive(process.pid)
        assert process.exit_status() == ExitStatus(code=None, signal=signal.SIGKILL)
        assert not zygote.alive
        await process.aclose()  # its pipes are its owner's to close


async def test_cancelled_open_zygote_still_reaps_everything() -> None:
    with no_leaks() as groups, trio.fail_after(30):
        with trio.CancelScope() as scope:
            async with open_zygote() as zygote:
                groups.append(zygote.pid)
                process = await zygote.launch(spec("cancelled-with-zygote"))
                groups.append(process.pid)
                scope.cancel()
                await trio.sleep_forever()
        # the exit report still came through: the control reader outlived the outside cancellation
        assert process.exit_status() == ExitStatus(code=None, signal=signal.SIGKILL)
        await process.aclose()


async def test_cancelled_launches_leave_nothing_behind() -> None:
    with no_leaks() as groups, trio.fail_after(30):
        async with open_zygote() as zygote:
            groups.append(zygote.pid)
            for delay in (0, 0.0005, 0.001, 0.002, 0.005):
                with trio.move_on_after(delay):
                    process = await zygote.launch(spec("cancelled"))
                    groups.append(process.pid)
                    await process.aclose()  # the worker sees EOF on its stdin and exits
            await wait_until(lambda: zygote.running_workers == 0, 5, "workers still running")


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio
    from dspex_trio._zygote import open_zygote
    from dspex_trio._worker import open_worker

    async def main():
        async with open_zygote() as zygote, open_worker(launcher=zygote, diagnostics=True) as worker:
            await worker.call("echo", {"value": 1})
            print(json.dumps({"template": zygote.pid, "worker": worker.pid}), flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_parent_sigkilled_template_and_workers_are_gone_within_a_second() -> None:
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-c", PARENT_SCRIPT],
        stdout=subprocess.PIPE,
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    pids: dict[str, int] = {}
    try:
        assert parent.stdout is not None
        with trio.fail_after(30):
            line = await read_until(
                parent.stdout,
                lambda data: data.endswith(b"\n"),
                "the parent script exited before printing its pids",
            )
        pids = json.loads(line)
        assert pid_alive(pids["template"]) and pid_alive(pids["worker"])
        parent.kill()
        await parent.wait()
        took = await wait_until(
            lambda: gone(pids["template"]) and gone(pids["worker"]),
            1.0,
            lambda: f"states: {[process_state(p) for p in pids.values()]}",
        )
        print(f"\ntemplate and worker gone {took * 1000:.0f} ms after the parent was SIGKILLed")
    finally:
        kill_quietly(parent.pid, group=True)
        for pid in pids.values():
            kill_quietly(pid, group=True)
        with trio.move_on_after(5):
            await parent.wait()
        if parent.stdout is not None:
            await parent.stdout.aclose()


# -- the supervised launcher: restarted, or replaced by subprocesses ---------------------------------


def python_without_zygote(tmp_path: Path) -> str:
    """An interpreter wrapper on which the template fails to start (and the subprocess launcher works)."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$2" = bridge_child._zygote ]; then echo "no zygote here" >&2; exit 3; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


async def test_supervised_zygote_is_restarted_and_old_workers_keep_serving() -> None:
    fds_before, children_before = open_fds(), child_processes()
    with trio.fail_after(30):
        async with open_launcher("auto") as launcher:
            assert isinstance(launcher, SupervisedZygote)
            first = launcher.zygote
            assert first is not None
            async with open_worker(launcher=launcher, diagnostics=True) as old:
                assert ppid_of(old.pid) == first.pid
                os.kill(first.pid, signal.SIGKILL)
                # meanwhile, workers still start (as subprocesses until the new template is ready)
                async with open_worker(launcher=launcher, diagnostics=True) as meanwhile:
                    assert await meanwhile.call("echo", {"value": 2}) == 2
                await wait_until(
                    lambda: launcher.zygote is not None and launcher.zygote.alive, 15, "no new zygote"
                )
                second = launcher.zygote
                assert second is not None and second.pid != first.pid
                assert launcher.restarts == 1 and launcher.name == "zygote"
                async with open_worker(launcher=launcher, diagnostics=True) as new:
                    assert ppid_of(new.pid) == second.pid
                    assert "dspy" in (new.hello.versions if new.hello else {})
                    assert await new.call("echo", {"value": 3}) == 3
                assert await old.call("echo", {"value": 1}) == 1  # forked by the dead one, still serving
    assert open_fds() == fds_before
    assert child_processes() == children_before


async def test_auto_launcher_falls_back_to_subprocesses_when_the_zygote_cannot_start(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with open_launcher("auto", python=python_without_zygote(tmp_path)) as launcher:
            assert isinstance(launcher, SupervisedZygote)
            assert launcher.name == "subprocess"
            assert "exit code 3" in (launcher.fallback_reason or "")
            assert "no zygote here" in (launcher.fallback_reason or "")
            async with open_worker(launcher=launcher, diagnostics=True) as worker:
                assert ppid_of(worker.pid) == os.getpid()  # a plain subprocess
                assert await worker.call("echo", {"value": 1}) == 1


async def test_zygote_launcher_kind_raises_when_the_zygote_cannot_start(tmp_path: Path) -> None:
    with trio.fail_after(30), pytest.raises(ZygoteError, match="no zygote here"):
        async with open_launcher("zygote", python=python_without_zygote(tmp_path)):
            pass  # pragma: no cover
