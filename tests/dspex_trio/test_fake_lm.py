"""Tests of the fake OpenAI-compatible LM server (``dspex_trio.testing._fake_lm``).

DSPy's real HTTP client (``dspy.LM("openai/fake", api_base=...)``, DSPy 3.4's native engine) calls the
server over loopback. That client is synchronous, so each DSPy call runs in a worker thread
(``trio.to_thread.run_sync``) with ``dspy.context(lm=...)`` entered inside the thread; ``dspy.streamify``'s
async generator is consumed there with ``asyncio.run``. Protocol-level checks use a small h11 client.
"""

from __future__ import annotations

import os

# DSPy's first LM call otherwise tries to download a model price list (5 s timeout on a dead network).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import dspy
import h11
import pydantic
import pytest
import trio
import trio.testing

from dspex_trio.testing import _fake_lm
from dspex_trio.testing._fake_answers import MALFORMED_REPLY, parse_output_fields, render_reply
from dspex_trio.testing._fake_lm import MAX_BODY_BYTES, FakeLM, FakeLMConfig, open_fake_lm, serve_fake_lm
from tests.helpers import wait_until
from tests.metered import Meter, MeteredStr

T = TypeVar("T")

CALL_DEADLINE_S = 10.0
"""Upper bound for any one test step, in seconds (a hang fails fast instead of stalling the suite)."""


def make_lm(fake: FakeLM, **kwargs: Any) -> dspy.LM:
    return dspy.LM("openai/fake", api_base=fake.url, api_key="x", num_retries=0, cache=False, **kwargs)


async def in_thread(lm: dspy.LM, fn: Callable[[], T]) -> T:
    """Run the synchronous DSPy call ``fn`` in a worker thread, with ``lm`` as the context LM there."""

    def run() -> T:
        with dspy.context(lm=lm):
            return fn()

    with trio.fail_after(CALL_DEADLINE_S):
        return await trio.to_thread.run_sync(run)


async def raises_in_thread(lm: dspy.LM, fn: Callable[[], object]) -> BaseException:
    """Run ``fn`` like :func:`in_thread` and return the exception it raised (fails if none)."""

    def run() -> BaseException:
        with dspy.context(lm=lm):
            try:
                fn()
            except Exception as exc:
                return exc
        raise AssertionError("the DSPy call did not raise")

    with trio.fail_after(CALL_DEADLINE_S):
        return await trio.to_thread.run_sync(run)


def assert_no_litellm() -> None:
    assert "litellm" not in sys.modules, "DSPy's native client imported litellm"


@attrs.define
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client (h11 over a Trio TCP stream) for protocol-level checks."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, fake: FakeLM) -> HttpClient:
        return cls(await trio.open_tcp_stream(fake.host, fake.port), f"{fake.host}:{fake.port}")

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_head(self, method: str, path: str, headers: list[tuple[str, str]]) -> None:
        all_headers = [("host", self.host), *headers]
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=path, headers=all_headers)) or b""
        )

    async def read_reply(self) -> Reply:
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection before replying")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(status, headers, bytes(body))

    async def request(self, method: str, path: str, body: Any = None) -> Reply:
        data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = [("content-length", str(len(data)))] if method != "GET" else []
        if method != "GET":
            headers.append(("content-type", "application/json"))
        with trio.fail_after(CALL_DEADLINE_S):
            await self.send_head(method, path, headers)
            if data:
                await self.stream.send_all(self.conn.send(h11.Data(data=data)) or b"")
            await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")
            return await self.read_reply()


async def request(fake: FakeLM, method: str, path: str, body: Any = None) -> Reply:
    client = await HttpClient.connect(fake)
    try:
        return await client.request(method, path, body)
    finally:
        await client.aclose()


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}


# --- DSPy end to end -------------------------------------------------------------------------------


