"""Which LMs a websocket client may use: the operator's policy, applied to ``lm/configure`` and
``lm/select``.

The in-process Python API is the operator and keeps its full freedom. A websocket client is not: an LM
configuration is a URL the server's workers will connect to and a key they will send, so by default
(``client_lm="off"``) clients only choose, by name, among the LMs the operator configured (``lm/list``,
``lm/select``). The operator may open it:

- ``"allowlist"``: a client may configure an LM whose ``api_base`` starts with one of ``allow_lm_bases``
  (compared parsed: scheme, host, port, path segments), and must send its own ``api_key``;
- ``"any"``: any ``api_base`` (or the provider's default), except one that resolves to a loopback,
  private, link-local, multicast or otherwise non-public address, unless it is allow-listed explicitly.

Whatever the policy, a client's configuration is **hermetic** (the worker sends the key the client gave,
or none: never a key from an environment, a login file or the machine's cloud identity), bounded
(``num_retries``, ``timeout``, ``max_tokens`` capped by the operator), and, unless its base was
allow-listed, **public only** (the worker refuses, at connect time, to reach a non-public address: DNS
rebinding after the check gets nowhere). An ``admin`` connection may configure any LM (no mode, no
address check) and may change the pool's default; its configuration is hermetic too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import attrs

from dspex_trio._egress import base_allowed, check_lm_base
from dspex_trio._errors import InvalidParams

ClientLM = Literal["off", "allowlist", "any"]
CLIENT_LM_MODES: Final = ("off", "allowlist", "any")
CLIENT_LM_SETTINGS: Final = frozenset({"temperature", "max_tokens", "num_retries", "timeout"})
"""The ``dspy.LM`` settings a client may pass in ``lm/configure``'s ``settings``."""
OFFLINE: Final = "offline"
DEFAULT: Final = "default"


class LMPolicyRefused(InvalidParams):
    """The operator's client LM policy does not allow this configuration (``unauthorized`` over the
    websocket)."""


def _named_tuple(lms: Iterable[NamedLM]) -> tuple[NamedLM, ...]:
    return tuple(lms)


