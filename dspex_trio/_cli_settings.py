"""The settings of ``dspex-trio serve``: defaults < ``--config`` TOML file < ``DSPEX_*`` environment < flags.

Every field of :class:`ServeSettings` is a key of the config file (``-`` or ``_``), a ``DSPEX_<NAME>``
variable (lists comma-separated; ``lms`` only in the file) and a flag. Secrets (tokens, LM keys) are
read apart, by :func:`resolve_secrets`, from files and the environment, never from the config file.
docs/configuration.md lists them all; a test keeps that page and this module in step.
"""

from __future__ import annotations

import math
import secrets
import ssl
import tomllib
from collections.abc import Mapping
from typing import Any, Final

import attrs
import cattrs

from dspex_trio._lm_budgets import parse_lm_budget
from dspex_trio._lm_cache import parse_lm_cache

__all__ = [
    "DRAIN_GRACE_S",
    "ENV_PREFIX",
    "KEY_VARIABLES",
    "SETTING_NAMES",
    "CliError",
    "Secrets",
    "ServeSettings",
    "SettingsError",
    "lm_key_from_environment",
    "missing_key_warnings",
    "read_secret",
    "resolve_secrets",
    "resolve_settings",
    "server_ssl_context",
]

TOKEN_BYTES: Final = 32
"""Random bytes of a token made by ``--token auto``."""
DRAIN_GRACE_S: Final = 10.0
"""On SIGTERM or a first Ctrl-C, seconds running executions get to finish before they are cancelled."""
ENV_PREFIX: Final = "DSPEX_"
KEY_VARIABLES: Final = ("DSPEX_LM_API_KEY", "OPENAI_API_KEY")
"""Where the key of ``--lm`` comes from when no ``--lm-api-key-file`` is given, first set wins."""


class CliError(Exception):
    """An expected failure of a command: its message is the one line the user sees (cause, then fix)."""


class SettingsError(CliError, ValueError):
    """A setting (from the file, the environment or a flag) is invalid."""


