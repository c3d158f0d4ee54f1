"""A cancelled call's one terminal frame is ``cancelled``, whatever its method does when the cancel wakes it.

The reader sends the call's terminal ``cancelled`` before it sets ``ctx.cancelled``: a method woken by that
event (``sleep`` returning, an LM read failing on the connection the cancel closed) may finish in its thread
at once, and its result or error must be the one discarded. Simulated here without threads: the event's
``set`` runs what the method's thread does when it wins that race, at the exact moment it would be woken.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bridge_child import wire
from bridge_child._server import Worker


def deliver(child: Worker, parent: wire.Connection, message: wire.ParentMessage) -> None:
    """``message`` sent by ``parent``, read and handled by ``child``'s reader (as ``serve`` does)."""
    child.conn.receive_data(parent.send(message))
    child.dispatch(child.conn.next_event())  # type: ignore[arg-type]


def opened(child: Worker) -> wire.Connection:
    """The parent's end, after the child's hello."""
    parent = wire.Connection(wire.Role.PARENT)
    parent.receive_data(b"".join(child._batch))
    child._batch.clear()
    assert isinstance(parent.next_event(), wire.Hello)
    return parent


@pytest.fixture
def child() -> Iterator[Worker]:
    read_fd, write_fd = os.pipe()
    worker = Worker(read_fd, write_fd, capacity=1, diagnostics=True)
    worker._batch.append(worker.conn.send(worker.hello()))  # what `serve` sends first
    try:
        yield worker
    finally:
        worker.executor.shutdown(wait=False)
        os.close(read_fd)
        os.close(write_fd)


class WokenAnswers(threading.Event):
    """``ctx.cancelled`` whose ``set`` lets the woken method answer at once (``answer``)."""

    def __init__(self, worker: Worker, answer: Any) -> None:
        super().__init__()
        self.worker, self.answer = worker, answer
        self.sent: list[bool] = []

    def set(self) -> None:
        super().set()
        self.sent.append(self.worker.terminal(self.ctx, self.answer, batch=True))

    ctx: Any = None


@pytest.mark.parametrize(
    "answer",
    [
        lambda i: wire.Result(i, None),  # `sleep` returns when cancelled
        lambda i: wire.Error(i, wire.ErrorCode.PROGRAM_ERROR, "APIConnectionError", "closed"),  # an LM read
    ],
    ids=["result", "error"],
)
def test_the_cancel_answers_before_the_woken_method(child: Worker, answer: Any) -> None:
    parent = opened(child)
    deliver(child, parent, wire.Call(7, "sleep", {"seconds": 30}))
    ctx = child.contexts[7]
    woken = WokenAnswers(child, answer(7))
    woken.ctx = ctx
    ctx._cancelled = woken  # made on first use: the test puts its own in first
    deliver(child, parent, wire.Cancel(7))
    assert woken.sent == [False]  # the method's answer came second: discarded
    counters = child.counters
    assert (counters["cancelled"], counters["completed"], counters["failed"]) == (1, 0, 0), counters
    assert counters["discarded"] == 1 and 7 not in child.contexts
    # the child's batch (what it writes next) holds the ack and one terminal frame for call 7
    parent.receive_data(b"".join(child._batch))
    messages = []
    while (message := parent.next_event()) is not wire.NEED_DATA:
        messages.append(message)
    terminals = [m for m in messages if isinstance(m, (wire.Result, wire.Error))]
    assert [type(m) for m in messages] == [wire.Ack, wire.Error] and len(terminals) == 1
    assert terminals[0].code == wire.ErrorCode.CANCELLED


def test_a_call_cancelled_before_its_thread_starts_does_not_run(child: Worker) -> None:
    parent = opened(child)
    deliver(child, parent, wire.Call(8, "sleep", {"seconds": 30}))
    ctx = child.contexts[8]
    deliver(child, parent, wire.Cancel(8))
    assert child.outcome(ctx, child.methods["sleep"]) is None  # not run: `sleep` would answer 30
    assert child.counters["cancelled"] == 1 and child.counters["completed"] == 0
