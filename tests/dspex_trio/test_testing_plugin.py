"""The pytest plugin (``dspex_trio.testing``), driven as a user would: sample test files run by an inner
pytest in a subprocess (``pytester.runpytest_subprocess``: trio and real processes are involved)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import pid_alive

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="starts real workers")

INI = """
[pytest]
trio_mode = true
addopts = -p no:cacheprovider
"""

SAMPLE = """
import pytest

BACKEND = {"mock": "mock", "bridge": "bridge", "full": "pool"}


async def test_backend_runs_a_program(dspex_backend, dspex_layer):
    pid = await dspex_backend.create_program("question -> answer", session="s")
    out = await dspex_backend.execute(pid, {"question": "What is Trio?"}, session="s")
    assert isinstance(out["answer"], str) and out["answer"]
    assert dspex_backend.name == BACKEND[dspex_layer]
    print(f"LAYER={dspex_layer} BACKEND={dspex_backend.name}")


async def test_fake_lm_serves_the_real_layers(dspex_backend, dspex_fake_lm, dspex_layer):
    await dspex_backend.configure_lm(
        "openai/fake", api_base=dspex_fake_lm.url, api_key="test-key", num_retries=0, session="s"
    )
    pid = await dspex_backend.create_program("question -> answer", session="s")
    out = await dspex_backend.execute(pid, {"question": "Why is the sky blue?"}, session="s")
    assert out["answer"]
    assert dspex_fake_lm.requests == (0 if dspex_layer == "mock" else 1)


async def test_websocket_client(dspex_ws_client):
    from dspex_trio.testing import RpcError

    client = dspex_ws_client
    assert await client.request("ping") == "pong"
    program = (await client.request("program/create", {"signature": "question -> answer"}))["program"]
    submitted = await client.request("execution/submit", {"program": program, "inputs": {"question": "q"}})
    events = []
    while not events or events[-1]["event"] not in ("completed", "failed", "cancelled"):
        events.append((await client.next_notification("execution/event"))["params"])
    assert events[0]["event"] == "started" and events[-1]["event"] == "completed", events
    assert {e["execution"] for e in events} == {submitted["execution"]}
    with pytest.raises(RpcError) as caught:
        await client.request("program/get", {"program": "p_nope"})
    assert caught.value.data["kind"] == "unknown_program"
