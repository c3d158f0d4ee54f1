"""The program module of the ``jobs`` benchmark family: a registered three-predictor module whose last
predictor judges its own answer, and the metric that reads that judgement (what ``dspy.Evaluate`` and
the optimizers then count)."""

from __future__ import annotations

import dspy


class Pipeline(dspy.Module):
    """Three predictors in a row: summarize, classify, answer (with a verdict)."""

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("question: str -> summary: str")
        self.classify = dspy.Predict("summary: str -> topic: str")
        self.answer = dspy.Predict("summary: str, topic: str -> answer: str, correct: bool")

    def forward(self, question: str) -> dspy.Prediction:
        summary = self.summarize(question=question).summary
        topic = self.classify(summary=summary).topic
        return self.answer(summary=summary, topic=topic)


def agrees(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """The prediction's own verdict."""
    return bool(prediction.correct)


PROGRAMS = {"pipeline": Pipeline}
METRICS = {"agrees": agrees}


def devset(n: int, offset: int = 0) -> list[dict[str, object]]:
    """``n`` examples as the pool takes them."""
    return [
        {"inputs": {"question": f"What is item {i} about trio and dspy?"}, "labels": {"answer": f"item {i}"}}
        for i in range(offset, offset + n)
    ]


def examples(data: list[dict[str, object]]) -> list[dspy.Example]:
    """The same examples as ``dspy.Example``s (what ``dspy.Evaluate`` and the optimizers take)."""
    return [
        dspy.Example(**e["inputs"], **e["labels"]).with_inputs(*e["inputs"])  # type: ignore[arg-type]
        for e in data
    ]
