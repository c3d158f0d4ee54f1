"""The behaviour-compliance suite over ``dspex_trio.connect``: the very test functions of
``test_compliance.py``, unchanged, with each layer served on a loopback websocket by the plugin's remote
mode (the ``dspex_remote`` marker) and the tests given the remote client instead of the backend.

``mock`` over the websocket starts no process (the fast part of the suite); ``bridge`` and ``full`` do.
"""

from __future__ import annotations

import pytest

import dspex_trio
from dspex_trio import Backend
from tests.dspex_trio.test_compliance import (
    dspex_pool_options,
    test_bad_inputs_fail_with_the_same_message_on_every_layer,
    test_chain_of_thought_outputs_start_with_reasoning_on_every_layer,
    test_create_execute_and_stream_give_every_declared_output_typed,
    test_programs_are_listed_found_and_deleted,
    test_sessions_do_not_leak_between_tests,
)

pytestmark = pytest.mark.dspex_remote

__all__ = [
    "dspex_pool_options",
    "test_bad_inputs_fail_with_the_same_message_on_every_layer",
    "test_chain_of_thought_outputs_start_with_reasoning_on_every_layer",
    "test_create_execute_and_stream_give_every_declared_output_typed",
    "test_programs_are_listed_found_and_deleted",
    "test_sessions_do_not_leak_between_tests",
]


@pytest.mark.parametrize("dspex_backend", ["mock", "full"], indirect=True)
async def test_the_suite_above_runs_over_the_remote_client(dspex_backend: Backend, dspex_layer: str) -> None:
    """What makes the imported tests above remote ones: their backend is a connected remote client, whose
    requests reached the server."""
    assert isinstance(dspex_backend, dspex_trio.RemoteBackend)
    pid = await dspex_backend.create_program("question -> answer", session="s")
    await dspex_backend.execute(pid, {"question": "q"}, session="s")
    stats = dspex_backend.statistics()
    assert stats.connected and stats.connections == 1 and stats.completed == 1
    assert stats.backend == {"mock": "mock", "full": "pool"}[dspex_layer]
