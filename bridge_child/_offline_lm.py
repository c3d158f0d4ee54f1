"""The embedded offline LM: deterministic answers, no key, no network.

A custom lm15 engine (DSPy 3.4's extension point: ``dspy.LM(model, engine=E(), async_engine=AE())``)
that answers any DSPy adapter request from the request itself. It reads the output fields and their
types from the system message DSPy's ChatAdapter writes (``1. `answer` (str): ...``, read by
``spec.prompt_output_fields``; types by the safe parser, an unknown one read as ``str``), derives each value
from a stable hash of the field name and the last user message (the formatted inputs), and replies in
ChatAdapter's format ``[[ ## field ## ]]\\nvalue\\n\\n...[[ ## completed ## ]]`` (or as a JSON object when
the prompt has no ChatAdapter markers, as with ``JSONAdapter``). So the same inputs always give the same
outputs, and every value has its declared type (``spec.fake_value``, which the mock backend uses too).

Streaming sends the reply word by word, so ``dspy.streamify`` listeners yield several chunks per field.
Usage is reported as whitespace word counts. Importing this module does not import dspy.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

from bridge_child.spec import (
    STR,
    InvalidSignature,
    TypeSpec,
    digest,
    fake_value,
    parse_type,
    prompt_output_fields,
)

MODEL: Final = "offline/dspex-deterministic"
"""The model string of the offline LM (its provider prefix is never routed: the engine is custom)."""

_CHAT_MARKER: Final = "[[ ## completed ## ]]"


_SCHEMA_NOTE: Final = "# note: the value you produce must adhere to the JSON schema: "
"""How ChatAdapter's system message gives the JSON schema of a structured output field."""


def _schema_note(system: str, name: str) -> str | None:
    """The JSON schema ChatAdapter's system message gives for output field ``name`` (its
    ``[[ ## name ## ]]`` block's note), as JSON text; None if there is none."""
    block = system.find(f"[[ ## {name} ## ]]\n{{{name}}}")
    if block < 0:
        return None
    line_end = system.find("\n", block + len(name) * 2 + 12)
    if line_end < 0:
        line_end = len(system)
    note = system.find(_SCHEMA_NOTE, block, line_end)
    if note < 0:
        return None
    text = system[note + len(_SCHEMA_NOTE) : line_end]
    try:
        json.loads(text)
    except ValueError:
        return None
    return text


def output_fields(system: str) -> list[tuple[str, TypeSpec]]:
    """The output fields (name, type) listed in a DSPy adapter's system message. A type the safe parser
    does not model (a pydantic model, ``dict[str, Any]``, ``Optional[int]``) is read from the JSON
    schema the prompt gives for it (``json``), else answered as text."""
    fields: list[tuple[str, TypeSpec]] = []
    for name, annotation in prompt_output_fields(system):
        try:
            type_ = parse_type(annotation) if annotation is not None else STR
        except InvalidSignature:
            schema = _schema_note(system, name)
            type_ = TypeSpec("json", schema=schema) if schema is not None else STR
        fields.append((name, type_))
    return fields


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
        return f"Offline answer {digest(seed) % 10_000}.", prompt_words
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
