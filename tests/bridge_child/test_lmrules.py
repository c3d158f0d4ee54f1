"""LM configuration rules without a worker: the hermetic flags, provider refusals, redaction, and the
guard's check of each outgoing request."""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from typing import Any

import pytest

from bridge_child._context import MethodError
from bridge_child._lmrules import NO_CREDENTIAL, hermetic_refusal, public_url, redact, secrets_of
from bridge_child.spec import check_lm_config, describe_lm

SECRET = "sk-a-recognisable-secret-0042"


def test_the_flags_are_booleans_and_false_is_the_default() -> None:
    config = check_lm_config({"model": "openai/x", "hermetic": True, "public_only": True})
    assert config == {"model": "openai/x", "hermetic": True, "public_only": True}
    assert check_lm_config({"model": "openai/x", "hermetic": False, "public_only": False}) == {
        "model": "openai/x"
    }
    for bad in ("yes", 1, None):
        with pytest.raises(MethodError, match="'hermetic' has the wrong type"):
            check_lm_config({"model": "openai/x", "hermetic": bad})
    with pytest.raises(MethodError, match="'max_tokens' has the wrong type"):
        check_lm_config({"model": "openai/x", "max_tokens": True})  # other keys still refuse booleans


@pytest.mark.parametrize(
    "model", ["openai/gpt-4o-mini", "anthropic/claude", "xai/grok", "hosted_vllm/m", "ollama_chat/llama"]
)
def test_key_based_providers_may_be_hermetic(model: str) -> None:
    assert hermetic_refusal(model) is None
    assert check_lm_config({"model": model, "hermetic": True})["hermetic"] is True


@pytest.mark.parametrize(
    "model",
    [
        "azure/gpt-4o",
        "bedrock/claude",
        "vertex_ai/gemini",
        "claude-code:sonnet/x",
        "openai-codex:gpt/5",
        "x/y",
    ],
)
def test_identity_and_login_providers_are_refused_when_hermetic(model: str) -> None:
    head = model.partition("/")[0]
    with pytest.raises(MethodError, match=f"provider {head!r} is not available to a hermetic") as refused:
        check_lm_config({"model": model, "hermetic": True})
    assert refused.value.type == "InvalidParams"
    assert check_lm_config({"model": model})["model"] == model  # an operator may use them
    assert check_lm_config({"model": "offline", "hermetic": True})["model"] == "offline"


def test_descriptions_hide_keys_and_url_credentials() -> None:
    described = describe_lm(
        {"model": "openai/x", "api_key": SECRET, "api_base": f"https://user:{SECRET}@llm.example/v1"}
    )
    assert described == {"model": "openai/x", "api_base": "https://***@llm.example/v1", "has_api_key": True}
    assert public_url("http://llm.example:8000/v1") == "http://llm.example:8000/v1"


def test_redaction_covers_every_spelling_of_every_secret() -> None:
    config = {"api_key": SECRET, "api_base": "http://u:base-password-77@x.example/"}
    environ = {"MY_SERVICE_TOKEN": "env-token-value-1234", "PATH": "/usr/bin", "SHORT_API_KEY": "abc"}
    secrets = secrets_of(config, environ)
    message = " | ".join(
        [
            SECRET,
            json.dumps({"key": SECRET + '"quoted'})[8:],
            urllib.parse.quote(SECRET + "/+"),
            "base-password-77",
            "env-token-value-1234",
            "Authorization: Bearer someone-elses-token-999",
            "/usr/bin abc",
        ]
    )
    cleaned = redact(message, secrets)
    for secret in (SECRET, "base-password-77", "env-token-value-1234", "someone-elses-token-999"):
        assert secret not in cleaned
    assert "/usr/bin abc" in cleaned  # not secrets: PATH is not secret-named, 3 characters are too short


# -- the guard's check of outgoing requests (imports dspy; no network) ------------------------------


