"""State tables, and the worker's: its states, the inputs that move it, and one table of both.

Every state machine of the runtime is written the same way: a dict ``(state, input) -> next state``
(the worker's ``TRANSITIONS`` here, the circuit breaker's in ``_breaker.py``; the wire protocol's call
and connection tables in ``bridge_child.wire``, which cannot import this module). An input the table
does not list for a state is a bug, raised as the module's own error type; :func:`next_state` is that
lookup for the runtime's tables.

The worker (``dspex_trio._worker.Worker``) changes state only in its ``_change(input)``, which
consults ``TRANSITIONS`` and publishes the change (``on_transition(worker, from, to, reason)``: the
pool's ``worker_state`` health events)::

    starting --hello--> ready <--at/below capacity--> busy
    starting | ready | busy --close requested--> draining --exited with code 0--> stopped
    any live state --lost | died--> failed     (and an unasked exit with code 0: failed too)
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping
from typing import Final, TypeVar

StateT = TypeVar("StateT", bound=Hashable)
InputT = TypeVar("InputT", bound=Hashable)


def next_state(
    table: Mapping[tuple[StateT, InputT], StateT], state: StateT, event: InputT, error: type[Exception]
) -> StateT:
    """``table[state, event]``.

    Raises:
        error: the table does not allow ``event`` in ``state`` (a bug in the machine or its owner).
    """
    try:
        return table[state, event]
    except KeyError:
        raise error(f"{event!s} is not allowed in state {state!s}") from None


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    """Launched; waiting for its ``hello``."""
    READY = "ready"
    """Handshake done, below its capacity."""
    BUSY = "busy"
    """At its capacity (it may still take more calls: they queue in the worker)."""
    DRAINING = "draining"
    """Closing: takes no new calls; in-flight calls finish, then the teardown ladder runs."""
    STOPPED = "stopped"
    """Exited with code 0 after it was asked to close. Terminal."""
    FAILED = "failed"
    """Died, was killed, broke the protocol, or failed to start. Terminal."""


class WorkerInput(enum.StrEnum):
    """What happens to a worker; its value is the default reason of the change it causes."""

    HELLO = "hello received"
    """The handshake completed: the hello came and the process is still alive."""
    AT_CAPACITY = "at capacity"
    """Calls in flight reached its capacity."""
    BELOW_CAPACITY = "below capacity"
    """Calls in flight fell below its capacity."""
    CLOSE = "close requested"
    """``aclose()`` began the teardown ladder."""
    LOST = "lost"
    """A detector (protocol error, missed heartbeats or ack, no hello in time) killed it."""
    EXITED_CLEAN = "exited with code 0"
    """The process was reaped with exit code 0 (clean only after a close was requested)."""
    DIED = "died"
    """The process was reaped with another code, or killed by a signal."""


TRANSITIONS: Final[dict[tuple[WorkerState, WorkerInput], WorkerState]] = {
    (WorkerState.STARTING, WorkerInput.HELLO): WorkerState.READY,
    (WorkerState.STARTING, WorkerInput.CLOSE): WorkerState.DRAINING,
    (WorkerState.STARTING, WorkerInput.LOST): WorkerState.FAILED,
    (WorkerState.STARTING, WorkerInput.EXITED_CLEAN): WorkerState.FAILED,
    (WorkerState.STARTING, WorkerInput.DIED): WorkerState.FAILED,
    (WorkerState.READY, WorkerInput.AT_CAPACITY): WorkerState.BUSY,
    (WorkerState.READY, WorkerInput.CLOSE): WorkerState.DRAINING,
    (WorkerState.READY, WorkerInput.LOST): WorkerState.FAILED,
    (WorkerState.READY, WorkerInput.EXITED_CLEAN): WorkerState.FAILED,  # nobody asked it to exit
    (WorkerState.READY, WorkerInput.DIED): WorkerState.FAILED,
    (WorkerState.BUSY, WorkerInput.BELOW_CAPACITY): WorkerState.READY,
    (WorkerState.BUSY, WorkerInput.CLOSE): WorkerState.DRAINING,
    (WorkerState.BUSY, WorkerInput.LOST): WorkerState.FAILED,
    (WorkerState.BUSY, WorkerInput.EXITED_CLEAN): WorkerState.FAILED,  # nobody asked it to exit
    (WorkerState.BUSY, WorkerInput.DIED): WorkerState.FAILED,
    (WorkerState.DRAINING, WorkerInput.EXITED_CLEAN): WorkerState.STOPPED,
    (WorkerState.DRAINING, WorkerInput.LOST): WorkerState.FAILED,
    (WorkerState.DRAINING, WorkerInput.DIED): WorkerState.FAILED,
}
"""(state, input) -> next state. Anything else is a bug: ``InvalidTransition``. Terminal states take
no input, and no input leaves a state unchanged: every entry is a published change."""

TERMINAL: Final = frozenset({WorkerState.STOPPED, WorkerState.FAILED})
ACCEPTING: Final = frozenset({WorkerState.READY, WorkerState.BUSY})
"""States in which a worker takes new calls."""


class InvalidTransition(AssertionError):
    """An input ``TRANSITIONS`` does not allow in the worker's state: a bug in the runtime."""
