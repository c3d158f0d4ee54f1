"""The public-address rule shared by the host's base check and the worker's connect-time guard."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_child.netaddr import address_class, parse_ip_host


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud instance metadata
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.7", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fd00::1", "private"),
        ("fec0::1", "private"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("2001::1", "reserved"),  # Teredo
        ("100::1", "reserved"),
        ("4000::1", "reserved"),  # outside global unicast
        ("::ffff:127.0.0.1", "loopback (IPv4-mapped 127.0.0.1)"),
        ("::ffff:169.254.169.254", "link-local (IPv4-mapped 169.254.169.254)"),
        ("::ffff:0:10.0.0.1", "private (IPv4-translated 10.0.0.1)"),
        ("::127.0.0.1", "loopback (IPv4-compatible 127.0.0.1)"),
        ("64:ff9b::7f00:1", "loopback (NAT64 127.0.0.1)"),
        ("64:ff9b:1::1", "private"),
        ("2002:a9fe:a9fe::1", "link-local (6to4 169.254.169.254)"),
        # public
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("2002:808:808::1", None),
    ],
)
def test_address_classes(address: str, expected: str | None) -> None:
    assert address_class(address) == expected


def test_address_class_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        address_class("localhost")


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_a_public_ipv4_address_is_global_unicast(value: int) -> None:
    ip = ipaddress.IPv4Address(value)
    if address_class(ip) is None:
        assert ip.is_global and not ip.is_multicast and not ip.is_private and not ip.is_loopback
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_private:
        assert address_class(ip) is not None


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv6_forms_embedding_ipv4_are_judged_by_the_embedded_address(value: int) -> None:
    ip = ipaddress.IPv4Address(value)
    public = address_class(ip) is None
    for form in (f"::ffff:{ip}", f"64:ff9b::{ip}", f"::ffff:0:{ip}"):
        assert (address_class(form) is None) == public, form
    six_to_four = ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)
    assert (address_class(six_to_four) is None) == public


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_a_public_ipv6_address_is_global_unicast(value: int) -> None:
    ip = ipaddress.IPv6Address(value)
    embedding = ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96")
    if address_class(ip) is None:
        assert ip in ipaddress.IPv6Network("2000::/3") or any(
            ip in ipaddress.IPv6Network(n) for n in embedding
        )
        assert not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_site_local)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7F.0.0.01", "127.0.0.1"),
        ("169.254.43518", "169.254.169.254"),
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("example.com", None),
        ("a1.example", None),
        ("1a.example", None),
    ],
)
def test_numeric_host_spellings(host: str, expected: str | None) -> None:
    parsed = parse_ip_host(host)
    assert (None if parsed is None else str(parsed)) == expected


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.0.0.1", "1.16777216", "09.1", "a.1", "example.08", "::g"])
def test_malformed_numeric_hosts_are_errors_not_names(host: str) -> None:
    with pytest.raises(ValueError):
        parse_ip_host(host)


@given(st.integers(min_value=0, max_value=2**32 - 1), st.sampled_from(["dec", "hex", "oct", "two", "three"]))
def test_every_inet_aton_spelling_parses_to_the_same_address(value: int, form: str) -> None:
    ip = ipaddress.IPv4Address(value)
    a, b, c, d = ip.packed
    host = {
        "dec": str(value),
        "hex": hex(value),
        "oct": f"0{value:o}" if value else "0",
        "two": f"{a}.{value & 0xFFFFFF}",
        "three": f"{a}.{b}.{(c << 8) | d}",
    }[form]
    assert parse_ip_host(host) == ip
    # the platform's resolver reads the same spelling as the same address
    assert socket.inet_aton(host) == ip.packed