def request(headers: list[tuple[str, str]], url: str = "http://llm.example/v1/chat/completions") -> Any:
    from bridge_child._lmguard import TransportRequest

    return TransportRequest(method="POST", url=url, headers=headers, body=b"{}")


def guard(**kwargs: Any) -> Any:
    from bridge_child._lmguard import LMGuard

    base: dict[str, Any] = {
        "provider": "openai-chat",
        "hermetic": True,
        "public_only": False,
        "api_key": None,
        "api_base": None,
    }
    return LMGuard(**{**base, **kwargs})


def test_a_keyless_hermetic_request_leaves_without_the_stand_in() -> None:
    sent = guard().outgoing(
        request(
            [("Authorization", f"Bearer {NO_CREDENTIAL}"), ("content-type", "application/json")],
            url=f"http://llm.example/v1/x?key={NO_CREDENTIAL}&alt=sse",
        )
    )
    assert sent.headers == [("content-type", "application/json")]
    assert NO_CREDENTIAL not in sent.url and "alt=sse" in sent.url


def test_a_hermetic_request_carries_its_own_key_or_is_refused() -> None:
    from bridge_child._lmguard import CredentialRefused

    own = guard(api_key="own-key-1")
    assert own.outgoing(request([("Authorization", "Bearer own-key-1")])).headers == [
        ("Authorization", "Bearer own-key-1")
    ]
    assert own.outgoing(request([("x-api-key", "own-key-1")])).headers == [("x-api-key", "own-key-1")]
    for foreign in [("Authorization", f"Bearer {SECRET}"), ("x-api-key", SECRET), ("X-Goog-Api-Key", SECRET)]:
        with pytest.raises(CredentialRefused, match="did not give"):
            own.outgoing(request([foreign]))
        with pytest.raises(CredentialRefused):
            guard().outgoing(request([foreign]))
    # an operator's guard (public_only only) does not touch credentials
    operator = guard(hermetic=False, public_only=True)
    assert operator.outgoing(request([("Authorization", f"Bearer {SECRET}")])).headers == [
        ("Authorization", f"Bearer {SECRET}")
    ]


def test_a_hermetic_router_config_reads_no_environment() -> None:
    from dspy.lm15 import RouterConfig

    dspy_config = RouterConfig(api_keys=None, base_urls={"openai-chat": "http://elsewhere/"})
    hardened = guard(api_base="http://llm.example/v1").router_config(dspy_config)
    assert hardened.env == {}
    assert hardened.api_keys == {"openai-chat": NO_CREDENTIAL}
    assert hardened.base_urls == {"openai-chat": "http://llm.example/v1"}
    assert guard(api_key="k").router_config(dspy_config).api_keys == {"openai-chat": "k"}
    # An operator's LM keeps DSPy's config, with room for the asynchronous lane's connections.
    from bridge_child._lmguard import MAX_LM_CONNECTIONS

    operator = guard(hermetic=False).router_config(dspy_config)
    assert operator == dataclasses.replace(dspy_config, max_connections=MAX_LM_CONNECTIONS)
    assert hardened.max_connections == MAX_LM_CONNECTIONS
    sized = dataclasses.replace(dspy_config, max_connections=7)
    assert guard(hermetic=False).router_config(sized) is sized  # a size given is kept


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        (("127.0.0.1", 80), "loopback"),
        (("::1", 80, 0, 0), "loopback"),
        (("169.254.169.254", 80), "link-local"),
        (("::ffff:10.0.0.1", 443, 0, 0), "private"),
        (("localhost", 80), "a name"),
        ("/run/socket", "not an internet address"),
        (("93.184.216.34", 443), None),
        (("2606:4700:4700::1111", 443, 0, 0), None),
    ],
)
def test_the_connect_guard_checks_the_address_connected_to(address: Any, refused: str | None) -> None:
    from bridge_child._lmguard import _connect_refusal

    reason = _connect_refusal(address)
    assert (reason is None) if refused is None else (reason is not None and refused in reason)
