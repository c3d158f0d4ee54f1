"""Loading a program's state in the worker (``bridge_child._programs._apply_state``): the same module
as DSPy's own ``load_state`` gives, without its trial run on a deep copy; a module class with its own
``load_state`` keeps it."""

from __future__ import annotations

from typing import Any

import dspy

from bridge_child._programs import _apply_state, dump_state


class Two(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("question: str -> summary: str")
        self.second = dspy.ChainOfThought("summary: str -> answer: str")

    def forward(self, question: str) -> Any:
        return self.second(summary=self.first(question=question).summary)


def state_with_demos() -> dict[str, Any]:
    source = Two()
    source.first.demos = [{"question": "q1", "summary": "s1"}]
    source.second.predict.demos = [{"summary": "s2", "reasoning": "r2", "answer": "a2"}]
    source.second.predict.signature = source.second.predict.signature.with_instructions("Think it over.")
    return dump_state(source)


def test_the_loaded_module_is_the_one_dspy_s_load_state_gives() -> None:
    state = state_with_demos()
    ours, theirs = Two(), Two()
    _apply_state(ours, state)
    theirs.load_state(state)
    assert ours.dump_state() == theirs.dump_state()
    assert ours.second.predict.signature.instructions == "Think it over."
    assert ours.first.demos == [{"question": "q1", "summary": "s1"}]


def test_a_module_with_its_own_load_state_keeps_it() -> None:
    seen: list[dict[str, Any]] = []

    class Own(Two):
        def load_state(self, state: dict[str, Any], **kwargs: Any) -> Any:
            seen.append(state)
            return super().load_state(state, **kwargs)

    state = state_with_demos()
    module = Own()
    _apply_state(module, state)
    assert seen == [state]
    assert module.first.demos == [{"question": "q1", "summary": "s1"}]


def test_a_bare_predictor_loads_its_own_state() -> None:
    source = dspy.Predict("question: str -> answer: str")
    source.demos = [{"question": "q", "answer": "a"}]
    module = dspy.Predict("question: str -> answer: str")
    _apply_state(module, source.dump_state())
    assert module.demos == [{"question": "q", "answer": "a"}]
