"""The command line: settings precedence, ``serve`` as a real process, ``run`` and ``status``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio._cli import ServeSettings, SettingsError, resolve_settings
from dspex_trio._cli_settings import SETTING_NAMES
from tests.helpers import kill_quietly, pid_alive, read_until, wait_until

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
        with trio.fail_after(20):
            output = await read_until(
                process.stdout,
                lambda data: b"\n" in data,
                lambda: f"serve exited early: {process.returncode}",
            )
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


# -- every expected failure is one line, exit 1 (130 for Ctrl-C) -------------------------------------------


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``dspex-trio *args``: exit status, stdout, stderr."""
    with trio.fail_after(120):
        result = await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def without_keys() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DSPEX_LM_API_KEY", "OPENAI_API_KEY")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_on_a_port_in_use_fails_at_once_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await cli("serve", "--port", str(port))
        assert (code, out) == (1, "")
        assert err == (
            f"dspex-trio serve: error: port {port} on 127.0.0.1 is already in use (another dspex-trio "
            "serve?): stop that server, or choose another port with --port (0 picks a free one)\n"
        )
        # -v: the same line, after the traceback; no worker was started before the bind failed
        code, _, err = await cli("-v", "serve", "--port", str(port))
        assert code == 1 and "Traceback" in err and err.endswith(err.splitlines()[-1] + "\n")
        assert err.splitlines()[-1].startswith(f"dspex-trio serve: error: port {port} on 127.0.0.1")
        assert "starting" not in err and "worker" not in err.replace("(another dspex-trio serve?)", "")


async def test_serve_with_its_http_port_in_use_fails_before_serving_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await cli("serve", "--port", "0", "--http-port", str(port))
    assert (code, out) == (1, "")  # no "serving" line: the port is bound before anything is served
    assert err == (
        f"dspex-trio serve: error: port {port} on 127.0.0.1 is already in use (another dspex-trio "
        "serve?): stop that server, or choose another port with --http-port (0 picks a free one)\n"
    )


def test_the_monitoring_settings_are_flags_config_keys_and_variables(tmp_path):
    from dspex_trio._cli import _parser
    from dspex_trio._cli_monitoring import Monitoring, monitoring_from

    token = tmp_path / "metrics-token"
    token.write_text("scrape\n")
    config = tmp_path / "dspex.toml"
    config.write_text(f'http-port = 9100\nmetrics_token_file = "{token}"\nhttp_routes = false\n')
    env = {"DSPEX_TRACING": "true", "DSPEX_LOG_FORMAT": "json", "DSPEX_HTTP_PORT": "9200"}
    args = _parser().parse_args(["serve"])
    flags = {name: getattr(args, name, None) for name in SETTING_NAMES}
    assert {n: flags[n] for n in ("http_port", "http_routes", "tracing", "log_format")} == dict.fromkeys(
        ("http_port", "http_routes", "tracing", "log_format")
    )  # flags not given are unset: the file and the environment decide
    settings = resolve_settings(file=str(config), environ=env, flags=flags)
    assert (settings.http_port, settings.http_routes, settings.tracing, settings.log_format) == (
        9200,  # the environment beats the file
        False,
        True,
        "json",
    )
    assert monitoring_from(settings) == Monitoring(
        http_routes=False, http_port=9200, metrics_token="scrape", tracing=True
    )
    args = _parser().parse_args(
        ["--log-format", "text", "serve", "--http-port", "0", "--no-tracing", "--no-http-routes"]
    )
    flags = {name: getattr(args, name, None) for name in SETTING_NAMES}
    settings = resolve_settings(file=str(config), environ=env, flags=flags)
    assert (settings.http_port, settings.http_routes, settings.tracing, settings.log_format) == (
        0,
        False,
        False,
        "text",
    )  # flags beat both
    assert resolve_settings(file=None, environ={}, flags={}).http_routes is True
    with pytest.raises(SettingsError, match=r"^DSPEX_HTTP_PORT: expected a whole number, not 'x'$"):
        resolve_settings(file=None, environ={"DSPEX_HTTP_PORT": "x"}, flags={})
    with pytest.raises(SettingsError, match="http_port must be 0-65535"):
        resolve_settings(file=None, environ={"DSPEX_HTTP_PORT": "70000"}, flags={})
    with pytest.raises(SettingsError, match="log_format must be text or json"):
        resolve_settings(file=None, environ={"DSPEX_LOG_FORMAT": "xml"}, flags={})


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["serve", "--config", "{tmp}/missing.toml"],
            {},
            "serve: error: config file {tmp}/missing.toml: No such file or directory",
        ),
        (
            ["serve", "--config", "{tmp}/bad.toml"],
            {},
            "serve: error: config file {tmp}/bad.toml: unknown key(s) prot; known: "
            + ", ".join(SETTING_NAMES),
        ),
        (
            ["serve"],
            {"DSPEX_PORT": "eighty"},
            "serve: error: DSPEX_PORT: expected a whole number, not 'eighty'",
        ),
        (
            ["serve", "--token-file", "{tmp}/empty"],
            {},
            "serve: error: token file {tmp}/empty is empty",
        ),
        (
            ["serve", "--host", "0.0.0.0", "--port", "0"],
            {},
            "serve: error: refusing to serve on '0.0.0.0' without a token: set --token-file, DSPEX_TOKEN or "
            "--token auto, or bind 127.0.0.1",
        ),
        (
            ["status", "--url", "ws://127.0.0.1:{port}"],
            {},
            "status: error: cannot connect to ws://127.0.0.1:{port}: Connection refused: start the server "
            "(dspex-trio serve), or give its address with --url",
        ),
        (
            ["run", "question -> answer", "--url", "ws://127.0.0.1:{port}"],
            {},
            "run: error: cannot connect to ws://127.0.0.1:{port}: Connection refused: start the server "
            "(dspex-trio serve), or give its address with --url",
        ),
        (
            ["status", "--url", "http://127.0.0.1:{port}"],
            {},
            'status: error: --url http://127.0.0.1:{port}: WebSocket URL scheme must be "ws:" or "wss:"',
        ),
        (
            ["run", "n: int -> answer", "--inputs-json", "[3]"],
            {},
            "run: error: --inputs-json must be a JSON object, e.g. --inputs-json '{{\"n\": 3}}'",
        ),
    ],
    ids=[
        "missing-config",
        "unknown-key",
        "bad-variable",
        "empty-token-file",
        "public-without-token",
        "status-unreachable",
        "run-unreachable",
        "not-a-ws-url",
        "inputs-not-an-object",
    ],
)
async def test_expected_failures_are_one_line_naming_the_cause_and_the_fix(
    tmp_path: Any, args: list[str], env: dict[str, str], expected: str
) -> None:
    (tmp_path / "bad.toml").write_text("prot = 80\n")
    (tmp_path / "empty").write_text("\n")
    port = free_port()
    fill = partial(str.format, tmp=tmp_path, port=port)
    code, out, err = await cli(*map(fill, args), env={**os.environ, **env})
    assert (code, out, err) == (1, "", "dspex-trio " + fill(expected) + "\n")


