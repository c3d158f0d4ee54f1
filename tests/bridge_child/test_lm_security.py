"""Issue 13, worker side: a client-chosen (hermetic) LM sends no credential but its own, reaches public
addresses only, a ``Retry-After`` never pins a worker thread, and no key shows in an error or a log.

Real workers (subprocess and zygote launchers) against a local server that records every request
(``tests/recording_lm.py``). The server's environment holds a canary key under every provider's
variable, the workers get it too (``worker_env`` names them: the worst case), and the workers' HOME
holds stored logins (Codex, Claude Code, xAI) with the canary: a hermetic LM must never send it, while
an operator LM (not hermetic) does what DSPy normally does, which proves the canary was reachable.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import dspex_trio
from bridge_child import wire
from dspex_trio._launcher import SubprocessLauncher
from dspex_trio._zygote import open_zygote, zygote_supported
from tests.helpers import wait_until
from tests.recording_lm import ANSWER, RecordingLM, Reply, recording_lm

CANARY = "sk-canary-5e1f-0123456789abcdef"
KEY_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "XAI_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY")
PROGRAM = {"id": "p1", "version": 1, "spec": {"signature": "question -> answer", "module": "predict"}}
INPUTS = {"question": "What is six times seven?"}
LAUNCHERS = [
    "subprocess",
    pytest.param("zygote", marks=pytest.mark.skipif(not zygote_supported(), reason="Linux")),
]


def plant_logins(home: Path) -> None:
    """Stored logins lm15 borrows (Codex CLI, Claude Code, xAI/pi): all holding the canary."""
    files = {
        ".codex/auth.json": {"tokens": {"access_token": CANARY, "account_id": "acct-canary"}},
        ".claude/.credentials.json": {"claudeAiOauth": {"accessToken": CANARY, "refreshToken": CANARY}},
        ".config/lm15/credentials.json": {"xai": {"type": "oauth", "access": CANARY, "refresh": CANARY}},
        ".pi/agent/auth.json": {"xai": {"type": "oauth", "access": CANARY, "refresh": CANARY}},
    }
    for name, content in files.items():
        path = home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


@pytest.fixture
def server() -> Iterator[RecordingLM]:
    with recording_lm() as lm:
        yield lm


@pytest.fixture
def canary_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in KEY_VARIABLES:
        monkeypatch.setenv(name, CANARY)
    home = tmp_path / "home"
    plant_logins(home)
    return home


@pytest.fixture(params=LAUNCHERS)
async def worker(request: pytest.FixtureRequest, canary_env: Path) -> AsyncIterator[dspex_trio.Worker]:
    """A worker that has the canary in its environment and stored logins in its HOME."""
    env = {"HOME": str(canary_env)}
    if request.param == "subprocess":
        launcher = SubprocessLauncher(env=env, worker_env=KEY_VARIABLES)
        async with dspex_trio.open_worker(launcher=launcher, diagnostics=True) as w:
            yield w
    else:
        async with (
            open_zygote(env=env, worker_env=KEY_VARIABLES) as zygote,
            dspex_trio.open_worker(launcher=zygote, diagnostics=True) as w,
        ):
            yield w


def lm(server: RecordingLM, model: str = "openai/x", **settings: Any) -> dict[str, Any]:
    return {"model": model, "api_base": server.url, "num_retries": 3, "timeout": 30, **settings}


async def execute(worker: dspex_trio.Worker, config: dict[str, Any], *, stream: bool = False) -> Any:
    params = {"program": PROGRAM, "inputs": INPUTS, "lm": config}
    if not stream:
        return await worker.call("execute", params, timeout=60)
    async with worker.stream("execute", params, timeout=60) as events:
        async for _event in events:
            pass
        return await events.result()


# -- hermetic credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hermetic_lm_without_a_key_sends_no_credential(
    worker: dspex_trio.Worker, server: RecordingLM, stream: bool
) -> None:
    # two failures first: DSPy retries (after a 500, and after a 429 with Retry-After) on the same LM
    server.script.extend([Reply(500), Reply(429, {"Retry-After": "0"})])
    out = await execute(worker, lm(server, hermetic=True), stream=stream)
    assert out["outputs"]["answer"] == ANSWER
    assert server.count() == 3
    assert CANARY not in server.everything_sent()
    for request in server.requests:
        assert not {"authorization", "x-api-key", "api-key"} & set(request.headers), request.headers

    # the control: the same LM as an operator's (not hermetic) does send the key it finds in the
    # worker's environment, so the canary was there to leak
    server.requests.clear()
    await execute(worker, lm(server), stream=stream)
    assert CANARY in server.everything_sent()


@pytest.mark.parametrize("model", ["xai/x", "groq/x", "hosted_vllm/x", "anthropic/x"])
async def test_no_hermetic_provider_falls_back_to_the_environment_or_a_stored_login(
    worker: dspex_trio.Worker, server: RecordingLM, model: str
) -> None:
    try:
        await execute(worker, lm(server, model, hermetic=True, num_retries=0))
    except dspex_trio.ProgramError:
        assert model == "anthropic/x"  # this server speaks chat completions, not Anthropic messages
    assert server.count() >= 1
    assert CANARY not in server.everything_sent()


async def test_a_hermetic_lm_sends_its_own_key_and_only_it(
    worker: dspex_trio.Worker, server: RecordingLM
) -> None:
    own = "sk-own-client-key-42"
    server.script.append(Reply(500))
    out = await execute(worker, lm(server, hermetic=True, api_key=own))
    assert out["outputs"]["answer"] == ANSWER
    assert [r.headers.get("authorization") for r in server.requests] == [f"Bearer {own}"] * 2
    assert CANARY not in server.everything_sent()


@pytest.mark.parametrize("model", ["azure/gpt-4o", "claude-code:sonnet/x", "openai-codex:gpt/x", "bedrock/x"])
async def test_machine_identity_providers_are_refused_for_hermetic_lms(
    worker: dspex_trio.Worker, server: RecordingLM, model: str
) -> None:
    with pytest.raises(dspex_trio.InvalidParams, match="not available to a hermetic") as refused:
        await worker.call("validate_lm", {"lm": lm(server, model, hermetic=True)})
    assert repr(model.partition("/")[0]) in str(refused.value)
    with pytest.raises(dspex_trio.InvalidParams, match="not available to a hermetic"):
        await execute(worker, lm(server, model, hermetic=True))
    assert server.count() == 0


def test_the_routed_provider_is_checked_again_when_the_lm_is_built() -> None:
    # a spelling the early prefix check would not catch must still be refused by the provider lm15
    # routes it to (in-process: dspy, no worker)
    from bridge_child._context import MethodError
    from bridge_child._programs import _build_lm

    for model, provider in [("claude-code:x/y", "claude-code"), ("openai-codex:x/y", "openai-codex")]:
        with pytest.raises(MethodError, match=f"cannot use provider '{provider}'") as refused:
            _build_lm({"model": model, "hermetic": True})
        assert refused.value.code == wire.ErrorCode.INVALID_PARAMS
    with pytest.raises(MethodError, match="cannot use provider 'azure-chat'"):
        _build_lm({"model": "azure/x", "hermetic": True, "api_key": "k"})


async def test_an_operator_lm_reads_only_the_environment_it_was_given(
    canary_env: Path, server: RecordingLM
) -> None:
    # no worker_env: the worker has no key, and an operator LM without api_key cannot find one
    launcher = SubprocessLauncher(env={"HOME": str(canary_env)})
    async with dspex_trio.open_worker(launcher=launcher) as plain:
        with pytest.raises(dspex_trio.ProgramError, match="OPENAI_API_KEY"):
            await execute(plain, lm(server))
    assert server.count() == 0


# -- public_only: connect-time egress -------------------------------------------------------------------


def loopback_hosts(server: RecordingLM) -> list[str]:
    import socket

    hosts = ["127.0.0.1", "localhost"]
    name = socket.gethostname()
    try:
        if all(info[4][0] == "127.0.0.1" for info in socket.getaddrinfo(name, server.port)):
            hosts.append(name)  # a name other than localhost that this machine maps to loopback
    except OSError:
        pass
    return hosts


@pytest.mark.parametrize("stream", [False, True])
async def test_a_public_only_lm_never_connects_inside(
    worker: dspex_trio.Worker, server: RecordingLM, stream: bool
) -> None:
    for host in loopback_hosts(server):
        base = f"http://{host}:{server.port}/v1"
        config = {**lm(server, hermetic=True, public_only=True), "api_base": base}
        with pytest.raises(dspex_trio.ProgramError) as refused:
            await execute(worker, config, stream=stream)
        assert refused.value.error_type == "EgressRefused"
        assert "loopback" in str(refused.value) and "public_only" in str(refused.value)
    assert server.count() == 0
    # the guard is the LM's, not the worker's: another LM reaches the same server from the same worker
    out = await execute(worker, lm(server, hermetic=True), stream=stream)
    assert out["outputs"]["answer"] == ANSWER


async def test_the_connect_guard_does_not_touch_concurrent_lms(
    worker: dspex_trio.Worker, server: RecordingLM
) -> None:
    refused_config = {
        **lm(server, hermetic=True, public_only=True),
        "api_base": f"http://localhost:{server.port}",
    }
    outcomes: list[str] = []

    async def one(config: dict[str, Any]) -> None:
        try:
            await execute(worker, config)
            outcomes.append("ok")
        except dspex_trio.ProgramError as exc:
            outcomes.append(exc.error_type)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, refused_config if i % 2 else lm(server, hermetic=True))
    assert sorted(outcomes) == ["EgressRefused"] * 3 + ["ok"] * 3
    assert server.count() == 3


# -- Retry-After -------------------------------------------------------------------------------------------


async def executing(worker: dspex_trio.Worker) -> list[int]:
    return list((await worker.call("stats"))["executing"])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cancel_ends_a_retry_after_wait_at_once(
    worker: dspex_trio.Worker, server: RecordingLM, stream: bool
) -> None:
    server.script.extend([Reply(429, {"Retry-After": "30"})] * 3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(execute, worker, lm(server, hermetic=True), stream=stream))
        await wait_until(lambda: server.count() >= 1, 20, "the first request")
        nursery.cancel_scope.cancel()
    # the worker's thread is free again long before the 30 s wait would end, and sent nothing more
    await wait_until(lambda: _idle(worker), 10, "the execution's thread to finish")
    assert server.count() == 1


async def _idle(worker: dspex_trio.Worker) -> bool:
    return not await executing(worker)


async def test_a_cancelled_call_starts_no_further_lm_call(
    worker: dspex_trio.Worker, server: RecordingLM
) -> None:
    # an unparseable answer makes DSPy call the LM again (JSON fallback): not once the call is cancelled
    gate = threading.Event()
    server.script.append(Reply(text="nothing a parser could use", hold=gate))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(execute, worker, lm(server, hermetic=True)))
        await wait_until(lambda: server.count() >= 1, 20, "the first request")
        nursery.cancel_scope.cancel()
    gate.set()  # the answer arrives after the cancel
    await wait_until(lambda: _idle(worker), 10, "the execution's thread to finish")
    assert server.count() == 1


async def test_a_retry_after_longer_than_the_deadline_ends_the_call_with_the_rate_limit_error(
    worker: dspex_trio.Worker, server: RecordingLM
) -> None:
    server.script.extend([Reply(429, {"Retry-After": "30"})] * 3)
    params = {"program": PROGRAM, "inputs": INPUTS, "lm": lm(server, hermetic=True)}
    with pytest.raises(dspex_trio.ProgramError) as failed:
        await worker.call("execute", params, timeout=10)  # not CallTimeout: it does not wait 30 s
    assert failed.value.error_type == "LMRateLimitError"
    assert server.count() == 1
    assert not await executing(worker)


async def test_a_short_retry_after_is_still_honoured(worker: dspex_trio.Worker, server: RecordingLM) -> None:
    server.script.append(Reply(429, {"Retry-After": "1"}))
    out = await execute(worker, lm(server, hermetic=True))
    assert out["outputs"]["answer"] == ANSWER
    assert server.count() == 2


# -- no secret in an error or a log ---------------------------------------------------------------------

SECRET = "sk-recognisable-secret-9f8e7d6c5b4a"


@pytest.mark.parametrize("stream", [False, True])
async def test_no_key_in_errors_or_worker_stderr(
    worker: dspex_trio.Worker, server: RecordingLM, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}. Bearer {SECRET}", "type": "auth"}}
    failures: list[str] = []

    async def fail(config: dict[str, Any], *replies: Reply) -> str:
        server.script.clear()
        server.script.extend(replies)
        with pytest.raises(dspex_trio.ProgramError) as caught:
            await execute(worker, {**config, "api_key": SECRET, "num_retries": 0}, stream=stream)
        failures.append(f"{caught.value!s} {caught.value!r}")
        return caught.value.error_type

    # a bad base (nothing listens there), an auth error echoing the key, an answer echoing it that
    # cannot be parsed (ChatAdapter, then JSONAdapter), and the same auth error for a hermetic LM
    assert await fail({**lm(server), "api_base": "http://127.0.0.1:9/v1"}) == "LMTransportError"
    assert await fail(lm(server), Reply(401, body=echo)) == "LMAuthError"
    garbage = Reply(text=f"no fields here, only {SECRET}")
    assert await fail(lm(server), garbage, garbage) == "AdapterParseError"
    assert await fail(lm(server, hermetic=True), Reply(401, body=echo)) == "LMAuthError"
    assert server.count() >= 3
    assert any(SECRET in r.raw() for r in server.requests)  # the key did travel, to its own LM
    # a base with credentials in it (an operator's): described without its password
    described = await worker.call(
        "validate_lm", {"lm": {"model": "openai/x", "api_base": f"http://user:{SECRET}@example.com/v1"}}
    )
    assert described["api_base"] == "http://***@example.com/v1"
    failures.append(repr(described))
    assert SECRET not in "\n".join(failures)
    # the worker's stderr (re-logged by the runtime), once it has all been read; a line written on
    # purpose shows that the capture sees the worker's stderr at all
    await worker.call("spew_stderr", {"bytes": 100})
    await worker.aclose()
    worker_logs = "\n".join(r.getMessage() for r in caplog.records if r.name == "dspex_trio.worker")
    assert "e" * 99 in worker_logs
    assert SECRET not in worker_logs
