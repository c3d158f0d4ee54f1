"""The TCP workers' handshake codec (``bridge_child.tcp``): pure functions, bytes in, claims out.

The fuzz tests hold the invariants: an answer made with the pool's secret for the host's nonce is
accepted with its claims intact; changing any byte of it, answering another nonce, or using another
secret is refused; arbitrary bytes are refused with ``AuthError`` and nothing else.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_child import tcp

secrets_ = st.binary(min_size=tcp.MIN_SECRET_BYTES, max_size=64)
nonces = st.binary(min_size=tcp.NONCE_BYTES, max_size=tcp.NONCE_BYTES)
claims_ = st.fixed_dictionaries(
    {"token": st.text(max_size=40), "pid": st.integers(0, 2**31), "node": st.text(max_size=60)}
)


def answer_parts(message: bytes) -> tuple[bytes, bytes]:
    return message[: tcp.AUTH_HEADER.size], message[tcp.AUTH_HEADER.size :]


@given(secrets_, nonces, claims_)
def test_a_valid_answer_is_accepted_with_its_claims(
    secret: bytes, nonce: bytes, claims: dict[str, Any]
) -> None:
    assert tcp.parse_challenge(tcp.challenge(nonce)) == nonce
    header, rest = answer_parts(tcp.auth_message(secret, nonce, claims))
    assert tcp.parse_auth_header(header) == len(rest)
    assert tcp.verify_auth(secret, nonce, rest) == claims


@given(secrets_, secrets_, nonces, nonces, claims_, st.data())
def test_any_change_or_another_secret_or_nonce_is_refused(
    secret: bytes, other: bytes, nonce: bytes, other_nonce: bytes, claims: dict[str, Any], data: st.DataObject
) -> None:
    _, rest = answer_parts(tcp.auth_message(secret, nonce, claims))
    if other != secret:
        with pytest.raises(tcp.AuthError, match="wrong secret"):
            tcp.verify_auth(other, nonce, rest)
    if other_nonce != nonce:  # a recorded answer is useless against another challenge
        with pytest.raises(tcp.AuthError, match="wrong secret"):
            tcp.verify_auth(secret, other_nonce, rest)
    index = data.draw(st.integers(0, len(rest) - 1))
    flipped = bytearray(rest)
    flipped[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(tcp.AuthError):
        tcp.verify_auth(secret, nonce, bytes(flipped))


@given(secrets_, nonces, st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_auth_error(secret: bytes, nonce: bytes, junk: bytes) -> None:
    for parse in (
        lambda: tcp.parse_auth_header(junk[: tcp.AUTH_HEADER.size]),
        lambda: tcp.verify_auth(secret, nonce, junk),
        lambda: tcp.parse_challenge(junk),
    ):
        try:
            parse()
        except tcp.AuthError:
            pass


def test_sizes_are_bounded_and_claims_are_checked_once_authenticated() -> None:
    secret, nonce = b"s" * 32, b"n" * tcp.NONCE_BYTES
    too_long = tcp.AUTH_HEADER.pack(tcp.MAGIC, tcp.MAX_CLAIMS_BYTES + 1)
    with pytest.raises(tcp.AuthError, match="exceed"):
        tcp.parse_auth_header(too_long)
    with pytest.raises(tcp.AuthError, match="bad magic"):
        tcp.parse_auth_header(tcp.AUTH_HEADER.pack(b"HTTP/1.1", 3))
    with pytest.raises(ValueError, match="exceed"):
        tcp.auth_message(secret, nonce, {"token": "x" * tcp.MAX_CLAIMS_BYTES, "pid": 1, "node": ""})
    for bad in ({"token": 1, "pid": 1, "node": ""}, {"token": "t", "pid": True, "node": ""}, {"token": "t"}):
        _, rest = answer_parts(tcp.auth_message(secret, nonce, bad))
        with pytest.raises(tcp.AuthError, match="claims need"):
            tcp.verify_auth(secret, nonce, rest)
    body = b"[not json"
    rest = body + tcp._mac(secret, nonce, body)
    with pytest.raises(tcp.AuthError, match="not JSON"):
        tcp.verify_auth(secret, nonce, rest)


def test_the_secret_line() -> None:
    secret = bytes(range(32))
    assert tcp.parse_secret_line(secret.hex().encode() + b"\n") == secret
    for bad in (b"", b"\n", b"zz\n", b"0011\n"):
        with pytest.raises(ValueError):
            tcp.parse_secret_line(bad)