"""


@pytest.fixture
def user_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for name in ("DSPEX_TEST_MODE", "DSPEX_TEST_REMOTE", "DSPEX_TEST_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    pytester.makeini(INI)
    return pytester


@pytest.mark.parametrize(
    ("layer", "how"),
    [("mock", "default"), ("bridge", "env"), ("full", "option")],
)
def test_a_user_suite_passes_on_each_layer(
    user_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, layer: str, how: str
) -> None:
    user_suite.makepyfile(test_sample=SAMPLE)
    args = ["-s"]
    if how == "env":
        monkeypatch.setenv("DSPEX_TEST_MODE", layer)
    elif how == "option":
        args.append(f"--dspex-mode={layer}")
    result = user_suite.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=3)
    backend = {"mock": "mock", "bridge": "bridge", "full": "pool"}[layer]
    result.stdout.fnmatch_lines([f"*LAYER={layer} BACKEND={backend}*"])


@pytest.mark.parametrize(("layer", "how"), [("mock", "env"), ("full", "option")])
def test_remote_mode_runs_a_user_suite_over_the_websocket(
    user_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, layer: str, how: str
) -> None:
    """The same sample suite, its backend a ``dspex_trio.connect`` client of the layer served on a
    loopback websocket (the fake LM configured through it, the websocket client on the same server)."""
    user_suite.makepyfile(
        test_sample=SAMPLE,
        test_remote="""
        import dspex_trio

        async def test_it_is_the_remote_client(dspex_backend):
            assert isinstance(dspex_backend, dspex_trio.RemoteBackend)
        """,
    )
    args = ["-s", f"--dspex-mode={layer}"]
    if how == "env":
        monkeypatch.setenv("DSPEX_TEST_REMOTE", "1")
    else:
        args.append("--dspex-remote")
    result = user_suite.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=4)
    backend = {"mock": "mock", "full": "pool"}[layer]
    result.stdout.fnmatch_lines([f"*LAYER={layer} BACKEND={backend}*"])


def test_remote_mode_runs_a_user_suite_against_a_served_endpoint(
    user_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("t0ken-for-tests")
    command = [sys.executable, "-m", "dspex_trio", "serve", "--port", "0", "--workers", "1"]
    with subprocess.Popen(
        [*command, "--admin-token-file", str(token_file)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as server:
        try:
            assert server.stdout is not None
            url = server.stdout.readline().decode().split()[2]
            user_suite.makepyfile(
                test_remote="""
                async def test_against_the_endpoint(dspex_backend, dspex_layer, dspex_fake_lm):
                    assert dspex_layer == "remote" and dspex_backend.name == "pool"
                    await dspex_backend.configure_lm(
                        "openai/fake", api_base=dspex_fake_lm.url, api_key="k", num_retries=0, session="s"
                    )
                    pid = await dspex_backend.create_program("question -> answer", session="s")
                    assert (await dspex_backend.execute(pid, {"question": "q"}, session="s"))["answer"]
                    assert dspex_fake_lm.requests == 1  # the served workers called this test's fake LM
                """
            )
            monkeypatch.setenv("DSPEX_TEST_REMOTE", url)
            monkeypatch.setenv("DSPEX_TEST_TOKEN", "t0ken-for-tests")
            result = user_suite.runpytest_subprocess("-m", "not real_processes", timeout=60)
            result.assert_outcomes(passed=1)  # it starts nothing itself: in the fast part
            monkeypatch.setenv("DSPEX_TEST_TOKEN", "wrong")
            result = user_suite.runpytest_subprocess(timeout=60)
            result.assert_outcomes(failed=1)  # pytest-trio sets fixtures up inside the test
            result.stdout.fnmatch_lines(["*HandshakeRefused*HTTP 401*"])
        finally:
            server.kill()


def test_an_unknown_remote_mode_is_a_usage_error(
    user_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_suite.makepyfile("async def test_it(dspex_backend): ...")
    monkeypatch.setenv("DSPEX_TEST_REMOTE", "http://example.com")
    result = user_suite.runpytest_subprocess(timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*DSPEX_TEST_REMOTE*'http://example.com' is not a remote mode*"])


def test_real_processes_marker_selects_the_fast_part(user_suite: pytest.Pytester) -> None:
    user_suite.makepyfile(
        test_marks="""
        import pytest

        async def test_mock(dspex_backend):
            assert dspex_backend.name == "mock"

        @pytest.mark.dspex_layer("bridge")
        async def test_bridge(dspex_backend): ...

        @pytest.mark.parametrize("dspex_backend", ["full"], indirect=True)
        async def test_full(dspex_backend): ...

        async def test_pool(dspex_pool): ...
        """
    )
    result = user_suite.runpytest_subprocess("-m", "not real_processes", timeout=60)
    result.assert_outcomes(passed=1, deselected=3)


@pytest.mark.parametrize("where", ["option", "env", "marker", "parameter"])
def test_an_unknown_layer_is_a_usage_error_naming_the_allowed_values(
    user_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    decoration = {
        "marker": '@pytest.mark.dspex_layer("cloud")',
        "parameter": '@pytest.mark.parametrize("dspex_backend", ["cloud"], indirect=True)',
    }.get(where, "")
    user_suite.makepyfile(
        f"""
        import pytest

        {decoration}
        async def test_it(dspex_backend): ...
        """
    )
    args = ["--dspex-mode=cloud"] if where == "option" else []
    if where == "env":
        monkeypatch.setenv("DSPEX_TEST_MODE", "cloud")
    result = user_suite.runpytest_subprocess(*args, timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    source = {"option": "--dspex-mode", "env": "DSPEX_TEST_MODE", "marker": "@pytest.mark.dspex_layer"}
    result.stderr.fnmatch_lines(
        [
            f"*{source.get(where, 'dspex_backend parameter')}*unknown dspex test layer 'cloud'; "
            "the allowed values are mock, bridge, full*"
        ]
    )


def test_a_leaked_process_is_reported_and_killed(user_suite: pytest.Pytester) -> None:
    user_suite.makepyfile(
        """
        import os
        import subprocess

        async def test_leaks_a_process(dspex_backend):
            subprocess.Popen(["sleep", "30"])

        async def test_next_one_is_clean(dspex_backend):
            pass

        async def test_leaks_a_pipe(dspex_backend):
            global PIPE
            PIPE = os.pipe()
        """
    )
    result = user_suite.runpytest_subprocess(timeout=60)
    result.assert_outcomes(passed=3, errors=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_process*",
            "*1 child process(es) started by this test still ran*(killed now): pid * sleep 30*",
            "*test_leaks_a_pipe*",
            "*DspexLeakWarning: dspex_trio: still open after the test's teardown: fd * -> pipe:*",
        ]
    )
    match = re.search(r"pid (\d+): sleep 30", result.stdout.str())
    assert match is not None
    assert not pid_alive(int(match[1]))


def test_markers_and_parameters_override_the_environment_read_at_test_time(
    user_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPEX_TEST_MODE", "mock")
    user_suite.makepyfile(
        """
        import pytest

        async def test_env(dspex_backend, dspex_layer):
            assert dspex_layer == "mock" and dspex_backend.name == "mock"

        @pytest.mark.dspex_layer("bridge")
        async def test_marker_beats_env(dspex_backend, dspex_layer):
            assert dspex_layer == "bridge" and dspex_backend.name == "bridge"

        @pytest.mark.dspex_layer("bridge")
        @pytest.mark.parametrize("dspex_backend", ["mock"], indirect=True)
        async def test_parameter_beats_marker(dspex_backend, dspex_layer):
            assert dspex_layer == "mock" and dspex_backend.name == "mock"

        @pytest.fixture
        def switch_to_bridge(monkeypatch):
            monkeypatch.setenv("DSPEX_TEST_MODE", "bridge")

        async def test_env_is_read_when_the_test_runs(switch_to_bridge, dspex_backend):
            assert dspex_backend.name == "bridge"
        """
    )
    result = user_suite.runpytest_subprocess(timeout=60)
    result.assert_outcomes(passed=4)

    result = user_suite.runpytest_subprocess("--dspex-mode=mock", "-k", "env_is_read", timeout=60)
    result.assert_outcomes(failed=1)  # the option beats the environment: still mock


def test_a_layer_without_dspy_is_skipped_saying_what_to_install(user_suite: pytest.Pytester) -> None:
    user_suite.makeconftest("import sys\nsys.modules['dspy'] = None  # as if dspy were not installed\n")
    user_suite.makepyfile(
        """
        import pytest

        @pytest.mark.dspex_layer("bridge")
        async def test_bridge(dspex_backend): ...

        async def test_pool(dspex_pool): ...

        async def test_mock_needs_no_dspy(dspex_backend):
            assert dspex_backend.name == "mock"
        """
    )
    result = user_suite.runpytest_subprocess("-rs", timeout=60)
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*install dspy==3.4.1 (pip install dspex-trio)*"])


def test_the_package_exports_every_hook_and_fixture_of_the_plugin() -> None:
    """pytest registers the package ``dspex_trio.testing`` (the entry point) and finds the plugin's
    hooks and fixtures on it by name: each must be re-exported from ``_plugin``, the private ones too."""
    from dspex_trio import testing
    from dspex_trio.testing import _plugin

    names = {n for n in vars(_plugin) if n.startswith(("pytest_", "dspex_", "_dspex_"))} | set(
        _plugin.__all__
    )
    assert {"pytest_configure", "dspex_backend", "dspex_fake_lm", "_dspex_no_leaks", "RpcError"} <= names
    missing = sorted(n for n in names if getattr(testing, n, None) is not getattr(_plugin, n))
    assert not missing, f"not re-exported by dspex_trio.testing: {missing}"


def test_the_fake_lm_and_its_command_need_no_pytest() -> None:
    code = (
        "import sys\n"
        "sys.modules['pytest'] = None  # importing pytest now fails\n"
        "from dspex_trio.testing import FakeLMConfig, open_fake_lm, serve_fake_lm\n"
        "from dspex_trio._cli import main\n"
        "assert 'dspex_trio.testing._plugin' not in sys.modules\n"
        "sys.exit(main(['fake-lm', '--help']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: dspex-trio fake-lm" in result.stdout


WARM_SAMPLE = """
import os

