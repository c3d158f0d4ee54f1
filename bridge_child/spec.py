"""The program-spec layer: what a program, its inputs and an LM configuration may be, without DSPy or Trio.

One layer, used by everything that reads a program spec or a DSPy prompt: the worker
(``bridge_child._programs``), its embedded offline LM (``bridge_child._offline_lm``), the host's mock
backend (``dspex_trio._mock``) and the fake LM server (``dspex_trio.testing``). So they all parse a spec,
order its output fields, check inputs and LM configurations, and read a DSPy prompt the same way.
Importing it imports neither dspy nor trio (like :mod:`bridge_child.wire`).

- Program specs: :func:`parse_spec` -> :class:`ProgramSpec`, whose :attr:`ProgramSpec.outputs` are the
  fields the module produces (``chain_of_thought`` puts ``reasoning`` first, as ``dspy.ChainOfThought``
  does). A spec is ``{"signature": str | {"inputs", "outputs", "instructions"}, "module": "predict" |
  "chain_of_thought", "instructions": str?, "state": dump_state() dict?, "name"?, "description"?}``.
- Signatures, parsed without ``eval`` (the parser lives in ``bridge_child._signatures``):
  :func:`parse_signature`, :func:`parse_type`, :class:`SignatureSpec`, :class:`FieldSpec`,
  :class:`TypeSpec`, :data:`STR`.
- Inputs: :func:`check_inputs`. Outputs of the mock backend and the offline LM: :func:`fake_value`
  (deterministic, of the declared type).
- LM configurations: :data:`LM_KEYS`, :data:`OFFLINE`, :func:`check_lm_config`, :func:`describe_lm`.
- Prompts: :func:`prompt_output_fields` reads the "Your output fields are:" section of a DSPy adapter's
  system message; :func:`scan_type_text` reads one type expression as DSPy prints it. Both run in time
  linear in the text (string searches; every type scan is bounded), since the fake LM runs them on
  request bodies.
- Errors: :class:`SpecError` (``invalid_params``), :class:`InvalidSignature`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from bridge_child._lmcache import DEFAULT_MODE as LM_CACHE_DEFAULT_MODE
from bridge_child._lmcache import MAX_MEMORY_ENTRIES as LM_CACHE_MAX_ENTRIES
from bridge_child._lmcache import MIN_DISK_BYTES as LM_CACHE_MIN_DISK_BYTES
from bridge_child._lmcache import MODES as LM_CACHE_MODES
from bridge_child._lmrules import hermetic_refusal, public_url
from bridge_child._modules import (
    BASE_MODULES,
    BUILTIN_MODULES,
    MAX_NAME_CHARS,
    MODULES,
    NO_REGISTRY,
    OPTION_KEYS,
    BuiltinModule,
    ModuleLayout,
    PredictorLayout,
    RegistryNames,
    builtin_layout,
    builtin_name,
    check_name,
    check_reserved,
    module_outputs,
    parse_include,
    parse_options,
    resolve_module,
)
from bridge_child._program_state import MAX_DEMOS, MAX_STATE_BYTES, InvalidState, check_state
from bridge_child._signatures import (
    MAX_ANNOTATION_CHARS,
    MAX_FIELDS,
    STR,
    FieldSpec,
    InvalidSignature,
    SignatureSpec,
    SpecError,
    TypeSpec,
    parse_signature,
    parse_type,
)
from bridge_child._values import digest, fake_from_schema, fake_value

__all__ = [
    "BASE_MODULES",
    "BUILTIN_MODULES",
    "LM_CACHE_DEFAULT_MODE",
    "LM_CACHE_MAX_ENTRIES",
    "LM_CACHE_MIN_DISK_BYTES",
    "LM_CACHE_MODES",
    "LM_KEYS",
    "MAX_DEMOS",
    "MAX_FIELDS",
    "MAX_NAME_CHARS",
    "MAX_PROMPT_FIELDS",
    "MAX_STATE_BYTES",
    "MODULES",
    "NO_REGISTRY",
    "OFFLINE",
    "OPTION_KEYS",
    "SPEC_KEYS",
    "STR",
    "BuiltinModule",
    "FieldSpec",
    "InvalidSignature",
    "InvalidState",
    "ModuleLayout",
    "PredictorLayout",
    "ProgramSpec",
    "RegistryNames",
    "SignatureSpec",
    "SpecError",
    "TypeSpec",
    "builtin_name",
    "check_inputs",
    "check_lm_config",
    "check_name",
    "check_state",
    "describe_lm",
    "digest",
    "fake_from_schema",
    "fake_value",
    "parse_signature",
    "parse_spec",
    "parse_type",
    "prompt_output_fields",
    "scan_type_text",
]

OFFLINE: Final = "offline"
"""The model name of the embedded deterministic LM (the default)."""
SPEC_KEYS: Final = frozenset(
    {"signature", "module", "instructions", "state", "include", "name", "description", *OPTION_KEYS}
)
"""Every key a program spec may hold (``OPTION_KEYS``: the options of the built-in modules)."""
LM_KEYS: Final = {
    "model": (str,),
    "api_base": (str, type(None)),
    "api_key": (str, type(None)),
    "num_retries": (int,),
    "timeout": (int, float, type(None)),
    "temperature": (int, float, type(None)),
    "max_tokens": (int, type(None)),
    "hermetic": (bool,),
    "public_only": (bool,),
    "fallbacks": (list,),
}
"""The keys of an LM configuration and the types each may have. ``hermetic`` and ``public_only``: see
``bridge_child._lmrules`` (a client-chosen LM sends no credential but its own, and reaches public
addresses only). ``fallbacks``: the LM configurations tried next, in order, when this one fails with a
provider failure (``bridge_child._lm_fallback``); at most ``MAX_FALLBACK_LMS``, none with its own."""
MAX_FALLBACK_LMS: Final = 8
"""Most LMs in one configuration's ``fallbacks`` list, a count."""


