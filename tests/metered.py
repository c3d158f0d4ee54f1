"""A measure of work that is not time: a ``str`` that counts the characters its operations touch.

Parsers of untrusted text (DSPy prompts in request bodies) must do work linear in the text. Give them a
:class:`MeteredStr` and compare ``meter.chars`` with ``len(text)``: every search is charged the
characters it scanned, every slice its length, every index one, every other whole-text method
``len(text)``. Only operations on the metered object itself are seen (a slice is a plain ``str`` again,
charged once when it was cut), so a parser checked with it must work on the text by searching, slicing
and indexing it, which is how the prompt parsers here are written.
"""

from __future__ import annotations

from typing import Any, SupportsIndex


class Meter:
    def __init__(self) -> None:
        self.chars = 0
        self.calls = 0

    def charge(self, chars: int) -> None:
        self.calls += 1
        self.chars += max(0, chars)


def _window(length: int, start: SupportsIndex | None, end: SupportsIndex | None) -> tuple[int, int]:
    first, last, _ = slice(start, end).indices(length)
    return first, max(first, last)


class MeteredStr(str):
    meter: Meter

    def __new__(cls, value: str, meter: Meter | None = None) -> MeteredStr:
        self = super().__new__(cls, value)
        self.meter = meter if meter is not None else Meter()
        return self

    def find(self, sub: str, start: SupportsIndex | None = None, end: SupportsIndex | None = None) -> int:
        first, last = _window(len(self), start, end)
        at = super().find(sub, start, end)
        self.meter.charge((at + len(sub) if at >= 0 else last) - first)
        return at

    def rfind(self, sub: str, start: SupportsIndex | None = None, end: SupportsIndex | None = None) -> int:
        first, last = _window(len(self), start, end)
        at = super().rfind(sub, start, end)
        self.meter.charge(last - (at if at >= 0 else first))
        return at

    def index(self, sub: str, start: SupportsIndex | None = None, end: SupportsIndex | None = None) -> int:
        at = self.find(sub, start, end)
        if at < 0:
            raise ValueError("substring not found")
        return at

    def startswith(
        self, prefix: Any, start: SupportsIndex | None = None, end: SupportsIndex | None = None
    ) -> bool:
        self.meter.charge(max(len(p) for p in prefix) if isinstance(prefix, tuple) else len(prefix))
        return super().startswith(prefix, start, end)

    def endswith(
        self, suffix: Any, start: SupportsIndex | None = None, end: SupportsIndex | None = None
    ) -> bool:
        self.meter.charge(max(len(s) for s in suffix) if isinstance(suffix, tuple) else len(suffix))
        return super().endswith(suffix, start, end)

    def __getitem__(self, key: Any) -> str:
        value = super().__getitem__(key)
        self.meter.charge(len(value))
        return value

    def __contains__(self, sub: object) -> bool:
        self.meter.charge(len(self))
        return super().__contains__(sub)  # type: ignore[operator]

    def _whole(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.meter.charge(len(self))
        return getattr(str, name)(self, *args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # type: ignore[override]
        return self._whole("encode", *args, **kwargs)  # type: ignore[no-any-return]

    def split(self, *args: Any, **kwargs: Any) -> list[str]:  # type: ignore[override]
        return self._whole("split", *args, **kwargs)  # type: ignore[no-any-return]

    def strip(self, *args: Any) -> str:
        return self._whole("strip", *args)  # type: ignore[no-any-return]

    def rstrip(self, *args: Any) -> str:
        return self._whole("rstrip", *args)  # type: ignore[no-any-return]

    def translate(self, *args: Any) -> str:
        return self._whole("translate", *args)  # type: ignore[no-any-return]