async def test_predict_over_http() -> None:
    async with open_fake_lm() as fake:
        lm = make_lm(fake)
        prediction = await in_thread(lm, lambda: dspy.Predict("question -> answer")(question="What is Trio?"))
        assert isinstance(prediction.answer, str)
        assert "What is Trio?" in prediction.answer
        again = await in_thread(lm, lambda: dspy.Predict("question -> answer")(question="What is Trio?"))
        assert again.answer == prediction.answer  # deterministic
        assert fake.requests == 2
        assert fake.statistics.connections_accepted == 1  # DSPy's client reused the connection
    assert_no_litellm()


async def test_chain_of_thought_over_http() -> None:
    async with open_fake_lm() as fake:
        prediction = await in_thread(
            make_lm(fake), lambda: dspy.ChainOfThought("question -> answer")(question="Why?")
        )
        assert prediction.reasoning and isinstance(prediction.reasoning, str)
        assert prediction.answer and isinstance(prediction.answer, str)
        assert fake.requests == 1
    assert_no_litellm()


async def test_typed_output_fields() -> None:
    signature = (
        "question: str -> answer: str, count: int, score: float, ok: bool, tags: list[str], "
        "label: Literal['yes', 'no (maybe)'], weights: dict[str, int], extra: Optional[int]"
    )
    async with open_fake_lm() as fake:
        p = await in_thread(make_lm(fake), lambda: dspy.Predict(signature)(question="Types?"))
    assert isinstance(p.answer, str)
    assert isinstance(p.count, int)
    assert isinstance(p.score, float)
    assert isinstance(p.ok, bool)
    assert isinstance(p.tags, list) and p.tags and all(isinstance(t, str) for t in p.tags)
    assert p.label in ("yes", "no (maybe)")
    assert isinstance(p.weights, dict) and all(isinstance(v, int) for v in p.weights.values())
    assert isinstance(p.extra, int)


class Item(pydantic.BaseModel):
    name: str
    quantity: int
    tags: list[str]


async def test_structured_output_from_json_schema() -> None:
    """Model-typed fields are answered from the JSON schema DSPy puts in the prompt."""
    signature = dspy.Signature(
        {
            "query": (str, dspy.InputField()),
            "item": (Item, dspy.OutputField()),
            "items": (list[Item], dspy.OutputField()),
        }
    )
    async with open_fake_lm() as fake:
        prediction = await in_thread(make_lm(fake), lambda: dspy.Predict(signature)(query="stock"))
        assert isinstance(prediction.item, Item)
        assert len(prediction["items"]) == 2 and all(isinstance(i, Item) for i in prediction["items"])
        assert fake.requests == 1  # parsed by the ChatAdapter, no JSONAdapter retry


async def test_json_adapter() -> None:
    async with open_fake_lm() as fake:
        lm = make_lm(fake)

        def call() -> dspy.Prediction:
            with dspy.context(adapter=dspy.JSONAdapter()):
                return dspy.Predict("question -> answer, n: int")(question="JSON?")

        prediction = await in_thread(lm, call)
        assert isinstance(prediction.answer, str) and isinstance(prediction.n, int)
        assert fake.requests == 1


async def test_streamify_yields_several_answer_chunks() -> None:
    async with open_fake_lm() as fake:

        def stream() -> list[Any]:
            program = dspy.streamify(
                dspy.ChainOfThought("question -> answer"),
                stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")],
            )

            async def consume() -> list[Any]:
                return [item async for item in program(question="Stream this, please")]

            return asyncio.run(consume())

        items = await in_thread(make_lm(fake), stream)
        chunks = [i for i in items if isinstance(i, dspy.streaming.StreamResponse)]
        assert len(chunks) >= 2
        assert {c.signature_field_name for c in chunks} == {"answer"}
        assert chunks[-1].is_last_chunk
        final = items[-1]
        assert isinstance(final, dspy.Prediction)
        assert "".join(c.chunk for c in chunks) == final.answer
        assert fake.statistics.streamed == 1
    assert_no_litellm()


# --- Fault injection through DSPy ----------------------------------------------------------------


