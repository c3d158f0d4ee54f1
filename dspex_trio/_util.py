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