async def test_run_without_a_key_says_where_the_key_comes_from() -> None:
    code, out, err = await cli(
        "run",
        "question -> answer",
        "--input",
        "question=hi",
        "--lm",
        "openai/gpt-4o-mini",
        env=without_keys(),
    )
    assert (code, out) == (1, "")
    assert err == (
        "dspex-trio run: error: the LM openai/gpt-4o-mini has no usable API key (LMNotConfiguredError): "
        "set DSPEX_LM_API_KEY or OPENAI_API_KEY, or give --lm-api-key-file PATH\n"
    )


async def test_version_and_options_before_fake_lm() -> None:
    code, out, err = await cli("--version")
    assert (code, err) == (0, "") and out.startswith(f"dspex-trio {dspex_trio.__version__} (Python ")
    code, out, err = await cli("-v", "fake-lm", "--help")
    assert (code, err) == (0, "") and out.startswith("usage: dspex-trio fake-lm")


# -- run and status against a running server ---------------------------------------------------------------


@asynccontextmanager
async def mock_server(**options: Any) -> AsyncIterator[dspex_trio.WebsocketServer]:
    """A websocket server over the in-process mock backend (no worker process)."""
    async with dspex_trio.open_backend("mock") as backend, trio.open_nursery() as nursery:
        yield await nursery.start(partial(dspex_trio.serve_websocket, backend, port=0, **options))
        nursery.cancel_scope.cancel()


async def test_run_on_a_running_server_checks_inputs_and_hints_at_json() -> None:
    async with mock_server() as server:
        code, out, err = await cli("run", "question -> answer", "-i", "question=hi", "--url", server.url)
        assert (code, err) == (0, "") and out.startswith("answer: ")
        code, out, err = await cli("run", "question -> answer", "-i", "qestion=hi", "--url", server.url)
        assert (code, out) == (1, "")
        assert err == (
            "dspex-trio run: error: unknown input 'qestion' (did you mean 'question'?): the inputs of "
            "'question -> answer' are question\n"
        )
        code, out, err = await cli("run", "n: int -> answer", "-i", "n=3", "--url", server.url)
        assert (code, out) == (1, "")
        assert err == (
            "dspex-trio run: error: execute: input 'n' must be int, not str: --input gives text; give n (int) "
            "as JSON: --inputs-json '{\"n\": 3}'\n"
        )
        code, out, err = await cli(
            "run", "n: int -> answer", "--inputs-json", '{"n": 3}', "--url", server.url, "--json"
        )
        assert (code, err) == (0, "") and set(json.loads(out)) == {"answer"}
        code, out, err = await cli("run", "q -> a", "-i", "q=x", "--lm", "nope", "--url", server.url)
        assert (code, out) == (1, "")
        assert err.startswith("dspex-trio run: error: lm/select: ") and "offline" in err
        assert server.statistics().connections_total == 5


