"""Where a client-chosen LM base may point: parsing, allow-listed prefixes, and address checks."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import dspex_trio
from dspex_trio._egress import LMBaseRefused, base_allowed, check_lm_base, parse_base

NAMES = {
    "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
    "rebind.example": ["127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "half.example": ["93.184.216.34", "10.0.0.7"],
    "mapped.example": ["::ffff:127.0.0.1"],
}
"""The injected resolver's view of the world."""


async def resolve(host: str, port: int) -> Iterable[str]:
    await trio.lowlevel.checkpoint()
    if host not in NAMES:
        raise OSError(f"unknown host {host}")
    return NAMES[host]


async def refused(url: str, **kwargs: object) -> str:
    with pytest.raises(LMBaseRefused) as caught:
        await check_lm_base(url, resolve=resolve, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def test_refusal_is_an_invalid_params_error() -> None:
    assert issubclass(LMBaseRefused, dspex_trio.InvalidParams)
    assert issubclass(LMBaseRefused, dspex_trio.DspexError)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1]/", "loopback"),
        ("http://0x7f.1/", "loopback"),
        ("http://2130706433/", "loopback"),
        ("http://127.1/", "loopback"),
        ("http://0177.0.0.1/", "loopback"),
        ("http://127.0.0.1:8000/v1", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:a9fe:a9fe]/", "link-local"),
        ("http://[fe80::1%25eth0]:8080/", "link-local"),
        ("http://10.0.0.1/", "private"),
        ("http://192.168.0.10/v1", "private"),
        ("http://100.64.0.1/", "shared"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://localhost/", "loopback name"),
        ("http://LocalHost.:8000/v1", "loopback name"),
        ("http://api.localhost/", "loopback name"),
        ("http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/", "loopback name"),  # fullwidth
        ("http://127\u30020\u30020\u30021/", "loopback"),  # ideographic full stops separate labels
        ("http://rebind.example/v1", "resolves to 127.0.0.1, which is a loopback"),
        ("http://metadata.example/", "link-local"),
        ("http://half.example/", "resolves to 10.0.0.7, which is a private"),
        ("http://mapped.example/", "loopback"),
        ("http://nowhere.example/", "cannot be resolved"),
        ("ftp://public.example/", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://public.example/", "scheme"),
        ("public.example/v1", "scheme"),
        ("http://user:pass@public.example/", "credentials in the URL"),
        ("http://user@public.example/", "credentials in the URL"),
        ("http://public.example@127.0.0.1/", "credentials in the URL"),
        ("http://public.example\\@127.0.0.1/", "backslashes"),
        ("http://public.example /", "spaces"),
        ("http://public.example/\n", "control characters"),
        ("http://public.example/v1?next=http://127.0.0.1", "no query or fragment"),
        ("http://public.example/v1#x", "no query or fragment"),
        ("http://public.example:0/", "port"),
        ("http://public.example:65536/", "port"),
        ("http://public.example:8o/", "port"),
        ("http://public.example/v1/../admin", "'..'"),
        ("http://public.example/v1/%2e%2e/admin", "'..'"),
        ("http://public.example/v1%2f..%2fadmin", "encoded"),
        ("http://1.2.3.4.5/", "not a valid one"),
        ("http://256.1/", "not a valid one"),
        ("http://[::1/", "not a valid URL"),
        ("http://::1/", "malformed"),
        ("http:///v1", "no valid host"),
        ("http://a..b/", "no valid host"),
        ("http://a_b%00.example/", "characters a host name cannot have"),
        ("http://a%2eb.example/", "characters a host name cannot have"),
        ("http://" + "a" * 3000 + ".example/", "longer than"),
    ],
)
async def test_refused_bases_say_why(url: str, why: str) -> None:
    assert why in await refused(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://public.example/v1",
        "https://PUBLIC.example:8443/v1/",
        "http://93.184.216.34/v1",
        "http://[2606:4700:4700::1111]/",
        "https://public.example",
    ],
)
async def test_public_bases_pass(url: str) -> None:
    await check_lm_base(url, resolve=resolve)


async def test_an_allowed_prefix_admits_an_inside_base_without_resolving() -> None:
    async def no_dns(host: str, port: int) -> Iterable[str]:
        raise AssertionError("an allowed base is not resolved")

    allowed = ["http://127.0.0.1:8000/v1", "http://llm.internal"]
    await check_lm_base("http://127.0.0.1:8000/v1/chat", allowed_prefixes=allowed, resolve=no_dns)
    await check_lm_base("http://127.1:8000/v1", allowed_prefixes=allowed, resolve=no_dns)  # same address
    await check_lm_base("http://LLM.internal:80/anything", allowed_prefixes=allowed, resolve=no_dns)
    # the prefix is no wildcard: another port, path or host is checked as usual
    assert "loopback" in await refused("http://127.0.0.1:8001/v1", allowed_prefixes=allowed)
    assert "loopback" in await refused("http://127.0.0.1:8000/v10", allowed_prefixes=allowed)
    assert "loopback" in await refused("http://127.0.0.1:8000/", allowed_prefixes=allowed)
    # an allowed prefix never admits a URL with credentials or a bad scheme
    assert "credentials" in await refused("http://u:p@llm.internal/", allowed_prefixes=allowed)