async def test_rate_limit_then_recovery() -> None:
    async with open_fake_lm(fail_status=429, fail_count=1) as fake:
        lm = make_lm(fake)
        error = await raises_in_thread(lm, lambda: dspy.Predict("question -> answer")(question="q"))
        assert type(error).__name__ == "LMRateLimitError"
        assert isinstance(error, dspy.LMError)
        # The budget of one failure is spent: the next call succeeds.
        prediction = await in_thread(lm, lambda: dspy.Predict("question -> answer")(question="q"))
        assert prediction.answer
        assert fake.statistics.failures_injected == 1
        assert fake.requests == 2


async def test_server_error_configured_at_runtime() -> None:
    async with open_fake_lm() as fake:
        lm = make_lm(fake)
        fake.configure(fail_status=503)
        error = await raises_in_thread(lm, lambda: dspy.Predict("question -> answer")(question="q"))
        assert type(error).__name__ == "LMServerError"
        fake.config = FakeLMConfig()
        assert (await in_thread(lm, lambda: dspy.Predict("question -> answer")(question="q"))).answer


async def test_malformed_reply_raises_adapter_parse_error() -> None:
    async with open_fake_lm(malformed=True) as fake:
        error = await raises_in_thread(
            make_lm(fake), lambda: dspy.Predict("question -> answer")(question="q")
        )
        assert isinstance(error, dspy.utils.exceptions.AdapterParseError)
        assert fake.requests == 2  # ChatAdapter, then its JSONAdapter retry
        assert fake.statistics.malformed_served == 2


async def test_latency_is_respected() -> None:
    async with open_fake_lm(latency_s=0.2) as fake:
        lm = make_lm(fake)
        start = time.perf_counter()
        await in_thread(lm, lambda: dspy.Predict("question -> answer")(question="slow"))
        assert time.perf_counter() - start >= 0.2


async def test_timeout_mode_makes_the_client_give_up() -> None:
    async with open_fake_lm(timeout=True) as fake:
        lm = make_lm(fake, timeout=0.3)
        start = time.perf_counter()
        error = await raises_in_thread(lm, lambda: dspy.Predict("question -> answer")(question="q"))
        assert type(error).__name__ == "LMTransportError"
        assert time.perf_counter() - start >= 0.3
        assert fake.statistics.timeouts_injected == 1
        # The server noticed the client hang up and closed its side of the connection.
        await wait_until(
            lambda: fake.statistics.connections_open == 0, CALL_DEADLINE_S, lambda: repr(fake.statistics)
        )


# --- HTTP protocol -----------------------------------------------------------------------------------


async def test_health_and_models() -> None:
    async with open_fake_lm(model="tiny") as fake:
        health = await request(fake, "GET", "/health")
        assert health.status == 200 and health.json()["status"] == "ok"
        models = await request(fake, "GET", "/v1/models")
        assert models.status == 200
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]
        assert fake.requests == 0  # only chat completions count as LM calls
        assert fake.statistics.http_requests == 2


async def test_completion_shape_and_keep_alive() -> None:
    async with open_fake_lm() as fake:
        client = await HttpClient.connect(fake)
        try:
            first = await client.request("POST", "/v1/chat/completions", CHAT)
            second = await client.request("POST", "/v1/chat/completions", CHAT)
        finally:
            await client.aclose()
        assert first.status == second.status == 200
        body = first.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"] == "This is a fake reply to: hello."
        assert (
            body["usage"]["total_tokens"]
            == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )
        assert fake.statistics.connections_accepted == 1


async def test_sse_stream_shape() -> None:
    async with open_fake_lm(stream_chunk_chars=4) as fake:
        payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        reply = await request(fake, "POST", "/v1/chat/completions", payload)
    assert reply.status == 200
    assert reply.headers[b"content-type"] == b"text/event-stream"
    events = [line[len("data: ") :] for line in reply.body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "This is a fake reply to: hello."
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) >= 2


