"""Where a client-chosen LM base URL may point (SSRF rules), checked when the LM is configured.

A websocket client may choose an LM and its ``api_base``. Left unchecked, that turns a worker into a
proxy into the server's own network: ``http://169.254.169.254/`` (cloud instance metadata), a
database's admin port on ``10.x``, a service on ``127.0.0.1``. Two functions decide:

- :func:`base_allowed`: does the URL fall under one of the operator's allowed prefixes? Compared
  parsed and normalised (scheme, lower-case host, explicit or default port, path prefix on a segment
  boundary), never as strings: ``http://a.example/v1`` admits ``http://A.example:80/v1/chat`` but
  neither ``http://a.example.evil.com/`` nor ``http://a.example/v10``.
- :func:`check_lm_base`: raises :class:`LMBaseRefused` unless the URL is ``http(s)``, carries no
  credentials (userinfo), and either matches an allowed prefix or every address its host resolves to
  is public (``bridge_child.netaddr.address_class``: no loopback, private, link-local, multicast,
  reserved, unspecified or shared address, in any spelling: ``http://0x7f.1/``, ``http://[::ffff:
  127.0.0.1]/``, a name that resolves to ``127.0.0.1``).

This check runs once, in the host. DNS may answer differently when the worker connects (DNS
rebinding), so a configuration whose base was admitted by resolution rather than by an allowed
prefix is sent to the workers with ``"public_only": true``: the worker then refuses, at connect time,
any connection of that LM to a non-public address (``bridge_child._lmguard``). See docs/security.md.

The parsing and matching are pure; only :func:`check_lm_base` does I/O (name resolution).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

import attrs
import trio

from bridge_child.netaddr import address_class, parse_ip_host
from dspex_trio._errors import InvalidParams

SCHEMES: Final = ("http", "https")
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
MAX_URL_CHARS: Final = 2048
"""Longest base URL considered, in characters."""
RESOLVE_TIMEOUT_S: Final = 10.0
"""How long name resolution of a base's host may take, in seconds; past it the base is refused."""
MAX_SHOWN_CHARS: Final = 200
"""A refused URL is quoted in the error up to this many characters."""

Resolver = Callable[[str, int], Awaitable[Iterable[str]]]
"""``resolve(host, port)`` -> the IP addresses (text) the host resolves to; raises ``OSError`` if it
cannot be resolved."""

_FORBIDDEN_CHARS: Final = re.compile(r"[\x00-\x20\x7f\\]")
"""Control characters, space and backslash: parsers disagree about them (the classic way to make a
check and a client see different hosts), so a URL holding one is refused outright."""
_ENCODED_SEPARATOR: Final = re.compile(r"%(2f|5c)", re.IGNORECASE)
_HOST_CHARS: Final = re.compile(r"[a-z0-9._-]+")


class LMBaseRefused(InvalidParams):
    """A client-chosen LM base URL may not be used; the message says why (its scheme, credentials in
    it, or the class of an address its host is or resolves to)."""


