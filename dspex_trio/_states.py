"""The worker state machine: every state, and every allowed transition, in one table."""

from __future__ import annotations

import enum
from typing import Final


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    """Launched; waiting for its ``hello``."""
    READY = "ready"
    """Handshake done, no call in flight."""
    BUSY = "busy"
    """At least one call in flight (it may still take more, up to its capacity)."""
    DRAINING = "draining"
    """Takes no new calls; in-flight calls finish, then the teardown ladder runs."""
    STOPPED = "stopped"
    """Exited after a clean drain or shutdown. Terminal."""
    FAILED = "failed"
    """Died, was killed, broke the protocol, or failed to start. Terminal."""


TRANSITIONS: Final[frozenset[tuple[WorkerState, WorkerState]]] = frozenset(
    {
        (WorkerState.STARTING, WorkerState.READY),
        (WorkerState.STARTING, WorkerState.DRAINING),
        (WorkerState.STARTING, WorkerState.FAILED),
        (WorkerState.READY, WorkerState.BUSY),
        (WorkerState.READY, WorkerState.DRAINING),
        (WorkerState.READY, WorkerState.FAILED),
        (WorkerState.BUSY, WorkerState.READY),
        (WorkerState.BUSY, WorkerState.DRAINING),
        (WorkerState.BUSY, WorkerState.FAILED),
        (WorkerState.DRAINING, WorkerState.STOPPED),
        (WorkerState.DRAINING, WorkerState.FAILED),
    }
)
"""(from, to) pairs. Anything else is a bug: ``InvalidTransition``."""

TERMINAL: Final = frozenset({WorkerState.STOPPED, WorkerState.FAILED})
ACCEPTING: Final = frozenset({WorkerState.READY, WorkerState.BUSY})
"""States in which a worker takes new calls."""


class InvalidTransition(AssertionError):
    """A transition not in ``TRANSITIONS`` was attempted: a bug in the runtime."""


def check_transition(old: WorkerState, new: WorkerState) -> None:
    if (old, new) not in TRANSITIONS:
        raise InvalidTransition(f"worker state {old} -> {new} is not allowed")
