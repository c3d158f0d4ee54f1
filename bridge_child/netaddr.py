"""Which network addresses are public: the one rule behind every egress check.

Shared by the host's configuration-time check of a client-chosen LM base
(``dspex_trio._egress.check_lm_base``) and the worker's connect-time guard of LMs configured
``public_only`` (``bridge_child._lmguard``), so the two can never disagree. Pure: only ``ipaddress``;
importing it imports neither trio nor dspy.

- :func:`address_class` names the class of a non-public address (``"loopback"``, ``"private"``,
  ``"link-local"``, ...) or returns None for a public one. IPv4 uses an explicit table of the IANA
  special-purpose ranges (not ``ipaddress.is_global``, whose answer changed between Python versions and
  calls multicast global); IPv6 is public only inside global unicast (``2000::/3``) minus its special
  ranges, and the forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible, IPv4-translated,
  NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by the address they embed.
- :func:`parse_ip_host` reads a URL host that is an address literal: bracket-less IPv6, dotted-quad IPv4,
  and the legacy numeric spellings that resolvers (``inet_aton``) and browsers accept, which are the
  classic way around a naive check: ``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``. A host whose
  last label is numeric but is not a valid address is an error, never a name to look up.
"""

from __future__ import annotations

import ipaddress
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_CLASSES: Final = tuple(
    (ipaddress.IPv4Network(network), name)
    for network, name in (
        ("0.0.0.0/8", "unspecified"),  # "this network"
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared"),  # carrier-grade NAT
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # cloud instance metadata lives here
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved"),  # 6to4 relay anycast (deprecated)
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # future use, and 255.255.255.255 (broadcast)
    )
)
"""Every IPv4 range that is not public, with its class (IANA IPv4 special-purpose registry)."""

_V6_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")
_V6_CLASSES: Final = tuple(
    (ipaddress.IPv6Network(network), name)
    for network, name in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("100::/64", "reserved"),  # discard-only
        ("2001::/23", "reserved"),  # IETF protocol assignments (Teredo, ORCHID, ...)
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "private"),  # unique local
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # site-local (deprecated)
        ("ff00::/8", "multicast"),
    )
)
"""IPv6 ranges that are not public, with their class; anything else outside ``2000::/3`` is reserved."""

_V4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_TRANSLATED: Final = ipaddress.IPv6Network("::ffff:0:0:0/96")
_V4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR: Final = ipaddress.IPv6Network("2002::/16")


def _embedded_v4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 form carries, and the form's name; None if it carries none."""
    if address in _V4_MAPPED:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "IPv4-mapped"
    if address in _V4_TRANSLATED:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "IPv4-translated"
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF), "6to4"
    if address in _V4_COMPATIBLE and int(address) > 1:  # not :: or ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "IPv4-compatible"
    return None


def address_class(address: str | IPAddress) -> str | None:
    """The class of a non-public address (e.g. ``"loopback"``, ``"link-local"``), or None if public.

    ``address`` is an ``ipaddress`` object or the text of one (an IPv6 zone, ``fe80::1%eth0``, is
    allowed). Raises ``ValueError`` if it is not an IP address.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv4Address):
        for network, name in _V4_CLASSES:
            if ip in network:
                return name
        return None
    if ip.scope_id is not None:
        ip = ipaddress.IPv6Address(int(ip))
    embedded = _embedded_v4(ip)
    if embedded is not None:
        inner, form = embedded
        inner_class = address_class(inner)
        return None if inner_class is None else f"{inner_class} ({form} {inner})"
    for network6, name6 in _V6_CLASSES:
        if ip in network6:
            return name6
    return None if ip in _V6_GLOBAL_UNICAST else "reserved"


_DIGITS: Final = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _ipv4_number(part: str) -> int | None:
    """One label of a numeric IPv4 host: decimal, ``0x`` hex or ``0`` octal (``inet_aton``'s rules)."""
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
        if digits == "":
            return 0
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits or any(c not in _DIGITS[base] for c in digits):
        return None
    return int(digits, base)


def _looks_numeric(label: str) -> bool:
    if label[:2] in ("0x", "0X"):
        return all(c in _DIGITS[16] for c in label[2:])
    return label != "" and all(c in _DIGITS[10] for c in label)


def parse_ip_host(host: str) -> IPAddress | None:
    """The address a URL host denotes if it is an address literal, else None (a name to resolve).

    ``host`` is the host as it appears in the URL, without brackets for IPv6 (``::1``). IPv4 accepts
    every spelling ``inet_aton`` does: 1 to 4 dot-separated numbers, each decimal, ``0x`` hex or
    leading-``0`` octal, the last one filling the remaining bytes (``127.1``, ``2130706433``), and one
    trailing dot. Raises ``ValueError`` for a host that must be read as an address but is not a valid
    one (its last label is numeric, or it contains ``:``): such a host is never looked up as a name.
    """
    if ":" in host:
        return ipaddress.IPv6Address(host)  # raises ValueError if malformed
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot: "127.0.0.1."
    if not labels or not _looks_numeric(labels[-1]):
        return None
    if len(labels) > 4:
        raise ValueError(f"{host!r} is not a valid IPv4 address (more than 4 parts)")
    numbers = [_ipv4_number(label) for label in labels]
    if any(n is None for n in numbers):
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    value = 0
    for n in numbers[:-1]:
        assert n is not None
        if n > 255:
            raise ValueError(f"{host!r} is not a valid IPv4 address (a part is above 255)")
        value = value * 256 + n
    last = numbers[-1]
    assert last is not None
    room = 256 ** (5 - len(numbers))
    if last >= room:
        raise ValueError(f"{host!r} is not a valid IPv4 address (its last part is too large)")
    return ipaddress.IPv4Address(value * room + last)
