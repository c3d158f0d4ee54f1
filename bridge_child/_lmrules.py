"""LM configuration rules the worker and the host share, with no dspy: which providers a hermetic
(client-chosen) LM may use, and how secrets are kept out of error messages and descriptions.

The flags of an LM configuration (``LM_KEYS`` in ``bridge_child._programs``):

- ``"hermetic": true``: the LM may send no credential but the configuration's own ``api_key`` (or
  none): not an environment variable, not a stored login (Codex / Claude Code / xAI files in HOME),
  not the machine's cloud identity. Providers whose credential is the machine's or a login's
  (``azure``, and any ``provider:`` spelling lm15 routes to an OAuth or cloud door) are refused.
  The websocket layer sets it on every client-chosen configuration.
- ``"public_only": true``: the LM may connect to public addresses only, checked at connect time
  (DNS rebinding), see ``bridge_child._lmguard``.

Pure: importing this module imports neither trio nor dspy.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Final

HERMETIC_PROVIDERS: Final = frozenset(
    {
        "openai",
        "anthropic",
        "gemini",
        "groq",
        "openrouter",
        "deepseek",
        "xai",
        "ollama",
        "ollama_chat",
        "hosted_vllm",
        "moonshot",
    }
)
"""``provider/`` prefixes a hermetic configuration may use: lm15's key-based doors. Left out: ``azure``
(its credential chain is the machine's identity), and every other spelling (``claude-code:...``,
``openai-codex:...``, ``bedrock-...``: stored logins and cloud identities). The worker re-checks the
provider lm15 actually routes to when it builds the LM (``bridge_child._lmguard``)."""
NO_CREDENTIAL: Final = "dspex-hermetic-no-credential"
"""The stand-in key a hermetic LM configured without ``api_key`` is built with (lm15 refuses to build a
key-based door without one, and would otherwise look in the environment or a stored login): a public
constant, removed from every request before it is sent, so such an LM sends no credential at all."""
SECRET_NAME_SUFFIXES: Final = ("_API_KEY", "_TOKEN", "_SECRET", "_SECRET_KEY", "_PASSWORD", "_CREDENTIALS")
"""Environment variables named like this are secrets: their values are redacted from worker errors."""
MIN_REDACTED_CHARS: Final = 4
"""Shorter values are not redacted (replacing every ``a`` would say more than it hides)."""
REDACTED: Final = "***"


def hermetic_refusal(model: str) -> str | None:
    """Why a hermetic configuration may not use ``model``, or None if it may (a pure, early check of
    the ``provider/`` prefix; the worker checks the routed provider again when building the LM)."""
    head, slash, _rest = model.partition("/")
    if not slash or head not in HERMETIC_PROVIDERS:
        return (
            f"provider {head!r} is not available to a hermetic (client-chosen) LM: its credential would be "
            f"this machine's identity or a stored login; use one of {', '.join(sorted(HERMETIC_PROVIDERS))}"
        )
    return None


def public_url(url: str) -> str:
    """``url`` without the credentials it may carry (``user:password@``), for descriptions and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))


def _spellings(secret: str) -> set[str]:
    """The ways a secret shows up in a message: as is, JSON-escaped, URL-encoded."""
    return {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""), repr(secret)[1:-1]}


def secrets_of(config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values a worker error could carry: the configuration's ``api_key``, the password of
    its ``api_base`` (and those of its ``fallbacks``), and the values of secret-named variables of the
    worker's environment (an operator may pass keys with ``worker_env``). Longest first."""
    found: set[str] = set()
    config = config or {}
    fallbacks = config.get("fallbacks")  # a fallback chain's keys are secrets of its errors too
    for each in [config, *(f for f in fallbacks or () if isinstance(f, Mapping))]:
        key = each.get("api_key")
        if isinstance(key, str):
            found.add(key)
        base = each.get("api_base")
        if isinstance(base, str) and "@" in base:
            try:
                password = urllib.parse.urlsplit(base).password
            except ValueError:
                password = None
            if password:
                found.add(password)
    environ = os.environ if environ is None else environ
    found.update(v for k, v in environ.items() if k.upper().endswith(SECRET_NAME_SUFFIXES))
    spelled = {s for secret in found if len(secret) >= MIN_REDACTED_CHARS for s in _spellings(secret)}
    return sorted((s for s in spelled if len(s) >= MIN_REDACTED_CHARS), key=len, reverse=True)


_BEARER: Final = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}")
"""An ``Authorization: Bearer <token>`` echoed in a message: the token goes, whoever it belongs to."""


def redact(message: str, secrets: Iterable[str]) -> str:
    """``message`` with every secret (and any bearer token) replaced by ``***``."""
    for secret in secrets:
        if secret in message:
            message = message.replace(secret, REDACTED)
    return _BEARER.sub(r"\1" + REDACTED, message)
