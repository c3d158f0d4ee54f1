"""``dspex-trio serve`` with the operator's program modules: ``--programs`` (repeatable),
``DSPEX_PROGRAMS`` (comma-separated) and ``programs`` in the config file; a module that cannot be used
stops ``serve`` with one error naming it."""

from __future__ import annotations

import os
import sys

import trio

from dspex_trio._cli_settings import resolve_settings

CLI = [sys.executable, "-m", "dspex_trio"]


def test_programs_come_from_the_file_the_environment_or_the_flags(tmp_path):
    assert resolve_settings(file=None, environ={}, flags={}).programs == ()
    config = tmp_path / "dspex.toml"
    config.write_text('programs = ["myapp.from_file"]\n')
    assert resolve_settings(file=str(config), environ={}, flags={}).programs == ("myapp.from_file",)
    env = {"DSPEX_PROGRAMS": "myapp.programs, other.tools"}
    assert resolve_settings(file=str(config), environ=env, flags={}).programs == (
        "myapp.programs",
        "other.tools",
    )
    flags = {"programs": ["a.b", "c"]}  # --programs a.b --programs c
    assert resolve_settings(file=str(config), environ=env, flags=flags).programs == ("a.b", "c")


async def test_serve_stops_with_one_error_naming_a_module_that_cannot_be_used():
    result = await trio.run_process(
        [*CLI, "serve", "--port", "0", "--programs", "tests.bad_programs.import_error"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "DSPEX_PROGRAMS": ""},
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [
        "dspex-trio serve: error: program module 'tests.bad_programs.import_error': cannot import it: "
        "ModuleNotFoundError: No module named 'no_such_dependency_anywhere' (at import_error.py:3)"
    ]
