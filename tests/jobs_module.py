"""The program module of the job tests (``programs=["tests.jobs_module"]``): small deterministic programs
and metrics for ``pool.evaluate`` and ``pool.compile``, scored the same by ``dspy.Evaluate`` in-process.

Programs: ``qa`` (one Predict: ``question -> answer, correct: bool``), ``fragile`` (as ``qa``, raising
for a question that holds "boom"), ``slow`` (as ``qa``, sleeping ``SLOW_S`` first), ``two_step`` (two predictors: a draft, then
``question, draft -> answer, correct``). Metrics: ``agrees``
(the prediction's own ``correct``: the offline LM makes it true for some questions, false for others),
``overlap`` (a float: words shared by the answer and the label), ``picky`` (raises for an example whose
label is "raise").
"""

from __future__ import annotations

import time

import dspy

from bridge_child.registry import metric, program

SLOW_S = 0.2
"""How long ``slow`` sleeps before it answers, in seconds."""


@program("qa")
def qa() -> dspy.Module:
    return dspy.Predict("question: str -> answer: str, correct: bool")


class Fragile(dspy.Module):
    """As qa, but raises for a question that holds "boom"."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.Predict("question: str -> answer: str, correct: bool")

    def forward(self, question: str) -> dspy.Prediction:
        if "boom" in question:
            raise ValueError(f"cannot answer {question!r}")
        return self.respond(question=question)


program("fragile")(Fragile)


class Slow(Fragile):
    """As qa, sleeping first."""

    def forward(self, question: str) -> dspy.Prediction:
        time.sleep(SLOW_S)
        return self.respond(question=question)


program("slow")(Slow)


@metric
def agrees(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """The prediction's own verdict."""
    return bool(prediction.correct)


@metric
def overlap(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
    """The share of the label's words that the answer holds."""
    words = set(str(example.answer).lower().split())
    return len(words & set(str(prediction.answer).lower().split())) / max(1, len(words))


@metric
def picky(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """Raises for an example labelled "raise"; else the prediction's verdict."""
    if example.answer == "raise":
        raise RuntimeError("picky cannot score this example")
    return bool(prediction.correct)


class TwoStep(dspy.Module):
    """Two predictors: a draft, then a checked answer."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question: str -> draft: str")
        self.check = dspy.Predict("question: str, draft: str -> answer: str, correct: bool")

    def forward(self, question: str) -> dspy.Prediction:
        draft = self.draft(question=question).draft
        return self.check(question=question, draft=draft)


program("two_step")(TwoStep)


class Tuned(dspy.Module):
    """As qa, but its answers depend on its own prompt too (its instruction and how many demos it
    has), as a real LM's do: the offline LM answers from the inputs only, so MIPROv2's candidates would
    all score alike on ``qa``."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.Predict("question: str -> answer: str, correct: bool")

    def forward(self, question: str) -> dspy.Prediction:
        prompt = f"{self.respond.signature.instructions} {len(self.respond.demos)}"
        return self.respond(question=f"{question} ({prompt})")


program("tuned")(Tuned)


@metric
def agrees_with_feedback(
    gold: dspy.Example,
    pred: dspy.Prediction,
    trace: object = None,
    pred_name: str | None = None,
    pred_trace: object = None,
) -> dspy.Prediction:
    """GEPA's five-argument form of ``agrees``: the score, and a feedback text naming the predictor."""
    score = 1.0 if bool(pred.correct) else 0.0
    verdict = "right" if score else "wrong"
    about = f" ({pred_name})" if pred_name else ""
    return dspy.Prediction(score=score, feedback=f"The answer to {gold.question!r} was {verdict}{about}.")


class TunedTwoStep(TwoStep):
    """As two_step, each predictor's answers depending on its own instruction too (as ``tuned``), so
    GEPA's proposals for either predictor change the scores."""

    def forward(self, question: str) -> dspy.Prediction:
        draft = self.draft(question=f"{question} ({self.draft.signature.instructions})").draft
        return self.check(question=f"{question} ({self.check.signature.instructions})", draft=draft)


program("tuned_two_step")(TunedTwoStep)


class TunedFragile(Tuned):
    """As tuned, but raises for a question that holds "boom"."""

    def forward(self, question: str) -> dspy.Prediction:
        if "boom" in question:
            raise ValueError(f"cannot answer {question!r}")
        return super().forward(question)


program("tuned_fragile")(TunedFragile)


@metric
def picky_with_feedback(
    gold: dspy.Example,
    pred: dspy.Prediction,
    trace: object = None,
    pred_name: str | None = None,
    pred_trace: object = None,
) -> dspy.Prediction:
    """As ``agrees_with_feedback``, raising for an example labelled "raise" (as ``picky``)."""
    if gold.answer == "raise":
        raise RuntimeError("picky cannot score this example")
    return agrees_with_feedback(gold, pred, trace, pred_name, pred_trace)


@metric
def feedback_raises(
    gold: dspy.Example,
    pred: dspy.Prediction,
    trace: object = None,
    pred_name: str | None = None,
    pred_trace: object = None,
) -> float:
    """Scores as ``agrees``, but raises when GEPA asks it for a predictor's feedback."""
    if pred_name is not None:
        raise RuntimeError("no feedback here")
    return 1.0 if bool(pred.correct) else 0.0
