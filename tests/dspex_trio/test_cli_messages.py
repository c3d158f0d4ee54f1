"""The command line's messages, in-process: the one error path, the input checks, the hints, logging.

The same messages from a real ``dspex-trio`` process, with their exit codes, are in ``test_cli.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

import dspex_trio
from dspex_trio import _cli
from dspex_trio._cli_client import connect_failure
from dspex_trio._cli_run import RunRequest, check_inputs, explain_failure, parse_inputs
from dspex_trio._cli_settings import (
    SETTING_NAMES,
    CliError,
    Secrets,
    ServeSettings,
    SettingsError,
    missing_key_warnings,
    resolve_settings,
)

ROOT = Path(__file__).resolve().parents[2]

# -- the one error path ------------------------------------------------------------------------------------


def test_an_expected_failure_in_nested_groups_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    failure = BaseExceptionGroup(
        "outer",
        [ExceptionGroup("inner", [ValueError("noise"), CliError("port 1 is in use: choose another\nmore")])],
    )
    assert _cli._report("serve", failure, verbose=0) == 1
    assert capsys.readouterr().err == "dspex-trio serve: error: port 1 is in use: choose another\n"


def test_ctrl_c_anywhere_is_130_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    failure = BaseExceptionGroup("outer", [KeyboardInterrupt(), CliError("not this")])
    assert _cli._report("status", failure, verbose=0) == 130
    assert capsys.readouterr().err == "dspex-trio status: interrupted\n"
    assert _cli._report("run", KeyboardInterrupt(), verbose=0) == 130
    assert capsys.readouterr().err == "dspex-trio run: interrupted\n"


def test_the_traceback_only_at_v(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        raise ExceptionGroup("group", [CliError("the cause: the fix")])
    except ExceptionGroup as exc:
        assert _cli._report("run", exc, verbose=1) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("dspex-trio run: error: the cause: the fix\n")


def test_each_kind_of_failure_has_its_line() -> None:
    assert _cli.explain(dspex_trio.PoolUnavailable("the pool is unavailable: x")) == (
        "PoolUnavailable: the pool is unavailable: x"
    )
    assert _cli.explain(dspex_trio.WorkerStartFailed("exit code 1\nstderr tail")) == (
        "the workers could not start: exit code 1 (-v shows their output)"
    )
    assert _cli.explain(FileNotFoundError(errno.ENOENT, "No such file or directory", "x.toml")) == (
        "No such file or directory: x.toml"
    )
    assert _cli.explain(ZeroDivisionError("division by zero")) == (
        "unexpected ZeroDivisionError: division by zero (-v shows the traceback)"
    )
    # a cancellation is never the cause; an expected failure is chosen over others
    leaves = _cli._leaves(ExceptionGroup("g", [RuntimeError("x"), ExceptionGroup("h", [CliError("y")])]))
    assert isinstance(_cli._main_cause(leaves), CliError)


def test_options_before_fake_lm_are_the_cli_s_own() -> None:
    assert _cli._split_fake_lm(["-v", "fake-lm", "--port", "0"]) == (["-v", "fake-lm"], ["--port", "0"])
    assert _cli._split_fake_lm(["--log-format", "json", "fake-lm"]) == (
        ["--log-format", "json", "fake-lm"],
        [],
    )
    assert _cli._split_fake_lm(["run", "fake-lm"]) is None
    assert _cli._split_fake_lm(["-v"]) is None


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _cli.main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dspex-trio {dspex_trio.__version__} (Python ") and "dspy " in out


# -- serve: binding, settings, keys ------------------------------------------------------------------------


def test_a_port_in_use_names_the_port_and_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CliError) as caught:
            trio.run(_cli._listen, "127.0.0.1", port)
    assert str(caught.value) == (
        f"port {port} on 127.0.0.1 is already in use (another dspex-trio serve?): stop that server, "
        "or choose another port with --port (0 picks a free one)"
    )
    denied = OSError(errno.EACCES, "Permission denied")
    assert _cli._bind_failure("127.0.0.1", 80, denied) == (
        "not allowed to listen on port 80 (below 1024 needs privileges): choose another with --port"
    )


def test_the_http_port_in_use_names_its_own_flag() -> None:
    from functools import partial

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CliError, match=r"choose another port with --http-port \(0 picks a free one\)$"):
            trio.run(partial(_cli._listen, "127.0.0.1", port, flag="--http-port"))


def test_environment_values_are_explained() -> None:
    with pytest.raises(SettingsError, match=r"^DSPEX_PORT: expected a whole number, not 'eighty'$"):
        resolve_settings(file=None, environ={"DSPEX_PORT": "eighty"}, flags={})
    with pytest.raises(SettingsError, match=r"^DSPEX_DRAIN_GRACE: expected a number, not 'soon'$"):
        resolve_settings(file=None, environ={"DSPEX_DRAIN_GRACE": "soon"}, flags={})


def test_a_provider_lm_without_a_key_is_warned_about() -> None:
    settings = ServeSettings(lm="openai/gpt-4o-mini")
    no_keys = Secrets(None, None, None, {"fast": {"model": "openai/gpt-4o-mini"}})
    assert missing_key_warnings(settings, no_keys) == [
        "--lm openai/gpt-4o-mini has no API key: set DSPEX_LM_API_KEY or OPENAI_API_KEY, or "
        "--lm-api-key-file PATH (fine if its endpoint needs none); without one its executions fail",
        'lms.fast (openai/gpt-4o-mini) has no API key: add api_key_env = "VAR" or api_key_file = "PATH" '
        "to its table (fine if its endpoint needs none)",
    ]
    keys = Secrets(None, None, "sk-x", {"fast": {"model": "openai/x", "api_key": "k"}})
    assert missing_key_warnings(settings, keys) == []
    assert missing_key_warnings(ServeSettings(), Secrets(None, None, None, {})) == []
    passed = ServeSettings(lm="anthropic/claude", worker_env=("ANTHROPIC_API_KEY",))
    assert missing_key_warnings(passed, Secrets(None, None, None, {})) == []


def test_configuration_md_lists_every_setting_and_variable() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in SETTING_NAMES:
        assert f"`{name}`" in text, name
        if name != "lms":
            assert f"`DSPEX_{name.upper()}`" in text, name
    for variable in (
        "DSPEX_LM_API_KEY",
        "OPENAI_API_KEY",
        "DSPEX_LM",
        "DSPEX_LM_BASE_URL",
        "DSPEX_TEST_MODE",
    ):
        assert f"`{variable}`" in text, variable


@pytest.mark.parametrize("page", ["configuration.md", "deploy.md"])
def test_the_config_files_in_the_docs_are_valid(page: str, tmp_path: Path) -> None:
    text = (ROOT / "docs" / page).read_text()
    examples = re.findall(r"^```toml\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert examples
    for example in examples:
        config = tmp_path / "dspex.toml"
        config.write_text(example)
        settings = resolve_settings(file=str(config), environ={}, flags={})
        assert settings.token_file == "/etc/dspex-trio/token" and settings.lm == "openai/gpt-4o-mini"


# -- run: inputs and failures ------------------------------------------------------------------------------

FIELDS = [{"name": "question", "type": "str"}, {"name": "n", "type": "int"}]


def request(*items: str, inputs_json: str | None = None, **fields: Any) -> RunRequest:
    inputs, text = parse_inputs(items, inputs_json)
    return RunRequest(signature="question, n: int -> answer", inputs=inputs, text_inputs=text, **fields)


def test_a_misspelt_input_is_named_with_a_suggestion() -> None:
    with pytest.raises(CliError) as caught:
        check_inputs(request("qestion=hi", "n=1"), FIELDS)
    assert str(caught.value) == (
        "unknown input 'qestion' (did you mean 'question'?): the inputs of "
        "'question, n: int -> answer' are question, n"
    )
    with pytest.raises(CliError) as caught:
        check_inputs(request("question=hi"), FIELDS)
    assert str(caught.value) == "missing input 'n': give it with --input n=VALUE (or in --inputs-json)"
    check_inputs(request("question=hi", inputs_json='{"n": 3}'), FIELDS)  # complete: no error


def test_input_flags_are_checked_before_anything_starts() -> None:
    with pytest.raises(CliError, match=r"^--input takes NAME=VALUE, not 'question'$"):
        parse_inputs(["question"], None)
    with pytest.raises(CliError, match=r"^--inputs-json must be a JSON object"):
        parse_inputs([], "[1]")
    with pytest.raises(CliError, match=r"^--inputs-json is not JSON"):
        parse_inputs([], "{n: 3}")
    inputs, text = parse_inputs(["question=a=b"], '{"n": 3, "question": "overridden"}')
    assert inputs == {"question": "a=b", "n": 3} and text == {"question"}


def test_failures_a_person_can_fix_say_how() -> None:
    typed = explain_failure(
        request("n=3"), FIELDS, "InvalidParams", "execute: input 'n' must be int, not str"
    )
    assert str(typed) == (
        "execute: input 'n' must be int, not str: --input gives text; give n (int) as JSON: "
        "--inputs-json '{\"n\": 3}'"
    )
    message = "[openai/x] no API key found\n\n  To fix:\n    - pass api_key= to dspy.LM"
    local = explain_failure(request(lm="openai/x"), FIELDS, "LMNotConfiguredError", message)
    assert str(local) == (
        "the LM openai/x has no usable API key (LMNotConfiguredError): set DSPEX_LM_API_KEY or "
        "OPENAI_API_KEY, or give --lm-api-key-file PATH"
    )
    remote = explain_failure(request(lm="openai/x", url="ws://h"), FIELDS, "LMNotConfiguredError", message)
    assert str(remote).endswith(
        "select one of the server's LMs with --lm NAME, or give this LM's key with --lm-api-key-file"
    )
    timeout = explain_failure(request(), FIELDS, "CallTimeout", "execute timed out after 1 s")
    assert str(timeout) == "execute timed out after 1 s: give it longer with --timeout SECONDS"
    other = explain_failure(request(), FIELDS, "LMRateLimitError", "rate limited\nretry later")
    assert str(other) == "rate limited (LMRateLimitError)"


def test_connection_failures_name_the_url_and_the_fix() -> None:
    url = "ws://127.0.0.1:9"
    refused = OSError("all attempts to connect to 127.0.0.1:9 failed")
    refused.__cause__ = ExceptionGroup("g", [OSError(errno.ECONNREFUSED, "Error connecting to ...")])
    assert connect_failure(url, refused, token=False, timeout=10) == (
        "cannot connect to ws://127.0.0.1:9: Connection refused: start the server (dspex-trio serve), "
        "or give its address with --url"
    )
    rejected = trio_websocket.ConnectionRejected(401, (), b"unauthorized: a token is required\n")
    assert connect_failure(url, rejected, token=False, timeout=10) == (
        "ws://127.0.0.1:9 refused the connection (HTTP 401: unauthorized: a token is required): give the "
        "server's token with --token-file PATH or DSPEX_TOKEN"
    )
    assert connect_failure(url, trio.TooSlowError(), token=True, timeout=2.5) == (
        "no answer from ws://127.0.0.1:9 within 2.5 s: is this the address of a dspex-trio server?"
    )


# -- logging -----------------------------------------------------------------------------------------------


def _record(name: str, message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_log_lines_as_text_and_as_json() -> None:
    text = _cli._TextFormatter().format(_record("dspex_trio.pool", "worker w1 replaced"))
    assert text.endswith(" INFO pool: worker w1 replaced")
    line = json.loads(_cli._JsonFormatter().format(_record("trio-websocket", "x", logging.DEBUG)))
    assert line["level"] == "DEBUG" and line["logger"] == "trio-websocket" and line["message"] == "x"
    assert line["time"].endswith("Z")


def test_serves_log_format_setting_switches_the_cli_handler() -> None:
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        root.handlers.clear()
        _cli._configure_logging(0, "text")
        (handler,) = root.handlers
        _cli._use_log_format("json")  # DSPEX_LOG_FORMAT=json, or log_format in the config file
        assert isinstance(handler.formatter, _cli._JsonFormatter)
        _cli._use_log_format("text")
        assert isinstance(handler.formatter, _cli._TextFormatter)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_vv_does_not_log_websocket_frames() -> None:
    root, frames = logging.getLogger(), logging.getLogger("trio-websocket")
    saved = root.level, list(root.handlers), frames.level
    try:
        root.handlers.clear()
        _cli._configure_logging(2, "text")
        assert root.level == logging.DEBUG and frames.getEffectiveLevel() == logging.INFO
        root.handlers.clear()
        frames.setLevel(logging.NOTSET)
        _cli._configure_logging(3, "text")
        assert frames.getEffectiveLevel() == logging.DEBUG
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        frames.setLevel(saved[2])
