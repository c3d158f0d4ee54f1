"""What the fake LM answers: pure functions from a chat request to its reply, with no I/O.

The server (``_fake_lm``) reads a request body and sends what these build: :func:`parse_chat_request`
(the body, checked), :func:`render_reply` (the answer text), :func:`completion_body` and
:func:`stream_events` (the JSON reply, or its SSE chunks).

Answers are deterministic. The output field names (and their types, when listed) are read from the
system message DSPy's ChatAdapter writes (``1. `answer` (str): ...``, by the program-spec layer's
``bridge_child.spec.prompt_output_fields``, which the worker's offline LM uses too), or else from the
"Respond with the corresponding output fields" sentence of the last user message. The reply is in the
same format (``[[ ## answer ## ]]\\n...\\n\\n[[ ## completed ## ]]``), with values derived from a hash
of the last user message: a short sentence for a ``str``, a number for an ``int``/``float``, one of the
choices of a ``Literal``, a value built from the JSON schema DSPy prints for structured types. A
JSONAdapter prompt (or a request with ``response_format``) gets a JSON object instead; a prompt with no
output fields gets plain text.

Bounded work (the server listens on a socket; a body is at most ``_fake_lm.MAX_BODY_BYTES``): request
text is only searched (``str.find``), sliced and scanned in bounded windows, never matched by a regular
expression, so the work is linear in the body (``tests/metered.py`` measures it); at most
``MAX_PROMPT_FIELDS`` fields are read; the user message is hashed once; one answer holds at most
``MAX_ANSWER_VALUES`` values however its schemas nest or refer to each other. A body nested too deeply
for Python's recursion limit is a :class:`BadRequest`, like any other malformed body.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
from typing import Any, Final

import attrs

from bridge_child.spec import MAX_PROMPT_FIELDS, MAX_PROMPT_NAME_CHARS, prompt_output_fields, scan_type_text

MAX_SCHEMA_DEPTH: Final = 8
"""Deepest nesting followed when building a value from a JSON schema or a type expression."""
MAX_SCHEMA_ITEMS: Final = 8
"""Most items in an array built from a JSON schema (``minItems`` above it is not honoured)."""
MAX_ANSWER_VALUES: Final = 4096
"""Most values (scalars, list items, object members) built for one answer; past it, ``null``."""
SNIPPET_MAX_WORDS: Final = 6
"""Words of the first input value quoted in a generated sentence."""
SNIPPET_MAX_CHARS: Final = 48
"""Characters of the first input value quoted in a generated sentence."""
SNIPPET_SCAN_CHARS: Final = 4096
"""Characters of the first input value looked at to find those words."""
MAX_CHOICES: Final = 16
"""Most choices (``n``) in one completion."""
MALFORMED_REPLY: Final = "Sorry, I will not follow the requested output format this time."
"""Reply text sent when ``FakeLMConfig.malformed`` is set: neither ChatAdapter nor JSONAdapter format."""

_NOTE_SCHEMA: Final = "# note: the value you produce must adhere to the JSON schema: "
_JSON_OUTPUTS_MARK: Final = "Outputs will be a JSON object with the following fields."
_RESPOND_MARK: Final = "Respond with the corresponding output fields"
_TYPE_INFO: Final = " (must be formatted as a valid Python "
_SNIPPET_BLANKS: Final = str.maketrans({ch: " " for ch in '[]{}`"\\'})


class BadRequest(ValueError):
    """The request body is not a chat completion request the fake LM can read (a ``400``)."""


# --- Requests -----------------------------------------------------------------------------------------


@attrs.frozen
class ChatRequest:
    """A chat completion request, as far as the fake LM reads it."""

    messages: list[dict[str, Any]]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    """``stream_options.include_usage``: a last SSE chunk with the usage."""
    n: int = 1
    response_format: Any = None


def parse_chat_request(body: bytes) -> ChatRequest:
    """The request in ``body`` (untrusted JSON). Raises :class:`BadRequest`."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(str(exc)) from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("`messages` must be a list of message objects")
    model = payload.get("model")
    stream_options = payload.get("stream_options")
    n = payload.get("n")
    return ChatRequest(
        messages=messages,
        model=model if isinstance(model, str) and model else None,
        stream=bool(payload.get("stream")),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        n=n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHOICES else 1,
        response_format=payload.get("response_format"),
    )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, {"type": "image_url"}]
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def messages_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(_content_text(m.get("content")) for m in messages)


def _system_text(messages: list[dict[str, Any]]) -> str:
    texts = [_content_text(m.get("content")) for m in messages if m.get("role") == "system"]
    return texts[0] if len(texts) == 1 else "\n".join(texts)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


# --- Output fields ------------------------------------------------------------------------------------