async def test_a_bad_allowed_prefix_is_the_operators_error() -> None:
    with pytest.raises(ValueError, match="not a valid base URL"):
        await check_lm_base("http://public.example/", allowed_prefixes=["ftp://x/"], resolve=resolve)
    with pytest.raises(TypeError):
        base_allowed("http://public.example/", "http://public.example/")  # one string, not a list


async def test_resolution_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async def hangs(host: str, port: int) -> Iterable[str]:
        await trio.sleep_forever()
        raise AssertionError

    with pytest.raises(LMBaseRefused, match="timed out"):
        await check_lm_base("http://slow.example/", resolve=hangs)


def _loopback_name() -> str | None:
    """A host name other than localhost that this machine's resolver maps to loopback, if any."""
    for name in (socket.gethostname(), "ip6-localhost", "ip6-loopback", "localhost.localdomain"):
        try:
            infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
        except OSError:
            continue
        if name.lower() != "localhost" and all(
            ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos
        ):
            return name
    return None


async def test_the_default_resolver_sees_a_name_that_resolves_to_loopback() -> None:
    name = _loopback_name()
    if name is None:
        pytest.skip("no host name other than localhost resolves to loopback here")
    with pytest.raises(LMBaseRefused, match="loopback"):
        await check_lm_base(f"http://{name}:8000/v1")
    # and names under .localhost are loopback without asking any resolver
    with pytest.raises(LMBaseRefused, match="loopback name"):
        await check_lm_base("http://anything.localhost/")


@pytest.mark.parametrize(
    ("url", "prefix", "allowed"),
    [
        ("http://a.example/v1", "http://a.example/v1", True),
        ("http://A.Example:80/v1/chat/completions", "http://a.example/v1", True),
        ("http://a.example/v1/", "http://a.example/v1", True),
        ("http://a.example/v1", "http://a.example/v1/", True),
        ("http://a.example./v1", "http://a.example/v1", True),
        ("http://a.example/anything", "http://a.example", True),
        ("http://a.example/anything", "http://a.example/", True),
        ("http://a.example.evil.com/", "http://a.example/v1", False),
        ("http://a.example.evil.com/v1", "http://a.example", False),
        ("http://evil.com/a.example/v1", "http://a.example/v1", False),
        ("http://a.example/v10", "http://a.example/v1", False),
        ("http://a.example/v", "http://a.example/v1", False),
        ("http://a.example:8080/v1", "http://a.example/v1", False),
        ("https://a.example/v1", "http://a.example/v1", False),
        ("https://a.example:443/v1", "https://a.example/v1", True),
        ("http://a.example:443/v1", "https://a.example/v1", False),
        ("http://a.example/V1", "http://a.example/v1", False),  # paths are case-sensitive
        ("http://u@a.example/v1", "http://a.example/v1", False),
        ("http://a.example/v1/../v2", "http://a.example/v1", False),
        ("http://[::1]:8000/v1", "http://[0:0::1]:8000/v1", True),
        ("not a url", "http://a.example/v1", False),
    ],
)
def test_base_allowed_compares_parsed_urls(url: str, prefix: str, allowed: bool) -> None:
    assert base_allowed(url, [prefix]) is allowed


HOST = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){1,3}", fullmatch=True)
SEGMENT = st.from_regex(r"[A-Za-z0-9_~-]{1,8}", fullmatch=True)


@given(HOST, st.lists(SEGMENT, max_size=3), st.lists(SEGMENT, max_size=3), st.sampled_from(["http", "https"]))
def test_a_prefix_admits_exactly_its_subtree(
    host: str, prefix_path: list[str], rest: list[str], scheme: str
) -> None:
    prefix = f"{scheme}://{host}/" + "/".join(prefix_path)
    url = prefix.rstrip("/") + "/" + "/".join(rest)
    assert base_allowed(url, [prefix])
    assert base_allowed(url.replace(host, host.upper(), 1), [prefix])  # hosts are case-insensitive
    if prefix_path:
        # a longer last segment is a sibling, not a child
        assert not base_allowed(prefix.rstrip("/") + "x", [prefix])
    # a host that merely starts with the allowed one is another host
    assert not base_allowed(url.replace(host, host + ".evil.com", 1), [prefix])
    other = "https" if scheme == "http" else "http"
    assert not base_allowed(url.replace(scheme, other, 1), [prefix])


@given(HOST, st.integers(min_value=1, max_value=65535))
def test_parse_base_normalises_case_dots_and_default_ports(host: str, port: int) -> None:
    plain = parse_base(f"http://{host}/v1")
    assert parse_base(f"HTTP://{host.upper()}.:80/v1/") == plain
    assert plain.port == 80 and plain.path == "/v1" and plain.ip is None
    assert parse_base(f"https://{host}:{port}/").port == port
