"""pytest plugin: fixtures for testing an application that embeds dspex-trio, on the three test layers.

Registered through the ``pytest11`` entry point (``dspex_trio``) as the package ``dspex_trio.testing``,
which re-exports every hook and fixture of this module: installing dspex-trio is enough, no
``pytest_plugins`` line is needed (``-p no:dspex_trio`` turns it off). The fixtures are Trio fixtures
(pytest-trio): use them from async tests, with ``trio_mode = true`` in the pytest configuration or
``@pytest.mark.trio`` on each test. See ``docs/testing.md``.

Fixtures (each test gets its own; nothing is shared between tests):

- ``dspex_backend``: a :class:`~dspex_trio.Backend` on the test's layer: ``mock`` (in-process, fake
  deterministic answers), ``bridge`` (one real worker process) or ``full`` (the real pool, real DSPy).
- ``dspex_pool``: a ready :class:`~dspex_trio.Pool` (always real) with the embedded offline LM.
- ``dspex_fake_lm``: a running OpenAI-compatible fake LM server (``.url`` is its ``api_base``).
- ``dspex_ws_client``: a :class:`WebsocketClient` connected to a websocket server that serves
  ``dspex_backend`` (so it follows the layer too).
- ``dspex_pool_options``: the ``open_pool`` options of ``dspex_pool`` and the ``full`` layer; override it
  in a ``conftest.py`` to change them (``lm``, ``diagnostics`` and ``programs`` apply to the ``bridge``
  layer too, ``programs`` to ``mock``).

**Remote mode** runs ``dspex_backend`` through :func:`dspex_trio.connect`, the remote client: with
``--dspex-remote`` (or ``DSPEX_TEST_REMOTE=1``, or the ``dspex_remote`` marker) the plugin serves the test's
layer on a loopback websocket (with an admin token: the test keeps the operator's freedom over LMs) and
hands the test a client of it; with ``--dspex-remote=ws://host:port`` (or ``DSPEX_TEST_REMOTE=ws://...``,
token in ``DSPEX_TEST_TOKEN``) the test gets a client of that served endpoint, nothing is started and
``dspex_layer`` is ``remote``.

The layer of a test is resolved when the test runs, first match wins: an explicit parameter
(``@pytest.mark.parametrize("dspex_backend", ["bridge"], indirect=True)``), the ``dspex_layer`` marker
(``@pytest.mark.dspex_layer("bridge")``), ``--dspex-mode``, the ``DSPEX_TEST_MODE`` environment variable,
then ``mock``. An unknown value is a usage error. A layer whose requirement is missing (``dspy``, process
support) is skipped, saying what to install.

Tests that start real processes through these fixtures (``bridge``/``full`` layers, ``dspex_pool``) get the
``real_processes`` marker at collection: ``pytest -m "not real_processes"`` runs the fast part alone.
After the fixtures are torn down, a child process of the test process still running (zombies count as
exited) is killed and reported as an error of the test, with its pid and command line.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import os
import secrets
import signal
import sys
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from functools import partial
from typing import Any, Final, TypeVar

import pytest
import trio
import trio_websocket

from dspex_trio import Backend, Pool, WebsocketServer, connect, open_backend, open_pool, serve_websocket
from dspex_trio._launcher import DEFAULT_LAUNCHER
from dspex_trio._shared_launcher import LauncherNeeds
from dspex_trio._zygote import zygote_supported
from dspex_trio.testing._fake_lm import FakeLM, open_fake_lm
from dspex_trio.testing._templates import HostedLauncher, TemplateHost

try:
    from pytest_trio import trio_fixture as _trio_fixture
except ImportError:  # pragma: no cover - pytest-trio is in the "test" extra
    _trio_fixture = None

__all__ = [
    "ENV_VAR",
    "LAYERS",
    "DspexLeakWarning",
    "RpcError",
    "WebsocketClient",
    "warm_templates_by_default",
]

LAYERS: Final = ("mock", "bridge", "full")
"""The test layers, fastest first."""
ENV_VAR: Final = "DSPEX_TEST_MODE"
"""The environment variable that selects the layer (below the marker and ``--dspex-mode``)."""
REMOTE_ENV_VAR: Final = "DSPEX_TEST_REMOTE"
"""Remote mode (below the ``dspex_remote`` marker and ``--dspex-remote``): ``1`` serves the layer on a
loopback websocket, a ``ws://`` / ``wss://`` URL uses that endpoint; empty or ``0``: off."""
COLD_ENV_VAR: Final = "DSPEX_TEST_COLD"
"""``1``: no warm template, every pool and bridge of the fixtures starts cold (as ``--dspex-cold``)."""
TOKEN_ENV_VAR: Final = "DSPEX_TEST_TOKEN"
"""The token for the endpoint of ``DSPEX_TEST_REMOTE=ws://...``."""
REMOTE_MARKER: Final = "dspex_remote"
REMOTE_LAYER: Final = "remote"
"""What ``dspex_layer`` says for a test run against an endpoint given by URL (its layer is the server's)."""
DEFAULT_LAYER: Final = "mock"
REAL_PROCESSES_MARKER: Final = "real_processes"
_BACKEND_KIND: Final = {"mock": "mock", "bridge": "bridge", "full": "pool"}
_PROCESS_FIXTURES: Final = frozenset({"dspex_pool"})
"""Fixtures that always start real processes (whatever the layer)."""
DEFAULT_POOL_WORKERS: Final = 2
START_TIMEOUT_S: Final = 60.0
"""Bound on opening a backend or pool (a cold ``import dspy`` alone takes ~1 s), in s."""
RPC_TIMEOUT_S: Final = 30.0
"""Default bound on one :class:`WebsocketClient` request or notification wait, in s."""
LEAK_GRACE_S: Final = 2.0
"""After teardown: how long child processes may take to exit before they count as leaked, in s."""
_LEAK_POLL_S: Final = 0.02
_REAP_WAIT_S: Final = 2.0
"""After killing a leaked process: how long to wait to reap it, in s."""
_WS_SUBPROTOCOL: Final = "dspex.v1"

