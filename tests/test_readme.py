"""The README's Python snippets run as pasted: each in a fresh interpreter, outside the repository, with
no LM key in its environment (the offline LM answers), real time, bounded."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Final

import pytest
import trio

README: Final = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_TIMEOUT_S: Final = 120.0
"""Bound on one snippet (it starts a pool), in s."""
SNIPPETS: Final = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i + 1}" for i in range(len(SNIPPETS))])
async def test_a_readme_snippet_runs_as_pasted(code: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "DSPEX_LM_API_KEY")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_OFFLINE_MODE="true")
    with trio.fail_after(SNIPPET_TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.strip(), "the snippet printed nothing"
