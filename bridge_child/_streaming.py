"""A streamed execution of any DSPy module: chunks of every ``str`` output field of every predictor inside
it, each tagged with its predictor, and ``status`` events (a predictor started, a tool was called, a tool
returned), in the order the program produced them.

Each event is a frame of the call (``ctx.emit``):

- ``{"event": "chunk", "predictor": "respond", "field": "answer", "chunk": "..."}``
- ``{"event": "status", "status": "predictor", "predictor": "respond", "message": "respond started"}``
- ``{"event": "status", "status": "tool_call", "tool": "search", "args": {...}, "message": "calling search"}``
- ``{"event": "status", "status": "tool_result", "tool": "search", "ok": true, "message": "search returned"}``

How: DSPy streams an LM's answer into ``settings.send_stream`` (``await stream.send(chunk)``, or
``anyio.from_thread.run(stream.send, chunk)`` from a synchronous module) when a ``StreamListener`` of
the calling predictor is registered. Instead of a memory stream read by another task (what
``dspy.streamify`` uses), the stream here is a sink whose ``send`` hands each chunk to that predictor's
listeners and emits what they yield at once; status events come from a DSPy callback in the program's
own thread. So every event leaves in program order, and no queue sits between the LM and the frame
stream. The module runs as it does unstreamed (its synchronous ``forward``, so a streamed execution
gives the outputs an unstreamed one gives: DSPy's async paths differ, e.g. in the error text ReAct
records), in an AnyIO worker thread of an event loop private to the call (``asyncio.run`` in the
call's thread), which is what lets DSPy stream from synchronous code.

Modules that run copies of their module (``best_of_n``, ``refine`` deep-copy it for each attempt) send
status events for the copies' predictors but no chunks: a listener is bound to one predictor object.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import defaultdict
from typing import Any, Final

from bridge_child._context import CallContext
from bridge_child._tools import ExecutionStopped

MAX_STATUS_ARGS_CHARS: Final = 2000
"""Largest tool-argument object a ``tool_call`` status event carries, as JSON characters; a larger one
is sent as text cut to this length."""
STOP_POLL_S: Final = 0.02
"""How often a streamed execution looks at its call's cancel and deadline, in seconds."""


def _short(value: Any, plain: Any) -> Any:
    data = plain(value)
    text = json.dumps(data, ensure_ascii=False)
    return data if len(text) <= MAX_STATUS_ARGS_CHARS else text[:MAX_STATUS_ARGS_CHARS] + "..."


def _status_callback(ctx: CallContext, stages: dict[str, str], plain: Any) -> Any:
    """A DSPy callback that emits this call's ``status`` events."""
    from dspy.predict.predict import Predict
    from dspy.utils.callback import BaseCallback

    class StatusEvents(BaseCallback):
        def __init__(self) -> None:
            self.tools: dict[str, str] = {}

        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            name = stages.get(getattr(instance, "stage", "")) if isinstance(instance, Predict) else None
            if name is not None:
                ctx.emit(
                    {
                        "event": "status",
                        "status": "predictor",
                        "predictor": name,
                        "message": f"{name} started",
                    }
                )

        def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            name = getattr(instance, "name", None)
            if not isinstance(name, str) or name == "finish":
                return
            self.tools[call_id] = name
            args = inputs.get("kwargs", inputs) if isinstance(inputs, dict) else inputs
            ctx.emit(
                {
                    "event": "status",
                    "status": "tool_call",
                    "tool": name,
                    "args": _short(args, plain),
                    "message": f"calling {name}",
                }
            )

        def on_tool_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
            name = self.tools.pop(call_id, None)
            if name is None:
                return
            ok = exception is None
            message = f"{name} returned" if ok else f"{name} raised {type(exception).__name__}"
            ctx.emit({"event": "status", "status": "tool_result", "tool": name, "ok": ok, "message": message})

    return StatusEvents()


class _ChunkSink:
    """Stands in for DSPy's ``send_stream``: routes each LM chunk to its predictor's listeners and emits
    the field chunks they yield, at once."""

    def __init__(self, ctx: CallContext, listeners: list[Any]) -> None:
        self.ctx = ctx
        self.listeners = listeners
        self.by_predictor: dict[int, list[Any]] = defaultdict(list)
        for listener in listeners:
            self.by_predictor[id(listener.predict)].append(listener)

    def emit(self, response: Any) -> None:
        if response.chunk:
            self.ctx.emit(
                {
                    "event": "chunk",
                    "predictor": response.predict_name,
                    "field": response.signature_field_name,
                    "chunk": response.chunk,
                }
            )

    async def send(self, value: Any) -> None:
        predict_id = getattr(value, "predict_id", None)
        if predict_id is None or self.ctx.cancelled.is_set():
            return  # DSPy's own status messages, or a call given up: nothing to send
        for listener in self.by_predictor.get(predict_id, ()):
            response = listener.receive(value)
            if response is not None:
                self.emit(response)

    def finish(self) -> None:
        for listener in self.listeners:
            response = listener.finalize()
            if response is not None:
                self.emit(response)


def run_streamed(ctx: CallContext, module: Any, kwargs: dict[str, Any], plain: Any) -> Any:
    """Run ``module(**kwargs)`` streaming its events; its prediction, or None when the call was
    cancelled meanwhile (its terminal frame is already sent). Raises what the module raises."""
    import anyio
    import anyio.to_thread
    from dspy.dsp.utils.settings import settings
    from dspy.streaming import StreamListener

    named = module.named_predictors()
    listeners = [
        StreamListener(field, predict=predictor, predict_name=name, allow_reuse=True)
        for name, predictor in named
        for field, info in predictor.signature.output_fields.items()
        if info.annotation is str
    ]
    stages = {predictor.stage: name for name, predictor in named}
    sink = _ChunkSink(ctx, listeners)
    callbacks = [*settings.callbacks, _status_callback(ctx, stages, plain)]

    async def main() -> Any:
        task = asyncio.current_task()
        assert task is not None
        stopped: list[str] = []

        async def watch() -> None:  # the program stops with its call (cancel or deadline)
            while True:
                if ctx.cancelled.is_set() or ctx.remaining() == 0.0:
                    stopped.append("cancelled" if ctx.cancelled.is_set() else "deadline")
                    task.cancel()
                    return
                await asyncio.sleep(STOP_POLL_S)

        watcher = asyncio.create_task(watch())
        try:
            with settings.context(send_stream=sink, stream_listeners=listeners, callbacks=callbacks):
                # the module runs as it does unstreamed (its synchronous forward: the same outputs), in
                # an AnyIO worker thread (what lets DSPy stream from it); abandoned if stopped
                call = functools.partial(module, **kwargs)
                prediction = await anyio.to_thread.run_sync(
                    call, limiter=anyio.CapacityLimiter(1), abandon_on_cancel=True
                )
        except asyncio.CancelledError:
            if not stopped:
                raise
            if stopped[0] == "deadline":
                raise ExecutionStopped("deadline", "") from None
            return None
        finally:
            watcher.cancel()
        sink.finish()
        return prediction

    prediction = asyncio.run(main())
    return None if ctx.cancelled.is_set() else prediction