T = TypeVar("T")


# -- options, markers, layer resolution -------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dspex", "dspex-trio test layers")
    group.addoption(
        "--dspex-mode",
        dest="dspex_mode",
        default=None,
        metavar="|".join(LAYERS),
        help=f"the layer of the dspex_backend fixture (overrides ${ENV_VAR}; a dspex_layer marker or an "
        f"explicit parameter overrides it). Default: {DEFAULT_LAYER}.",
    )
    group.addoption(
        "--dspex-remote",
        dest="dspex_remote",
        nargs="?",
        const="1",
        default=None,
        metavar="URL",
        help="remote mode: dspex_backend is a dspex_trio.connect client, of the test's layer served on a "
        f"loopback websocket, or of the endpoint at URL (token in ${TOKEN_ENV_VAR}). Overrides "
        f"${REMOTE_ENV_VAR}; the {REMOTE_MARKER} marker overrides it.",
    )
    group.addoption(
        "--dspex-cold",
        dest="dspex_cold",
        action="store_true",
        default=None,
        help="start every pool and bridge of the dspex fixtures cold (its own zygote or subprocesses) instead "
        f"of forking fresh workers from the test run's warm template (also ${COLD_ENV_VAR}=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "dspex_layer(name): run this test's dspex_backend on layer name (mock, bridge or full), "
        "overriding --dspex-mode and $DSPEX_TEST_MODE",
    )
    config.addinivalue_line(
        "markers",
        f"{REAL_PROCESSES_MARKER}: starts real worker processes (set by the dspex fixtures for the bridge "
        'and full layers); -m "not real_processes" selects the fast in-process part',
    )
    config.addinivalue_line(
        "markers",
        f"{REMOTE_MARKER}(url=None): run this test's dspex_backend through dspex_trio.connect: its layer "
        "served on a loopback websocket, or the endpoint at url",
    )
    # Fail early and clearly on a bad setting; the layer itself is read again at test time.
    _check_layer(config.getoption("dspex_mode"), "--dspex-mode")
    _check_layer(os.environ.get(ENV_VAR) or None, ENV_VAR)
    _check_remote(config.getoption("dspex_remote"), "--dspex-remote")
    _check_remote(os.environ.get(REMOTE_ENV_VAR) or None, REMOTE_ENV_VAR)