@attrs.frozen(kw_only=True)
class NamedLM:
    """An LM the operator offers to websocket clients by name (``lm/list``, ``lm/select``)."""

    model: str
    api_base: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    fallbacks: tuple[NamedLM, ...] = attrs.field(default=(), converter=_named_tuple)
    """The LMs tried next, in order, when this one fails with a provider failure (``5xx``, ``429``,
    timeout, connect error): see docs/lm.md, "Fallback". A client selects the chain by its name only."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NamedLM:
        """From ``{"model", "api_base"?, "api_key"?, "fallbacks"?: [config, ...], **settings}`` (as
        ``open_pool(lm=...)`` takes)."""
        rest = dict(config)
        try:
            model = rest.pop("model")
        except KeyError:
            raise ValueError("a named LM needs a 'model'") from None
        fallbacks = tuple(
            lm if isinstance(lm, NamedLM) else cls.from_config(lm) for lm in rest.pop("fallbacks", None) or ()
        )
        return cls(
            model=model,
            api_base=rest.pop("api_base", None),
            api_key=rest.pop("api_key", None),
            settings=rest,
            fallbacks=fallbacks,
        )

    def describe(self, name: str) -> dict[str, Any]:
        """What ``lm/list`` shows: never the key."""
        described: dict[str, Any] = {
            "name": name,
            "model": self.model,
            "api_base": self.api_base,
            "has_api_key": self.api_key is not None,
        }
        if self.fallbacks:
            described["fallbacks"] = [
                {"model": lm.model, "api_base": lm.api_base, "has_api_key": lm.api_key is not None}
                for lm in self.fallbacks
            ]
        return described

    def configure_kwargs(self) -> dict[str, Any]:
        """The keywords of ``Backend.configure_lm`` (besides ``session``)."""
        kwargs = {"model": self.model, "api_base": self.api_base, "api_key": self.api_key, **self.settings}
        if self.fallbacks:
            kwargs["fallbacks"] = [_without_none(lm.configure_kwargs()) for lm in self.fallbacks]
        return kwargs


def _without_none(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if v is not None}


def _cap(name: str, value: Any, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParams(f"settings.{name} must be a number")
    if not (math.isfinite(value) and 0 <= value <= maximum):
        raise LMPolicyRefused(
            f"settings.{name} must be between 0 and {maximum:g} on this server, not {value!r}"
        )


@attrs.frozen(kw_only=True)
class ClientLMPolicy:
    """The operator's rules for client-chosen LMs (see the module doc)."""

    mode: ClientLM = "off"
    allowed_bases: tuple[str, ...] = ()
    """``api_base`` prefixes clients may use (``allowlist``), and that ``any`` lets reach non-public
    addresses."""
    max_retries: int = 2
    """Largest ``num_retries`` a client may set."""
    max_timeout: float = 120.0
    """Largest ``timeout`` (s per LM request) a client may set."""
    max_tokens: int = 16_384
    """Largest ``max_tokens`` a client may set."""

    async def client_config(
        self,
        *,
        model: str,
        api_base: str | None,
        api_key: str | None,
        settings: Mapping[str, Any],
        admin: bool,
    ) -> dict[str, Any]:
        """The ``configure_lm`` keywords for a client's ``lm/configure``, or ``LMPolicyRefused`` /
        ``InvalidParams`` (``LMBaseRefused``) saying why not."""
        unknown = sorted(set(settings) - CLIENT_LM_SETTINGS)
        if unknown:
            raise InvalidParams(
                f"settings: unknown or not allowed: {', '.join(unknown)}; allowed: {', '.join(sorted(CLIENT_LM_SETTINGS))}"
            )
        if model == DEFAULT:
            raise InvalidParams(f"to use the server's default LM, call lm/select with name {DEFAULT!r}")
        if not admin:
            if self.mode == "off":
                raise LMPolicyRefused(
                    "this server does not let clients configure LMs: choose one of lm/list with lm/select "
                    "(the operator can allow it with --client-lm allowlist|any)"
                )
            for name, maximum in (
                ("num_retries", self.max_retries),
                ("timeout", self.max_timeout),
                ("max_tokens", self.max_tokens),
            ):
                if name in settings and settings[name] is not None:
                    _cap(name, settings[name], maximum)
        config: dict[str, Any] = {"model": model, "api_base": api_base, "api_key": api_key, **settings}
        if model == OFFLINE:
            if api_base is not None or api_key is not None:
                raise InvalidParams("the offline LM takes no api_base or api_key")
            return config
        config["hermetic"] = True
        if admin:
            return config
        listed = api_base is not None and base_allowed(api_base, self.allowed_bases)
        if self.mode == "allowlist":
            if not listed:
                raise LMPolicyRefused(
                    "api_base must start with one of the allowed LM bases on this server"
                    + (f": {', '.join(self.allowed_bases)}" if self.allowed_bases else " (none is set)")
                )
            if not api_key:
                raise LMPolicyRefused("send your own api_key: this server never lends its keys")
            return config
        if api_base is not None and not listed:
            await check_lm_base(api_base, allowed_prefixes=self.allowed_bases)
        if not listed:
            config["public_only"] = True
        return config


def describe_catalog(lms: Mapping[str, NamedLM]) -> list[dict[str, Any]]:
    """``lm/list``: the default and offline LMs, then the operator's named ones (no key ever)."""
    listed: list[dict[str, Any]] = [
        {"name": DEFAULT, "description": "the server's default LM (every session starts with it)"}
    ]
    if OFFLINE not in lms:
        listed.append({"name": OFFLINE, "model": OFFLINE, "api_base": None, "has_api_key": False})
    listed.extend(lm.describe(name) for name, lm in lms.items())
    return listed
