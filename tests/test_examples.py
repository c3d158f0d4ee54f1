"""The example applications run as their READMEs say: served with one command, used by their client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from tests.helpers import kill_quietly, read_until


async def test_the_support_desk_is_served_with_one_command_and_used_by_its_client() -> None:
    server = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "dspex_trio",
            "serve",
            "--port",
            "0",
            "--programs",
            "examples.support.programs",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "DSPEX_WORKERS": "2"},
    )
    try:
        assert server.stdout is not None
        with trio.fail_after(60):
            output = await read_until(
                server.stdout, lambda data: b"\n" in data, lambda: f"serve exited early: {server.returncode}"
            )
        url = output.decode().splitlines()[0].split()[2]
        client = await trio.run_process(
            [sys.executable, "-m", "examples.support.client", "--url", url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert client.returncode == 0, client.stderr.decode()
        text = client.stdout.decode()
        assert "programs: answer, chat, triage" in text
        assert "tools:    order_status, search_faq" in text
        assert "metrics:  grounded" in text
        assert "[respond.predict started]" in text  # the streamed answer's status event
        assert "ticket: {" in text and '"category": ' in text
        assert "agent used: " in text and "best of 3: " in text
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await server.wait() == 0
    finally:
        kill_quietly(server.pid)
        await server.wait()