def _check_layer(value: object, source: str) -> str | None:
    if value is None or value in LAYERS:
        return value
    raise pytest.UsageError(
        f"{source}: unknown dspex test layer {value!r}; the allowed values are {', '.join(LAYERS)}"
    )


def _layer_of(item: pytest.Item, param: object = None, *, has_param: bool = False) -> str:
    """The layer of ``item``: explicit parameter > ``dspex_layer`` marker > ``--dspex-mode`` >
    ``$DSPEX_TEST_MODE`` > ``mock``. Raises ``pytest.UsageError`` on an unknown value."""
    if has_param:
        return _check_layer(param, "dspex_backend parameter") or DEFAULT_LAYER
    marker = item.get_closest_marker("dspex_layer")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("layer")
        return _check_layer(value, f"@pytest.mark.dspex_layer on {item.nodeid}") or DEFAULT_LAYER
    option = _check_layer(item.config.getoption("dspex_mode"), "--dspex-mode")
    if option is not None:
        return option
    return _check_layer(os.environ.get(ENV_VAR) or None, ENV_VAR) or DEFAULT_LAYER


_LOCAL: Final = "local"
"""Remote mode, with the test's layer served by the plugin on a loopback websocket."""


def _check_remote(value: object, source: str) -> str | None:
    """None (off), ``_LOCAL``, or the URL of a served endpoint; ``pytest.UsageError`` otherwise."""
    if value is None or value in ("", "0", "false", "no", "off"):
        return None
    if value in ("1", "true", "yes", "on", True):
        return _LOCAL
    if isinstance(value, str) and value.startswith(("ws://", "wss://")) and len(value) > len("wss://"):
        return value
    raise pytest.UsageError(
        f"{source}: {value!r} is not a remote mode; use 1 (serve the layer on a loopback websocket) or a "
        "ws://host:port URL of a served endpoint"
    )


def _remote_of(item: pytest.Item) -> str | None:
    """Remote mode of ``item`` (None, ``_LOCAL`` or a URL): ``dspex_remote`` marker > ``--dspex-remote``
    > ``$DSPEX_TEST_REMOTE``."""
    marker = item.get_closest_marker(REMOTE_MARKER)
    if marker is not None:
        url = marker.args[0] if marker.args else marker.kwargs.get("url")
        return _check_remote(
            url if url is not None else "1", f"@pytest.mark.{REMOTE_MARKER} on {item.nodeid}"
        )
    option = _check_remote(item.config.getoption("dspex_remote"), "--dspex-remote")
    if option is not None:
        return option
    return _check_remote(os.environ.get(REMOTE_ENV_VAR) or None, REMOTE_ENV_VAR)


def _collected_layer(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return _layer_of(item, params.get("dspex_backend"), has_param="dspex_backend" in params)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        uses_backend = bool(names & {"dspex_backend", "dspex_ws_client"})
        local = _remote_of(item) in (None, _LOCAL)  # an endpoint given by URL starts nothing here
        if (uses_backend and local and _collected_layer(item) != "mock") or names & _PROCESS_FIXTURES:
            item.add_marker(REAL_PROCESSES_MARKER)


def _missing_requirement(layer: str) -> str | None:
    """Why ``layer`` cannot run here (a reason for ``pytest.skip``), or None."""
    if layer == "mock":
        return None
    if os.name != "posix" or sys.platform in ("emscripten", "wasi", "ios"):
        return (
            f"dspex layer {layer!r} starts worker processes: it needs a POSIX system with os.fork or "
            f"subprocess (this is {sys.platform}); use --dspex-mode=mock"
        )
    try:
        found = importlib.util.find_spec("dspy") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return (
            f"dspex layer {layer!r} runs real DSPy: install dspy==3.4.1 (pip install dspex-trio), "
            "or use --dspex-mode=mock"
        )
    return None


def _require(layer: str) -> None:
    reason = _missing_requirement(layer)
    if reason is not None:
        pytest.skip(reason)


# -- leaks ------------------------------------------------------------------------------------------------


class DspexLeakWarning(pytest.PytestWarning):
    """A pipe or socket opened during a test that used the dspex fixtures is still open after their
    teardown (``filterwarnings = error::dspex_trio.testing.DspexLeakWarning`` makes it an error)."""


def _open_fds() -> dict[int, str]:
    """This process's pipes and sockets, ``{fd: what it points to}`` (empty without ``/proc``)."""
    fds: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listdir's own fd, closed by now
            continue
        if target.startswith(("pipe:", "socket:")):
            fds[int(name)] = target
    return fds


def _children() -> dict[int, str]:
    """This process's live child processes (zombies have exited: left out), ``{pid: command line}``,
    and those of the test run's warm templates (workers forked for a test are not our children)."""
    parents = {os.getpid()} | _template_pids()
    children: dict[int, str] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc (not Linux): nothing to check
        return children
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses: split after the last ")"
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) not in parents or fields[0] == b"Z":
            continue
        children[int(name)] = _cmdline(int(name))
    return children


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or "?"