@attrs.frozen
class OutputField:
    """An output field read from a DSPy prompt."""

    name: str
    type_expr: str | None = None
    """The type as DSPy prints it (``int``, ``list[str]``, ``Literal['a', 'b']``), if listed."""
    json_schema: dict[str, Any] | None = None
    """The JSON schema DSPy gives for structured types (lists, dicts, models), if any."""


def parse_output_fields(messages: list[dict[str, Any]]) -> list[OutputField]:
    """The output fields a DSPy (Chat/JSON adapter) prompt asks for, in order; empty if none are found."""
    system = _system_text(messages)
    fields = [OutputField(name, type_expr) for name, type_expr in prompt_output_fields(system)]
    if not fields:
        fields = _fields_from_user_message(_last_user_text(messages))
    if not fields:
        return []
    schemas = _schema_notes(system)
    return [attrs.evolve(f, json_schema=schemas.get(f.name)) for f in fields]


def _fields_from_user_message(user: str) -> list[OutputField]:
    """The fields of ChatAdapter's reminder "Respond with the corresponding output fields, starting with
    the field `[[ ## a ## ]]`, then `[[ ## b ## ]]` (must be formatted as a valid Python int), ..."."""
    at = user.rfind(_RESPOND_MARK)
    if at < 0:
        return []
    line_end = user.find("\n", at)
    if line_end < 0:
        line_end = len(user)
    fields: list[OutputField] = []
    pos = at
    while len(fields) < MAX_PROMPT_FIELDS:
        start = user.find("`[[ ## ", pos, line_end)
        if start < 0:
            break
        name_at = start + len("`[[ ## ")
        tick = user.find("`", name_at, line_end)  # a name has no backtick: the marker ends at the next one
        if tick < 0:
            break
        pos = tick
        close = tick - len(" ## ]]")
        if not name_at < close <= name_at + MAX_PROMPT_NAME_CHARS or not user.startswith(" ## ]]`", close):
            continue
        name = user[name_at:close]
        pos = tick + 1
        type_expr = None
        if user.startswith(_TYPE_INFO, pos):
            scanned = scan_type_text(user, pos + len(_TYPE_INFO), line_end)
            if scanned is not None:
                type_expr, pos = scanned[0].strip() or None, scanned[1]
        if name != "completed":
            fields.append(OutputField(name, type_expr))
    return fields


def _schema_notes(system: str) -> dict[str, dict[str, Any]]:
    """The JSON schemas DSPy gives for structured output fields: in ChatAdapter's field structure
    (``[[ ## item ## ]]\\n{item}        # note: ... JSON schema: {...}``) or JSONAdapter's skeleton."""
    notes: dict[str, str] = {}
    pos = 0
    while len(notes) < MAX_PROMPT_FIELDS:
        at = system.find(_NOTE_SCHEMA, pos)
        if at < 0:
            break
        line_end = system.find("\n", at)
        if line_end < 0:
            line_end = len(system)
        pos = line_end
        name = _note_field(system, at)
        if name is not None:
            notes[name] = system[at + len(_NOTE_SCHEMA) : line_end]
    json_at = system.find(_JSON_OUTPUTS_MARK)
    brace = system.find("{", json_at) if json_at >= 0 else -1
    if brace >= 0:  # JSONAdapter: the skeleton is a JSON object of field -> "{field}  # note: ..."
        try:
            skeleton, _ = json.JSONDecoder().raw_decode(system, brace)
        except (ValueError, RecursionError):
            skeleton = None
        if isinstance(skeleton, dict):
            for name, template in list(skeleton.items())[:MAX_PROMPT_FIELDS]:
                if isinstance(template, str) and _NOTE_SCHEMA in template:
                    notes[name] = template.split(_NOTE_SCHEMA, 1)[1]
    schemas: dict[str, dict[str, Any]] = {}
    for name, text in notes.items():
        try:
            schema = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(schema, dict):
            schemas[name] = schema
    return schemas


def _note_field(system: str, at: int) -> str | None:
    """The field whose note starts at ``at``: its line must be ``{name}`` and blanks, and the line before
    it ``[[ ## name ## ]]`` (both found in bounded windows)."""
    window = max(0, at - MAX_PROMPT_NAME_CHARS - 64)
    newline = system.rfind("\n", window, at)
    if newline < 0 and window > 0:
        return None
    head = system[newline + 1 : at].rstrip(" \t")
    if len(head) < 3 or head[0] != "{" or head[-1] != "}":
        return None
    name = head[1:-1]
    header = f"[[ ## {name} ## ]]"
    start = newline - len(header)
    if start < 0 or not system.startswith(header, start) or (start > 0 and system[start - 1] != "\n"):
        return None
    return name


