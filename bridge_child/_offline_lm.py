"""The embedded offline LM: deterministic answers, no key, no network.

A custom lm15 engine (DSPy 3.4's extension point: ``dspy.LM(model, engine=E(), async_engine=AE())``)
that answers any DSPy adapter request from the request itself. It reads the output fields and their
types from the system message DSPy's ChatAdapter writes (``1. `answer` (str): ...``), derives each value
from a stable hash of the field name and the last user message (the formatted inputs), and replies in
ChatAdapter's format ``[[ ## field ## ]]\\nvalue\\n\\n...[[ ## completed ## ]]`` (or as a JSON object when
the prompt has no ChatAdapter markers, as with ``JSONAdapter``). So the same inputs always give the same
outputs, and every value has its declared type:

- ``str``: a short sentence naming the field; ``int``: 0..99; ``float``: within [0, 1]; ``bool``;
- ``list[T]``: three items; ``dict``: a small object; ``Literal[...]``: one of its values.

Streaming sends the reply word by word, so ``dspy.streamify`` listeners yield several chunks per field.
Usage is reported as whitespace word counts. Importing this module does not import dspy.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

from bridge_child._signatures import STR, InvalidSignature, TypeSpec, parse_type

MODEL: Final = "offline/dspex-deterministic"
"""The model string of the offline LM (its provider prefix is never routed: the engine is custom)."""

_OUTPUT_SECTION_RE: Final = re.compile(
    r"Your output fields are:\n(.*?)(?:\nAll interactions will be structured|\Z)", re.DOTALL
)
_FIELD_LINE_RE: Final = re.compile(r"^\d+\. `([A-Za-z_][A-Za-z0-9_]*)` \((.*?)\):", re.MULTILINE)
_CHAT_MARKER: Final = "[[ ## completed ## ]]"
_WORDS: Final = (
    "amber", "brisk", "cobalt", "delta", "ember", "fable", "granite", "harbor", "ivory", "juniper",
    "kelp", "lumen", "maple", "nimbus", "onyx", "prairie", "quartz", "raven", "sierra", "tundra",
)  # fmt: skip


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def output_fields(system: str) -> list[tuple[str, TypeSpec]]:
    """The output fields (name, type) listed in a DSPy adapter's system message."""
    match = _OUTPUT_SECTION_RE.search(system)
    if match is None:
        return []
    fields: list[tuple[str, TypeSpec]] = []
    for name, annotation in _FIELD_LINE_RE.findall(match.group(1)):
        try:
            type_ = parse_type(annotation)
        except InvalidSignature:
            type_ = STR  # a type we do not model: answer text, let the adapter decide
        fields.append((name, type_))
    return fields


def fake_value(name: str, type_: TypeSpec, seed_text: str, salt: str = "") -> Any:
    """A deterministic value of ``type_`` for field ``name``, derived from ``seed_text``."""
    h = _digest(name, salt, seed_text)
    kind = type_.kind
    if kind == "str":
        words = " ".join(_WORDS[(h >> (5 * i)) % len(_WORDS)] for i in range(4))
        return f"The {name.replace('_', ' ')} is {words}."
    if kind == "int":
        return h % 100
    if kind == "float":
        return round((h % 1001) / 1000, 3)
    if kind == "bool":
        return h % 2 == 0
    if kind == "literal":
        return type_.values[h % len(type_.values)]
    if kind == "list":
        assert type_.item is not None
        return [fake_value(name, type_.item, seed_text, f"{salt}/{i}") for i in range(3)]
    if kind == "dict":
        item = type_.item or STR
        return {"key": fake_value(name, item, seed_text, f"{salt}/key")}
    return ""  # pragma: no cover


def _request_texts(request: Any) -> tuple[str, list[str]]:
    system = request.system
    if system is None:
        system_text = ""
    elif isinstance(system, str):
        system_text = system
    else:
        system_text = "".join(getattr(part, "text", "") or "" for part in system)
    user_texts = [m.text or "" for m in request.messages if m.role == "user"]
    return system_text, user_texts


def reply_text(request: Any) -> tuple[str, int]:
    """The reply to ``request`` and the prompt size in words."""
    system, user_texts = _request_texts(request)
    seed = user_texts[-1] if user_texts else ""
    fields = output_fields(system)
    prompt_words = len(system.split()) + sum(len(m.split()) for m in user_texts)
    if not fields:
        return f"Offline answer {_digest(seed) % 10_000}.", prompt_words
    values = {name: fake_value(name, type_, seed) for name, type_ in fields}
    if _CHAT_MARKER not in system:  # JSONAdapter and friends: a JSON object
        return json.dumps(values), prompt_words
    blocks = []
    for name, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        blocks.append(f"[[ ## {name} ## ]]\n{text}")
    return "\n\n".join([*blocks, _CHAT_MARKER]), prompt_words


def _pieces(text: str) -> list[str]:
    """The reply as stream deltas: one word (with its trailing whitespace) each."""
    return re.findall(r"\s*\S+\s*", text) or [text]


class OfflineEngine:
    """Sync lm15 engine: ``complete(Request) -> Response`` and ``stream(Request)`` events."""

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage

        text, prompt_words = reply_text(request)
        return Response(
            id=None,
            model=MODEL,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=prompt_words, output_tokens=len(text.split())),
        )

    def stream(self, request: Any) -> Iterator[Any]:
        from dspy.lm15 import StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta, Usage

        text, prompt_words = reply_text(request)
        yield StreamStartEvent(model=MODEL)
        for piece in _pieces(text):
            yield StreamDeltaEvent(delta=TextDelta(text=piece))
        yield StreamEndEvent(
            finish_reason="stop", usage=Usage(input_tokens=prompt_words, output_tokens=len(text.split()))
        )

    def close(self) -> None:
        pass


class AsyncOfflineEngine:
    """Async counterpart (``acall``, ``streamify``)."""

    def __init__(self, sync: OfflineEngine | None = None) -> None:
        self.sync = sync or OfflineEngine()

    async def complete(self, request: Any) -> Any:
        return self.sync.complete(request)

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        for event in self.sync.stream(request):
            yield event

    async def aclose(self) -> None:
        pass


def offline_lm(**kwargs: Any) -> Any:
    """A ``dspy.LM`` backed by the offline engine (no cache: answers are cheap and deterministic)."""
    import dspy

    sync = OfflineEngine()
    return dspy.LM(MODEL, engine=sync, async_engine=AsyncOfflineEngine(sync), cache=False, **kwargs)