def _kill_and_reap(pid: int) -> None:
    """SIGKILL ``pid`` (its whole group when it leads one), then reap it (bounded)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + _REAP_WAIT_S
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # reaped by its owner meanwhile
            return
        time.sleep(_LEAK_POLL_S)


def _check_no_leaks(before: dict[int, str]) -> None:
    """Fail (a test error at teardown) if a child process started during the test is still running
    after ``LEAK_GRACE_S``; kill it first."""
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        templates = _template_pids()  # the run's warm templates outlive every test, on purpose
        leaked = {pid: cmd for pid, cmd in _children().items() if pid not in before and pid not in templates}
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(_LEAK_POLL_S)
    if not leaked:
        return
    for pid in leaked:
        _kill_and_reap(pid)
    described = "; ".join(f"pid {pid}: {cmd}" for pid, cmd in sorted(leaked.items()))
    pytest.fail(
        f"dspex_trio: {len(leaked)} child process(es) started by this test still ran {LEAK_GRACE_S} s "
        f"after its fixtures were torn down (killed now): {described}",
        pytrace=False,
    )


@pytest.fixture
def _dspex_no_leaks() -> Iterator[None]:
    """Set up before, torn down after every dspex fixture: the leak checks (processes: an error; pipes
    and sockets: a :class:`DspexLeakWarning`)."""
    before, fds_before = _children(), _open_fds()
    yield
    try:
        _check_no_leaks(before)
    finally:
        gc.collect()  # an unreachable socket object is closed by its finalizer: not a leak
        held = _HOST.fds() if _HOST is not None else set()  # the warm templates' own sockets and pipes
        leaked_fds = {fd: t for fd, t in _open_fds().items() if fds_before.get(fd) != t and fd not in held}
        if leaked_fds:
            described = ", ".join(f"fd {fd} -> {t}" for fd, t in sorted(leaked_fds.items()))
            warnings.warn(
                DspexLeakWarning(f"dspex_trio: still open after the test's teardown: {described}"),
                stacklevel=1,
            )


# -- fixtures ---------------------------------------------------------------------------------------------


async def _serve_context(
    open_: Callable[[], AbstractAsyncContextManager[T]],
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[T] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_() as value:
        task_status.started(value)
        await done.wait()


@asynccontextmanager
async def _opened(open_: Callable[[], AbstractAsyncContextManager[T]]) -> AsyncIterator[T]:
    """``async with open_()`` in a task of its own, so that only its opening is bounded (by
    ``START_TIMEOUT_S``); closed normally when the block ends."""
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT_S):
            value: T = await nursery.start(_serve_context, open_, done)
        try:
            yield value
        finally:
            done.set()


def _async_fixture(fn: Callable[..., Any]) -> Any:
    """A Trio fixture (pytest-trio), or, without pytest-trio, a fixture that says to install it."""
    if _trio_fixture is not None:
        return _trio_fixture(fn)

    def missing() -> None:  # pragma: no cover
        pytest.fail(f"the {fn.__name__} fixture needs pytest-trio: pip install pytest-trio", pytrace=False)

    missing.__name__ = fn.__name__
    missing.__doc__ = fn.__doc__
    return pytest.fixture(name=fn.__name__)(missing)


@pytest.fixture
def dspex_layer(request: pytest.FixtureRequest) -> str:
    """This test's layer (``mock``, ``bridge`` or ``full``), resolved as for ``dspex_backend``; ``remote``
    when it runs against an endpoint given by URL."""
    remote = _remote_of(request.node)
    if remote is not None and remote != _LOCAL:
        return REMOTE_LAYER
    return _collected_layer(request.node)


@pytest.fixture
def dspex_pool_options() -> dict[str, Any]:
    """The ``open_pool`` options of ``dspex_pool`` and of the ``full`` layer; override it to change them
    (``lm=None`` is the embedded offline LM)."""
    return {"workers": DEFAULT_POOL_WORKERS, "lm": None}


@pytest.fixture
def _dspex_backend_layer(request: pytest.FixtureRequest) -> str:
    """The layer of ``dspex_backend``, its requirements checked (a skip, outside trio, keeps its reason);
    ``remote`` for an endpoint given by URL."""
    remote = _remote_of(request.node)
    if remote is not None and remote != _LOCAL:
        return REMOTE_LAYER
    layer = _collected_layer(request.node)
    _require(layer)
    return layer


@pytest.fixture
def _dspex_remote(request: pytest.FixtureRequest) -> str | None:
    """The remote mode of ``dspex_backend``: None (in-process), ``local``, or the endpoint's URL."""
    return _remote_of(request.node)