# -- program specs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramSpec:
    """A parsed program spec: its module (a built-in, or a registered program's name), its signature
    (built-ins only), options, the extra entries it ``include``s, and DSPy state (checked later, against
    the program's predictors)."""

    signature: SignatureSpec | None
    module: str
    """A built-in's canonical name (``"predict"``, ``"chain_of_thought"``, ``"react"``, ...) or a
    registered program's name."""
    state: dict[str, Any] | None = None
    registered: bool = False
    """``module`` names a program from an operator's program module (``PROGRAMS``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The built-in's options, defaults filled in (``tools``, ``max_iters``, ``n``, ``reward``, ...)."""
    include: tuple[str, ...] = ()
    """Entries of the prediction besides the outputs that executions return (``trajectory``)."""

    @property
    def inputs(self) -> tuple[FieldSpec, ...]:
        """The input fields (a registered program's are the registry's to say: empty here)."""
        return self.signature.inputs if self.signature is not None else ()

    @property
    def outputs(self) -> tuple[FieldSpec, ...]:
        """Every output field the module produces, in order: for ``chain_of_thought`` and ``react``,
        ``reasoning`` first (added as a ``str`` when the signature does not declare it, moved first when
        it does); ``rationale`` first for ``multi_chain_comparison``. A registered program's (or a
        best_of_n over one) are the registry's to say: empty here."""
        if self.signature is None:
            return ()
        return module_outputs(self.module, self.signature, self.options)

    def layout(self) -> ModuleLayout:
        """A built-in's predictors as its DSPy state names them (``ModuleLayout``)."""
        if self.signature is None:  # a registered program, or best_of_n/refine over one
            return ModuleLayout((), registered_base=self.module if self.registered else self.options["base"])
        return builtin_layout(self.module, self.signature, self.options)