async def test_oversized_body_declared_is_rejected() -> None:
    async with open_fake_lm() as fake:
        client = await HttpClient.connect(fake)
        try:
            with trio.fail_after(CALL_DEADLINE_S):
                head = [("content-length", str(MAX_BODY_BYTES + 1)), ("content-type", "application/json")]
                await client.send_head("POST", "/v1/chat/completions", head)
                reply = await client.read_reply()
        finally:
            await client.aclose()
        assert reply.status == 413
        assert reply.headers[b"connection"] == b"close"
        assert fake.statistics.rejected_too_large == 1
        assert fake.requests == 0


async def test_oversized_body_sent_is_rejected() -> None:
    """A client that sends the whole oversized (chunked) body still reads the 413, not a reset."""
    async with open_fake_lm() as fake:
        client = await HttpClient.connect(fake)
        try:
            with trio.fail_after(CALL_DEADLINE_S):
                await client.send_head("POST", "/v1/chat/completions", [("transfer-encoding", "chunked")])
                piece = b"x" * (256 * 1024)
                async with trio.open_nursery() as nursery:

                    async def send_body() -> None:
                        try:
                            for _ in range(MAX_BODY_BYTES // len(piece) + 2):
                                await client.stream.send_all(client.conn.send(h11.Data(data=piece)) or b"")
                        except trio.BrokenResourceError:
                            pass

                    nursery.start_soon(send_body)
                    reply = await client.read_reply()
        finally:
            await client.aclose()
        assert reply.status == 413


async def test_bad_requests() -> None:
    async with open_fake_lm() as fake:
        client = await HttpClient.connect(fake)
        try:
            assert (await client.request("GET", "/nope")).status == 404
            assert (await client.request("GET", "/v1/chat/completions")).status == 405
            assert (await client.request("POST", "/v1/chat/completions", b"{not json")).status == 400
            assert (await client.request("POST", "/v1/chat/completions", {"messages": "x"})).status == 400
            # The connection survives all of these.
            assert (await client.request("GET", "/health")).status == 200
        finally:
            await client.aclose()
        assert fake.statistics.connections_accepted == 1
        assert fake.statistics.bad_requests == 2


async def test_fail_probability_is_seeded() -> None:
    async def statuses(fake: FakeLM) -> list[int]:
        client = await HttpClient.connect(fake)
        try:
            return [(await client.request("POST", "/v1/chat/completions", CHAT)).status for _ in range(20)]
        finally:
            await client.aclose()

    async with open_fake_lm(fail_status=500, fail_probability=0.5, seed=7) as fake:
        first = await statuses(fake)
        fake.config = fake.config  # reinstalling a config restarts its random generator
        second = await statuses(fake)
        fake.configure(fail_count=3, fail_probability=1.0)
        third = await statuses(fake)
    assert first == second
    assert set(first) == {200, 500}
    assert third == [500] * 3 + [200] * 17


async def test_connection_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fake_lm, "MAX_CONNECTIONS", 1)
    async with open_fake_lm() as fake:
        first = await HttpClient.connect(fake)
        assert (await first.request("GET", "/health")).status == 200
        second = await HttpClient.connect(fake)  # queued in the listen backlog, not served
        try:
            await second.send_head("GET", "/health", [])
            await second.stream.send_all(second.conn.send(h11.EndOfMessage()) or b"")
            with trio.move_on_after(0.2) as waited:
                await second.read_reply()
            assert waited.cancelled_caught
            await first.aclose()
            with trio.fail_after(CALL_DEADLINE_S):
                assert (await second.read_reply()).status == 200
        finally:
            await second.aclose()


async def test_serve_fake_lm_with_nursery_start() -> None:
    async with trio.open_nursery() as nursery:
        fake: FakeLM = await nursery.start(serve_fake_lm)
        assert fake.port > 0 and fake.url == f"http://127.0.0.1:{fake.port}/v1"
        assert (await request(fake, "GET", "/health")).status == 200
        fake.stop()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", fake.port)


