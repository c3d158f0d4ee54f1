"""The opening handshake's decision (``_handshake.py``), sans-IO: every rule of docs/security.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspex_trio._handshake import (
    Accepted,
    HandshakePolicy,
    Refused,
    check_handshake_untrusted,
    host_of_header,
    is_loopback,
    is_loopback_origin,
    normalize_origin,
)

OPEN = HandshakePolicy.build()
TOKEN = HandshakePolicy.build(tokens=["t0ken"], admin_tokens=["adm1n"])
ADMIN_ONLY = HandshakePolicy.build(admin_tokens=["adm1n"])
LISTED = HandshakePolicy.build(allowed_origins=["https://app.example.com"])
TOKEN_LISTED = HandshakePolicy.build(tokens=["t0ken"], allowed_origins=["https://app.example.com"])
PROTO = ["dspex.v1"]


def decide(
    policy: HandshakePolicy,
    *,
    host: str | None = "127.0.0.1:8765",
    origin: str | None = None,
    token: str | None = None,
    authorization: str | None = None,
    subprotocols: list[str] = PROTO,
) -> Accepted | Refused:
    headers: list[tuple[bytes, bytes]] = []
    if host is not None:
        headers.append((b"host", host.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    return check_handshake_untrusted(policy, headers, subprotocols)


def refused(decision: Accepted | Refused, status: int, reason: str) -> bool:
    return isinstance(decision, Refused) and (decision.status, decision.reason) == (status, reason)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8765",
        "127.0.0.1",
        "localhost:8765",
        "LOCALHOST",
        "[::1]:8765",
        "[::1]",
        "127.9.9.9:1",
        "a.localhost:80",
    ],
)
def test_without_a_token_loopback_hosts_are_accepted(host: str) -> None:
    assert decide(OPEN, host=host) == Accepted("client", False)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:8765",  # DNS rebinding: the page's own name, resolving to 127.0.0.1
        "evil.example",
        "10.0.0.5:8765",
        "0.0.0.0:8765",
        "127.0.0.1.evil.example",
        "localhost.evil.example:8765",
        "",
        None,
        "127.0.0.1:80@evil.example",
        "[::1]evil",
    ],
)
def test_without_a_token_any_other_host_is_refused(host: str | None) -> None:
    assert refused(decide(OPEN, host=host), 403, "host")


@pytest.mark.parametrize(
    "origin", ["http://127.0.0.1:3000", "http://localhost", "https://localhost:8443", "http://[::1]:9000"]
)
def test_loopback_pages_are_accepted(origin: str) -> None:
    assert isinstance(decide(OPEN, origin=origin), Accepted)


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://evil.example:8765",
        "null",
        "file://",
        "http://127.0.0.1.evil.example",
        "x",
    ],
)
def test_foreign_pages_are_refused(origin: str) -> None:
    assert refused(decide(OPEN, origin=origin), 403, "origin")


def test_allowed_origins_extend_the_loopback_ones() -> None:
    assert isinstance(decide(LISTED, origin="https://app.example.com"), Accepted)
    assert isinstance(decide(LISTED, origin="HTTPS://APP.EXAMPLE.COM"), Accepted)  # normalised
    assert isinstance(decide(LISTED, origin="http://localhost:3000"), Accepted)
    assert refused(decide(LISTED, origin="http://app.example.com"), 403, "origin")  # another scheme
    assert refused(decide(LISTED, origin="https://app.example.com:444"), 403, "origin")  # another port
    assert refused(decide(LISTED, origin="https://evil.example"), 403, "origin")


def test_a_token_is_required_once_set_and_compared_exactly() -> None:
    assert refused(decide(TOKEN), 401, "token")
    assert refused(decide(TOKEN, token="wrong"), 401, "token")
    assert refused(decide(TOKEN, token="t0ken-but-longer"), 401, "token")
    assert refused(decide(TOKEN, authorization="Basic dDBrZW4="), 401, "token")
    assert refused(decide(TOKEN, authorization="Bearer"), 401, "token")
    decision = decide(TOKEN, token="t0ken")
    assert decision == Accepted("client", True)
    assert isinstance(refused_headers := decide(TOKEN), Refused)
    assert (b"www-authenticate", b'Bearer realm="dspex-trio"') in refused_headers.headers


def test_the_admin_token_gives_the_admin_role() -> None:
    assert decide(TOKEN, token="adm1n") == Accepted("admin", True)
    # with only an admin token set, clients still connect without one (loopback rules), admins with it
    assert decide(ADMIN_ONLY) == Accepted("client", False)
    assert decide(ADMIN_ONLY, token="adm1n") == Accepted("admin", True)
    assert refused(decide(ADMIN_ONLY, token="guess"), 401, "token")  # a wrong token is never ignored


def test_with_a_token_the_host_is_not_checked_but_a_set_origin_list_is() -> None:
    assert isinstance(decide(TOKEN, token="t0ken", host="dspex.example.com"), Accepted)
    assert isinstance(decide(TOKEN, token="t0ken", origin="https://anything.example"), Accepted)
    assert refused(decide(TOKEN_LISTED, token="t0ken", origin="https://anything.example"), 403, "origin")
    assert isinstance(decide(TOKEN_LISTED, token="t0ken", origin="https://app.example.com"), Accepted)
    assert isinstance(decide(TOKEN_LISTED, token="t0ken", origin="http://localhost:1"), Accepted)


def test_the_subprotocol_is_required_and_the_refusal_says_so() -> None:
    decision = decide(OPEN, subprotocols=[])
    assert refused(decision, 400, "subprotocol") and "dspex.v1" in decision.message  # type: ignore[union-attr]
    assert refused(decide(OPEN, subprotocols=["dspex.v2"]), 400, "subprotocol")
    assert isinstance(decide(OPEN, subprotocols=["other", "dspex.v1"]), Accepted)


def test_the_first_of_repeated_headers_counts_and_long_ones_are_refused() -> None:
    headers = [
        (b"host", b"127.0.0.1:1"),
        (b"origin", b"http://localhost"),
        (b"origin", b"http://evil.example"),
    ]
    assert isinstance(check_handshake_untrusted(OPEN, headers, PROTO), Accepted)
    long = [(b"host", b"127.0.0.1:1"), (b"origin", b"http://localhost/" + b"x" * 5000)]
    assert refused(check_handshake_untrusted(OPEN, long, PROTO), 400, "header")


def test_refusal_messages_name_what_was_wrong_and_never_a_token() -> None:
    for decision in (
        decide(TOKEN, token="wrong"),
        decide(OPEN, host="evil.example"),
        decide(OPEN, origin="http://x.y"),
    ):
        assert isinstance(decision, Refused)
        assert decision.message and "wrong" not in decision.message
    assert "t0ken" not in repr(TOKEN) and "adm1n" not in repr(TOKEN)


def test_policy_building_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        HandshakePolicy.build(tokens=[" "])
    with pytest.raises(ValueError, match="not an origin"):
        HandshakePolicy.build(allowed_origins=["app.example.com"])


def test_helpers() -> None:
    assert host_of_header("[::1]:80") == "::1" and host_of_header("name:80") == "name"
    assert (
        host_of_header("a b") is None and host_of_header("[::1") is None and host_of_header("x:y:z") is None
    )
    assert normalize_origin("http://Example.COM:80/") == "http://example.com:80"
    assert normalize_origin("http://user@example.com") is None
    assert is_loopback("::1") and is_loopback("[::1]") and not is_loopback("::2") and not is_loopback(None)
    assert is_loopback_origin("http://127.0.0.1:1") and not is_loopback_origin("null")


@given(
    host=st.one_of(st.none(), st.text(max_size=40)),
    origin=st.one_of(st.none(), st.text(max_size=40)),
    authorization=st.one_of(st.none(), st.text(max_size=40)),
    subprotocols=st.lists(st.text(max_size=10), max_size=3),
)
def test_any_headers_give_a_decision_and_only_loopback_without_a_token(
    host: str | None, origin: str | None, authorization: str | None, subprotocols: list[str]
) -> None:
    headers = [
        (name, value.encode("utf-8", "surrogatepass"))
        for name, value in ((b"host", host), (b"origin", origin), (b"authorization", authorization))
        if value is not None
    ]
    decision = check_handshake_untrusted(OPEN, headers, subprotocols)
    if isinstance(decision, Accepted):
        assert authorization is None and is_loopback(host_of_header(host or ""))
        assert origin is None or is_loopback_origin(origin)
        assert "dspex.v1" in subprotocols
