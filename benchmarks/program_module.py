"""The program module of the ``programs`` benchmark family: a registered three-predictor module, and a
heavy library (numpy) imported, with an index built, at import (what the zygote template then shares
with every worker it forks)."""

from __future__ import annotations

import dspy
import numpy as np

INDEX = np.random.default_rng(0).standard_normal((20_000, 64))
"""A stand-in for an application's embedding index (10 MB), built once at import."""


class Pipeline(dspy.Module):
    """Three predictors in a row: summarize, classify, answer."""

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict("text: str -> summary: str")
        self.classify = dspy.Predict("summary: str -> topic: str")
        self.answer = dspy.Predict("summary: str, topic: str -> answer: str")

    def forward(self, text: str) -> dspy.Prediction:
        summary = self.summarize(text=text).summary
        topic = self.classify(summary=summary).topic
        return self.answer(summary=summary, topic=topic)


PROGRAMS = {"pipeline": Pipeline}