def test_cli_main_serves_until_sigterm() -> None:
    code = "import sys; from dspex_trio.testing._fake_lm import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--latency", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")

        async def check() -> Reply:
            return await request(FakeLM(host, int(port), FakeLMConfig()), "GET", "/health")

        assert trio.run(check).status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=CALL_DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_config() -> None:
    with pytest.raises(SystemExit):
        _fake_lm.main(["--fail-status", "200"])


# --- Reply rendering -----------------------------------------------------------------------------------


def test_render_reply_without_fields_is_plain_text() -> None:
    assert (
        render_reply([{"role": "user", "content": "Tell me a joke"}])
        == "This is a fake reply to: Tell me a joke."
    )


def test_parse_output_fields_handles_tricky_types() -> None:
    system = (
        "Your input fields are:\n1. `q` (str):\nYour output fields are:\n"
        "1. `a` (Literal['x)', 'y']): the choice\n2. `b` (dict[str, list[int]]):\n"
        "All interactions will be structured in the following way\n"
    )
    fields = parse_output_fields([{"role": "system", "content": system}])
    assert [(f.name, f.type_expr) for f in fields] == [
        ("a", "Literal['x)', 'y']"),
        ("b", "dict[str, list[int]]"),
    ]
    reply = render_reply(
        [{"role": "system", "content": system}, {"role": "user", "content": "[[ ## q ## ]]\nhi"}]
    )
    assert reply.startswith("[[ ## a ## ]]\n") and reply.endswith("[[ ## completed ## ]]")


def test_output_fields_from_the_user_message_alone() -> None:
    user = (
        "[[ ## q ## ]]\nhi\n\nRespond with the corresponding output fields, starting with the field "
        "`[[ ## reasoning ## ]]`, then `[[ ## n ## ]]` (must be formatted as a valid Python int), "
        "and then ending with the marker for `[[ ## completed ## ]]`."
    )
    fields = parse_output_fields([{"role": "user", "content": user}])
    assert [(f.name, f.type_expr) for f in fields] == [("reasoning", None), ("n", "int")]
    reply = render_reply([{"role": "user", "content": user}])
    assert reply.startswith("[[ ## reasoning ## ]]\nLet me think") and "[[ ## n ## ]]\n" in reply


def test_malformed_reply_is_in_no_adapter_format() -> None:
    assert "[[ ##" not in MALFORMED_REPLY and not MALFORMED_REPLY.lstrip().startswith("{")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        FakeLMConfig(latency_s=-1)
    with pytest.raises(ValueError):
        FakeLMConfig(fail_probability=1.5)
    with pytest.raises(ValueError):
        FakeLMConfig(fail_status=302)


async def test_open_fake_lm_lets_body_errors_through_unwrapped() -> None:
    with pytest.raises(ZeroDivisionError):
        async with open_fake_lm():
            raise ZeroDivisionError


# --- Bounded work (issue 13: it is a test tool, but it listens on a socket) ------------------------------