@attrs.frozen
class BaseURL:
    """A base URL, parsed and normalised for comparison."""

    scheme: str
    """``http`` or ``https``."""
    host: str
    """Lower case, IDNA-encoded, no trailing dot; an address literal in its canonical text
    (``127.0.0.1`` for ``0x7f.1``, compressed IPv6 without brackets)."""
    port: int
    """Explicit, or the scheme's default."""
    path: str
    """Without a trailing slash (``""`` for the root)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    """The address, when the host is an address literal."""


def _shown(url: str) -> str:
    return repr(url if len(url) <= MAX_SHOWN_CHARS else url[:MAX_SHOWN_CHARS] + "...")


def _refuse(url: str, why: str) -> LMBaseRefused:
    return LMBaseRefused(f"LM base {_shown(url)} refused: {why}")


def _split_netloc(netloc: str, url: str) -> tuple[str, str | None]:
    """(host, port text or None); an IPv6 host keeps its brackets."""
    if netloc.startswith("["):
        end = netloc.find("]")
        rest = netloc[end + 1 :] if end > 0 else ""
        if end < 0 or (rest and not rest.startswith(":")):
            raise _refuse(url, "its IPv6 address is malformed")
        return netloc[: end + 1], (rest[1:] if rest else None)
    host, colon, port = netloc.partition(":")
    if ":" in port:
        raise _refuse(url, "its host is malformed (an IPv6 address needs brackets)")
    return host, (port if colon else None)


def _normal_host(raw: str, url: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    if raw.startswith("["):
        try:
            ip6 = ipaddress.IPv6Address(raw[1:-1])
        except ValueError:
            raise _refuse(url, "its IPv6 address is malformed") from None
        return ip6.compressed, ip6
    host = raw
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _refuse(url, "its host is not a valid internationalised name") from None
    host = host.lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host or ".." in host or host.startswith("."):
        raise _refuse(url, "it has no valid host")
    if not _HOST_CHARS.fullmatch(host):
        raise _refuse(url, "its host holds characters a host name cannot have")
    try:
        ip = parse_ip_host(host)
    except ValueError:
        raise _refuse(url, "its host looks like an address but is not a valid one") from None
    if ip is not None:
        return (str(ip) if ip.version == 4 else ip.compressed), ip
    return host, None


def _normal_path(path: str, url: str) -> str:
    if _ENCODED_SEPARATOR.search(path):
        raise _refuse(url, "its path holds an encoded '/' or '\\'")
    segments = path.split("/")
    if any(urllib.parse.unquote(s) in (".", "..") for s in segments):
        raise _refuse(url, "its path holds '.' or '..' segments")
    return path.rstrip("/")


def parse_base(url: str) -> BaseURL:
    """Parse and normalise a base URL, strictly.

    Raises:
        LMBaseRefused: not a string, too long, not ``http(s)``, credentials (userinfo) in it, a query
            or fragment, characters parsers disagree about (controls, spaces, backslashes), a bad port,
            a malformed host, or ``.``/``..``/encoded-slash path segments.
    """
    if not isinstance(url, str):
        raise LMBaseRefused(f"an LM base must be a string, not {type(url).__name__}")
    if len(url) > MAX_URL_CHARS:
        raise _refuse(url, f"it is longer than {MAX_URL_CHARS} characters")
    if _FORBIDDEN_CHARS.search(url):
        raise _refuse(url, "it holds control characters, spaces or backslashes")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise _refuse(url, f"it is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _refuse(url, f"scheme {parts.scheme!r} is not allowed (only http and https)")
    if "@" in parts.netloc:
        raise _refuse(url, "credentials in the URL (user:password@) are not allowed; pass api_key")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise _refuse(url, "a base URL has no query or fragment")
    raw_host, port_text = _split_netloc(parts.netloc, url)
    port = DEFAULT_PORTS[scheme]
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
            raise _refuse(url, "its port is not a number from 1 to 65535")
        port = int(port_text)
    host, ip = _normal_host(raw_host, url)
    return BaseURL(scheme, host, port, _normal_path(parts.path, url), ip)


def _under(url: BaseURL, prefix: BaseURL) -> bool:
    if (url.scheme, url.host, url.port) != (prefix.scheme, prefix.host, prefix.port):
        return False
    return prefix.path == "" or url.path == prefix.path or url.path.startswith(prefix.path + "/")


def _parse_prefixes(prefixes: Sequence[str]) -> list[BaseURL]:
    if isinstance(prefixes, str):
        raise TypeError("allowed prefixes must be a sequence of URLs, not one string")
    parsed = []
    for prefix in prefixes:
        try:
            parsed.append(parse_base(prefix))
        except LMBaseRefused as exc:
            raise ValueError(f"allowed LM base prefix {prefix!r} is not a valid base URL: {exc}") from None
    return parsed


def base_allowed(url: str, prefixes: Sequence[str]) -> bool:
    """Whether ``url`` is under one of the operator's allowed ``prefixes``.

    Both are parsed and normalised (:func:`parse_base`): scheme, host (case, IDNA, numeric spellings),
    port (explicit or default) and path, the path compared on a segment boundary. A URL that cannot be
    parsed is not allowed. Raises ``ValueError`` if a prefix itself is not a valid base URL (an
    operator's configuration error).
    """
    allowed = _parse_prefixes(prefixes)
    try:
        parsed = parse_base(url)
    except LMBaseRefused:
        return False
    return any(_under(parsed, prefix) for prefix in allowed)


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def check_lm_base(
    url: str, *, allowed_prefixes: Sequence[str] = (), resolve: Resolver | None = None
) -> None:
    """Refuse an LM base URL a client may not use; return None if it may.

    The URL must be ``http(s)`` with no credentials in it (:func:`parse_base`), and either be under an
    allowed prefix (:func:`base_allowed`: then nothing is resolved, the operator vouched for it) or
    have a host all of whose addresses are public. ``localhost`` and ``*.localhost`` are loopback by
    name. Names are resolved with ``trio.socket.getaddrinfo`` (or ``resolve(host, port)``, for tests)
    within ``RESOLVE_TIMEOUT_S``.

    Raises:
        LMBaseRefused: (an ``InvalidParams``) naming why: the scheme, credentials in the URL, a host
            that cannot be resolved, or the class of a non-public address (``loopback``, ``private``,
            ``link-local``, ...).
        ValueError: an allowed prefix is not a valid base URL.
    """
    allowed = _parse_prefixes(allowed_prefixes)
    parsed = parse_base(url)
    if any(_under(parsed, prefix) for prefix in allowed):
        return
    if parsed.ip is not None:
        addresses: list[str] = [str(parsed.ip)]
    elif parsed.host == "localhost" or parsed.host.endswith(".localhost"):
        raise _refuse(url, f"{parsed.host} is a loopback name; use a public host or an allowed base")
    else:
        try:
            with trio.fail_after(RESOLVE_TIMEOUT_S):
                addresses = list(await (resolve or _getaddrinfo)(parsed.host, parsed.port))
        except (OSError, trio.TooSlowError) as exc:
            why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc) or type(exc).__name__
            raise _refuse(url, f"its host {parsed.host} cannot be resolved ({why})") from None
        if not addresses:
            raise _refuse(url, f"its host {parsed.host} resolves to no address")
    for address in addresses:
        try:
            refused = address_class(address)
        except ValueError:
            refused = "not an IP address"
        if refused is not None:
            where = "is" if parsed.ip is not None else f"resolves to {address}, which is"
            raise _refuse(
                url,
                f"its host {parsed.host} {where} a {refused} address; only public addresses, or a "
                "base the operator allows, may be used",
            )
