"""Safe parsing of program signatures sent by clients: never ``eval``.

DSPy's own string signatures evaluate their type annotations as Python. Here a client's signature is
parsed by a tiny tokenizer and recursive-descent parser that knows only an allowed set of types:

- ``str``, ``int``, ``float``, ``bool``, ``dict``, ``dict[str, T]`` (``T`` a scalar);
- ``list[T]`` where ``T`` is a scalar or a ``Literal``;
- ``Literal[...]`` of string, integer and boolean literals;
- ``History`` (or ``dspy.History``), for an input: a chat's earlier turns, sent as a JSON list of objects.

Everything else (names such as ``MyClass``, calls such as ``__import__('os')``, attributes, nesting
such as ``list[list[str]]``) is refused with :class:`InvalidSignature`. The worker then builds the dspy
``Signature`` class with :func:`dspy.make_signature` from real Python types (``bridge_child._programs``).

Two forms are accepted: a string ``"question, context: list[str] -> answer, confidence: float"``, and a
structured object ``{"inputs": [{"name", "type", "desc"}], "outputs": [...], "instructions": "..."}``.

This module is the signature part of the program-spec layer: import its names from
:mod:`bridge_child.spec`. It imports neither dspy nor trio.
"""

from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from bridge_child import wire
from bridge_child._context import MethodError

MAX_SIGNATURE_CHARS: Final = 16 * 1024
MAX_ANNOTATION_CHARS: Final = 1024
MAX_FIELDS: Final = 64
MAX_FIELD_NAME_CHARS: Final = 64
MAX_LITERAL_VALUES: Final = 64
MAX_LITERAL_CHARS: Final = 256
MAX_DESC_CHARS: Final = 4096
MAX_INSTRUCTIONS_CHARS: Final = 64 * 1024

SCALARS: Final = ("str", "int", "float", "bool")
HISTORY_NAMES: Final = ("History", "dspy.History")
"""How a signature names ``dspy.History`` (an input only)."""
_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_TOKEN_RE: Final = re.compile(
    r"""\s*(?:
        (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)
      | (?P<string>'[^'\\\n]*'|"[^"\\\n]*")
      | (?P<int>-?[0-9]{1,18})
      | (?P<punct>[\[\],])
    )""",
    re.VERBOSE,
)


class SpecError(MethodError):
    """Something the program-spec layer refuses (a spec, a signature, inputs, an LM configuration). A
    worker method that raises it fails its call with ``invalid_params``; ``type`` names the kind."""

    def __init__(self, message: str, *, type: str = "InvalidParams") -> None:
        super().__init__(wire.ErrorCode.INVALID_PARAMS, message, type=type)


