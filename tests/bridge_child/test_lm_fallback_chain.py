"""Model fallback, in process: the configuration (``spec.check_lm_config``'s ``fallbacks``), its
description and secrets, and :class:`bridge_child._lm_fallback.FallbackLM` deciding what falls back,
over stand-in LMs. The real path (workers, ``fake-lm``) is ``tests/dspex_trio/test_lm_fallback.py``.
"""

from __future__ import annotations

import re
from typing import Any

import dspy
import pytest

from bridge_child import _lm_fallback, wire
from bridge_child._lmrules import secrets_of
from bridge_child.spec import MAX_FALLBACK_LMS, SpecError, check_lm_config, describe_lm


def chain_config() -> dict[str, Any]:
    return {
        "model": "openai/a",
        "api_base": "http://127.0.0.1:1/v1",
        "api_key": "secret-a",
        "fallbacks": [
            {"model": "openai/b", "api_base": "http://u:pw-b-secret@127.0.0.1:2/v1", "api_key": "secret-b"},
            "openai/c",
        ],
    }


def test_a_chain_is_checked_each_lm_as_a_configuration() -> None:
    checked = check_lm_config(chain_config())
    assert [f["model"] for f in checked["fallbacks"]] == ["openai/b", "openai/c"]
    assert check_lm_config(checked) == checked  # checking again changes nothing
    assert "fallbacks" not in check_lm_config({"model": "openai/a", "fallbacks": []})


@pytest.mark.parametrize(
    ("fallbacks", "says"),
    [
        ([{"model": "openai/b", "fallbacks": ["openai/c"]}], "no fallbacks of its own"),
        (["openai/x"] * (MAX_FALLBACK_LMS + 1), f"at most {MAX_FALLBACK_LMS}"),
        ([{"model": "openai/b", "colour": "red"}], "lm.fallbacks[0]: unknown key"),
        (["nonsense"], "lm.fallbacks[0]: model must be"),
        ([3], "lm.fallbacks[0] must be an object"),
        ("openai/b", "wrong type"),
    ],
)
def test_a_bad_chain_is_refused_naming_where(fallbacks: Any, says: str) -> None:
    with pytest.raises(SpecError, match=re.escape(says)):
        check_lm_config({"model": "openai/a", "fallbacks": fallbacks})


def test_a_hermetic_or_public_only_primary_makes_every_fallback_so() -> None:
    checked = check_lm_config(
        {"model": "openai/a", "hermetic": True, "public_only": True, "fallbacks": ["openai/b"]}
    )
    assert checked["fallbacks"] == [{"model": "openai/b", "hermetic": True, "public_only": True}]
    with pytest.raises(SpecError, match="hermetic"):
        check_lm_config({"model": "openai/a", "hermetic": True, "fallbacks": ["azure/b"]})


def test_the_description_and_the_redaction_cover_every_lm_of_the_chain() -> None:
    config = check_lm_config(chain_config())
    described = describe_lm(config)
    text = repr(described)
    assert "secret-a" not in text and "secret-b" not in text and "pw-b-secret" not in text
    assert [f["model"] for f in described["fallbacks"]] == ["openai/b", "openai/c"]
    assert [f["has_api_key"] for f in described["fallbacks"]] == [True, False]
    secrets = secrets_of(config, environ={})
    assert {"secret-a", "secret-b", "pw-b-secret"} <= set(secrets)


def test_an_lm_is_named_by_its_budget_key_without_credentials() -> None:
    assert _lm_fallback.lm_name({"model": "openai/a"}) == "openai/a"
    assert _lm_fallback.lm_name({"model": "openai/a", "api_base": "http://h:1/v1/"}) == wire.lm_key(
        "openai/a", "http://h:1/v1"
    )
    assert "pw" not in _lm_fallback.lm_name({"model": "openai/a", "api_base": "http://u:pw@h:1/v1"})