def _wants_json(messages: list[dict[str, Any]], response_format: Any) -> bool:
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return True
    return any(
        m.get("role") == "system" and _JSON_OUTPUTS_MARK in _content_text(m.get("content")) for m in messages
    )


# --- Values -------------------------------------------------------------------------------------------


def _first_input_value(user_text: str) -> str:
    """The start (at most ``SNIPPET_SCAN_CHARS``) of the first ``[[ ## name ## ]]`` block's value, or of
    the whole text when it has none."""
    pos = 0
    while True:
        at = user_text.find("[[ ## ", pos)
        if at < 0:
            return user_text[:SNIPPET_SCAN_CHARS]
        pos = at + len("[[ ## ")
        if at > 0 and user_text[at - 1] != "\n":
            continue
        line_end = user_text.find("\n", pos, pos + MAX_PROMPT_NAME_CHARS + len(" ## ]]") + 1)
        if line_end < 0 or line_end - pos <= len(" ## ]]") or not user_text.endswith(" ## ]]", pos, line_end):
            continue
        value = user_text[line_end + 1 : line_end + 1 + SNIPPET_SCAN_CHARS]
        following = value.find("\n[[ ## ")
        return value if following < 0 else value[: following + 1]


def _snippet(user_text: str) -> str:
    """A few words of the first input value, free of ``[[``/``]]`` and braces that could confuse a parser."""
    value = _first_input_value(user_text)
    at = value.find("\nRespond with ")
    while at >= 0:  # the value of the last input runs into the "Respond with" reminder after a blank line
        head = value[:at].rstrip()
        if "\n" in value[len(head) : at]:
            value = head
            break
        at = value.find("\nRespond with ", at + 1)
    words = value.translate(_SNIPPET_BLANKS).split()
    snippet = " ".join(words[:SNIPPET_MAX_WORDS])[:SNIPPET_MAX_CHARS].strip()
    return snippet or "the input"