@attrs.frozen(kw_only=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    workers: int = 2
    lm: str | None = None
    """None or "offline": the embedded offline LM."""
    lm_base_url: str | None = None
    lm_api_key_file: str | None = None
    token: str | None = attrs.field(default=None, repr=False)
    """A client token, or "auto" (one is made at start and printed once)."""
    token_file: str | None = None
    admin_token_file: str | None = None
    allowed_origins: tuple[str, ...] = ()
    client_lm: str = "off"
    allow_lm_bases: tuple[str, ...] = ()
    worker_env: tuple[str, ...] = ()
    programs: tuple[str, ...] = ()
    """The operator's program modules (``--programs``, repeatable; ``DSPEX_PROGRAMS``, comma-separated)."""
    async_capacity: int = 0
    """Executions with a network LM each worker runs on its asynchronous lane (``--async-capacity``)."""
    lm_budgets: tuple[str, ...] = ()
    """Pool-wide LM budgets, each ``MODEL[@BASE] [concurrent=N] [rpm=N] [tpm=N] [window=S]``
    (``--lm-budget``, repeatable; ``DSPEX_LM_BUDGETS``, comma-separated); any one makes workers lease."""
    lm_cache: str | None = None
    """The workers' LM answer cache, ``[entries=N] [dir=PATH] [disk_mb=N] [mode=MODE]`` or ``on``
    (``--lm-cache``, ``DSPEX_LM_CACHE``; docs/lm.md, "Cache"); None: off."""
    lms: dict[str, dict[str, Any]] = attrs.Factory(dict)
    """Named LMs clients may select (config file only): ``[lms.NAME]`` with ``model``, ``api_base``,
    ``api_key_env`` or ``api_key_file``, and ``dspy.LM`` settings."""
    diagnostics: bool = False
    drain_grace: float = DRAIN_GRACE_S
    certfile: str | None = None
    """PEM file of the server's certificate chain (and its key, unless ``keyfile``): serve ``wss://``."""
    keyfile: str | None = None
    ray: str | None = None
    """Run the workers on this Ray cluster ("auto", "HOST:PORT", "ray://HOST:PORT"): docs/scale-out.md."""
    ray_listen: str | None = None
    """``HOST:PORT`` the Ray nodes reach this server's worker listener on (default 127.0.0.1:0)."""
    ray_num_cpus: float | None = None
    """Ray CPUs reserved per worker (None: ``RayLauncher``'s default, 1)."""
    ray_num_gpus: float | None = None
    """Ray GPUs reserved per worker (None: 0)."""
    ray_resources: tuple[str, ...] = ()
    """Custom Ray resources reserved per worker, each ``NAME=QUANTITY`` (``dspex_trio._cli_ray``)."""
    ray_labels: tuple[str, ...] = ()
    """Node labels a worker's node must have, each ``KEY=VALUE`` (Ray's label selector syntax)."""
    http_port: int | None = None
    """Also serve ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard on this port (0: a free one)."""
    metrics_token_file: str | None = None
    """A file holding a scraper's own token: it opens ``/metrics`` only."""
    http_routes: bool = True
    """Answer the monitoring routes on the websocket's port (``--no-http-routes``: False)."""
    tracing: bool = False
    """OpenTelemetry traces, configured by the standard ``OTEL_*`` variables (docs/monitoring.md)."""
    log_format: str = "text"
    """Log lines as ``text`` or ``json`` objects (``dspex-trio --log-format json serve``)."""


attrs.resolve_types(ServeSettings)
SETTING_NAMES: Final = tuple(a.name for a in attrs.fields(ServeSettings))
_settings_converter = cattrs.Converter(forbid_extra_keys=True)


def _parse_env_value(name: str, raw: str) -> Any:
    field_type = attrs.fields_dict(ServeSettings)[name].type
    if field_type == tuple[str, ...]:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if field_type == dict[str, dict[str, Any]]:
        raise ValueError("set it in the config file")
    if field_type is int or field_type == int | None:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected a whole number, not {raw!r}") from None
    if field_type is float or field_type == float | None:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, not {raw!r}") from None
    if field_type is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean (1/0, true/false), not {raw!r}")
    return raw


def resolve_settings(
    *, file: str | None, environ: Mapping[str, str], flags: Mapping[str, Any]
) -> ServeSettings:
    """Merge the settings: defaults < TOML ``file`` < ``DSPEX_*`` environment < ``flags`` (None: unset).

    Raises:
        SettingsError: an unreadable file, an unknown key, or a value of the wrong type.
    """
    merged: dict[str, Any] = {}
    if file is not None:
        try:
            with open(file, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise SettingsError(f"config file {file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {file} is not valid TOML: {exc}") from None
        table = {key.replace("-", "_"): value for key, value in table.items()}
        unknown = sorted(set(table) - set(SETTING_NAMES))
        if unknown:
            raise SettingsError(
                f"config file {file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}"
            )
        merged.update(table)
    for name in SETTING_NAMES:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            try:
                merged[name] = _parse_env_value(name, raw)
            except ValueError as exc:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}: {exc}") from None
    merged.update({k: v for k, v in flags.items() if v is not None})
    try:
        settings = _settings_converter.structure(merged, ServeSettings)
    except Exception as exc:
        details = (
            "; ".join(cattrs.transform_error(exc)) if isinstance(exc, cattrs.BaseValidationError) else exc
        )
        raise SettingsError(f"invalid settings: {details}") from None
    if not 0 <= settings.port <= 65535:
        raise SettingsError(f"invalid settings: port must be 0-65535, not {settings.port}")
    if settings.workers < 1:
        raise SettingsError(f"invalid settings: workers must be >= 1, not {settings.workers}")
    if not (settings.drain_grace >= 0 and math.isfinite(settings.drain_grace)):
        raise SettingsError(f"invalid settings: drain_grace must be >= 0 s, not {settings.drain_grace}")
    if settings.client_lm not in ("off", "allowlist", "any"):
        raise SettingsError(
            f"invalid settings: client_lm must be off, allowlist or any, not {settings.client_lm!r}"
        )
    if settings.token is not None and settings.token_file is not None:
        raise SettingsError("invalid settings: give the token with token or token_file, not both")
    if settings.keyfile is not None and settings.certfile is None:
        raise SettingsError("invalid settings: keyfile needs certfile (the certificate it is the key of)")
    if settings.async_capacity < 0:
        raise SettingsError(f"invalid settings: async_capacity must be >= 0, not {settings.async_capacity}")
    if settings.http_port is not None and not 0 <= settings.http_port <= 65535:
        raise SettingsError(f"invalid settings: http_port must be 0-65535, not {settings.http_port}")
    if settings.log_format not in ("text", "json"):
        raise SettingsError(f"invalid settings: log_format must be text or json, not {settings.log_format!r}")
    for text in settings.lm_budgets:
        try:
            parse_lm_budget(text)
        except ValueError as exc:
            raise SettingsError(f"invalid settings: {exc}") from None
    if settings.lm_cache is not None:
        try:
            parse_lm_cache(settings.lm_cache)
        except ValueError as exc:
            raise SettingsError(f"invalid settings: lm_cache: {exc}") from None
    return settings


def server_ssl_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The TLS context of ``wss://`` (``certfile`` and ``keyfile``), or None for ``ws://``.

    Raises:
        SettingsError: a file that cannot be read, or that holds no certificate or key that match.
    """
    if settings.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except ssl.SSLError as exc:  # (an OSError too)
        raise SettingsError(
            f"certfile {settings.certfile}"
            + (f" / keyfile {settings.keyfile}" if settings.keyfile else "")
            + f": not a certificate chain and its private key in PEM ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        path = exc.filename or (settings.keyfile if settings.keyfile else settings.certfile)
        raise SettingsError(f"certfile/keyfile {path}: {exc.strerror or exc}") from None
    return context


def read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise SettingsError(f"{what} file {path}: {exc.strerror or exc}") from None
    if not secret:
        raise SettingsError(f"{what} file {path} is empty")
    return secret


@attrs.frozen
class Secrets:
    """The secrets ``serve`` needs, read from files and the environment (never shown)."""

    token: str | None = attrs.field(repr=False)
    admin_token: str | None = attrs.field(repr=False)
    lm_key: str | None = attrs.field(repr=False)
    lms: dict[str, dict[str, Any]] = attrs.field(repr=False)
    generated: bool = False
    """The client token was made here (``--token auto``): print it once."""


def resolve_secrets(settings: ServeSettings, environ: Mapping[str, str]) -> Secrets:
    """The tokens and LM keys of ``settings``. Raises ``SettingsError`` naming a missing or empty one."""
    token = settings.token
    generated = token == "auto"
    if generated:
        token = secrets.token_urlsafe(TOKEN_BYTES)
    elif settings.token_file is not None:
        token = read_secret(settings.token_file, "token")
    admin = read_secret(settings.admin_token_file, "admin token") if settings.admin_token_file else None
    if settings.lm_api_key_file is not None:
        lm_key: str | None = read_secret(settings.lm_api_key_file, "LM key")
    else:
        lm_key = lm_key_from_environment(environ)
    lms: dict[str, dict[str, Any]] = {}
    for name, table in settings.lms.items():
        config = dict(table)
        if "model" not in config:
            raise SettingsError(f"lms.{name}: 'model' is required")
        if "api_key" in config:
            raise SettingsError(
                f'lms.{name}: write no key in the config file: use api_key_env = "VAR" or api_key_file = "PATH"'
            )
        key_env, key_file = config.pop("api_key_env", None), config.pop("api_key_file", None)
        if key_env is not None:
            if key_env not in environ:
                raise SettingsError(
                    f"lms.{name}: the environment variable {key_env} (api_key_env) is not set"
                )
            config["api_key"] = environ[key_env]
        elif key_file is not None:
            config["api_key"] = read_secret(key_file, f"lms.{name} key")
        lms[name] = config
    return Secrets(token, admin, lm_key, resolve_fallbacks(lms), generated)


def resolve_fallbacks(lms: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``[lms.NAME]`` tables whose ``fallbacks = ["OTHER", ...]`` name other tables: each name replaced
    by that LM's configuration (with its key), in order. Raises ``SettingsError`` for an unknown name,
    a name that is not a string, or a fallback LM that has fallbacks of its own."""
    resolved = {}
    for name, config in lms.items():
        names = config.get("fallbacks")
        if names is None:
            resolved[name] = config
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SettingsError(f'lms.{name}: fallbacks must be a list of LM names, e.g. ["local"]')
        chain = []
        for other in names:
            if other not in lms or other == name:
                known = ", ".join(sorted(set(lms) - {name})) or "none"
                raise SettingsError(f"lms.{name}: fallbacks: no other LM named {other!r} (defined: {known})")
            if "fallbacks" in lms[other]:
                raise SettingsError(f"lms.{name}: fallbacks: lms.{other} has fallbacks of its own")
            chain.append(dict(lms[other]))
        resolved[name] = {**config, "fallbacks": chain}
    return resolved


def lm_key_from_environment(environ: Mapping[str, str]) -> str | None:
    """The key of ``--lm`` from the environment (``KEY_VARIABLES``, first set wins), or None."""
    for name in KEY_VARIABLES:
        if environ.get(name):
            return environ[name]
    return None


def missing_key_warnings(settings: ServeSettings, keys: Secrets) -> list[str]:
    """One line per provider LM of ``settings`` that has no key (its executions fail if it needs one),
    unless ``worker_env`` passes a key variable to the workers."""
    warnings = []
    # a key variable passed to the workers (--worker-env ANTHROPIC_API_KEY) is read there by the provider
    passed = any("KEY" in name.upper() or "TOKEN" in name.upper() for name in settings.worker_env)
    if settings.lm is not None and "/" in settings.lm and keys.lm_key is None and not passed:
        warnings.append(
            f"--lm {settings.lm} has no API key: set {' or '.join(KEY_VARIABLES)}, or --lm-api-key-file "
            "PATH (fine if its endpoint needs none); without one its executions fail"
        )
    for name, config in keys.lms.items():
        if config.get("model") != "offline" and not config.get("api_key"):
            warnings.append(
                f'lms.{name} ({config.get("model")}) has no API key: add api_key_env = "VAR" or '
                'api_key_file = "PATH" to its table (fine if its endpoint needs none)'
            )
    return warnings