class InvalidSignature(SpecError):
    """The signature (or program spec) is refused; fails the call with ``invalid_params``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="InvalidSignature")


# -- the model --------------------------------------------------------------------------------------

LiteralValue = str | int | bool


@dataclass(frozen=True)
class TypeSpec:
    """One allowed type: a scalar, ``dict``, ``list[item]``, ``Literal[values]``, ``History`` (a chat's
    earlier turns), or ``json``: any JSON value, described by a JSON schema (a type a registered
    program declares in Python, e.g. a pydantic model, that the safe parser does not model)."""

    kind: Literal["str", "int", "float", "bool", "dict", "list", "literal", "history", "json"]
    item: TypeSpec | None = None
    """The item type of a list, or the value type of a ``dict[str, T]``."""
    values: tuple[LiteralValue, ...] = ()
    label: str | None = None
    """``json`` only: how the type is shown (the Python type's name, e.g. ``Answer``)."""
    schema: str | None = None
    """``json`` only: the JSON schema of the values, as JSON text (None: any JSON value)."""

    def render(self) -> str:
        """The annotation as text (what :func:`parse_type` reads back, ``json`` types excepted)."""
        if self.kind == "history":
            return "History"
        if self.kind == "json":
            return self.label or "json"
        if self.kind == "list":
            assert self.item is not None
            return f"list[{self.item.render()}]"
        if self.kind == "dict":
            return "dict" if self.item is None else f"dict[str, {self.item.render()}]"
        if self.kind == "literal":
            return "Literal[" + ", ".join(_render_literal(v) for v in self.values) + "]"
        return self.kind

    def to_python(self) -> Any:
        """The real Python type for dspy (``typing.Literal`` built from the parsed values; ``History``
        imports dspy)."""
        if self.kind == "history":
            import dspy

            return dspy.History
        if self.kind == "json":
            return Any
        if self.kind == "list":
            assert self.item is not None
            return list[self.item.to_python()]  # type: ignore[misc]
        if self.kind == "dict":
            return dict if self.item is None else dict[str, self.item.to_python()]  # type: ignore[misc]
        if self.kind == "literal":
            return Literal.__getitem__(self.values)
        return {"str": str, "int": int, "float": float, "bool": bool}[self.kind]

    def accepts(self, value: Any) -> bool:
        """True if a plain (decoded JSON/msgpack) value fits this type."""
        kind = self.kind
        if kind == "str":
            return isinstance(value, str)
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            return isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "literal":
            return any(type(value) is type(v) and value == v for v in self.values)
        if kind == "list":
            assert self.item is not None
            return isinstance(value, list) and all(self.item.accepts(v) for v in value)
        if kind == "dict":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                return False
            return self.item is None or all(self.item.accepts(v) for v in value.values())
        if kind == "history":  # the turns: one object (field name -> value) each
            return isinstance(value, list) and all(
                isinstance(turn, dict) and all(isinstance(k, str) for k in turn) for turn in value
            )
        return kind == "json"  # any JSON: checked by the program's own types (pydantic) where it runs


STR: Final = TypeSpec("str")


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: TypeSpec = STR
    desc: str | None = None
    optional: bool = False
    """An input that may be left out (a registered program's parameter with a default)."""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type.render(), "desc": self.desc}
        if self.type.schema is not None:
            out["schema"] = json.loads(self.type.schema)
        if self.optional:
            out["optional"] = True
        return out


@dataclass(frozen=True)
class SignatureSpec:
    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]
    instructions: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "inputs": [f.describe() for f in self.inputs],
            "outputs": [f.describe() for f in self.outputs],
            "instructions": self.instructions,
        }


def _render_literal(value: LiteralValue) -> str:
    if isinstance(value, str):
        return "'" + value + "'" if "'" not in value else '"' + value + '"'
    return repr(value)


