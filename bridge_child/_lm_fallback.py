"""Model fallback in the worker: an LM configuration whose ``fallbacks`` lists more LMs.

``{"model": "openai/a", ..., "fallbacks": [{"model": "openai/b", ...}, ...]}`` (checked by
``bridge_child.spec.check_lm_config``) becomes one :class:`FallbackLM`: each LM request of an execution
goes to the first LM of the chain; when that LM fails with a provider failure (DSPy's retryable LM
errors: ``5xx``, ``429`` once DSPy's retries and the pool's budget pauses are spent, timeout, connect or
transport error, ``dspy.is_retryable_lm_error``) the same request goes to the next LM, in the order
configured. Any other failure (a ``400`` that is the request's fault, an auth error, a guard's refusal,
a cancel), and any failure after a streamed answer emitted output (DSPy's own rule for its retries),
ends the execution as it would without fallbacks. Every LM of the chain is an ordinary
guarded LM (``bridge_child._lmguard.guarded_lm``): its own flags, its own budget key and leases.

When every LM of the chain failed, the execution fails with :class:`AllLMsFailed` (a
``program_error`` of type ``AllLMsFailed`` whose ``details["tried"]`` names every LM tried, in order,
with its error type). An execution that succeeds reports, in its ``usage``, the LMs that answered
(``usage["lms"]``: one name per LM request, in order; ``usage["lm"]``: the last of them) and the
failures it moved past (``usage["fallbacks"]``), through :func:`recording` and :func:`annotate`.

Importing this module imports dspy; ``bridge_child._programs`` imports it lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Final

import dspy
from dspy.clients.call_context import adapter_fallback_scope

from bridge_child import wire
from bridge_child._context import MethodError
from bridge_child._lmrules import public_url, redact

MAX_FALLBACK_ERROR_CHARS: Final = 512
"""Longest part of one LM's error message quoted in :class:`AllLMsFailed`, in characters."""
ALL_FAILED: Final = "AllLMsFailed"
"""The error type of an execution whose every LM failed (the host's ``dspex_trio.AllLMsFailed``)."""


def lm_name(config: dict[str, Any]) -> str:
    """How results and errors name an LM: its budget key (``wire.lm_key``), the base without any
    credential it may carry."""
    base = config.get("api_base")
    return wire.lm_key(config["model"], public_url(base) if isinstance(base, str) else None)


class AllLMsFailed(MethodError):
    """Every LM of a fallback chain failed with a provider failure; ``details["tried"]`` lists them."""

    def __init__(self, failures: Sequence[tuple[str, BaseException]], secrets: Sequence[str]) -> None:
        tried = [{"lm": name, "error": type(exc).__name__} for name, exc in failures]
        parts = [
            f"{name}: {type(exc).__name__}: {redact(str(exc), secrets)[:MAX_FALLBACK_ERROR_CHARS]}"
            for name, exc in failures
        ]
        super().__init__(
            wire.ErrorCode.PROGRAM_ERROR,
            f"every LM of the fallback chain failed ({len(failures)} tried): " + "; ".join(parts),
            type=ALL_FAILED,
            details={"tried": tried},
        )


@dataclasses.dataclass(eq=False)
class Record:
    """What one execution's LM requests did: the LMs that answered, the failures moved past."""

    answered: list[str] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


_RECORD: contextvars.ContextVar[Record | None] = contextvars.ContextVar("dspex_fallback", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Record]:
    """Record, for the execution this context runs, which LM of a chain answered each request."""
    record = Record()
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


def annotate(usage: dict[str, Any] | None, record: Record) -> dict[str, Any] | None:
    """``usage`` with the LMs that answered (``lms``: one per LM request, in order; ``lm``: the last
    of them, as before ``lms`` existed) and the failures moved past (``fallbacks``), when the
    execution's LM is a chain (unchanged otherwise)."""
    if not record.answered and not record.skipped:
        return usage
    out = dict(usage or {})
    if record.answered:
        out["lm"] = record.answered[-1]
        out["lms"] = list(record.answered)
    if record.skipped:
        out["fallbacks"] = list(record.skipped)
    return out


def _note(name: str | None, failures: list[tuple[str, BaseException]]) -> None:
    record = _RECORD.get()
    if record is None:
        return
    record.skipped.extend({"lm": n, "error": type(exc).__name__} for n, exc in failures)
    if name is not None:
        record.answered.append(name)


class FallbackLM(dspy.BaseLM):
    """A chain of LMs tried in order for each request (see the module doc). Everything but calling it
    (``model``, ``kwargs``, what the adapters ask) is the primary's."""

    def __init__(self, chain: Sequence[tuple[str, Any]], secrets: Sequence[str]) -> None:
        # No BaseLM.__init__: the attributes are the primary's (``__getattr__``).
        self._chain = tuple(chain)
        self._secrets = tuple(secrets)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._chain[0][1], name)

    @property
    def names(self) -> list[str]:
        return [name for name, _lm in self._chain]

    @property
    def supports_function_calling(self) -> bool:
        return bool(self._chain[0][1].supports_function_calling)

    @property
    def supports_reasoning(self) -> bool:
        return bool(self._chain[0][1].supports_reasoning)

    @property
    def supports_response_schema(self) -> bool:
        return bool(self._chain[0][1].supports_response_schema)

    @property
    def supported_params(self) -> set[str]:
        return set(self._chain[0][1].supported_params)

    def __call__(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        failures: list[tuple[str, BaseException]] = []
        for name, lm in self._chain:
            try:
                with adapter_fallback_scope() as progress:  # marked once a stream emitted output
                    answer = lm(prompt, messages=messages, **kwargs)
            except Exception as exc:
                if progress.emitted or not dspy.is_retryable_lm_error(exc):
                    _note(None, failures)
                    raise
                failures.append((name, exc))
                continue
            _note(name, failures)
            return answer
        _note(None, failures)
        raise AllLMsFailed(failures, self._secrets)

    async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        failures: list[tuple[str, BaseException]] = []
        for name, lm in self._chain:
            try:
                with adapter_fallback_scope() as progress:  # marked once a stream emitted output
                    answer = await lm.acall(prompt, messages=messages, **kwargs)
            except Exception as exc:
                if progress.emitted or not dspy.is_retryable_lm_error(exc):
                    _note(None, failures)
                    raise
                failures.append((name, exc))
                continue
            _note(name, failures)
            return answer
        _note(None, failures)
        raise AllLMsFailed(failures, self._secrets)
