"""What the fake LM server observes for the LM layer's tests: open connections and completions in flight,
clients that disconnect mid-answer, ``Retry-After`` on injected failures, per-request latency, arrivals per
second. Protocol-level checks with the small h11 client of ``test_fake_lm``.
"""

from __future__ import annotations

import json
import time

import h11
import pytest
import trio

from dspex_trio.testing._fake_lm import FakeLM, FakeLMConfig, main, open_fake_lm
from tests.dspex_trio.test_fake_lm import CALL_DEADLINE_S, CHAT, HttpClient, request
from tests.helpers import wait_until

COMPLETIONS = "/v1/chat/completions"


async def send_completion(client: HttpClient, payload: object = CHAT) -> None:
    """Send one completion request and do not wait for its answer."""
    data = json.dumps(payload).encode()
    await client.send_head(
        "POST", COMPLETIONS, [("content-length", str(len(data))), ("content-type", "application/json")]
    )
    await client.stream.send_all(client.conn.send(h11.Data(data=data)) or b"")
    await client.stream.send_all(client.conn.send(h11.EndOfMessage()) or b"")


async def test_retry_after_is_sent_with_each_injected_failure() -> None:
    async with open_fake_lm(fail_status=429, fail_count=2, retry_after_s=2) as fake:
        first = await request(fake, "POST", COMPLETIONS, CHAT)
        fake.configure(fail_status=503, retry_after_s=1.5)
        second = await request(fake, "POST", COMPLETIONS, CHAT)
        fake.configure(fail_status=None, retry_after_s=None)
        third = await request(fake, "POST", COMPLETIONS, CHAT)
    assert (first.status, first.headers[b"retry-after"]) == (429, b"2")
    assert first.json()["error"]["type"] == "rate_limit_error"
    assert (second.status, second.headers[b"retry-after"]) == (503, b"1.5")
    assert third.status == 200 and b"retry-after" not in third.headers


async def test_a_client_that_leaves_during_the_latency_is_noticed_at_once() -> None:
    async with open_fake_lm(latency_s=30.0) as fake:
        clients = [await HttpClient.connect(fake) for _ in range(3)]
        for client in clients:
            await send_completion(client)
        await wait_until(lambda: fake.statistics.completions_in_flight == 3, CALL_DEADLINE_S)
        assert fake.statistics.connections_open == 3
        closed_at = time.monotonic()
        for client in clients:
            await client.aclose()
        await wait_until(lambda: fake.statistics.client_disconnects == 3, CALL_DEADLINE_S)
        await wait_until(lambda: fake.statistics.connections_open == 0, CALL_DEADLINE_S)
        assert fake.statistics.completions_in_flight == 0
        assert fake.statistics.max_completions_in_flight == 3
        # Noticed when it happened, not when the 30 s answer would have been due.
        assert all(t - closed_at < 5.0 for t in fake.disconnect_times)
        assert len(fake.disconnect_times) == 3


async def test_a_client_that_leaves_mid_stream_is_noticed() -> None:
    async with open_fake_lm(stream_chunk_delay_s=30.0, stream_chunk_chars=1) as fake:
        client = await HttpClient.connect(fake)
        await send_completion(client, {**CHAT, "stream": True})
        with trio.fail_after(CALL_DEADLINE_S):
            while not isinstance(client.conn.next_event(), h11.Response):
                client.conn.receive_data(await client.stream.receive_some(65536))
        await client.aclose()
        # the disconnect is counted when it is seen; the completion ends just after (its handler unwinds)
        await wait_until(
            lambda: fake.statistics.client_disconnects == 1 and fake.statistics.completions_in_flight == 0,
            CALL_DEADLINE_S,
        )
        assert fake.statistics.streamed == 1


async def test_a_client_that_gives_up_in_timeout_mode_is_counted() -> None:
    async with open_fake_lm(timeout=True) as fake:
        client = await HttpClient.connect(fake)
        await send_completion(client)
        await wait_until(lambda: fake.statistics.timeouts_injected == 1, CALL_DEADLINE_S)
        await client.aclose()
        await wait_until(lambda: fake.statistics.client_disconnects == 1, CALL_DEADLINE_S)


async def test_an_answered_completion_is_no_disconnect() -> None:
    async with open_fake_lm(latency_s=0.01) as fake:
        assert (await request(fake, "POST", COMPLETIONS, CHAT)).status == 200
        await wait_until(lambda: fake.statistics.connections_open == 0, CALL_DEADLINE_S)
        assert fake.statistics.client_disconnects == 0
        assert fake.statistics.completions_in_flight == 0
        assert len(fake.arrival_times) == 1


async def test_concurrent_completions_are_all_in_flight_at_once() -> None:
    async with open_fake_lm(latency_s=0.3) as fake:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(request, fake, "POST", COMPLETIONS, CHAT)
        assert fake.statistics.max_completions_in_flight == 8
        assert fake.statistics.completions_in_flight == 0
        assert fake.max_arrivals_in_window(1.0) == 8


def test_latency_jitter_is_per_request_and_seeded() -> None:
    fake = FakeLM("127.0.0.1", 1, FakeLMConfig(latency_s=1.0, latency_jitter_s=0.5, seed=7))
    first = [fake._latency(fake.config) for _ in range(20)]
    fake.config = fake.config  # installing a config restarts the generator
    again = [fake._latency(fake.config) for _ in range(20)]
    assert first == again
    assert len(set(first)) == 20
    assert all(1.0 <= latency < 1.5 for latency in first)
    plain = FakeLM("127.0.0.1", 1, FakeLMConfig(latency_s=0.25))
    assert plain._latency(plain.config) == 0.25


def test_arrivals_in_windows() -> None:
    fake = FakeLM("127.0.0.1", 1, FakeLMConfig())
    assert fake.max_arrivals_in_window() == 0 and fake.arrivals_per_second() == []
    fake.arrival_times.extend([100.0, 100.2, 100.9, 101.1, 101.95, 103.5])
    assert fake.max_arrivals_in_window(1.0) == 3  # 100.2, 100.9, 101.1 (or 100.9 .. 101.95)
    assert fake.max_arrivals_in_window(0.5) == 2
    assert fake.max_arrivals_in_window(10.0) == 6
    assert fake.arrivals_per_second() == [3, 2, 0, 1]
    with pytest.raises(ValueError, match="positive"):
        fake.max_arrivals_in_window(0)
    fake.disconnect_times.append(1.0)
    fake.reset_statistics()
    assert not fake.arrival_times and not fake.disconnect_times


def test_config_validation_of_the_new_fields() -> None:
    with pytest.raises(ValueError, match="retry_after_s"):
        FakeLMConfig(retry_after_s=-1)
    with pytest.raises(ValueError, match="latency_jitter_s"):
        FakeLMConfig(latency_jitter_s=float("inf"))
    assert FakeLMConfig(retry_after_s=None).retry_after_s is None


def test_cli_rejects_a_negative_retry_after() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--fail-status", "429", "--retry-after", "-1"])
    assert exit_info.value.code == 2