class StandIn:
    """An LM that answers, or raises what it is given; counts its calls."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls = 0

    def _answer(self) -> Any:
        self.calls += 1
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def __call__(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        return self._answer()

    async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        return self._answer()


def run(lm: _lm_fallback.FallbackLM, asynchronous: bool) -> Any:
    if not asynchronous:
        return lm(messages=[{"role": "user", "content": "x"}])
    import asyncio

    return asyncio.run(lm.acall(messages=[{"role": "user", "content": "x"}]))


@pytest.mark.parametrize("asynchronous", [False, True], ids=["call", "acall"])
@pytest.mark.parametrize(
    "failure",
    [
        dspy.LMServerError("boom", status=500),
        dspy.LMRateLimitError("slow down", status=429),
        dspy.LMTimeoutError("late"),
        dspy.LMTransportError("refused"),
    ],
    ids=["5xx", "429", "timeout", "connect"],
)
def test_a_provider_failure_moves_to_the_next_lm(failure: Exception, asynchronous: bool) -> None:
    first, second, third = StandIn(failure), StandIn(["answer"]), StandIn(["never"])
    lm = _lm_fallback.FallbackLM([("a", first), ("b", second), ("c", third)], secrets=[])
    with _lm_fallback.recording() as record:
        assert run(lm, asynchronous) == ["answer"]
    assert (first.calls, second.calls, third.calls) == (1, 1, 0)
    usage = _lm_fallback.annotate({"total_tokens": 3}, record)
    assert usage == {
        "total_tokens": 3,
        "lm": "b",
        "lms": ["b"],
        "fallbacks": [{"lm": "a", "error": type(failure).__name__}],
    }


class FailsOnce(StandIn):
    """Raises its failure on the first call, answers on the others."""

    def _answer(self) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise self.result
        return ["from the primary"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["call", "acall"])
def test_usage_names_the_lm_of_every_request_in_order(asynchronous: bool) -> None:
    """Three LM requests of one execution: the first falls back to ``b``, the next two are answered by
    the primary again. ``lms`` names all three; ``lm`` (kept as it was) the last."""
    first, second = FailsOnce(dspy.LMServerError("boom", status=503)), StandIn(["from b"])
    lm = _lm_fallback.FallbackLM([("a", first), ("b", second)], secrets=[])
    with _lm_fallback.recording() as record:
        answers = [run(lm, asynchronous) for _ in range(3)]
    assert answers == [["from b"], ["from the primary"], ["from the primary"]]
    usage = _lm_fallback.annotate({"total_tokens": 9}, record)
    assert usage == {
        "total_tokens": 9,
        "lm": "a",
        "lms": ["b", "a", "a"],
        "fallbacks": [{"lm": "a", "error": "LMServerError"}],
    }


@pytest.mark.parametrize("asynchronous", [False, True], ids=["call", "acall"])
@pytest.mark.parametrize(
    "failure",
    [
        dspy.LMInvalidRequestError("bad request", status=400),
        dspy.LMAuthError("who?", status=401),
        ValueError("x"),
    ],
    ids=["400", "401", "not-an-lm-error"],
)
def test_a_failure_that_is_not_the_providers_does_not_fall_back(
    failure: Exception, asynchronous: bool
) -> None:
    first, second = StandIn(failure), StandIn(["answer"])
    lm = _lm_fallback.FallbackLM([("a", first), ("b", second)], secrets=[])
    with pytest.raises(type(failure)):
        run(lm, asynchronous)
    assert second.calls == 0


@pytest.mark.parametrize("asynchronous", [False, True], ids=["call", "acall"])
def test_all_down_names_every_lm_in_order_and_hides_secrets(asynchronous: bool) -> None:
    lm = _lm_fallback.FallbackLM(
        [
            ("a", StandIn(dspy.LMServerError("key sk-top-secret rejected", status=502))),
            ("b", StandIn(dspy.LMTransportError("connection refused"))),
        ],
        secrets=["sk-top-secret"],
    )
    with pytest.raises(_lm_fallback.AllLMsFailed) as caught:
        run(lm, asynchronous)
    error = caught.value
    assert error.type == "AllLMsFailed" and error.code == wire.ErrorCode.PROGRAM_ERROR
    assert error.details == {
        "tried": [{"lm": "a", "error": "LMServerError"}, {"lm": "b", "error": "LMTransportError"}]
    }
    assert "a: LMServerError" in error.message and "b: LMTransportError" in error.message
    assert "sk-top-secret" not in error.message


def test_without_a_chain_usage_is_unchanged() -> None:
    with _lm_fallback.recording() as record:
        pass
    assert _lm_fallback.annotate(None, record) is None
    assert _lm_fallback.annotate({"total_tokens": 1}, record) == {"total_tokens": 1}


def test_the_chain_shows_the_primarys_attributes() -> None:
    primary = dspy.LM("openai/a", api_base="http://127.0.0.1:1/v1", api_key="k", cache=False)
    lm = _lm_fallback.FallbackLM([("a", primary), ("b", StandIn(["x"]))], secrets=[])
    assert isinstance(lm, dspy.BaseLM)
    assert lm.model == "openai/a" and lm.kwargs == primary.kwargs
    assert lm.supports_function_calling == primary.supports_function_calling
    assert lm.names == ["a", "b"]


class EmitsThenFails(StandIn):
    """A streamed answer that emitted output, then failed (the next LM must not answer after it)."""

    def _answer(self) -> Any:
        from dspy.clients.call_context import stream_emitted

        self.calls += 1
        stream_emitted()
        raise dspy.LMServerError("stream broke", status=502)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["call", "acall"])
def test_a_failure_after_streamed_output_does_not_fall_back(asynchronous: bool) -> None:
    second = StandIn(["answer"])
    lm = _lm_fallback.FallbackLM([("a", EmitsThenFails(None)), ("b", second)], secrets=[])
    with pytest.raises(dspy.LMServerError):
        run(lm, asynchronous)
    assert second.calls == 0
    # and an ordinary failure on a fresh request still falls back (the mark was this request's)
    lm = _lm_fallback.FallbackLM(
        [("a", StandIn(dspy.LMServerError("x", status=500))), ("b", second)], secrets=[]
    )
    assert run(lm, asynchronous) == ["answer"]