async def test_a_10_mb_body_is_refused_before_it_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    monkeypatch.setattr(_fake_lm, "parse_chat_request", lambda body: parsed.append(body))
    ten_mb = 10 * 1024 * 1024
    async with open_fake_lm() as fake:
        client = await HttpClient.connect(fake)
        try:  # declared: refused on the head, before a byte of the body is sent
            with trio.fail_after(CALL_DEADLINE_S):
                head = [("content-length", str(ten_mb)), ("content-type", "application/json")]
                await client.send_head("POST", "/v1/chat/completions", head)
                assert (await client.read_reply()).status == 413
        finally:
            await client.aclose()
        client = await HttpClient.connect(fake)
        try:  # not declared (chunked): refused once more than MAX_BODY_BYTES came
            with trio.fail_after(CALL_DEADLINE_S):
                await client.send_head("POST", "/v1/chat/completions", [("transfer-encoding", "chunked")])
                async with trio.open_nursery() as nursery:

                    async def send_body() -> None:
                        piece = b"[" * (1024 * 1024)
                        try:
                            for _ in range(ten_mb // len(piece)):
                                await client.stream.send_all(client.conn.send(h11.Data(data=piece)) or b"")
                        except trio.BrokenResourceError:
                            pass

                    nursery.start_soon(send_body)
                    assert (await client.read_reply()).status == 413
        finally:
            await client.aclose()
        assert fake.statistics.rejected_too_large == 2
    assert parsed == []


async def test_the_body_is_read_only_up_to_the_limit() -> None:
    """Work measured in bytes read: 10 MB offered, at most the limit and one read taken."""
    from dspex_trio.testing._http import RECEIVE_CHUNK_BYTES, HttpConnection, PayloadTooLarge

    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = h11.Connection(h11.CLIENT)
    headers = [("host", "x"), ("transfer-encoding", "chunked")]
    request = h11.Request(method="POST", target="/v1/chat/completions", headers=headers)
    offered = client.send(request) or b""
    offered += b"".join(client.send(h11.Data(data=b"x" * (1024 * 1024))) or b"" for _ in range(10))
    await client_stream.send_all(offered)  # all 10 MB are there to read
    server = HttpConnection(server_stream)
    assert isinstance(await server.next_event(), h11.Request)
    limit = 1024 * 1024
    with pytest.raises(PayloadTooLarge):
        await server.read_body(limit)
    assert server.bytes_received <= limit + 2 * RECEIVE_CHUNK_BYTES < len(offered) // 5


def metered_chat(system: str, user: str) -> tuple[list[dict[str, Any]], Meter]:
    meter = Meter()
    messages = [
        {"role": "system", "content": MeteredStr(system, meter)},
        {"role": "user", "content": MeteredStr(user, meter)},
    ]
    return messages, meter


RESPOND = "Respond with the corresponding output fields, starting with the field "
NOTE = "# note: the value you produce must adhere to the JSON schema: "
PATHOLOGICAL_PROMPTS = {
    # shapes that make a naive scan super-linear; the first version's regular expressions were quadratic
    # (or worse) on the first two
    "blank lines": ("", "[[ ## q ## ]]\nhi" + "\n" * 400_000 + "x"),
    "unclosed type infos": ("", RESPOND + "`[[ ## a ## ]]` (must be formatted as a valid Python " * 6_000),
    "respond markers": ("", RESPOND + "`[[ ## " * 60_000),
    "note lines": (("[[ ## a ## ]]\n{a}   " + NOTE + "{" * 100 + "\n") * 2_000 + NOTE * 4_000, "hi"),
    "input headers": ("", "x[[ ## " * 60_000),
    "field dots": ("Your output fields are:\n" + ". `" * 100_000, "hi"),
    "unclosed field names": ("Your output fields are:\n" + "1. `\n" * 60_000, "hi"),
    "deep type": ("Your output fields are:\n1. `a` (" + "list[" * 200 + "int" + "]" * 200 + "):\n", "hi"),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL_PROMPTS))
def test_answer_work_is_linear_in_the_prompt(name: str) -> None:
    """Measured by the characters the answer's parsing touches (searches, slices, indexing; see
    tests/metered.py), not by time: a few times the prompt, whatever its shape."""
    system, user = PATHOLOGICAL_PROMPTS[name]
    messages, meter = metered_chat(system, user)
    reply = render_reply(messages)
    assert reply
    assert meter.chars <= 6 * (len(system) + len(user)) + 20_000, (meter.chars, len(system) + len(user))


async def test_a_pathological_body_near_the_cap_is_answered() -> None:
    """The first version would take hours on this one: its blank-line regular expression backtracked over
    the 1.5 M newlines (3 MB of JSON) from each of them."""
    content = "[[ ## q ## ]]\nhi" + "\n" * (1536 * 1024) + "x"
    async with open_fake_lm() as fake:
        reply = await request(
            fake, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]}
        )
    assert reply.status == 200
    assert reply.json()["choices"][0]["message"]["content"] == "This is a fake reply to: hi."