import pytest

from tests_helpers import parent_of

PIDS = []


@pytest.mark.parametrize("n", range(3))
async def test_pool(dspex_pool, n):
    assert await dspex_pool.call("ping") is not None
    pids = [w.pid for w in dspex_pool.statistics().workers]
    print(f"POOL {n} launcher={dspex_pool.statistics().launcher} parents={sorted({parent_of(p) for p in pids})}"
          f" workers={sorted(pids)} me={os.getpid()}")


@pytest.mark.parametrize("dspex_backend", ["bridge", "full"], indirect=True)
async def test_backend(dspex_backend, dspex_layer):
    pid = await dspex_backend.create_program("question -> answer", session="s")
    assert (await dspex_backend.execute(pid, {"question": "q"}, session="s"))["answer"]
"""

PARENT_OF = """
def parent_of(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])
"""


@pytest.mark.parametrize("cold", [False, True])
def test_one_warm_template_serves_every_test_of_the_run_with_fresh_workers(
    user_suite: pytest.Pytester, cold: bool
) -> None:
    """Warm (the default): every test's pool forks fresh workers from one template, a child of the
    test process that outlives the tests and ends with the session. ``--dspex-cold``: each pool its
    own."""
    user_suite.makepyfile(test_warm=WARM_SAMPLE, tests_helpers=PARENT_OF)
    args = ["-s", "-p", "no:randomly"] + (["--dspex-cold"] if cold else [])
    result = user_suite.runpytest_subprocess(*args, timeout=180)
    result.assert_outcomes(passed=5)
    lines = re.findall(
        r"POOL (\d) launcher=(\w+) parents=\[([\d, ]+)\] workers=\[([\d, ]+)\] me=(\d+)", result.stdout.str()
    )
    assert len(lines) == 3, result.stdout.str()
    parents = [set(map(int, p.split(","))) for _, _, p, _, _ in lines]
    workers = [set(map(int, w.split(","))) for _, _, _, w, _ in lines]
    me = int(lines[0][4])
    assert all(launcher == "zygote" for _, launcher, _, _, _ in lines)
    assert (
        all(len(w) == 2 for w in workers) and not (workers[0] & workers[1]) and not (workers[1] & workers[2])
    )
    if cold:  # each pool forked from a template of its own
        assert len(set().union(*parents)) == 3
    else:  # one template for all, a child of the test process
        assert len(set().union(*parents)) == 1
        (template,) = parents[0]
        assert template != me and not pid_alive(template)  # ended with the session
