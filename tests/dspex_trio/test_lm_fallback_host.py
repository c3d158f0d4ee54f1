"""Model fallback on the host, in process: an operator's named LM (``NamedLM``, ``[lms.NAME]`` tables)
names a chain that clients select by name only; a worker's ``AllLMsFailed`` becomes the typed
:class:`dspex_trio.AllLMsFailed`, and a websocket client's ``failed`` data lists every LM tried.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import dspex_trio
from bridge_child import wire
from dspex_trio._cli import _configure_default_lm
from dspex_trio._cli_settings import ServeSettings, SettingsError, resolve_fallbacks
from dspex_trio._client_lm import describe_catalog
from dspex_trio._client_protocol import error_from_failure_untrusted
from dspex_trio._errors import error_from_frame
from dspex_trio._ws_errors import failure


def test_a_named_lm_names_a_chain_whose_keys_it_never_shows() -> None:
    named = dspex_trio.NamedLM.from_config(
        {
            "model": "openai/a",
            "api_key": "sk-a",
            "temperature": 0.0,
            "fallbacks": [
                {"model": "openai/b", "api_base": "http://h/v1", "api_key": "sk-b"},
                {"model": "openai/c"},
            ],
        }
    )
    assert [lm.model for lm in named.fallbacks] == ["openai/b", "openai/c"]
    kwargs = named.configure_kwargs()
    assert kwargs["fallbacks"] == [
        {"model": "openai/b", "api_base": "http://h/v1", "api_key": "sk-b"},
        {"model": "openai/c"},
    ]
    assert kwargs["model"] == "openai/a" and kwargs["temperature"] == 0.0
    [_default, _offline, listed] = describe_catalog({"chain": named})
    assert listed["fallbacks"] == [
        {"model": "openai/b", "api_base": "http://h/v1", "has_api_key": True},
        {"model": "openai/c", "api_base": None, "has_api_key": False},
    ]
    assert "sk-" not in json.dumps(listed)
    assert "fallbacks" not in dspex_trio.NamedLM(model="openai/a").configure_kwargs()


def test_config_file_tables_name_their_fallbacks_by_table_name() -> None:
    lms = {
        "fast": {"model": "openai/a", "api_key": "sk-a", "fallbacks": ["local", "other"]},
        "local": {"model": "openai/b", "api_base": "http://127.0.0.1:8000/v1"},
        "other": {"model": "openai/c", "api_key": "sk-c"},
    }
    resolved = resolve_fallbacks(lms)
    assert resolved["fast"]["fallbacks"] == [lms["local"], lms["other"]]  # in the order written
    assert resolved["local"] == lms["local"]


@pytest.mark.parametrize(
    ("fallbacks", "says"),
    [
        (["nope"], "no other LM named 'nope'"),
        (["fast"], "no other LM named 'fast'"),
        ("local", "a list of LM names"),
    ],
)
def test_a_bad_fallback_name_is_a_settings_error(fallbacks: object, says: str) -> None:
    lms = {"fast": {"model": "openai/a", "fallbacks": fallbacks}, "local": {"model": "openai/b"}}
    with pytest.raises(SettingsError, match=says):
        resolve_fallbacks(lms)


def test_a_fallback_with_fallbacks_of_its_own_is_a_settings_error() -> None:
    lms = {
        "a": {"model": "openai/a", "fallbacks": ["b"]},
        "b": {"model": "openai/b", "fallbacks": ["c"]},
        "c": {"model": "openai/c"},
    }
    with pytest.raises(SettingsError, match=r"lms\.b has fallbacks of its own"):
        resolve_fallbacks(lms)


def test_the_workers_all_failed_error_is_typed_on_the_host_and_for_clients() -> None:
    tried = [
        {"lm": "openai/a @ http://h:1/v1", "error": "LMServerError"},
        {"lm": "openai/b", "error": "LMTimeoutError"},
    ]
    frame = wire.Error(
        id=1,
        code=wire.ErrorCode.PROGRAM_ERROR,
        type="AllLMsFailed",
        message="every LM of the fallback chain failed (2 tried): ...",
        details={"tried": tried},
    )
    error = error_from_frame(frame, acked=True, worker="worker-1")
    assert isinstance(error, dspex_trio.AllLMsFailed) and isinstance(error, dspex_trio.ProgramError)
    assert error.tried == tried and error.error_type == "AllLMsFailed"
    data = failure(error)
    assert data["type"] == "AllLMsFailed" and data["tried"] == tried
    other = error_from_frame(
        wire.Error(id=2, code=wire.ErrorCode.PROGRAM_ERROR, type="LMServerError", message="x"),
        acked=True,
        worker="worker-1",
    )
    assert type(other) is dspex_trio.ProgramError and "tried" not in failure(other)


def test_the_remote_client_raises_the_typed_error_from_a_failed_event() -> None:
    data = {
        "type": "AllLMsFailed",
        "error": "AllLMsFailed",
        "message": "AllLMsFailed: every LM of the fallback chain failed (2 tried): ...",
        "tried": [{"lm": "openai/a", "error": "LMServerError"}, "junk", {"lm": 3}],
    }
    error = error_from_failure_untrusted(data)
    assert isinstance(error, dspex_trio.AllLMsFailed)
    assert error.tried == [{"lm": "openai/a", "error": "LMServerError"}, {"lm": "", "error": ""}]
    assert str(error).count("AllLMsFailed:") == 1


class RecordingPool:
    def __init__(self) -> None:
        self.configured: list[dict[str, Any]] = []

    async def configure_lm(self, model: str, **kwargs: Any) -> None:
        self.configured.append({"model": model, **kwargs})


async def test_serve_lm_name_makes_a_named_chain_the_default() -> None:
    lms = resolve_fallbacks(
        {
            "resilient": {"model": "openai/a", "api_key": "sk-a", "fallbacks": ["local"]},
            "local": {"model": "openai/b", "api_base": "http://127.0.0.1:8000/v1"},
        }
    )
    pool = RecordingPool()
    await _configure_default_lm(pool, ServeSettings(lm="resilient"), None, lms)  # type: ignore[arg-type]
    assert pool.configured == [
        {
            "model": "openai/a",
            "api_base": None,
            "api_key": "sk-a",
            "fallbacks": [{"model": "openai/b", "api_base": "http://127.0.0.1:8000/v1"}],
        }
    ]
    with pytest.raises(SettingsError, match="--lm-base-url"):
        await _configure_default_lm(
            pool,  # type: ignore[arg-type]
            ServeSettings(lm="resilient", lm_base_url="http://x/v1"),
            None,
            lms,
        )
