"""One style for the tests of every state table (a ``(state, input) -> next state`` dict).

Each table is tested over the full product of its states and inputs, each case carrying the table's own
answer (``None``: refused), and the test applies the input through the owner's one method (the worker's
``_change``, the breaker's ``_move``, a wire ``Connection``'s send and receive):

    @pytest.mark.parametrize(("state", "event", "expected"), every_state_and_input(TABLE, States, Inputs))
    def test_...(state, event, expected): ...
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import pytest

CASE_NAMES = ("state", "event", "expected")
"""The parameter names of every table case."""


def _name(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else str(getattr(value, "name", value))


def every_state_and_input(
    table: Mapping[tuple[Any, Any], Any], states: Iterable[Hashable], inputs: Iterable[Hashable]
) -> list[Any]:
    """Every (state, input) pair with the table's next state, or None where the table refuses it."""
    inputs = list(inputs)
    return [
        pytest.param(state, event, table.get((state, event)), id=f"{_name(state)}-{_name(event)}")
        for state in states
        for event in inputs
    ]


def path_to(table: Mapping[tuple[Any, Any], Any], start: Hashable, state: Hashable) -> list[Any]:
    """The shortest list of inputs that takes ``start`` to ``state`` through ``table`` (so a test reaches
    each state the way its owner does). Raises ``AssertionError`` if ``state`` is unreachable."""
    paths: dict[Hashable, list[Any]] = {start: []}
    frontier = [start]
    while frontier:
        current = frontier.pop(0)
        for (source, event), target in table.items():
            if source == current and target not in paths:
                paths[target] = [*paths[current], event]
                frontier.append(target)
    assert state in paths, f"{state} cannot be reached from {start}"
    return paths[state]
