"""The suite's options and markers (the dspex fixtures come from the ``dspex_trio.testing`` plugin).

- ``--run-slow``: tests marked ``slow`` (chaos, soak) are skipped without it.
- ``real_processes``: set here on every test that starts a process (the plugin sets it on tests that get
  a bridge or full backend through its fixtures), so that ``pytest -m "not real_processes"`` runs the
  fast, in-process part of the suite alone (see docs/testing.md). A test of a module not listed in
  ``IN_PROCESS`` is assumed to start processes. A test this file calls in-process that starts one after
  all (``subprocess``, ``os.fork``, ``os.posix_spawn``: seen through an audit hook) fails, saying so.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_trio.testing import warm_templates_by_default

pytest_plugins = ["pytester"]

COLD_START_MARKER = "cold_start"
"""A test that starts its workers cold on purpose (what it checks is the cold path, or the default
launcher itself): the warm templates are not the default for it."""

IN_PROCESS: dict[str, frozenset[str]] = {
    # module: the tests in it that start processes anyway (by function name)
    "tests/bridge_child/test_wire.py": frozenset({"test_importing_wire_imports_neither_trio_nor_dspy"}),
    "tests/bridge_child/testnetaddr.py": frozenset(),
    "tests/bridge_child/test_lmrules.py": frozenset(),
    "tests/bridge_child/test_tcp_auth.py": frozenset(),
    "tests/bridge_child/test_cancel_order.py": frozenset(),
    "tests/dspex_trio/test_egress.py": frozenset(),
    "tests/bridge_child/test_programs.py": frozenset(
        {
            "test_importing_the_program_layer_does_not_import_dspy",
            "test_execute_predict_and_chain_of_thought_offline",
            "test_execute_streams_chunks_before_the_result",
            "test_errors_are_clear_and_typed",
            "test_state_round_trip_applies_demos_and_instructions",
            "test_concurrent_executes_in_one_worker",
        }
    ),
    "tests/bridge_child/test_spec.py": frozenset(
        {
            "test_importing_the_spec_layer_imports_neither_dspy_nor_trio",
            "test_the_program_methods_import_no_cycle",
        }
    ),
    "tests/dspex_trio/test_architecture.py": frozenset(),
    "tests/dspex_trio/test_backends.py": frozenset(
        {
            "test_fallback_engages_when_the_pool_is_unavailable_and_returns_when_it_recovers",
            "test_fallback_reaches_mock_only_when_allowed",
        }
    ),
    "tests/dspex_trio/test_breaker.py": frozenset(
        {"test_a_real_restart_storm_opens_the_circuit_and_half_open_recovers"}
    ),
    "tests/dspex_trio/test_checkpoints.py": frozenset(
        {
            "test_every_async_method_of_a_backend_with_workers_checkpoints",
            "test_every_async_method_of_the_worker_handle_checkpoints",
        }
    ),
    "tests/dspex_trio/test_compliance.py": frozenset(),  # the plugin marks the bridge and full layers
    "tests/dspex_trio/test_compliance_remote.py": frozenset(),  # the same, over the websocket
    "tests/dspex_trio/test_client.py": frozenset(),
    "tests/dspex_trio/test_client_protocol.py": frozenset(),
    "tests/dspex_trio/test_client_ws.py": frozenset(),
    "tests/dspex_trio/test_ws_frames.py": frozenset(),  # the endpoint's own framing, trio-websocket in-process
    "tests/dspex_trio/test_exports.py": frozenset({"test_typed_options_reach_the_pool_and_its_workers"}),
    "tests/dspex_trio/test_fake_lm.py": frozenset(
        {"test_cli_main_serves_until_sigterm", "test_cli_warns_on_stderr_when_bound_to_all_interfaces"}
    ),
    "tests/dspex_trio/test_cli_messages.py": frozenset(),
    "tests/dspex_trio/test_cli_ray.py": frozenset(
        {"test_without_ray_the_workers_are_local_and_get_worker_env"}
    ),
    "tests/dspex_trio/test_ray_control.py": frozenset(),
    "tests/dspex_trio/test_resize.py": frozenset(),
    "tests/dspex_trio/test_handshake.py": frozenset(),
    "tests/dspex_trio/test_jsonrpc.py": frozenset(),
    "tests/dspex_trio/test_ws_api.py": frozenset(),
    "tests/dspex_trio/test_health.py": frozenset({"test_a_sigstopped_real_worker_is_detected_and_replaced"}),
    "tests/dspex_trio/test_logs.py": frozenset(),
    "tests/dspex_trio/test_plain_http.py": frozenset(),
    "tests/dspex_trio/test_retry.py": frozenset(),
    "tests/dspex_trio/test_sessions.py": frozenset(),
    "tests/dspex_trio/test_validators.py": frozenset(),
    "tests/dspex_trio/test_metrics.py": frozenset(
        {"test_importing_the_runtime_does_not_import_prometheus_client"}
    ),
    "tests/dspex_trio/test_http_routes.py": frozenset(),
    "tests/dspex_trio/test_log_context.py": frozenset(),  # its real-process test is marked
    "tests/bridge_child/test_wire_leases.py": frozenset(),
    "tests/dspex_trio/test_fake_lm_observing.py": frozenset(),
    "tests/dspex_trio/test_lm_budgets.py": frozenset(),
    "tests/bridge_child/test_lmcache.py": frozenset(),
    "tests/dspex_trio/test_lm_cache.py": frozenset(),
    "tests/dspex_trio/test_ws_lm_cache.py": frozenset(),
    "tests/dspex_trio/test_gepa_options.py": frozenset(),  # GEPA's options and budget, no worker
    "tests/dspex_trio/test_deadline.py": frozenset(),  # issue 20: the caller's deadline on the hot path
    "tests/dspex_trio/test_client_ws_direct.py": frozenset(),  # issue 20: the client's direct socket I/O
    "tests/dspex_trio/test_compile_schedule.py": frozenset(),  # issue 16: the random search on a fake backend
    "tests/bridge_child/test_program_state_load.py": frozenset(),  # issue 16: a state loaded in the worker
}
_SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system"}
)
_spawned: list[str] = []
_watching = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching and event in _SPAWN_EVENTS:
        _spawned.append(f"{event}{args[:2]!r}"[:200])


sys.addaudithook(_audit)  # cannot be removed; inert outside in-process tests


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{COLD_START_MARKER}: this test's default launcher stays cold (no warm template)"
    )


@pytest.fixture(autouse=True)
def _warm_templates(request: pytest.FixtureRequest) -> Iterator[None]:
    """Workers a test starts without naming a launcher (``open_pool()``, ``open_worker()``, a bridge)
    are forked fresh from the run's warm template (issue 21): a pool is ready in milliseconds instead
    of paying ``import dspy`` again. Tests marked ``cold_start``, and the in-process ones, start cold;
    ``--dspex-cold`` turns it off for the whole run."""
    node = request.node
    if node.get_closest_marker("real_processes") is None or node.get_closest_marker(COLD_START_MARKER):
        yield
        return
    with warm_templates_by_default(request.config):
        yield


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("run_slow")
    for item in items:
        spawning = IN_PROCESS.get(item.nodeid.split("::", 1)[0])
        if spawning is None or getattr(item, "originalname", item.name) in spawning:
            item.add_marker("real_processes")
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))


@pytest.fixture(autouse=True)
def _in_process_tests_start_no_process(request: pytest.FixtureRequest) -> Iterator[None]:
    global _watching
    if request.node.get_closest_marker("real_processes") is not None:
        yield
        return
    _spawned.clear()
    _watching = True
    try:
        yield
    finally:
        _watching = False
    if _spawned:
        pytest.fail(
            f"this test started a process ({'; '.join(_spawned[:3])}) but is not marked real_processes: "
            "list it in tests/conftest.py's IN_PROCESS (or mark it), or the fast run will not be fast",
            pytrace=False,
        )