def test_no_regular_expression_runs_on_request_text() -> None:
    """The metering above cannot see a regular expression (it reads the text in C): there is none."""
    import re

    from dspex_trio.testing import _fake_answers

    assert not [
        name for name, value in vars(_fake_answers).items() if value is re or isinstance(value, re.Pattern)
    ]


def test_one_answer_holds_a_bounded_number_of_values() -> None:
    from dspex_trio.testing._fake_answers import MAX_ANSWER_VALUES

    fan_out = {f"p{i}": {"$ref": "#/$defs/Node"} for i in range(50)}  # 50 ** 8 values unbounded
    schemas = [
        {"$defs": {"Node": {"type": "object", "properties": fan_out}}, "$ref": "#/$defs/Node"},
        {"type": "array", "minItems": 10**12, "items": {"type": "array", "minItems": 10**12}},
    ]
    for schema in schemas:
        response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
        answer = json.loads(render_reply([{"role": "user", "content": "q"}], response_format))

        def count(value: Any) -> int:
            if isinstance(value, dict):
                return 1 + sum(count(v) for v in value.values())
            if isinstance(value, list):
                return 1 + sum(count(v) for v in value)
            return 1

        assert 1 < count(answer) <= 2 * MAX_ANSWER_VALUES


async def test_a_body_nested_too_deeply_is_a_400_and_the_server_goes_on() -> None:
    deep = b'{"model": "fake", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with open_fake_lm() as fake:
        client = await HttpClient.connect(fake)
        try:
            reply = await client.request("POST", "/v1/chat/completions", deep)
            assert reply.status == 400 and "nested too deeply" in reply.json()["error"]["message"]
            assert (await client.request("POST", "/v1/chat/completions", CHAT)).status == 200
        finally:
            await client.aclose()
        assert fake.statistics.bad_requests == 1


async def test_a_recursion_error_while_answering_is_a_400(monkeypatch: pytest.MonkeyPatch) -> None:
    def too_deep(*args: Any) -> str:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(_fake_lm, "render_reply", too_deep)
    async with open_fake_lm() as fake:
        reply = await request(fake, "POST", "/v1/chat/completions", CHAT)
        assert reply.status == 400 and "nested too deeply" in reply.json()["error"]["message"]
        assert (await request(fake, "GET", "/health")).status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_a_lone_surrogate_in_a_request_is_answered(stream: bool) -> None:
    body = b'{"stream": %s, "messages": [{"role": "user", "content": "\\ud800 hi"}]}' % (
        b"true" if stream else b"false"
    )
    async with open_fake_lm() as fake:
        reply = await request(fake, "POST", "/v1/chat/completions", body)
    assert reply.status == 200
    assert "\\ud800 hi" in reply.body.decode("ascii")  # escaped: the reply is valid UTF-8 JSON


def test_deeply_nested_schemas_in_a_prompt_are_ignored() -> None:
    system = "[[ ## a ## ]]\n{a}        " + NOTE + "[" * 100_000 + "\nYour output fields are:\n1. `a` (Item):"
    reply = render_reply([{"role": "system", "content": system}, {"role": "user", "content": "q"}])
    assert reply.startswith("[[ ## a ## ]]\n") and reply.endswith("[[ ## completed ## ]]")


# --- Binding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("fe80::1%eth0", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert _fake_lm.is_loopback(host) is loopback


async def test_binding_a_non_loopback_address_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=_fake_lm.logger.name):
        async with open_fake_lm():
            pass
        assert not caplog.records
        async with open_fake_lm("0.0.0.0"):
            pass
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "not a loopback address" in caplog.records[0].getMessage()


def test_cli_warns_on_stderr_when_bound_to_all_interfaces() -> None:
    code = "import sys; from dspex_trio.testing._fake_lm import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--host", "0.0.0.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("http://0.0.0.0:")  # printed once it listens
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=CALL_DEADLINE_S)
        assert proc.returncode == 0
        assert "fake-lm: fake LM: listening on http://0.0.0.0:" in stderr
        assert "not a loopback address" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