class _ValueMaker:
    """Builds deterministic values for one answer (seeded by the last user message, hashed once), at
    most ``MAX_ANSWER_VALUES`` of them."""

    def __init__(self, user_text: str) -> None:
        self.seed = hashlib.sha256(user_text.encode("utf-8", "surrogatepass")).digest()
        self.snippet = _snippet(user_text)
        self.budget = MAX_ANSWER_VALUES

    def _spend(self) -> bool:
        """Count one more value; False once the answer has all it may hold."""
        self.budget -= 1
        return self.budget >= 0

    def _number(self, name: str, salt: str = "") -> int:
        digest = hashlib.sha256(self.seed + f"\0{name}\0{salt}".encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:8], "big")

    def sentence(self, name: str) -> str:
        if name == "reasoning":
            return f"Let me think step by step about {self.snippet}, then give the answer."
        label = name.replace("_", " ").capitalize()
        return f"{label} {self._number(name) % 1000} is a fake reply about {self.snippet}."

    def for_field(self, field: OutputField) -> Any:
        if field.json_schema is not None:  # exact for lists, dicts and models: prefer it to the type
            return self.from_schema(field.json_schema, field.json_schema, field.name, 0)
        if field.type_expr:
            try:
                tree: ast.expr | None = ast.parse(field.type_expr, mode="eval").body
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                tree = None
            if tree is not None:
                return self.from_type(tree, field.name, 0)
        return self.sentence(field.name)

    def from_type(self, node: ast.expr, name: str, depth: int) -> Any:
        """A value of the type expression ``node`` (as DSPy prints types); unknown names get a sentence."""
        if depth > MAX_SCHEMA_DEPTH or _is_none(node) or not self._spend():
            return None
        h = self._number(name, str(depth))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
            return self.from_type(node.right if _is_none(node.left) else node.left, name, depth + 1)
        if isinstance(node, ast.Name | ast.Attribute):
            type_name = node.id if isinstance(node, ast.Name) else node.attr
            if type_name == "int":
                return h % 100
            if type_name == "float":
                return (h % 10000) / 100
            if type_name == "bool":
                return h % 2 == 0
            if type_name == "list":
                return [self.sentence(f"{name} 1"), self.sentence(f"{name} 2")]
            if type_name == "dict":
                return {"key": self.sentence(name)}
            return self.sentence(name)
        if isinstance(node, ast.Subscript):
            base = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", "")
            args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
            if base == "Literal":
                choices = [a.value for a in args if isinstance(a, ast.Constant)]
                return choices[h % len(choices)] if choices else None
            if base in ("Optional", "Union"):
                non_none = [a for a in args if not _is_none(a)]
                return self.from_type(non_none[0], name, depth + 1) if non_none else None
            if base in ("list", "List", "Sequence", "set", "Set", "frozenset"):
                values = [self.from_type(args[0], f"{name} {i}", depth + 1) for i in (1, 2)]
                return values if values[0] != values[1] else values[:1]
            if base in ("tuple", "Tuple"):
                if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
                    args = args[:1]
                return [
                    self.from_type(a, f"{name} {i}", depth + 1) for i, a in enumerate(args[:MAX_SCHEMA_ITEMS])
                ]
            if base in ("dict", "Dict", "Mapping") and len(args) == 2:
                key = self.from_type(args[0], f"{name} key", depth + 1)
                key = key if isinstance(key, str) else json.dumps(key)
                return {key: self.from_type(args[1], f"{name} value", depth + 1)}
        return self.sentence(name)

    def from_schema(self, schema: Any, root: dict[str, Any], name: str, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH or not self._spend():
            return None
        h = self._number(name, f"schema{depth}")
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/")[:MAX_SCHEMA_DEPTH]:
                target = target.get(part) if isinstance(target, dict) else None
            return self.from_schema(target, root, name, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][h % len(schema["enum"])]
        if "default" in schema and schema["default"] is not None:
            return schema["default"]
        for key in ("anyOf", "oneOf", "allOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
                return self.from_schema((non_null or options)[0], root, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties")
            if isinstance(properties, dict) and properties:
                return {
                    key: self.from_schema(sub, root, f"{name}.{key}", depth + 1)
                    for key, sub in properties.items()
                    if self.budget > 0
                }
            extra = schema.get("additionalProperties")
            return (
                {"key": self.from_schema(extra, root, f"{name}.key", depth + 1)}
                if isinstance(extra, dict)
                else {}
            )
        if kind == "array":
            min_items = schema.get("minItems")
            wanted = min_items if isinstance(min_items, int) and not isinstance(min_items, bool) else 0
            count = min(max(2, wanted), MAX_SCHEMA_ITEMS)
            return [
                self.from_schema(schema.get("items", {}), root, f"{name} {i}", depth + 1)
                for i in range(count)
            ]
        if kind == "integer":
            return h % 100
        if kind == "number":
            return (h % 10000) / 100
        if kind == "boolean":
            return h % 2 == 0
        if kind == "null":
            return None
        return self.sentence(name)


def _is_none(node: ast.expr) -> bool:
    return (isinstance(node, ast.Constant) and node.value is None) or (
        isinstance(node, ast.Name) and node.id == "None"
    )


def _chat_value(value: Any) -> str:
    """A value as the ChatAdapter expects it between field markers."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


# --- Replies ------------------------------------------------------------------------------------------


def render_reply(messages: list[dict[str, Any]], response_format: Any = None) -> str:
    """The deterministic reply to a chat request: ChatAdapter fields, a JSON object, or plain text."""
    user_text = _last_user_text(messages)
    maker = _ValueMaker(user_text)
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return json.dumps(maker.from_schema(schema, schema, "response", 0), ensure_ascii=False)
    fields = parse_output_fields(messages)
    if not fields:
        if _wants_json(messages, response_format):
            return json.dumps({"answer": maker.sentence("answer")})
        return f"This is a fake reply to: {maker.snippet}."
    values = {f.name: maker.for_field(f) for f in fields}
    if _wants_json(messages, response_format):
        return json.dumps(values, ensure_ascii=False)
    parts = [f"[[ ## {name} ## ]]\n{_chat_value(value)}" for name, value in values.items()]
    return "\n\n".join([*parts, "[[ ## completed ## ]]"])


def token_estimate(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def usage(messages: list[dict[str, Any]], text: str) -> dict[str, int]:
    """Token counts as OpenAI reports them (estimated: 4 characters a token)."""
    counts = {
        "prompt_tokens": token_estimate(messages_text(messages)),
        "completion_tokens": token_estimate(text),
    }
    counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
    return counts


def completion_body(
    completion_id: str, created: int, model: str, text: str, usage: dict[str, int], n: int = 1
) -> dict[str, Any]:
    """A ``chat.completion`` object with ``n`` identical choices."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
        "usage": usage,
    }


def stream_events(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    chunk_chars: int,
    usage: dict[str, int] | None,
) -> list[bytes]:
    """The SSE events of a streamed answer, each ``data: ...\\n\\n``: a role chunk, ``text`` in chunks of
    ``chunk_chars`` characters, a stop chunk, the usage chunk if asked for, then ``data: [DONE]``."""

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    events: list[dict[str, Any]] = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": text[i : i + chunk_chars]}, None) for i in range(0, len(text), chunk_chars)]
    events.append(chunk({}, "stop"))
    if usage is not None:
        events.append({**chunk({}, None), "choices": [], "usage": usage})
    return [b"data: " + dumps(event) + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8 (a lone surrogate from the request is escaped, never an encoding error)."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()
