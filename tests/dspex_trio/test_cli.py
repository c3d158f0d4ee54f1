"""The command line: settings precedence, ``serve`` as a real process, ``run`` and ``status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio._cli import ServeSettings, SettingsError, resolve_settings
from tests.helpers import kill_quietly, pid_alive, wait_until

CLI = [sys.executable, "-m", "dspex_trio"]


def test_settings_precedence_defaults_file_env_flags(tmp_path):
    assert resolve_settings(file=None, environ={}, flags={}) == ServeSettings()
    config = tmp_path / "dspex.toml"
    config.write_text('host = "127.0.0.2"\nport = 9000\nworkers = 3\nlm = "openai/from-file"\n')
    env = {"DSPEX_PORT": "9100", "DSPEX_LM": "openai/from-env", "DSPEX_DIAGNOSTICS": "true", "OTHER": "x"}
    settings = resolve_settings(file=str(config), environ=env, flags={"lm": "openai/from-flag", "host": None})
    assert settings.host == "127.0.0.2"  # file (the flag was not given)
    assert settings.workers == 3  # file
    assert settings.port == 9100  # env beats file
    assert settings.diagnostics is True  # env
    assert settings.lm == "openai/from-flag"  # flag beats env


def test_bad_settings_are_clear_errors(tmp_path):
    config = tmp_path / "dspex.toml"
    config.write_text("prot = 80\n")
    with pytest.raises(SettingsError, match=r"unknown key.*prot"):
        resolve_settings(file=str(config), environ={}, flags={})
    with pytest.raises(SettingsError, match="DSPEX_PORT"):
        resolve_settings(file=None, environ={"DSPEX_PORT": "eighty"}, flags={})
    with pytest.raises(SettingsError, match="port must be"):
        resolve_settings(file=None, environ={}, flags={"port": 70000})
    with pytest.raises(SettingsError, match="config file"):
        resolve_settings(file=str(tmp_path / "missing.toml"), environ={}, flags={})


async def test_serve_refuses_a_public_address_without_a_token():
    result = await trio.run_process(
        [*CLI, "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert b"without a token" in result.stderr


def _status_over_websocket(url: str, token: str | None = None) -> dict[str, Any]:
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    with connect(url, subprotocols=["dspex.v1"], additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "runtime/status"}))
        return json.loads(ws.recv(timeout=10))["result"]


async def test_serve_prints_its_url_answers_and_drains_on_sigterm():
    env = {**os.environ, "DSPEX_WORKERS": "2", "DSPEX_TOKEN": "t0ken"}
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(20):
            while b"\n" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"serve exited early: {process.returncode}"
                output += chunk
        line = output.decode().splitlines()[0]
        assert line.startswith("dspex-trio serving ws://127.0.0.1:") and line.endswith(
            "(subprotocol dspex.v1)"
        )
        url = line.split()[2]
        status = await trio.to_thread.run_sync(partial(_status_over_websocket, url, "t0ken"))
        pids = [w["pid"] for w in status["health"]["workers"]]
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            returncode = await process.wait()
        assert returncode == 0
        await wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5, "a worker outlived serve")
    finally:
        kill_quietly(process.pid)
        await process.wait()


async def test_run_streams_a_program_to_the_terminal():
    result = await trio.run_process(
        [*CLI, "run", "question -> answer, confidence: float", "--input", "question=What is DSPy?"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("answer: ") and len(lines[0]) > len("answer: ")
    assert lines[1].startswith("confidence: ")
    bad = await trio.run_process(
        [*CLI, "run", "question -> answer", "--input", "q=x"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert bad.returncode == 1 and b"error" in bad.stderr


async def test_status_once_prints_the_snapshot_and_a_bad_token_is_refused():
    async with dspex_trio.open_pool(workers=1) as pool, trio.open_nursery() as nursery:
        server = await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0, token="right"))
        result = await trio.run_process(
            [*CLI, "status", "--once", "--url", server.url, "--token", "right"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        text = result.stdout.decode()
        assert "pool: 1/1 workers, circuit closed" in text
        assert str(pool.statistics().workers[0].pid) in text
        refused = await trio.run_process(
            [*CLI, "status", "--once", "--url", server.url, "--token", "wrong"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert refused.returncode == 1 and b"HTTP 401" in refused.stderr
        nursery.cancel_scope.cancel()