async def test_status_with_a_wrong_token_and_ctrl_c() -> None:
    # --timeout 60 (not the default 10 s to connect and get the snapshot): a loaded machine must not
    # turn the refusal, or the snapshot before the Ctrl-C, into a timeout
    async with mock_server(token="right") as server:
        code, out, err = await cli(
            "status", "--once", "--url", server.url, "--token", "wrong", "--timeout", "60"
        )
        assert (code, out) == (1, "")
        assert err == (
            f"dspex-trio status: error: {server.url} refused the connection (HTTP 401: unauthorized: the token "
            "is not valid): check the token you give (--token-file PATH or DSPEX_TOKEN)\n"
        )
        # Ctrl-C is the way to leave `status`: exit 130, one line
        process = await trio.lowlevel.open_process(
            [*CLI, "status", "--url", server.url, "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "DSPEX_TOKEN": "right"},
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            output = b""
            with trio.fail_after(90):
                while b"pool:" not in output:
                    chunk = await process.stdout.receive_some(4096)
                    assert chunk, f"status exited early: {await process.stderr.receive_some(65536)!r}"
                    output += chunk
            process.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                code = await process.wait()
            err_bytes = await process.stderr.receive_some(65536)
            assert (code, err_bytes) == (130, b"dspex-trio status: interrupted\n")
        finally:
            kill_quietly(process.pid)
            await process.wait()


async def test_serve_logs_what_a_person_can_follow_without_websocket_frames() -> None:
    process = await trio.lowlevel.open_process(
        [*CLI, "-vv", "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    err = bytearray()

    async def collect_stderr() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(65536):
            err.extend(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_stderr)
            assert process.stdout is not None
            with trio.fail_after(30):
                output = await read_until(process.stdout, lambda data: b"\n" in data, "serve exited early")
            url = output.decode().split()[2]
            port = int(url.rsplit(":", 1)[1])

            def client() -> dict[str, Any]:
                from websockets.exceptions import InvalidStatus
                from websockets.sync.client import connect

                with pytest.raises(InvalidStatus):  # no subprotocol: refused, and logged with the reason
                    connect(url, open_timeout=10).close()
                with connect(url, subprotocols=["dspex.v1"], open_timeout=10) as ws:  # type: ignore[list-item]

                    def call(request_id: int, method: str, **params: Any) -> Any:
                        ws.send(
                            json.dumps(
                                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
                            )
                        )
                        while True:
                            message = json.loads(ws.recv(timeout=30))
                            if message.get("id") == request_id:
                                return message.get("result")

                    program = call(1, "program/create", signature="question -> answer")["program"]
                    call(2, "execution/submit", program=program, inputs={})  # fails: the input is missing
                    while json.loads(ws.recv(timeout=30)).get("params", {}).get("event") != "failed":
                        pass
                    return call(3, "runtime/status")  # type: ignore[no-any-return]

            status = await trio.to_thread.run_sync(client)
            victim = status["health"]["workers"][0]
            os.kill(victim["pid"], signal.SIGKILL)
            await wait_until(lambda: b"replaced worker" in err, 30, "no replacement was logged")
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await process.wait() == 0
            nursery.cancel_scope.cancel()
    finally:
        kill_quietly(process.pid)
        await process.wait()
    text = err.decode()
    for expected in (
        f"INFO cli: bound 127.0.0.1:{port}; starting 2 worker(s)",
        f"INFO websocket: listening on {url} (backend pool)",
        "INFO websocket: handshake from 127.0.0.1 refused (400): the websocket subprotocol 'dspex.v1' is required",
        "INFO websocket: connection from 127.0.0.1 opened (client)",
        f"WARNING pool: worker {victim['worker_id']} (pid {victim['pid']}) failed: killed by SIGKILL; "
        "starting a replacement",
        f"replaced worker {victim['worker_id']} in slot ",
    ):
        assert expected in text, (expected, text[-3000:])
    assert any(" INFO websocket: execution e_" in line and " failed: " in line for line in text.splitlines())
    assert "trio-websocket" not in text  # -vv: no frames