# -- annotations ------------------------------------------------------------------------------------


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None or match.end() == pos:
            bad = text[pos:].lstrip()[:1]
            raise ValueError(f"unexpected character {bad!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _TypeParser:
    def __init__(self, text: str) -> None:
        self.text = text.strip()
        self.pos = 0
        try:
            self.tokens = _tokenize(text)
        except ValueError as exc:
            raise self.fail(str(exc)) from None

    def fail(self, why: str) -> InvalidSignature:
        return InvalidSignature(
            f"unsupported type annotation {self.text!r}: {why}. Allowed: str, int, float, bool, dict, "
            "dict[str, T], list[T] (T one of str, int, float, bool, Literal[...]), Literal[...] of "
            "string, integer or boolean values, and History (inputs only)"
        )

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise self.fail("it ends too early")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        kind, text = self.take()
        if kind != "punct" or text != value:
            raise self.fail(f"expected {value!r}, found {text!r}")

    def parse(self) -> TypeSpec:
        if not self.tokens:
            raise self.fail("it is empty")
        spec = self.type(top=True)
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return spec

    def type(self, *, top: bool) -> TypeSpec:
        kind, name = self.take()
        if kind != "name":
            raise self.fail(f"expected a type name, found {name!r}")
        subscripted = self.peek() == ("punct", "[")
        if name in HISTORY_NAMES and top:
            if subscripted:
                raise self.fail("History takes no parameters")
            return TypeSpec("history")
        if name in SCALARS:
            if subscripted:
                raise self.fail(f"{name} takes no parameters")
            return TypeSpec(name)  # type: ignore[arg-type]
        if name == "Literal":
            if not subscripted:
                raise self.fail("Literal needs values, e.g. Literal['yes', 'no']")
            return self.literal()
        if name in ("list", "List") and top:
            if not subscripted:
                raise self.fail("give the item type of a list, e.g. list[str]")
            self.expect("[")
            item = self.type(top=False)
            if item.kind not in (*SCALARS, "literal"):
                raise self.fail("list items must be str, int, float, bool or a Literal")
            self.expect("]")
            return TypeSpec("list", item=item)
        if name in ("dict", "Dict") and top:
            if not subscripted:
                return TypeSpec("dict")
            self.expect("[")
            key_kind, key = self.take()
            if (key_kind, key) != ("name", "str"):
                raise self.fail("dict keys must be str")
            self.expect(",")
            value = self.type(top=False)
            if value.kind not in (*SCALARS, "literal"):
                raise self.fail("dict values must be str, int, float, bool or a Literal")
            self.expect("]")
            return TypeSpec("dict", item=value)
        if name in ("list", "List", "dict", "Dict"):
            raise self.fail("nested containers are not supported")
        raise self.fail(f"unknown type {name!r}")

    def literal(self) -> TypeSpec:
        self.expect("[")
        values: list[LiteralValue] = []
        while True:
            kind, text = self.take()
            value: LiteralValue
            if kind == "string":
                value = text[1:-1]
                if len(value) > MAX_LITERAL_CHARS:
                    raise self.fail(f"a Literal value is longer than {MAX_LITERAL_CHARS} characters")
            elif kind == "int":
                value = int(text)
            elif kind == "name" and text in ("True", "False"):
                value = text == "True"
            else:
                raise self.fail(f"Literal values must be quoted strings, integers or booleans, not {text!r}")
            if any(type(value) is type(v) and value == v for v in values):
                raise self.fail(f"duplicate Literal value {text}")
            values.append(value)
            if len(values) > MAX_LITERAL_VALUES:
                raise self.fail(f"more than {MAX_LITERAL_VALUES} Literal values")
            kind, text = self.take()
            if (kind, text) == ("punct", "]"):
                return TypeSpec("literal", values=tuple(values))
            if (kind, text) != ("punct", ","):
                raise self.fail(f"expected ',' or ']', found {text!r}")
            if self.peek() == ("punct", "]"):  # trailing comma
                self.pos += 1
                return TypeSpec("literal", values=tuple(values))


def parse_type(text: str) -> TypeSpec:
    """Parse one type annotation (never evaluated). Raises :class:`InvalidSignature`."""
    if not isinstance(text, str):
        raise InvalidSignature(f"a field type must be a string, not {type(text).__name__}")
    if len(text) > MAX_ANNOTATION_CHARS:
        raise InvalidSignature(f"type annotation longer than {MAX_ANNOTATION_CHARS} characters")
    return _TypeParser(text).parse()


# -- signatures -------------------------------------------------------------------------------------


def check_field_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidSignature(f"a field name must be a string, not {type(name).__name__}")
    if not _NAME_RE.match(name) or len(name) > MAX_FIELD_NAME_CHARS:
        raise InvalidSignature(
            f"invalid field name {name[:80]!r}: use letters, digits and underscores, starting with a letter "
            f"(at most {MAX_FIELD_NAME_CHARS} characters)"
        )
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise InvalidSignature(f"invalid field name {name!r}: it is a Python keyword")
    return name


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes."""
    parts: list[str] = []
    depth = 0
    quote: str | None = None
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise InvalidSignature(f"unbalanced ']' in {text.strip()[:200]!r}")
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    if quote is not None:
        raise InvalidSignature(f"unterminated quote in {text.strip()[:200]!r}")
    if depth != 0:
        raise InvalidSignature(f"unbalanced '[' in {text.strip()[:200]!r}")
    parts.append(text[start:])
    return parts


def _parse_field_decl(decl: str) -> FieldSpec:
    decl = decl.strip()
    if not decl:
        raise InvalidSignature("empty field in signature (a stray comma?)")
    name, colon, annotation = decl.partition(":")
    name = name.strip()
    check_field_name(name)
    type_ = parse_type(annotation) if colon else STR
    return FieldSpec(name, type_)


def _parse_field_list(text: str) -> list[FieldSpec]:
    if not text.strip():
        return []
    return [_parse_field_decl(part) for part in _split_top_level(text, ",")]


def _check_fields(inputs: list[FieldSpec], outputs: list[FieldSpec]) -> None:
    if not outputs:
        raise InvalidSignature("a signature needs at least one output field")
    history = [f.name for f in outputs if f.type.kind == "history"]
    if history:
        raise InvalidSignature(f"output field {history[0]!r}: History is a type for inputs only")
    if len(inputs) + len(outputs) > MAX_FIELDS:
        raise InvalidSignature(f"more than {MAX_FIELDS} fields")
    seen: set[str] = set()
    for f in (*inputs, *outputs):
        if f.name in seen:
            raise InvalidSignature(f"duplicate field name {f.name!r}")
        seen.add(f.name)


def parse_signature_string(text: str, instructions: str | None = None) -> SignatureSpec:
    if len(text) > MAX_SIGNATURE_CHARS:
        raise InvalidSignature(f"signature longer than {MAX_SIGNATURE_CHARS} characters")
    sides = _split_top_level(text, "->")
    if len(sides) != 2:
        raise InvalidSignature(
            f"a signature has the form 'inputs -> outputs' with exactly one '->', got {text[:200]!r}"
        )
    inputs = _parse_field_list(sides[0])
    outputs = _parse_field_list(sides[1])
    _check_fields(inputs, outputs)
    return SignatureSpec(tuple(inputs), tuple(outputs), _check_instructions(instructions))


def _check_instructions(instructions: Any) -> str | None:
    if instructions is None:
        return None
    if not isinstance(instructions, str):
        raise InvalidSignature(f"instructions must be a string, not {type(instructions).__name__}")
    if len(instructions) > MAX_INSTRUCTIONS_CHARS:
        raise InvalidSignature(f"instructions longer than {MAX_INSTRUCTIONS_CHARS} characters")
    return instructions or None


def _parse_field_object(item: Any, where: str) -> FieldSpec:
    if isinstance(item, str):
        return _parse_field_decl(item)
    if not isinstance(item, dict):
        raise InvalidSignature(f"each of {where} must be an object {{'name', 'type', 'desc'}} or a string")
    unknown = sorted(set(item) - {"name", "type", "desc"})
    if unknown:
        raise InvalidSignature(f"unknown key(s) in a field of {where}: {', '.join(map(str, unknown))}")
    name = check_field_name(item.get("name"))
    type_text = item.get("type", "str")
    type_ = parse_type(type_text) if type_text is not None else STR
    desc = item.get("desc")
    if desc is not None:
        if not isinstance(desc, str):
            raise InvalidSignature(f"the desc of field {name!r} must be a string")
        if len(desc) > MAX_DESC_CHARS:
            raise InvalidSignature(f"the desc of field {name!r} is longer than {MAX_DESC_CHARS} characters")
        desc = desc or None
    return FieldSpec(name, type_, desc)


def parse_signature_object(obj: dict[str, Any], instructions: str | None = None) -> SignatureSpec:
    unknown = sorted(set(obj) - {"inputs", "outputs", "instructions"})
    if unknown:
        raise InvalidSignature(f"unknown key(s) in signature: {', '.join(map(str, unknown))}")
    fields: dict[str, list[FieldSpec]] = {}
    for side in ("inputs", "outputs"):
        items = obj.get(side, [])
        if not isinstance(items, list):
            raise InvalidSignature(f"signature {side} must be a list")
        if len(items) > MAX_FIELDS:
            raise InvalidSignature(f"more than {MAX_FIELDS} fields")
        fields[side] = [_parse_field_object(item, side) for item in items]
    _check_fields(fields["inputs"], fields["outputs"])
    own = _check_instructions(obj.get("instructions"))
    return SignatureSpec(
        tuple(fields["inputs"]),
        tuple(fields["outputs"]),
        _check_instructions(instructions) if instructions is not None else own,
    )


def parse_signature(signature: Any, instructions: str | None = None) -> SignatureSpec:
    """Parse a string or structured signature; ``instructions`` (if given) wins over the object's own."""
    if isinstance(signature, str):
        return parse_signature_string(signature, instructions)
    if isinstance(signature, dict):
        return parse_signature_object(signature, instructions)
    raise InvalidSignature(f"a signature must be a string or an object, not {type(signature).__name__}")
