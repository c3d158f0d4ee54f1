"""The worker's CPU lane: CPU-bound calls run one at a time by the thread that reads stdin, and a second
thread takes over reading while one of them runs long.

CPU-bound calls (a method's ``lane`` predicate says which: DSPy executions with the in-process offline
LM) gain nothing from threads, since they hold the GIL, and lose a lot to them: on the 2-core VM this
was measured on, handing a ~450 µs execution to a pool thread made it cost ~700 µs of CPU (thread
wake-ups, GIL hand-offs and cold caches), while the reader running it right after reading it, with no
hand-off at all, keeps it near the in-process cost. So lane calls are queued in arrival order (once
their acks are written, see ``Worker.read_once``) and run by the reader between reads; while the lane
has work the reader reads (without blocking) only when its held results are due (``MAX_RESULT_HOLD_S``),
and writes them with the acks of what it read. Figures in docs/worker.md.

Two threads take turns (``CpuLane.take_turns``, the loop of both): the *reader* reads stdin and runs
lane calls; the other stands by. When one lane call has kept the reader for ``RELIEF_AFTER_S`` the
standby becomes the reader, so pings, cancels and acks keep flowing during a long CPU-bound call; the
relieved thread finishes the lane's queue (writing each result at once) and stands by in turn. A lane
call that was cancelled but goes on does not hold up the calls behind it: they move to the thread pool
(``CpuLane.admit``). The standby sleeps without waking once the lane has been idle for
``STANDBY_PARK_AFTER_S``.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Final, NoReturn

from bridge_child._context import CallContext, Method

if TYPE_CHECKING:
    from bridge_child._server import Worker

MAX_RESULT_HOLD_S: Final = 0.003
"""Seconds the reader may hold finished lane results to write them with later ones: while the lane has
calls queued, its results go out together (one write, one wake-up of the parent) unless the oldest has
waited this long; they also go out with any ack or pong, and whenever the reader is about to block."""
RELIEF_AFTER_S: Final = 0.025
"""Seconds a CPU-lane call may keep the reader before the standby thread takes over reading (pings,
cancels and acks are answered within about twice this while a long CPU-bound call runs)."""
STANDBY_PARK_AFTER_S: Final = 1.0
"""Seconds without lane work after which the standby thread stops checking and sleeps until woken."""

Job = tuple[CallContext, Method]


class CpuLane:
    """The CPU lane of one worker, and the roles of its two threads (reader, standby); every attribute
    is guarded by ``roles``. The worker it serves reads, runs and writes (``Worker.read_once``,
    ``outcome``, ``terminal``, ``run``); the lane decides who reads and who runs what, when."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.roles = threading.Condition(threading.Lock())
        self.queue: collections.deque[Job] = collections.deque()
        """Lane calls waiting, in arrival order (bounded by the calls the parent may have in flight)."""
        self.reader: int | None = None
        """``threading.get_ident()`` of the thread that reads stdin (exactly one does)."""
        self.runner: int | None = None
        """The thread running lane calls, if any (at most one: the lane is serial)."""
        self.busy = False
        """True while the runner is inside a lane call."""
        self.current: CallContext | None = None
        """The lane call running now, if any."""
        self.seq = 0
        """Lane calls started: the standby sees whether the runner made progress."""
        self.standby_parked = False

    def take_turns(self) -> NoReturn:
        """The loop of both the main and the relief thread: read (and run lane calls) while this
        thread is the reader; once relieved, finish the lane's queue; then stand by."""
        me = threading.get_ident()
        while True:
            if self.reader == me:
                self._read_and_run(me)
            self._drain(me)
            self._stand_by(me)

    def admit(self, new: list[Job]) -> list[Job]:
        """(Reader, after its flush) Queue the lane calls just read and acked (``new`` is emptied); the
        calls to run in the thread pool instead: the lane's queue, when its runner is stuck in a call
        that was cancelled (it ran past the relief, so another thread reads): a call that ignores its
        cancellation must not hold up the calls behind it."""
        with self.roles:
            self.queue.extend(new)
            new.clear()
            running = self.current
            if running is None or not running.cancelled.is_set() or self.runner == self.reader:
                return []
            spilled = list(self.queue)
            self.queue.clear()
        self.worker.count("lane_spilled", len(spilled))
        return spilled

    def _read_and_run(self, me: int) -> None:
        """The reader's loop; returns when this thread was relieved (its lane call done).

        While the lane has calls the reader reads stdin only once its held results are due (see
        ``MAX_RESULT_HOLD_S``): the acks of the calls read then go out in the same write as those
        results, one wake-up of the parent for both."""
        worker = self.worker
        while True:
            with self.roles:
                can_run = self.runner is None and bool(self.queue)
            if not can_run:
                worker.read_once(block=True)
            elif worker.held_due():
                worker.read_once(block=False)
            with self.roles:
                if self.runner is not None or not self.queue:
                    continue
                ctx, method = self.queue.popleft()
                self._start(me, ctx)
            outcome = worker.outcome(ctx, method)
            with self.roles:
                self.busy = False
                self.current = None
                relieved = self.reader != me
                if not relieved:
                    self.runner = None
            if outcome is not None:  # held by the reader; written now if another thread reads
                worker.terminal(ctx, outcome, batch=False, hold=not relieved)
            if relieved:
                return

    def _start(self, me: int, ctx: CallContext) -> None:
        """(``roles`` held) This thread runs the lane call ``ctx``."""
        self.runner = me
        self.busy = True
        self.current = ctx
        self.seq += 1
        if self.standby_parked:
            self.standby_parked = False
            self.roles.notify()

    def _drain(self, me: int) -> None:
        """A relieved runner runs the lane's queue to the end, then lets the reader run it again."""
        while True:
            with self.roles:
                if self.runner != me:
                    return
                if not self.queue:
                    self.runner = None
                    return
                ctx, method = self.queue.popleft()
                self._start(me, ctx)
            self.worker.run(ctx, method, batch=False)
            with self.roles:
                self.busy = False
                self.current = None

    def _reader_in_call(self) -> bool:
        """(``roles`` held) The reader is inside a lane call, so nobody reads stdin."""
        return self.busy and self.runner == self.reader

    def _stand_by(self, me: int) -> None:
        """Wait until the reader has been inside one lane call for ``RELIEF_AFTER_S``, then take over
        reading. Sleeps without waking once the lane has been idle for ``STANDBY_PARK_AFTER_S``."""
        idle_since: float | None = None
        with self.roles:
            while True:
                if self._reader_in_call():
                    idle_since = None
                    seq = self.seq
                    self.roles.wait(RELIEF_AFTER_S)
                    if self._reader_in_call() and self.seq == seq:
                        self.reader = me
                        self.worker.count("reliefs", 1)
                        return  # the new reader writes what is held before it blocks
                    if self._reader_in_call():
                        self.worker.write_held_if_due()
                    continue
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                if now - idle_since < STANDBY_PARK_AFTER_S:
                    self.roles.wait(RELIEF_AFTER_S)
                    continue
                self.standby_parked = True
                while self.standby_parked:
                    self.roles.wait()
                idle_since = None
