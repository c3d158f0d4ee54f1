"""What ``-v`` shows of the pool: a worker replaced (why, and by which), the circuit opened and closed.

Fake workers (``tests/fakes.py``) under ``autojump_clock``; the websocket server's own lines (connections
opened, refused with their reason, executions failed) are checked end to end in ``test_cli.py``.
"""

from __future__ import annotations

import logging
import signal

import pytest
import trio
import trio.testing

import dspex_trio
from dspex_trio import CircuitState
from tests.fakes import open_fake_launcher
from tests.helpers import wait_until


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "dspex_trio.pool"]


async def test_a_replaced_worker_is_logged_with_its_cause_and_successor(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspex_trio.pool")
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
        assert await pool.call("ping") is not None  # it served a call: a plain replacement, not a failure
        first = pool.statistics().workers[0]
        launcher.processes[0].die(signal=signal.SIGKILL)
        await wait_until(lambda: len(launcher.processes) == 2 and pool.statistics().workers, 10)
        await wait_until(lambda: any("replaced" in m for _, m in lines(caplog)), 10)
        second = pool.statistics().workers[0]
    assert lines(caplog)[:2] == [
        (
            logging.WARNING,
            f"worker {first.worker_id} (pid {first.pid}) failed: killed by SIGKILL; starting a replacement",
        ),
        (
            logging.INFO,
            f"worker {second.worker_id} (pid {second.pid}) replaced worker {first.worker_id} in slot 0",
        ),
    ]


async def test_the_circuit_opening_and_closing_is_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspex_trio.pool")
    async with (
        open_fake_launcher(fail_at_start=3) as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher, restart_intensity=1, probe_backoff=1) as pool,
    ):
        assert pool.circuit is CircuitState.OPEN
        launcher.fail_at_start = None
        await wait_until(lambda: pool.circuit is CircuitState.CLOSED, 60)
    messages = lines(caplog)
    opened = [m for level, m in messages if level == logging.ERROR and m.startswith("pool circuit open")]
    assert opened and "exit code 3" in opened[0]
    assert (logging.INFO, "pool circuit closed: probe workers started") in messages
