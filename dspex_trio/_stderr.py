"""A child process's stderr: re-logged line by line under the child's name, its last lines kept.

Both kinds of child the runtime starts have one: a worker (whose fd 1 points at its stderr too, so
``print()`` lands here) and the zygote template. Their handles read it with a :class:`StderrRelay`, log
each line (``[w3] ...`` on the ``dspex_trio.worker`` logger, ``[zygote] ...`` on ``dspex_trio.zygote``)
and quote the last lines in start-up failures. Reading never stops before EOF, so a child that floods
stderr never blocks on a full pipe; a line longer than ``MAX_STDERR_LINE_BYTES`` is logged in pieces.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import Any, Final

import trio

STDERR_READ_CHUNK_BYTES: Final = 32 * 1024
"""Most stderr bytes handled per read, so re-logging a flood yields to other tasks often."""
STDERR_TAIL_LINES: Final = 20
"""Last stderr lines kept per child, quoted in start-up failures."""
MAX_STDERR_LINE_BYTES: Final = 8 * 1024
"""A longer stderr line is logged in pieces of this size, in bytes."""


class StderrRelay:
    """Re-logs one child's stderr (see the module doc). ``await relay.run(stream)`` until EOF."""

    def __init__(self, label: str, logger: logging.Logger, *, extra: Mapping[str, Any] | None = None) -> None:
        self.label = label
        """The child's name in the log (``w3``, ``zygote``)."""
        self._logger = logger
        self._extra = extra
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.done = trio.Event()
        """Set once the stream reached EOF (or broke, or was closed): every line was relayed."""

    @property
    def tail(self) -> list[str]:
        """The last lines the child wrote (blank lines left out)."""
        return list(self._tail)

    async def run(self, stream: trio.abc.ReceiveStream) -> None:
        """Relay ``stream`` line by line until EOF; a broken or closed stream counts as EOF."""
        pending = b""
        try:
            while True:
                try:
                    data = await stream.receive_some(STDERR_READ_CHUNK_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    if pending:
                        self._line(pending)
                    return
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                while len(pending) > MAX_STDERR_LINE_BYTES:
                    lines.append(pending[:MAX_STDERR_LINE_BYTES])
                    pending = pending[MAX_STDERR_LINE_BYTES:]
                for line in lines:
                    self._line(line)
        finally:
            self.done.set()

    def _line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if not text:
            return
        self._tail.append(text)
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info("[%s] %s", self.label, text, extra=self._extra)
