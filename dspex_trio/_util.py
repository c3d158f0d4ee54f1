"""Small Trio helpers shared by the runtime's services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for an ``open_*`` context manager's own background tasks.

    An exception raised by the user's ``async with`` body comes out as itself, not wrapped in an
    ``ExceptionGroup`` (as a bare nursery would do), when no background task failed with it.
    """
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                raise
    except BaseExceptionGroup as group:
        if body_error is not None and len(group.exceptions) == 1 and group.exceptions[0] is body_error:
            raise body_error from body_error.__cause__
        raise


class WrappedStream(trio.abc.Stream):
    """A stream over another one (``_stream``) that changes how it is read: sending, waiting to send and
    closing go straight to the wrapped stream; ``transport`` is that stream (a ``trio.SocketStream``, or a
    ``trio.SSLStream`` under TLS). Subclasses implement ``receive_some``."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    @property
    def transport(self) -> trio.abc.Stream:
        return self._stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