def parse_spec(spec: Any, names: RegistryNames = NO_REGISTRY) -> ProgramSpec:
    """Parse a program spec (untrusted: it comes from a client). ``names`` are what the operator's
    program modules registered (programs, tools, metrics). Raises :class:`InvalidSignature`."""
    if not isinstance(spec, dict):
        raise InvalidSignature(f"a program spec must be an object, not {type(spec).__name__}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise InvalidSignature(
            f"unknown key(s) in program spec: {', '.join(map(str, unknown))}; known: {', '.join(sorted(SPEC_KEYS))}"
        )
    module, registered = resolve_module(spec.get("module", "predict"), names)
    include = parse_include(spec.get("include"))
    state = spec.get("state")
    if state is not None and not isinstance(state, dict):
        raise InvalidState(
            "a program's 'state' must be an object (DSPy's JSON state, as program.save('p.json') writes it)"
        )
    if registered:
        extra = sorted(k for k in ("signature", "instructions", *OPTION_KEYS) if k in spec)
        if extra:
            raise InvalidSignature(
                f"program {module!r} is registered with its own signatures and takes no {', '.join(extra)}"
            )
        return ProgramSpec(None, module, state or None, registered=True, include=include)
    options = parse_options(module, spec, names)
    if "signature" not in spec:
        if options.get("base") in names.programs:
            if "instructions" in spec:
                raise InvalidSignature(f"{module} over a registered program takes no instructions")
            return ProgramSpec(None, module, state or None, options=options, include=include)
        raise InvalidSignature("a program spec needs a 'signature'")
    if options.get("base") in names.programs:
        raise InvalidSignature(f"{module} over the registered program {options['base']!r} takes no signature")
    signature = parse_signature(spec["signature"], spec.get("instructions"))
    check_reserved(module, signature)
    parsed = ProgramSpec(signature, module, state or None, options=options, include=include)
    clash = sorted(set(include) & {f.name for f in parsed.outputs})
    if clash:
        raise InvalidSignature(f"'include' names {clash[0]!r}, which is an output already")
    return parsed


def check_inputs(fields: Sequence[FieldSpec], inputs: Any) -> None:
    """Check a call's inputs against a program's input fields: all present (but the optional ones), none
    unknown, each of its declared type. Raises :class:`SpecError`."""
    if not isinstance(inputs, dict):
        raise SpecError("execute: inputs must be an object")
    names = [f.name for f in fields]
    missing = [f.name for f in fields if f.name not in inputs and not f.optional]
    unknown = sorted(set(inputs) - set(names))
    if missing:
        message = f"execute: missing input field(s) {', '.join(map(repr, missing))}"
        if unknown:  # a misspelt name is both: say both, and the likely fix
            guesses = [
                f"{u!r} (did you mean {m!r}?)" if (m := _closest(u, missing)) else repr(u) for u in unknown
            ]
            message += f"; unknown input field(s) {', '.join(guesses)}"
        raise SpecError(message)
    if unknown:
        raise SpecError(
            f"execute: unknown input field(s) {', '.join(map(repr, unknown))}; inputs are {', '.join(names)}"
        )
    for f in fields:
        if f.name in inputs and not f.type.accepts(inputs[f.name]):
            raise SpecError(
                f"execute: input {f.name!r} must be {f.type.render()}, not {type(inputs[f.name]).__name__}"
            )


