"""Deterministic fake values of a declared type: what the mock backend answers and what the embedded
offline LM writes (no dspy, no trio). Import the names from :mod:`bridge_child.spec`.

A value is derived from a stable hash of the field name and a seed text (the inputs), so the same
inputs always give the same value, of the declared type: :func:`fake_value` for the types the safe
signature parser models, :func:`fake_from_schema` for any JSON schema (a pydantic model's, or what DSPy
prints for a type the parser does not model). Work is bounded (depth, number of values) whatever the
schema holds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from bridge_child._signatures import STR, TypeSpec

MAX_SCHEMA_DEPTH: Final = 8
"""Deepest nesting followed when building a value from a JSON schema."""
MAX_SCHEMA_ITEMS: Final = 8
"""Most items in an array built from a JSON schema (a larger ``minItems`` is not honoured)."""
MAX_SCHEMA_VALUES: Final = 4096
"""Most values (scalars, items, members) built from one schema; past it, ``null``."""

_WORDS: Final = (
    "amber", "brisk", "cobalt", "delta", "ember", "fable", "granite", "harbor", "ivory", "juniper",
    "kelp", "lumen", "maple", "nimbus", "onyx", "prairie", "quartz", "raven", "sierra", "tundra",
)  # fmt: skip
_FORMATS: Final = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
"""String formats pydantic checks, and a value of each."""


def digest(*parts: str) -> int:
    """A stable 64-bit number derived from ``parts`` (sha256; the same in every process)."""
    return int.from_bytes(
        hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()[:8], "big"
    )


def _sentence(name: str, h: int) -> str:
    words = " ".join(_WORDS[(h >> (5 * i)) % len(_WORDS)] for i in range(4))
    return f"The {name.replace('_', ' ')} is {words}."


def fake_value(name: str, type_: TypeSpec, seed_text: str, salt: str = "") -> Any:
    """A deterministic value of ``type_`` for field ``name``, derived from ``seed_text``: ``str`` a short
    sentence naming the field; ``int`` 0..99; ``float`` within [0, 1]; ``bool``; ``list[T]`` three
    items; ``dict`` a small object; ``Literal[...]`` one of its values; ``json`` a value of its schema."""
    h = digest(name, salt, seed_text)
    kind = type_.kind
    if kind == "str":
        return _sentence(name, h)
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
    if kind == "json":
        schema = json.loads(type_.schema) if type_.schema is not None else {}
        return fake_from_schema(schema, name, seed_text, salt)
    return []  # history (an input type): no turns


def fake_from_schema(schema: Any, name: str, seed_text: str, salt: str = "") -> Any:
    """A deterministic value that fits the JSON schema ``schema`` (objects get every property; arrays
    two items, or ``minItems`` up to :data:`MAX_SCHEMA_ITEMS`; ``$ref``, ``anyOf``, ``enum``, ``const``
    and string ``format`` are followed). An empty schema gives a small object."""
    maker = _SchemaValues(seed_text, salt, schema if isinstance(schema, dict) else {})
    return maker.value(schema, name, 0)


def _in_bounds(schema: dict[str, Any], h: int, *, integer: bool) -> int | float:
    """A number within the schema's ``minimum``/``maximum`` (exclusive ones too): 0..99 (an integer) or
    within [0, 1] (a number) when it sets none."""
    low, high = schema.get("minimum"), schema.get("maximum")
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = schema["exclusiveMinimum"] + (1 if integer else 1e-3)
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = schema["exclusiveMaximum"] - (1 if integer else 1e-3)
    low = low if isinstance(low, int | float) and not isinstance(low, bool) else None
    high = high if isinstance(high, int | float) and not isinstance(high, bool) else None
    if integer:
        first = int(low) if low is not None else (int(high) - 99 if high is not None and high < 0 else 0)
        count = int(high) - first + 1 if high is not None else 100
        return first + h % max(1, min(count, 100))
    start = float(low) if low is not None else (float(high) - 1.0 if high is not None and high < 0 else 0.0)
    span = float(high) - start if high is not None else 1.0
    return round(start + (h % 1001) / 1000 * max(0.0, min(span, 1e9)), 3)


class _SchemaValues:
    def __init__(self, seed_text: str, salt: str, root: dict[str, Any]) -> None:
        self.seed_text = seed_text
        self.salt = salt
        self.root = root
        self.budget = MAX_SCHEMA_VALUES

    def value(self, schema: Any, name: str, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH or self.budget <= 0:
            return None
        self.budget -= 1
        h = digest(name, self.salt, self.seed_text)
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = self.root
            for part in ref[2:].split("/")[:MAX_SCHEMA_DEPTH]:
                target = target.get(part) if isinstance(target, dict) else None
            return self.value(target, name, depth + 1)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[h % len(enum)]
        for key in ("anyOf", "oneOf", "allOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
                return self.value((non_null or options)[0], name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object" or "properties" in schema or not schema:
            properties = schema.get("properties")
            if isinstance(properties, dict) and properties:
                return {
                    str(key): self.value(sub, f"{name}.{key}", depth + 1)
                    for key, sub in properties.items()
                    if self.budget > 0
                }
            extra = schema.get("additionalProperties")
            item = extra if isinstance(extra, dict) and extra else {"type": "string"}
            return {"key": self.value(item, f"{name}.key", depth + 1)}
        if kind == "array":
            wanted = schema.get("minItems")
            count = min(
                max(2, wanted if isinstance(wanted, int) and not isinstance(wanted, bool) else 0),
                MAX_SCHEMA_ITEMS,
            )
            items = schema.get("items")
            return [
                self.value(items if isinstance(items, dict) else {"type": "string"}, f"{name} {i}", depth + 1)
                for i in range(count)
            ]
        if kind in ("integer", "number"):
            return _in_bounds(schema, h, integer=kind == "integer")
        if kind == "boolean":
            return h % 2 == 0
        if kind == "null":
            return None
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        return _sentence(name.rsplit(".", 1)[-1], h)
