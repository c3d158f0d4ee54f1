"""DSPy's own JSON state of a program, checked against the program's predictors (no dspy, no trio).

The format is the one ``program.save("p.json")`` writes and ``program.load("p.json")`` reads: an object
mapping each predictor's name (as ``named_predictors()`` gives it: ``"predict"``, ``"extract.predict"``,
``"respond"``) to that predictor's state, plus DSPy's ``"metadata"``; a bare ``dspy.Predict`` saves its
one predictor's state at the top level. A predictor's state holds ``demos``, ``signature``
(``instructions`` and each field's ``prefix`` and ``description``), ``lm``, ``traces``, ``train`` and, for
DSPy's decision fields, ``fields``.

:func:`check_state` is what a state from a client goes through before DSPy's ``load_state`` sees it:
plain JSON data only (never pickle, never an object marker), every predictor named and each with as many
signature fields as the program's (so a state saved from another program is refused, naming the
predictor), bounded sizes, and the LM dropped (the session's LM applies). Import the names from
:mod:`bridge_child.spec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from bridge_child._modules import PredictorLayout
from bridge_child._signatures import InvalidSignature

MAX_STATE_BYTES: Final = 8 * 1024 * 1024
"""Largest program state, JSON-encoded, in bytes (checked by the host before a worker sees it)."""
MAX_DEMOS: Final = 1000
"""Demos one predictor's state may hold."""
MAX_STATE_DEPTH: Final = 32
"""Deepest nesting of objects and lists within a state."""
PREDICTOR_KEYS: Final = frozenset({"demos", "signature", "lm", "traces", "train", "fields"})
"""The keys of one predictor's state that DSPy writes."""
METADATA: Final = "metadata"
"""The key DSPy's ``save()`` adds beside the predictors (library versions); ignored on load."""


class InvalidState(InvalidSignature):
    """A program state is refused (``invalid_params``, type ``InvalidState``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.type = "InvalidState"


def _marker(key: str) -> bool:
    """A key that serialises a Python object rather than data (jsonpickle's ``py/object``, ``__reduce__``)."""
    return key.startswith("py/") or (key.startswith("__") and key.endswith("__") and len(key) > 4)


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Raise :class:`InvalidState` unless ``value`` is plain JSON data without object markers."""
    if depth > MAX_STATE_DEPTH:
        raise InvalidState(f"{where} is nested more than {MAX_STATE_DEPTH} levels deep")
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidState(f"{where} holds {value}, which is not JSON")
        return
    if isinstance(value, list):
        for item in value:
            _check_json(item, where, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidState(f"{where} has a key that is not a string")
            if _marker(key):
                raise InvalidState(
                    f"{where} holds a serialized Python object ({key[:40]!r}); a state is plain JSON data"
                )
            _check_json(item, where, depth + 1)
        return
    raise InvalidState(
        f"{where} holds a {type(value).__name__}; a state is plain JSON data (DSPy's program.save('p.json') "
        "format), never pickle"
    )


def _check_predictor(state: Any, predictor: PredictorLayout) -> dict[str, Any]:
    where = f"the state of predictor {predictor.name!r}"
    if not isinstance(state, dict):
        raise InvalidState(f"{where} must be an object")
    unknown = sorted(set(state) - PREDICTOR_KEYS)
    if unknown:
        raise InvalidState(f"{where} has unknown key(s) {', '.join(repr(k[:40]) for k in unknown)}")
    demos = state.get("demos", [])
    if not isinstance(demos, list) or len(demos) > MAX_DEMOS:
        raise InvalidState(f"{where}: 'demos' must be a list of at most {MAX_DEMOS} objects")
    for i, demo in enumerate(demos):
        if not isinstance(demo, dict):
            raise InvalidState(f"{where}: demo {i} must be an object")
        _check_json(demo, f"{where}, demo {i}")
    signature = state.get("signature")
    if not isinstance(signature, dict):
        raise InvalidState(f"{where}: 'signature' must be an object")
    instructions = signature.get("instructions")
    fields = signature.get("fields")
    if not isinstance(instructions, str) or not isinstance(fields, list):
        raise InvalidState(f"{where}: 'signature' needs 'instructions' (a string) and 'fields' (a list)")
    if len(fields) != predictor.fields:
        raise InvalidState(
            f"{where} has {len(fields)} signature field(s) but the program's predictor has "
            f"{predictor.fields} ({', '.join((*predictor.inputs, *predictor.outputs))}): "
            "is it the state of another program?"
        )
    clean_fields = []
    for f in fields:
        if not (
            isinstance(f, dict) and isinstance(f.get("prefix"), str) and isinstance(f.get("description"), str)
        ):
            raise InvalidState(
                f"{where}: each signature field needs a 'prefix' and a 'description' (strings)"
            )
        clean_fields.append({"prefix": f["prefix"], "description": f["description"]})
    clean: dict[str, Any] = {
        "traces": [],
        "train": [],
        "demos": demos,
        "signature": {"instructions": instructions, "fields": clean_fields},
        "lm": None,  # whatever LM the state names is ignored: the session's LM applies
    }
    decision = state.get("fields")
    if decision is not None:  # DSPy's decision-field criteria: data, checked again by DSPy on load
        if not isinstance(decision, dict):
            raise InvalidState(f"{where}: 'fields' must be an object")
        _check_json(decision, f"{where}, 'fields'")
        clean["fields"] = decision
    return clean


def check_state(state: Any, predictors: Sequence[PredictorLayout], *, flat: bool) -> dict[str, Any]:
    """A client's program state, checked against the program's predictors and cleaned for DSPy's
    ``load_state`` (``flat``: the program is a bare ``dspy.Predict``, whose state is its predictor's).

    Raises :class:`InvalidState` naming what is wrong (and the predictor)."""
    if not isinstance(state, dict):
        raise InvalidState(
            "a program state must be an object (DSPy's JSON state, as program.save('p.json') writes it); "
            "pickled programs are never loaded"
        )
    state = {k: v for k, v in state.items() if k != METADATA}
    if flat:
        return _check_predictor(state, predictors[0])
    names = [p.name for p in predictors]
    unknown = [k for k in state if k not in names]
    if unknown:
        raise InvalidState(
            f"the state names predictor {str(unknown[0])[:80]!r}, which the program does not have "
            f"(its predictors: {', '.join(names) or 'none'}): is it the state of another program?"
        )
    missing = [n for n in names if n not in state]
    if missing:
        raise InvalidState(f"the state has no entry for the program's predictor {missing[0]!r}")
    return {p.name: _check_predictor(state[p.name], p) for p in predictors}
