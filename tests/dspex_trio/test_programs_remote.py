"""The DSPy program tests of ``test_programs_pool.py`` over ``dspex_trio.connect``: the very test
functions, unchanged, with ``pool`` a remote client of a pool served on a loopback websocket.

The server gets an admin token and the client holds it: the tests configure LMs on loopback addresses
(the fake LM server), which only the operator may do (docs/security.md). Left out, because they reach
into the pool's own process: its worker handles (``pool.workers()``, ``worker.call``: the LM reaching
every worker; killing every worker), a worker's pid and in-flight count from ``pool.statistics()``
(killing the busy worker), and ``get_state`` / ``load_state``, which the websocket API does not offer.
Their remote counterparts (a worker killed under a remote caller, the server restarted under it) are in
``test_client_faults.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

import dspex_trio
from tests.dspex_trio.test_programs_pool import (
    fake_lm,
    test_chain_of_thought_over_http,
    test_complex_signature,
    test_create_returns_an_id_and_execute_returns_every_field_typed,
    test_invalid_signature_is_a_clear_error_at_creation,
    test_program_not_found_list_and_delete,
    test_rate_limit_is_a_program_error_naming_the_dspy_type,
    test_session_lm_is_invisible_to_other_sessions,
    test_sessions_are_isolated,
    test_stream_yields_chunks_then_one_final_event,
    test_streaming_over_http_yields_chunks_before_the_final_event,
    test_typed_outputs_and_literals,
    test_usage_is_reported,
)

__all__ = [
    "fake_lm",
    "test_chain_of_thought_over_http",
    "test_complex_signature",
    "test_create_returns_an_id_and_execute_returns_every_field_typed",
    "test_invalid_signature_is_a_clear_error_at_creation",
    "test_program_not_found_list_and_delete",
    "test_rate_limit_is_a_program_error_naming_the_dspy_type",
    "test_session_lm_is_invisible_to_other_sessions",
    "test_sessions_are_isolated",
    "test_stream_yields_chunks_then_one_final_event",
    "test_streaming_over_http_yields_chunks_before_the_final_event",
    "test_typed_outputs_and_literals",
    "test_usage_is_reported",
]


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.RemoteBackend]:
    token = secrets.token_urlsafe(16)
    async with dspex_trio.open_pool(workers=2) as served, trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(dspex_trio.serve_websocket, served, "127.0.0.1", 0, admin_token=token)
        )
        async with dspex_trio.connect(server.url, token=token) as remote:
            yield remote
        nursery.cancel_scope.cancel()


async def test_the_tests_above_run_over_the_remote_client(pool: dspex_trio.RemoteBackend) -> None:
    assert isinstance(pool, dspex_trio.RemoteBackend) and pool.name == "pool"
    await test_usage_is_reported(pool)
    assert pool.statistics().completed == 1
