"""The attrs validators of the option records (``dspex_trio._validators``), and that every record uses
them: a bad value is a ``ValueError`` naming the field."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest

from dspex_trio import PoolOptions, RetryPolicy, WebsocketOptions, WorkerOptions
from dspex_trio._breaker import CircuitBreaker
from dspex_trio._validators import (
    at_least,
    finite_non_negative,
    fraction,
    http_error_status,
    non_negative,
    positive,
)


@attrs.frozen
class Record:
    count: Any = attrs.field(default=1, validator=at_least(1))
    limit: Any = attrs.field(default=None, validator=at_least(1, optional=True))
    timeout: Any = attrs.field(default=1.0, validator=positive)
    grace: Any = attrs.field(default=0.0, validator=non_negative)
    latency: Any = attrs.field(default=0.0, validator=finite_non_negative)
    share: Any = attrs.field(default=0.5, validator=fraction)
    status: Any = attrs.field(default=None, validator=http_error_status)


@pytest.mark.parametrize(
    ("field", "good", "bad", "message"),
    [
        ("count", [1, 2, 10**9, 1.5], [0, -1, None, math.nan], "count must be >= 1, not "),
        ("limit", [None, 1, 7], [0, -3, math.nan], "limit must be >= 1, not "),
        ("timeout", [1e-9, 1, 30.0], [0, 0.0, -1, math.nan], "timeout must be > 0, not "),
        ("grace", [0, 0.0, 5], [-0.001, -1, math.nan], "grace must be >= 0, not "),
        ("latency", [0, 2.5], [-1, math.inf, math.nan], "latency must be a finite number >= 0, not "),
        ("share", [0, 0.25, 1], [-0.1, 1.01, math.nan], "share must be within [0, 1], not "),
        (
            "status",
            [None, 400, 429, 599],
            [200, 302, 600],
            "status must be an HTTP error status (400-599), not ",
        ),
    ],
)
def test_each_validator_accepts_and_refuses(
    field: str, good: list[Any], bad: list[Any], message: str
) -> None:
    for value in good:
        assert getattr(Record(**{field: value}), field) is value
    for value in bad:
        with pytest.raises(ValueError) as info:
            Record(**{field: value})
        assert str(info.value) == message + repr(value)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: PoolOptions(workers=0), "workers must be >= 1"),
        (lambda: PoolOptions(workers=None), "workers must be >= 1"),
        (lambda: PoolOptions(max_calls_per_worker=0), "max_calls_per_worker must be >= 1"),
        (lambda: PoolOptions(rss_check_interval=0.001), "rss_check_interval must be >= 0.01"),
        (lambda: WorkerOptions(ack_timeout=0), "ack_timeout must be > 0"),
        (lambda: WorkerOptions(term_grace=-1), "term_grace must be >= 0"),
        (lambda: RetryPolicy(jitter=1.5), "jitter must be within [0, 1]"),
        (lambda: RetryPolicy(multiplier=0.5), "multiplier must be >= 1"),
        (lambda: WebsocketOptions(max_connections=0), "max_connections must be > 0"),
        (lambda: CircuitBreaker(clock=lambda: 0.0, failure_threshold=0), "failure_threshold must be >= 1"),
    ],
)
def test_the_option_records_use_them(make: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_optional_limits_default_to_none() -> None:
    options = PoolOptions()
    assert options.max_calls_per_worker is None and options.max_worker_rss_bytes is None
