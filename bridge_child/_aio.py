"""The worker's asynchronous lane: executions with a network LM run as tasks on an asyncio event loop of
the worker's own (one thread), through DSPy's async API, so thousands of LM requests are in flight per
worker without a thread each. A ``cancel`` cancels the task: the HTTP request is abandoned and its
connection closed, so the provider stops generating.

A method opts in with ``Method.aio`` (the coroutine) and ``Method.on_aio`` (whether this call goes
there: ``bridge_child._programs.on_aio_lane``). The reader acks the call, then hands it here after its
flush; the task writes the call's terminal frame itself (``Worker.terminal``, under the send lock).
Started with ``--async-capacity N`` (N > 0); the loop thread starts at the worker's first such call.

No dspy here.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Final

from bridge_child import _inflight, wire
from bridge_child._context import CallContext, Method, MethodError

if TYPE_CHECKING:
    from bridge_child._server import Worker

GIL_SWITCH_INTERVAL_S: Final = 0.0005
"""``sys.setswitchinterval`` of a worker with an asynchronous lane, in seconds (Python's default is
0.005): a thousand cancels are read and their connections closed while the loop unwinds tasks."""


class AioLane:
    """One worker's event loop thread and its tasks, by call id."""

    def __init__(self, worker: Worker, capacity: int) -> None:
        self.worker = worker
        self.capacity = capacity
        """Calls the host may send for this lane beyond the threads (added to the hello's capacity)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        self._calls: set[int] = set()
        """Calls handed to this lane and not yet ended or cancelled (guarded by ``_lock``)."""
        self._lock = threading.Lock()
        self.started = 0

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                # The reader must get the GIL back quickly from a loop busy with thousands of tasks
                # (acks, pings and cancels wait on it): a shorter switch interval than Python's 5 ms.
                sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=run, name="bridge-aio", daemon=True).start()
                ready.wait()
                self._loop = loop
            return self._loop

    def adopt(self, call: int) -> None:
        """(Reader, when it routes call ``call`` here) From now on a cancel of it is this lane's."""
        with self._lock:
            self._calls.add(call)

    def holds(self, call: int) -> bool:
        """(Reader) Call ``call`` was routed here and has not ended."""
        with self._lock:
            return call in self._calls

    def submit(self, ctx: CallContext, method: Method) -> None:
        """(Reader, after the ack is written) Run ``method.aio`` for ``ctx`` as a task on the loop."""
        loop = self._ensure_loop()
        self.started += 1
        loop.call_soon_threadsafe(self._start, ctx, method)

    def _start(self, ctx: CallContext, method: Method) -> None:
        if ctx.cancelled.is_set():
            with self._lock:
                self._calls.discard(ctx.id)
            return
        task = asyncio.get_running_loop().create_task(self._run(ctx, method))
        with self._lock:
            self._tasks[ctx.id] = task

    async def _run(self, ctx: CallContext, method: Method) -> None:
        assert method.aio is not None
        worker = self.worker
        message: wire.Result | wire.Error
        deadline: asyncio.Timeout | None = None
        try:
            with worker.lock:
                worker.executing.add(ctx.id)
            async with asyncio.timeout(ctx.remaining()) as deadline:
                value = await method.aio(worker, ctx)
            message = wire.Result(ctx.id, value)
        except asyncio.CancelledError:
            return  # cancelled: its terminal frame was already sent
        except TimeoutError as exc:
            if deadline is None or not deadline.expired():
                detail = str(exc) or "TimeoutError"
                message = wire.Error(ctx.id, wire.ErrorCode.INTERNAL, "TimeoutError", detail)
            else:
                message = wire.Error(
                    ctx.id, wire.ErrorCode.TIMEOUT, "CallTimeout", "the call's deadline passed"
                )
        except MethodError as exc:
            message = wire.Error(ctx.id, exc.code, exc.type or type(exc).__name__, exc.message, exc.details)
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(exc)).strip()
            message = wire.Error(ctx.id, wire.ErrorCode.INTERNAL, type(exc).__name__, str(exc) or detail)
        finally:
            with self._lock:
                self._tasks.pop(ctx.id, None)
                self._calls.discard(ctx.id)
            with worker.lock:
                worker.executing.discard(ctx.id)
        if not ctx.cancelled.is_set():
            worker.terminal(ctx, message, batch=False)

    def cancel(self, call: int) -> None:
        """(Reader) Cancel call ``call``, if it runs here."""
        self.cancel_many([call])

    def cancel_many(self, calls: list[int]) -> None:
        """(Reader, once per read, after setting each call's ``cancelled``) Close the connections of
        ``calls``' LM requests and cancel their tasks, in the loop's thread, with one wake-up of it.

        The loop closes them (before it cancels any task), not the reader: the loop would otherwise
        wake at the first closed connection and unwind that task while the reader closes the others,
        the two threads taking the GIL from each other at every ``shutdown`` (measured: 500 closes
        spread over 30-110 ms under load, against 10-40 ms in one thread). A task cancelled before it
        sees its connection end unwinds by ``CancelledError`` alone, not by the LM client's error path.
        """
        with self._lock:
            mine = [call for call in calls if call in self._calls]
            self._calls.difference_update(mine)
            loop = self._loop
        if not mine:
            return
        if loop is None:  # pragma: no cover - a call is routed here only once the loop started
            for call in mine:
                _inflight.abort(call)
            return

        def close_and_cancel() -> None:
            for call in mine:
                _inflight.abort(call)
            for call in mine:
                task = self._tasks.get(call)
                if task is not None:
                    task.cancel()

        loop.call_soon_threadsafe(close_and_cancel)

    @property
    def running(self) -> int:
        return len(self._tasks)