def _closest(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate ``name`` most likely misspells (``difflib``), if any is close."""
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


# -- LM configuration -------------------------------------------------------------------------------


def check_lm_config(raw: Any, where: str = "lm") -> dict[str, Any]:
    """A validated LM configuration (``{"model": ...}`` plus client settings). Never echoes the key.
    Raises :class:`SpecError`."""
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be an object {{'model': ..., ...}}")
    unknown = sorted(set(raw) - set(LM_KEYS))
    if unknown:
        raise SpecError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(LM_KEYS)}"
        )
    for key, kinds in LM_KEYS.items():
        if key in raw and (
            not isinstance(raw[key], kinds) or (isinstance(raw[key], bool) and bool not in kinds)
        ):
            raise SpecError(f"{where}: {key!r} has the wrong type ({type(raw[key]).__name__})")
    model = raw.get("model")
    if not model:
        raise SpecError(f"{where}: 'model' is required")
    if model != OFFLINE and "/" not in model:
        raise SpecError(f"{where}: model must be 'offline' or 'provider/name', e.g. 'openai/gpt-4o-mini'")
    refusal = hermetic_refusal(model) if raw.get("hermetic") and model != OFFLINE else None
    if refusal is not None:
        raise SpecError(f"{where}: {refusal}")
    checked = {k: v for k, v in raw.items() if v is not None and v is not False}
    if "fallbacks" in checked:
        checked["fallbacks"] = _check_fallbacks(checked["fallbacks"], raw, where)
        if not checked["fallbacks"]:
            del checked["fallbacks"]
    return checked


def _check_fallbacks(raw: list[Any], primary: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The checked ``fallbacks`` of an LM configuration: each an LM configuration without fallbacks of
    its own; a hermetic or public-only primary makes every fallback so too."""
    if len(raw) > MAX_FALLBACK_LMS:
        raise SpecError(f"{where}.fallbacks: at most {MAX_FALLBACK_LMS} LMs, not {len(raw)}")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and "fallbacks" in item:
            raise SpecError(f"{where}.fallbacks[{i}]: a fallback LM has no fallbacks of its own")
        if isinstance(item, str):
            item = {"model": item}
        if isinstance(item, dict):
            item = {**item, **{flag: True for flag in ("hermetic", "public_only") if primary.get(flag)}}
        out.append(check_lm_config(item, f"{where}.fallbacks[{i}]"))
    return out


def describe_lm(config: dict[str, Any] | None) -> dict[str, Any]:
    """What an LM configuration is, without its key."""
    config = config or {"model": OFFLINE}
    out = {k: v for k, v in config.items() if k not in ("api_key", "fallbacks")}
    if isinstance(out.get("api_base"), str):
        out["api_base"] = public_url(out["api_base"])
    out["has_api_key"] = "api_key" in config
    if isinstance(config.get("fallbacks"), list):
        out["fallbacks"] = [describe_lm(item) for item in config["fallbacks"]]
    return out


# -- DSPy prompts -----------------------------------------------------------------------------------

OUTPUT_SECTION: Final = "Your output fields are:"
"""Where a DSPy adapter's system message starts listing the output fields, one ``N. `name` (type): desc``
line each."""
SECTION_END: Final = "All interactions will be structured"
"""What follows the field lists in a DSPy adapter's system message."""
MAX_PROMPT_FIELDS: Final = 256
"""Most output fields read from one prompt (a worker's signature has at most ``MAX_FIELDS``)."""
MAX_PROMPT_NAME_CHARS: Final = 256
"""Longest field name read from a prompt, in characters (a longer one is not a field line)."""
_MAX_INDEX_DIGITS: Final = 4


def scan_type_text(text: str, start: int, stop: int | None = None) -> tuple[str, int] | None:
    """The type expression that starts at ``text[start]`` and ends at its closing ``)`` (DSPy prints
    ``(type)``), bracket and quote aware, so ``Literal['a)', 'b']`` is read whole: ``(type, index after
    the ")")``, or None if it does not close on its line. Looks at most ``MAX_ANNOTATION_CHARS``
    characters (and not past ``stop``)."""
    end = min(len(text), start + MAX_ANNOTATION_CHARS + 1)
    if stop is not None:
        end = min(end, stop)
    depth = 0
    quote: str | None = None
    i = start
    while i < end:
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            if depth == 0:
                return (text[start:i], i + 1) if ch == ")" else None
            depth -= 1
        elif ch == "\n":
            return None
        i += 1
    return None


def prompt_output_fields(system: str) -> list[tuple[str, str | None]]:
    """The output fields listed in a DSPy adapter's system message under "Your output fields are:", in
    order: ``(name, type as DSPy printed it)``, the type None when the line has none that closes.

    Reads lines ``N. `name` (type): ...`` up to "All interactions will be structured" (or the end), at
    most :data:`MAX_PROMPT_FIELDS` of them. Work is linear in ``system``: candidates are found by string
    searches that never scan the same text twice, and each name and type read is bounded."""
    start = system.find(OUTPUT_SECTION)
    if start < 0:
        return []
    end = system.find(SECTION_END, start)
    if end < 0:
        end = len(system)
    fields: list[tuple[str, str | None]] = []
    pos = start + len(OUTPUT_SECTION)
    while len(fields) < MAX_PROMPT_FIELDS:
        dot = system.find(". `", pos, end)
        if dot < 0:
            break
        pos = dot + 3
        newline = system.rfind("\n", max(0, dot - _MAX_INDEX_DIGITS - 1), dot)
        if newline < 0:  # not "N. `" at the start of a line
            continue
        index = system[newline + 1 : dot]
        if not (index.isascii() and index.isdigit()):
            continue
        close = system.find("`", pos, end)  # a name has no backtick: it ends at the next one
        if close < 0:
            break
        if not pos < close <= pos + MAX_PROMPT_NAME_CHARS or not system.startswith("` (", close):
            pos = close
            continue
        name = system[pos:close]
        if "\n" in name:
            pos = close
            continue
        scanned = scan_type_text(system, close + 3, end)
        type_text = scanned[0].strip() if scanned is not None else ""
        fields.append((name, type_text or None))
        pos = scanned[1] if scanned is not None else close + 3
    return fields