class _Served:
    """How the plugin reaches the endpoint of a remote-mode backend (for ``dspex_ws_client``)."""

    def __init__(self, url: str, token: str | None, server: WebsocketServer | None) -> None:
        self.url = url
        self.token = token
        self.server = server


_SERVED: dict[int, _Served] = {}
"""id(a remote-mode ``dspex_backend``) -> its endpoint, while the test runs."""


@pytest.fixture
def _dspex_pool_requirements() -> None:
    _require("full")


@asynccontextmanager
async def _served_remotely(backend: Backend) -> AsyncIterator[tuple[Backend, _Served]]:
    """``backend`` served on a loopback websocket (admin token: the test is the operator), and a
    :func:`dspex_trio.connect` client of it."""
    token = secrets.token_urlsafe(16)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, backend, "127.0.0.1", 0, admin_token=token))
        async with _opened(lambda: connect(server.url, token=token)) as remote:
            yield remote, _Served(server.url, token, server)
        nursery.cancel_scope.cancel()


# -- the test run's warm templates ---------------------------------------------------------------------------

_HOST: TemplateHost | None = None
"""The test run's warm templates (started by the first test that needs one; ended at session finish)."""


def _template_pids() -> set[int]:
    host = _HOST
    return {pid for pid in host.templates.values() if pid is not None} if host is not None else set()


def _cold(config: pytest.Config) -> bool:
    return bool(config.getoption("dspex_cold")) or os.environ.get(COLD_ENV_VAR, "") not in ("", "0")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """End the warm templates (and any worker still alive) with the test session."""
    global _HOST
    host, _HOST = _HOST, None
    if host is not None:
        host.close()


def warm_launcher(config: pytest.Config, needs: LauncherNeeds) -> HostedLauncher | None:
    """A launcher forking fresh workers from the test run's warm template for ``needs`` (started and
    awaited here, outside the test's Trio run, so that the leak checks taken next see it as already
    there); None with ``--dspex-cold`` / ``$DSPEX_TEST_COLD`` or where the zygote cannot run."""
    global _HOST
    if _cold(config) or not zygote_supported():
        return None
    if _HOST is None:
        _HOST = TemplateHost(start_timeout=START_TIMEOUT_S)
    launcher = _HOST.launcher(needs)
    try:
        _HOST.wait_ready(needs)
    except Exception:  # e.g. a program module that cannot be used: the cold path raises it as usual
        return None
    return launcher


@contextmanager
def warm_templates_by_default(config: pytest.Config) -> Iterator[None]:
    """While the block runs (a test's sync fixture: the setting reaches the test's Trio run), workers
    started without a named launcher (``open_worker()``, a bridge, ``open_pool(launcher="auto")``) are
    forked fresh from the test run's warm templates, one per set of needs; the default needs' template
    is started and awaited first. Nothing changes with ``--dspex-cold`` or where the zygote cannot run.
    For a project's own suite (an autouse fixture in its ``conftest.py``), where a pool opened in a test
    body should start warm too."""
    launcher = warm_launcher(config, LauncherNeeds(python=sys.executable))
    if launcher is None:
        yield
        return
    assert _HOST is not None
    token = DEFAULT_LAUNCHER.set(_HOST.provide)
    try:
        yield
    finally:
        DEFAULT_LAUNCHER.reset(token)


