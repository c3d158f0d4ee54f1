"""The websocket API's protocol layer (``_ws_api.py``) over the mock backend, with no socket: sessions as
capabilities, the client LM policy, limits, error text, and the shutdown's terminal events.

The transport is a list (``Outbox``); each test drives one or more connections of one service the way
the glue does (``handle(text)`` per frame). Everything runs in-process, so waiting is
``wait_all_tasks_blocked`` and never a sleep.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import dspex_trio
from dspex_trio import _jsonrpc as rpc
from dspex_trio._mock import MockBackend
from dspex_trio._ws_api import SERVER_SHUTDOWN, ApiConnection, ApiService, open_api_connection
from dspex_trio._ws_errors import client_message
from dspex_trio._ws_options import WebsocketOptions


class Outbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        self.messages.append(json.loads(rpc.encode(message)))  # what the client would read

    send_lossy = send


class Conn:
    """A client of one :class:`ApiConnection`."""

    def __init__(self, api: ApiConnection, outbox: Outbox) -> None:
        self.api = api
        self.outbox = outbox
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        request_id = self.next_id
        await self.api.handle(
            json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        )
        reply = self._take(request_id)
        if reply is not None:  # answered inline
            return reply
        with trio.fail_after(5):
            while reply is None:
                await trio.testing.wait_all_tasks_blocked()
                reply = self._take(request_id)
            return reply

    def _take(self, request_id: int) -> dict[str, Any] | None:
        for message in reversed(self.outbox.messages):
            if message.get("id") == request_id:
                self.outbox.messages.remove(message)
                return message
        return None

    async def result(self, method: str, **params: Any) -> Any:
        reply = await self.call(method, **params)
        assert "result" in reply, reply
        return reply["result"]

    async def error(self, method: str, **params: Any) -> dict[str, Any]:
        reply = await self.call(method, **params)
        assert "error" in reply, reply
        return reply["error"]

    def events(self, execution: str) -> list[dict[str, Any]]:
        return [
            m["params"]
            for m in self.outbox.messages
            if m.get("method") == "execution/event" and m["params"]["execution"] == execution
        ]


class GatedMock(MockBackend):
    """A mock whose executions wait for ``gate`` (to hold them in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.configured: list[tuple[str | None, dict[str, Any]]] = []

    async def execute(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        await self.gate.wait()
        return await super().execute(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        @asynccontextmanager
        async def gated() -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
            await self.gate.wait()
            async with MockBackend.stream(self, *args, **kwargs) as events:
                yield events

        return gated()

    async def configure_lm(self, model: str, *, session: str | None = None, **rest: Any) -> None:
        await super().configure_lm(model, session=session, **rest)
        self.configured.append((session, {"model": model, **rest}))


@pytest.fixture
def backend() -> GatedMock:
    return GatedMock()


def service_of(backend: Any, **options: Any) -> ApiService:
    lms = options.pop("lms", {})
    return ApiService(backend, WebsocketOptions(**options), lms)


@asynccontextmanager
async def connect(service: ApiService, role: str = "client") -> AsyncIterator[Conn]:
    outbox = Outbox()
    async with open_api_connection(service, outbox, role=role, peer="127.0.0.1") as api:  # type: ignore[arg-type]
        yield Conn(api, outbox)


# -- sessions ------------------------------------------------------------------------------------------


async def test_sessions_are_capabilities_only_their_holder_reaches(backend: GatedMock) -> None:
    backend.gate.set()
    service = service_of(backend)
    async with connect(service) as alice, connect(service) as mallory:
        session = (await alice.result("session/open"))["session"]
        assert session.startswith("s_") and len(session) >= 2 + 22  # 128 bits, URL-safe base64
        program = (await alice.result("program/create", signature="q -> a", session=session))["program"]
        # mallory has the same token but not the id: every name she can try is nobody's session
        for guess in ("default", "cli", "s1", "", "s_" + "A" * 22, session[:-1] + "x"):
            for method, params in (
                ("program/list", {"session": guess}),
                ("execution/run", {"program": program, "inputs": {"q": "x"}, "session": guess}),
                ("program/delete", {"program": program, "session": guess}),
                ("session/end", {"session": guess}),
                ("lm/select", {"name": "offline", "session": guess}),
            ):
                error = await mallory.error(method, **params)
                assert error["data"]["kind"] == "session_not_found", (method, guess, error)
        # her own (private) session holds none of alice's programs
        assert await mallory.result("program/list") == {"programs": []}
        error = await mallory.error("execution/submit", program=program, inputs={"q": "x"})
        assert error["data"]["kind"] == "unknown_program"
        assert [p["id"] for p in (await alice.result("program/list", session=session))["programs"]] == [
            program
        ]
    # a reconnect with the id resumes the session
    async with connect(service) as alice_again:
        run = await alice_again.result("execution/run", program=program, inputs={"q": "x"}, session=session)
        assert set(run["outputs"]) == {"a"}
        assert await alice_again.result("session/end", session=session) == {"session": session, "ended": True}
        error = await alice_again.error("program/list", session=session)
        assert error["data"]["kind"] == "session_not_found" and error["code"] == -32006


async def test_the_private_session_is_the_connections_and_ends_with_it(backend: GatedMock) -> None:
    backend.gate.set()
    service = service_of(backend)
    async with connect(service) as c:
        assert await c.result("program/list") == {"programs": []}  # a read opens nothing
        assert c.api.private_session is None and len(backend.sessions) == 0
        program = (await c.result("program/create", signature="q -> a"))["program"]
        private = c.api.private_session
        assert private is not None and backend.has_session(private)
        assert (await c.result("execution/run", program=program, inputs={"q": "x"}))["outputs"]
        await c.result("lm/select", name="offline")
    assert not backend.has_session(private)
    assert len(backend.sessions) == 0


async def test_a_hundred_thousand_session_opens_hit_the_bounds_and_others_are_served(
    backend: GatedMock,
) -> None:
    backend.gate.set()
    backend.sessions.max_minted = 40
    service = service_of(backend, max_sessions_per_connection=16)
    async with connect(service) as bystander:
        mine = (await bystander.result("session/open"))["session"]
        program = (await bystander.result("program/create", signature="q -> a", session=mine))["program"]
        opened = 0
        refusals: dict[str, int] = {}
        calls = 0
        while calls < 100_000:
            async with connect(service) as flooder:
                for _ in range(2_000):
                    calls += 1
                    reply = await flooder.call("session/open")
                    if "result" in reply:
                        opened += 1
                        continue
                    error = reply["error"]
                    assert error["data"]["kind"] == "limit_exceeded" and error["code"] == -32004
                    assert "maximum" in error["message"]
                    refusals[error["data"]["limit"]] = refusals.get(error["data"]["limit"], 0) + 1
            assert await bystander.result("ping") == "pong"
        assert opened == 39  # the server-wide bound: 40 minted sessions, the bystander's among them
        assert set(refusals) == {"sessions_per_connection", "sessions"}
        assert sum(refusals.values()) == 100_000 - opened
        assert len(backend.sessions) <= 40
        # the bystander's session and program are untouched
        run = await bystander.result("execution/run", program=program, inputs={"q": "x"}, session=mine)
        assert run["outputs"]


async def test_session_programs_are_bounded_in_count_and_bytes(backend: GatedMock) -> None:
    service = service_of(backend, session_max_programs=3, session_max_bytes=2_000)
    async with connect(service) as c:
        for i in range(3):
            await c.result("program/create", signature=f"q{i} -> a")
        error = await c.error("program/create", signature="q -> a")
        assert error["data"] == {"kind": "limit_exceeded", "limit": "programs", "max": 3}
        s = (await c.result("session/open"))["session"]
        error = await c.error("program/create", signature="q -> a", instructions="x" * 3_000, session=s)
        assert error["data"] == {"kind": "limit_exceeded", "limit": "session_bytes", "max": 2_000}
        assert await c.result("program/list", session=s) == {"programs": []}  # nothing was kept


# -- LMs -----------------------------------------------------------------------------------------------

NAMED = {"fast": dspex_trio.NamedLM(model="openai/fast", api_base="http://10.0.0.5/v1", api_key="sk-named")}


async def test_by_default_clients_choose_among_the_operators_lms(backend: GatedMock) -> None:
    service = service_of(backend, lms=NAMED)
    async with connect(service) as c:
        listed = await c.result("lm/list")
        assert listed["client_lm"] == "off"
        assert [lm["name"] for lm in listed["lms"]] == ["default", "offline", "fast"]
        assert "sk-named" not in json.dumps(listed) and listed["lms"][2]["has_api_key"] is True
        error = await c.error(
            "lm/configure", model="openai/x", api_base="https://api.example.com/v1", api_key="k"
        )
        assert error["data"]["kind"] == "unauthorized" and "lm/select" in error["message"]
        await c.result("lm/select", name="fast")
        session, config = backend.configured[-1]
        assert session == c.api.private_session
        assert config == {"model": "openai/fast", "api_base": "http://10.0.0.5/v1", "api_key": "sk-named"}
        await c.result("lm/select", name="default")
        assert backend.sessions.peek(session).lm is None  # type: ignore[union-attr]
        error = await c.error("lm/select", name="nope")
        assert error["data"]["kind"] == "invalid_params" and "fast" in error["message"]


async def test_allowlist_needs_a_listed_base_and_the_clients_own_key(backend: GatedMock) -> None:
    service = service_of(backend, client_lm="allowlist", allow_lm_bases=["http://127.0.0.1:9000/v1"])
    async with connect(service) as c:
        base = "http://127.0.0.1:9000/v1"
        for bad_base in (
            "http://127.0.0.1:9000/v10",
            "http://127.0.0.1:9001/v1",
            "https://api.example.com/v1",
            None,
        ):
            error = await c.error("lm/configure", model="openai/x", api_base=bad_base, api_key="k")
            assert error["data"]["kind"] == "unauthorized", (bad_base, error)
        error = await c.error("lm/configure", model="openai/x", api_base=base)
        assert error["data"]["kind"] == "unauthorized" and "api_key" in error["message"]
        await c.result("lm/configure", model="openai/x", api_base=base + "/chat", api_key="sk-client")
        _, config = backend.configured[-1]
        assert config["hermetic"] is True and "public_only" not in config  # listed: may be private
        assert config["api_key"] == "sk-client"


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:8000/v1",
        "http://localhost:8000/v1",
        "http://[::1]/v1",
        "http://169.254.169.254/latest",
        "http://10.1.2.3/v1",
        "http://192.168.0.1/v1",
        "file:///etc/passwd",
        "http://user:pw@1.1.1.1/",
    ],
)
async def test_any_refuses_inside_addresses_unless_listed(backend: GatedMock, base: str) -> None:
    service = service_of(backend, client_lm="any")
    async with connect(service) as c:
        error = await c.error("lm/configure", model="openai/x", api_base=base, api_key="k")
        assert error["data"]["kind"] in ("invalid_params", "unauthorized"), error
    assert backend.configured == []


async def test_any_marks_the_configuration_hermetic_and_public_only(backend: GatedMock) -> None:
    service = service_of(backend, client_lm="any", allow_lm_bases=["http://127.0.0.1:9000"])
    async with connect(service) as c:
        await c.result("lm/configure", model="openai/x", api_base="http://1.1.1.1/v1")  # no key: none is sent
        _, config = backend.configured[-1]
        assert config["hermetic"] is True and config["public_only"] is True and config["api_key"] is None
        await c.result("lm/configure", model="openai/x", api_base="http://127.0.0.1:9000/v1", api_key="k")
        _, config = backend.configured[-1]
        assert config["hermetic"] is True and "public_only" not in config


async def test_client_settings_are_capped_and_the_hidden_ones_refused(backend: GatedMock) -> None:
    service = service_of(backend, client_lm="any", client_lm_max_retries=1, client_lm_max_timeout=30)
    async with connect(service) as c:
        base = {"model": "openai/x", "api_base": "http://1.1.1.1/v1", "api_key": "k"}
        for settings in ({"num_retries": 5}, {"timeout": 31}, {"max_tokens": 10**9}, {"timeout": -1}):
            error = await c.error("lm/configure", **base, settings=settings)
            assert error["data"]["kind"] == "unauthorized", (settings, error)
        for settings in ({"hermetic": False}, {"public_only": False}, {"api_key": "x"}, {"headers": {}}):
            error = await c.error("lm/configure", **base, settings=settings)
            assert error["data"]["kind"] == "invalid_params", (settings, error)
        await c.result("lm/configure", **base, settings={"num_retries": 1, "timeout": 30, "temperature": 0.5})
    assert len(backend.configured) == 1


async def test_only_an_admin_changes_the_default_lm(backend: GatedMock) -> None:
    service = service_of(backend)
    async with connect(service) as client, connect(service, role="admin") as admin:
        error = await client.error("lm/configure", model="offline", default=True)
        assert error["data"]["kind"] == "unauthorized"
        # an admin is not bound by the client policy or the address checks, but is hermetic too
        await admin.result(
            "lm/configure", model="openai/x", api_base="http://10.0.0.9/v1", api_key="k", default=True
        )
        session, config = backend.configured[-1]
        assert session is None and config["hermetic"] is True
        assert backend.lm is not None and backend.lm["model"] == "openai/x"


# -- executions and errors -----------------------------------------------------------------------------


async def test_shutdown_gives_every_running_execution_its_terminal_cancelled_event(
    backend: GatedMock,
) -> None:
    service = service_of(backend)
    async with connect(service) as c:
        program = (await c.result("program/create", signature="q -> a"))["program"]
        executions = [
            (await c.result("execution/submit", program=program, inputs={"q": str(i)}))["execution"]
            for i in range(5)
        ]
        await trio.testing.wait_all_tasks_blocked()
        assert service.executions == 5
        c.api.stop()
        with trio.fail_after(5):
            await c.api.wait_executions_ended()
        for execution in executions:
            events = c.events(execution)
            assert [e["event"] for e in events] == ["started", "cancelled"], events
            assert events[-1]["data"] == {"reason": SERVER_SHUTDOWN}
        assert service.executions == 0


async def test_the_server_caps_the_execution_time(backend: GatedMock, autojump_clock: Any) -> None:
    service = service_of(backend, max_execution_time=3)
    seen: list[float | None] = []
    execute = backend.execute

    async def spy(*args: Any, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        seen.append(timeout)
        return await execute(*args, timeout=timeout, **kwargs)

    backend.execute = spy  # type: ignore[method-assign]
    backend.gate.set()
    async with connect(service) as c:
        program = (await c.result("program/create", signature="q -> a"))["program"]
        for timeout in (None, 100, 1):
            params = {"timeout": timeout} if timeout is not None else {}
            await c.result("execution/run", program=program, inputs={"q": "x"}, **params)
    assert seen == [3, 3, 1]


def test_internal_error_text_is_logged_and_the_client_gets_a_reference(caplog: Any) -> None:
    crash = dspex_trio.WorkerStartFailed(
        "worker w1 could not start\n--- its stderr ---\n/secret/path.py line 3"
    )
    message = client_message(crash)
    assert "/secret/path.py" not in message and "(ref r_" in message
    ref = message.split("(ref ")[1].rstrip(")")
    assert any(
        ref in record.getMessage() and "/secret/path.py" in record.getMessage() for record in caplog.records
    )
    program = dspex_trio.ProgramError("could not parse the answer", error_type="AdapterParseError")
    assert client_message(program) == "AdapterParseError: could not parse the answer"
    assert len(client_message(dspex_trio.ProgramError("x" * 10_000))) < 2_100


async def test_failed_executions_are_logged_once_each(backend: GatedMock, caplog: Any) -> None:
    backend.gate.set()
    caplog.set_level("INFO", logger="dspex_trio.websocket")
    service = service_of(backend)
    async with connect(service) as c:
        program = (await c.result("program/create", signature="q -> a"))["program"]
        error = await c.error("execution/run", program=program, inputs={"nope": 1})
        assert error["data"]["kind"] == "invalid_params"
        execution = (await c.result("execution/submit", program=program, inputs={"nope": 1}))["execution"]
        await trio.testing.wait_all_tasks_blocked()
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert lines == [
        f"execution run of {program} failed: InvalidParams",
        f"execution {execution} failed: InvalidParams",
    ]


async def test_keys_never_appear_in_status_lists_or_reprs(backend: GatedMock) -> None:
    backend.gate.set()
    service = service_of(
        backend, client_lm="any", lms={"named": dspex_trio.NamedLM(model="openai/n", api_key="sk-named-1")}
    )
    async with connect(service) as c, connect(service, role="admin") as admin:
        await admin.result(
            "lm/configure", model="openai/x", api_base="http://1.1.1.1/v1", api_key="sk-admin-2", default=True
        )
        session = (await c.result("session/open"))["session"]
        await c.result(
            "lm/configure",
            model="openai/x",
            api_base="http://1.1.1.1/v1",
            api_key="sk-client-3",
            session=session,
        )
        await c.result("lm/select", name="named")
        shown = json.dumps([await c.result("runtime/status"), await c.result("lm/list"), c.outbox.messages])
        shown += repr(backend.sessions.peek(session)) + repr(backend.sessions.peek(c.api.private_session))
        shown += repr(service) + repr(dict(service.lms))
    for key in ("sk-named-1", "sk-admin-2", "sk-client-3"):
        assert key not in shown


# -- registered programs ------------------------------------------------------------------------------------


async def test_program_create_takes_a_registered_program_or_a_builtin_with_its_options() -> None:
    service = service_of(MockBackend(programs=["tests.program_module"]))
    async with connect(service) as client:
        available = await client.result("program/available")
        assert {p["name"] for p in available["programs"]} >= {"rag", "agent", "judge"}
        assert {t["name"] for t in available["tools"]} >= {"lookup", "word_count"}
        assert {m["name"] for m in available["metrics"]} == {"exact_match", "short_answer"}

        rag = (await client.result("program/create", module="rag"))["program"]
        info = await client.result("program/get", program=rag)
        assert info["module"] == "rag" and [p["name"] for p in info["predictors"]] == ["respond.predict"]
        react = await client.result(
            "program/create",
            signature="question -> answer",
            module="react",
            tools=["lookup"],
            max_iters=2,
            include=["trajectory"],
        )
        run = await client.result("execution/run", program=react["program"], inputs={"question": "q"})
        assert list(run["outputs"]) == ["reasoning", "answer", "trajectory"]
        best = await client.result(
            "program/create", module="best_of_n", base="rag", reward="short_answer", n=2, threshold=0.5
        )
        assert (await client.result("program/get", program=best["program"]))["options"]["threshold"] == 0.5

        execution = (await client.result("execution/submit", program=rag, inputs={"question": "q"}))[
            "execution"
        ]
        with trio.fail_after(5):
            while not any(e["event"] == "completed" for e in client.events(execution)):
                await trio.testing.wait_all_tasks_blocked()
        events = client.events(execution)
        assert events[1]["event"] == "status" and events[1]["data"] == {
            "status": "predictor",
            "predictor": "respond.predict",
            "message": "respond.predict started",
        }
        chunk = next(e for e in events if e["event"] == "chunk")
        assert set(chunk["data"]) == {"predictor", "field", "chunk"}

        wrong_type = await client.error("program/create", module="rag", n="3")
        assert wrong_type["data"]["kind"] == "invalid_params"
        assert "n: expected an integer, got str" in wrong_type["data"]["errors"]
        unknown = await client.error("program/create", module="nope")
        assert unknown["data"]["kind"] == "invalid_params"
        assert "registered programs: agent, broken, chat" in unknown["message"]
        failing = await client.error("program/create", module="broken")
        assert (
            failing["data"]["kind"] == "execution_failed" and failing["data"]["type"] == "ProgramFactoryError"
        )
        assert "the factory of program 'broken' raised RuntimeError" in failing["message"]
