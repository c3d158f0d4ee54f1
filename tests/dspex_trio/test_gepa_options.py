"""GEPA's options and budget on the host (``dspex_trio._compile_gepa``), no processes: the budget is the
one ``dspy.GEPA.compile`` computes, and options are checked as ``dspy.GEPA`` checks them."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from dspex_trio import InvalidParams
from dspex_trio._compile_gepa import MAX_METRIC_CALLS, OPTIONS, check_gepa_options, metric_calls


def dspy_budget(options: dict[str, Any], predictors: int, train: int, val: int | None) -> int:
    """The ``max_metric_calls`` that ``dspy.GEPA.compile`` works out (its own arithmetic)."""
    gepa = dspy.GEPA(
        metric=lambda gold, pred, trace, pred_name, pred_trace: 1.0,
        reflection_lm=dspy.LM("openai/none", api_key="none"),
        **{
            k: options[k]
            for k in ("auto", "max_full_evals", "max_metric_calls")
            if options.get(k) is not None
        },
    )
    if gepa.auto is not None:
        from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS

        return gepa.auto_budget(
            num_preds=max(predictors, 1),
            num_candidates=AUTO_RUN_SETTINGS[gepa.auto]["n"],
            valset_size=val if val is not None else train,
        )
    if gepa.max_full_evals is not None:
        return gepa.max_full_evals * (train + (val or 0))
    assert gepa.max_metric_calls is not None
    return gepa.max_metric_calls


@pytest.mark.parametrize(
    "budget",
    [
        {"auto": "light"},
        {"auto": "medium"},
        {"auto": "heavy"},
        {"max_full_evals": 3},
        {"max_metric_calls": 77},
    ],
)
@pytest.mark.parametrize(("predictors", "train", "val"), [(1, 12, 8), (2, 40, None), (3, 100, 30)])
def test_the_budget_is_dspy_s(budget: dict[str, Any], predictors: int, train: int, val: int | None) -> None:
    options = check_gepa_options(budget)
    names = [f"p{i}" for i in range(predictors)]
    assert metric_calls(options, names, train, val) == dspy_budget(options, predictors, train, val)


def test_the_defaults_are_dspy_s() -> None:
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(dspy.GEPA.__init__).parameters.items()
        if name in OPTIONS and name != "reflection_lm"
    }
    assert defaults == {k: v for k, v in OPTIONS.items() if k in defaults}
    assert set(OPTIONS) - set(defaults) == {"reflection_lm"}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "exactly one of auto, max_full_evals, max_metric_calls"),
        ({"auto": "light", "max_full_evals": 2}, r"\(got auto, max_full_evals\)"),
        ({"auto": "extreme"}, "auto must be one of"),
        ({"max_metric_calls": 0}, "max_metric_calls must be an integer within"),
        ({"max_metric_calls": MAX_METRIC_CALLS + 1}, "max_metric_calls must be an integer within"),
        ({"max_metric_calls": 10, "reflection_minibatch_size": 0}, "reflection_minibatch_size"),
        ({"max_metric_calls": 10, "max_merge_invocations": None}, "max_merge_invocations"),
        ({"max_metric_calls": 10, "use_merge": "yes"}, "use_merge must be a boolean"),
        ({"max_metric_calls": 10, "failure_score": float("nan")}, "failure_score must be a number"),
        ({"max_metric_calls": 10, "component_selector": "random"}, "component_selector"),
        ({"max_metric_calls": 10, "reflection_lm": {"model": "openai/x"}}, "reflection_lm must be null"),
        ({"max_metric_calls": 10, "instruction_proposer": "x"}, "unknown option"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidParams, match=match):
        check_gepa_options(options)


def test_a_budget_above_the_limit_is_refused() -> None:
    options = check_gepa_options({"max_full_evals": 1000})
    with pytest.raises(InvalidParams, match="above the limit"):
        metric_calls(options, ["p"], 100, 100)