def _needs_of(options: dict[str, Any]) -> LauncherNeeds:
    return LauncherNeeds(
        python=options.get("python", sys.executable),
        worker_env=tuple(options.get("worker_env", ())),
        programs=tuple(options.get("programs", ())),
    )


@pytest.fixture
def _dspex_launcher(
    request: pytest.FixtureRequest, dspex_pool_options: dict[str, Any]
) -> HostedLauncher | None:
    """The warm launcher of this test's pool or bridge (None: cold), when the test starts processes."""
    if request.node.get_closest_marker(REAL_PROCESSES_MARKER) is None or "launcher" in dspex_pool_options:
        return None
    if _missing_requirement("full") is not None:
        return None  # the fixture skips, saying why
    return warm_launcher(request.config, _needs_of(dspex_pool_options))


@_async_fixture
async def dspex_backend(
    _dspex_launcher: HostedLauncher | None,
    _dspex_no_leaks: None,
    _dspex_backend_layer: str,
    _dspex_remote: str | None,
    dspex_pool_options: dict[str, Any],
) -> AsyncIterator[Backend]:
    """A backend on this test's layer (see the module doc): ``.name`` is ``mock``, ``bridge`` or
    ``pool`` (the ``full`` layer); in remote mode, a :class:`dspex_trio.RemoteBackend` whose ``.name`` is
    the served backend's."""
    layer = _dspex_backend_layer
    if layer == REMOTE_LAYER:
        assert _dspex_remote is not None
        token = os.environ.get(TOKEN_ENV_VAR) or None
        async with _opened(lambda: connect(_dspex_remote, token=token)) as remote:
            _SERVED[id(remote)] = _Served(_dspex_remote, token, None)
            try:
                yield remote
            finally:
                _SERVED.pop(id(remote), None)
        return
    options: dict[str, Any] = {}
    if layer == "full":
        options = dict(dspex_pool_options)
        if _dspex_launcher is not None:
            options["launcher"] = _dspex_launcher
    elif layer == "bridge":
        options = {k: v for k, v in dspex_pool_options.items() if k in ("lm", "diagnostics", "programs")}
        if _dspex_launcher is not None and not dspex_pool_options.get("worker_env"):
            # the bridge's own cold launcher would be a plain subprocess with these needs
            options["launcher"] = _dspex_launcher
    else:  # the mock loads the application's program modules too
        options = {k: v for k, v in dspex_pool_options.items() if k == "programs"}
    async with _opened(lambda: open_backend(_BACKEND_KIND[layer], **options)) as backend:
        if _dspex_remote is None:
            yield backend
            return
        async with _served_remotely(backend) as (remote, served):
            _SERVED[id(remote)] = served
            try:
                yield remote
            finally:
                _SERVED.pop(id(remote), None)


@_async_fixture
async def dspex_pool(
    _dspex_pool_requirements: None,
    _dspex_launcher: HostedLauncher | None,
    _dspex_no_leaks: None,
    dspex_pool_options: dict[str, Any],
) -> AsyncIterator[Pool]:
    """A ready pool of real worker processes with the embedded offline LM (``dspex_pool_options``): fresh
    workers forked from the test run's warm template (cold with ``--dspex-cold``)."""
    options = dict(dspex_pool_options)
    if _dspex_launcher is not None:
        options["launcher"] = _dspex_launcher
    async with _opened(lambda: open_pool(**options)) as pool:
        yield pool


@_async_fixture
async def dspex_fake_lm(_dspex_no_leaks: None) -> AsyncIterator[FakeLM]:
    """A running fake LM server on 127.0.0.1 (a free port): pass ``.url`` as ``api_base``, set
    ``.config`` (a ``FakeLMConfig``) to add latency or failures, read ``.statistics``."""
    async with open_fake_lm() as fake:
        yield fake


