"""Workers get an allow-listed environment, never a copy of the server's: secrets stay out unless named."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import dspex_trio
from dspex_trio._launcher import (
    ALLOWED_ENV,
    WORKER_ENV,
    SubprocessLauncher,
    check_env_names,
    default_launcher,
    worker_environment,
)
from dspex_trio._options import WorkerOptions
from dspex_trio._pool_launcher import open_launcher
from dspex_trio._zygote import open_zygote, zygote_supported

pytestmark = pytest.mark.cold_start
"""The workers' environment is what these tests check, set by each test: a warm template started by an
earlier test has its own (tests/conftest.py)."""

CANARY = "canary-7f3a-never-in-a-worker"
SECRETS = {
    "OPENAI_API_KEY": CANARY,
    "ANTHROPIC_API_KEY": CANARY,
    "DSPEX_TOKEN": CANARY,
    "GITHUB_TOKEN": CANARY,
    "AWS_SECRET_ACCESS_KEY": CANARY,
    "AWS_ACCESS_KEY_ID": CANARY,
    "DATABASE_URL": CANARY,
    "MY_SERVICE_SECRET": CANARY,
    "LC_SECRET_TOKEN": CANARY,  # in an allowed family, but named like a secret
    "COVERAGE_UPLOAD_TOKEN": CANARY,
}
NAMED = {"DSPEX_TEST_NAMED_KEY": "named-value", "ANOTHER_API_KEY": "named-too"}
ALLOWED = {"LC_TIME": "C", "DSPY_CACHEDIR": "/nonexistent/dspy-cache", "COVERAGE_RCFILE": "/nonexistent/rc"}

requires_zygote = pytest.mark.skipif(
    not zygote_supported(), reason="the zygote needs Linux fork + SCM_RIGHTS"
)


# -- the rule (pure) ------------------------------------------------------------------------------------


def test_only_the_allow_list_and_named_variables_pass() -> None:
    environ = {**SECRETS, **NAMED, **ALLOWED, "PATH": "/bin", "HOME": "/home/x", "TERM": "xterm"}
    env = worker_environment(environ, list(NAMED))
    for name in SECRETS:
        assert name not in env, name
    assert CANARY not in env.values()
    assert {k: env[k] for k in NAMED} == NAMED
    assert {k: env[k] for k in ALLOWED} == ALLOWED
    assert env["PATH"] == "/bin" and env["HOME"] == "/home/x"
    assert "TERM" not in env  # not needed by a worker
    assert {k: env[k] for k in WORKER_ENV} == dict(WORKER_ENV)


def test_a_named_variable_passes_whatever_it_looks_like_and_explicit_values_win() -> None:
    environ = {"OPENAI_API_KEY": "k", "PYTHONUNBUFFERED": "0"}
    env = worker_environment(environ, ["OPENAI_API_KEY", "NOT_SET"], {"EXTRA": "e", "PATH": "/opt"})
    assert env["OPENAI_API_KEY"] == "k"
    assert "NOT_SET" not in env  # named but unset: absent, not empty
    assert env["EXTRA"] == "e" and env["PATH"] == "/opt"
    assert env["PYTHONUNBUFFERED"] == "1"  # WORKER_ENV beats the parent's value


def test_no_allowed_name_is_secret_shaped() -> None:
    assert not [n for n in ALLOWED_ENV if n.endswith(("_KEY", "_TOKEN", "_SECRET", "_PASSWORD"))]
    assert "DSPEX_TOKEN" not in ALLOWED_ENV


@pytest.mark.parametrize("names", ["OPENAI_API_KEY", b"X"])
def test_worker_env_is_a_sequence_of_names_not_a_string(names: object) -> None:
    with pytest.raises(TypeError, match="sequence of variable names"):
        check_env_names(names)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        WorkerOptions(worker_env=names)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "A=B", "A\0B", 3])
def test_bad_variable_names_are_refused(name: object) -> None:
    with pytest.raises(ValueError, match="not an environment variable name"):
        check_env_names([name])  # type: ignore[list-item]


def test_worker_env_is_a_worker_option_applied_by_the_launcher_dspex_builds() -> None:
    assert WorkerOptions(worker_env=["A", "B"]).worker_env == ("A", "B")
    built = default_launcher(None, ("A",))
    assert isinstance(built, SubprocessLauncher) and built.worker_env == ("A",)
    mine = SubprocessLauncher()
    assert default_launcher(mine, ()) is mine
    with pytest.raises(ValueError, match="pass it to the launcher you give"):
        default_launcher(mine, ("A",))


# -- real workers ---------------------------------------------------------------------------------------


def proc_environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (``/proc/<pid>/environ``): where its ``os.environ`` comes
    from (a zygote fork's is its template's)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


def assert_clean(env: dict[str, str], *, named: bool) -> None:
    for name in SECRETS:
        assert name not in env, f"{name} leaked into a worker"
    assert CANARY not in "".join(env.values())
    for name, value in NAMED.items():
        assert (env.get(name) == value) if named else (name not in env), name
    assert {k: env.get(k) for k in ALLOWED} == ALLOWED
    assert env.get("PATH") == os.environ.get("PATH")


@pytest.fixture
def secret_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {**SECRETS, **NAMED, **ALLOWED}.items():
        monkeypatch.setenv(name, value)
    yield


@pytest.mark.usefixtures("secret_environment")
async def test_a_subprocess_worker_gets_no_secret_and_the_named_variables() -> None:
    async with dspex_trio.open_worker(worker_env=list(NAMED)) as worker:
        assert_clean(proc_environ(worker.pid), named=True)
    async with dspex_trio.open_worker() as worker:
        assert_clean(proc_environ(worker.pid), named=False)


@requires_zygote
@pytest.mark.usefixtures("secret_environment")
async def test_the_zygote_template_and_its_workers_get_no_secret() -> None:
    async with open_zygote(worker_env=list(NAMED)) as template:
        assert_clean(proc_environ(template.pid), named=True)
        async with dspex_trio.open_worker(launcher=template) as worker:
            assert_clean(proc_environ(worker.pid), named=True)
            assert await worker.call("ping") is not None
    async with open_zygote() as template:
        assert_clean(proc_environ(template.pid), named=False)


@pytest.mark.parametrize("launcher", ["subprocess", pytest.param("zygote", marks=requires_zygote)])
@pytest.mark.usefixtures("secret_environment")
async def test_a_pools_workers_get_the_worker_env_option(launcher: str) -> None:
    async with dspex_trio.open_pool(workers=2, launcher=launcher, worker_env=list(NAMED)) as pool:
        stats = pool.statistics()
        assert stats.launcher == launcher
        assert len(stats.workers) == 2
        for worker in stats.workers:
            assert_clean(proc_environ(worker.pid), named=True)


@pytest.mark.usefixtures("secret_environment")
async def test_a_launcher_object_brings_its_own_worker_env() -> None:
    with pytest.raises(ValueError, match="pass it to the launcher you give"):
        async with dspex_trio.open_worker(launcher=SubprocessLauncher(), worker_env=["X"]):
            pass  # pragma: no cover
    async with dspex_trio.open_worker(launcher=SubprocessLauncher(worker_env=list(NAMED))) as worker:
        assert_clean(proc_environ(worker.pid), named=True)


@pytest.mark.usefixtures("secret_environment")
async def test_the_bridge_backend_takes_worker_env() -> None:
    async with dspex_trio.open_backend("bridge", worker_env=list(NAMED)) as bridge:
        assert await bridge.call("ping") is not None
        (worker,) = bridge.health().workers
        assert_clean(proc_environ(worker.pid), named=True)


@requires_zygote
@pytest.mark.usefixtures("secret_environment")
async def test_open_launcher_passes_worker_env_to_the_template() -> None:
    async with (
        open_launcher("zygote", worker_env=list(NAMED)) as launcher,
        dspex_trio.open_worker(launcher=launcher) as worker,
    ):
        assert_clean(proc_environ(worker.pid), named=True)