class RpcError(Exception):
    """A JSON-RPC error reply: ``code``, ``message`` and ``data`` (``data["kind"]`` for the server's own
    codes, e.g. ``unknown_program``)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code}{f', data {data!r}' if data is not None else ''})")
        self.code = code
        self.message = message
        self.data = data


class WebsocketClient:
    """A JSON-RPC 2.0 client on one websocket connection (subprotocol ``dspex.v1``), for trio tests.

    ``await request(method, params)`` returns the result or raises :class:`RpcError`;
    ``await next_notification(method=None)`` returns the next notification (``{"jsonrpc", "method",
    "params"}``), of ``method`` if given (others stay queued). Both wait at most ``timeout`` seconds
    (``trio.TooSlowError``). Requests may run concurrently; a background task reads the replies.
    ``connection`` is the underlying ``trio_websocket.WebSocketConnection``.
    """

    def __init__(
        self, connection: trio_websocket.WebSocketConnection, server: WebsocketServer | None = None
    ) -> None:
        self.connection = connection
        self.server = server
        """The server it is connected to (from ``dspex_ws_client``), or None."""
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self._notifications: deque[dict[str, Any]] = deque()
        self._arrived = trio.Event()
        self._closed: BaseException | None = None

    async def request(self, method: str, params: Any = None, *, timeout: float = RPC_TIMEOUT_S) -> Any:
        """Send a request; its result. ``RpcError`` for an error reply."""
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        reply = await self._wait(
            lambda: self._replies.pop(request_id, None), timeout, json.dumps(message), f"reply to {method}"
        )
        if "error" in reply:
            error = reply["error"]
            raise RpcError(error.get("code", 0), error.get("message", ""), error.get("data"))
        return reply.get("result")

    async def notify(self, method: str, params: Any = None) -> None:
        """Send a notification (no reply)."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self.connection.send_message(json.dumps(message))

    async def next_notification(
        self, method: str | None = None, *, timeout: float = RPC_TIMEOUT_S
    ) -> dict[str, Any]:
        """The next notification received (of ``method``, if given), waiting for it if need be."""

        def take() -> dict[str, Any] | None:
            for i, message in enumerate(self._notifications):
                if method is None or message.get("method") == method:
                    del self._notifications[i]
                    return message
            return None

        return await self._wait(take, timeout, None, f"notification {method or '(any)'}")

    async def _wait(
        self, take: Callable[[], dict[str, Any] | None], timeout: float, send: str | None, what: str
    ) -> dict[str, Any]:
        with trio.fail_after(timeout):
            if send is not None:
                await self.connection.send_message(send)
            while (found := take()) is None:
                if self._closed is not None:
                    raise RuntimeError(f"websocket closed while waiting for the {what}") from self._closed
                await self._arrived.wait()
        return found

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads(await self.connection.get_message())
                if "method" in message:
                    self._notifications.append(message)
                elif isinstance(message.get("id"), int):
                    self._replies[message["id"]] = message
                self._arrived.set()
                self._arrived = trio.Event()
        except trio_websocket.ConnectionClosed as exc:
            self._closed = exc
            self._arrived.set()


@_async_fixture
async def dspex_ws_client(dspex_backend: Backend, _dspex_no_leaks: None) -> AsyncIterator[WebsocketClient]:
    """A :class:`WebsocketClient` connected to a websocket server (127.0.0.1, a free port) serving
    ``dspex_backend``; the server is ``client.server``. In remote mode: connected to the endpoint the
    remote backend uses (``client.server`` is None for an endpoint given by URL)."""
    served = _SERVED.get(id(dspex_backend))
    async with trio.open_nursery() as nursery:
        if served is None:
            server = await nursery.start(partial(serve_websocket, dspex_backend, "127.0.0.1", 0))
            served = _Served(server.url, None, server)
        headers = [(b"authorization", f"Bearer {served.token}".encode())] if served.token else None
        async with trio_websocket.open_websocket_url(
            served.url, subprotocols=[_WS_SUBPROTOCOL], extra_headers=headers, connect_timeout=START_TIMEOUT_S
        ) as connection:
            client = WebsocketClient(connection, served.server)
            nursery.start_soon(client._read)
            yield client
        nursery.cancel_scope.cancel()
