"""The program module the tests serve (``programs=["tests.program_module"]``): what an operator's
application registers, with an in-memory retriever and no network.

Registered programs: ``rag`` (retrieve, then answer with chain of thought), ``two_hop`` (two rounds of
query generation and retrieval), ``agent`` (DSPy's ReAct with two of the tools below), ``judge`` (a
pydantic output), ``chat`` (a ``dspy.History`` input), ``pipeline`` (three predictors in a row), and
two that fail on purpose: ``broken`` (its factory raises) and ``not_a_module`` (returns no module).
Tools: ``lookup`` and ``word_count`` (the embedded offline LM always calls a tool with one ``key``
argument, so these take one), ``explode`` (raises), ``noisy`` (prints to stdout), ``stall`` (hangs).
Metrics: ``exact_match``, ``short_answer`` (a reward for best_of_n and refine).
"""

from __future__ import annotations

import threading
import time
from typing import Literal

import dspy
import pydantic

from bridge_child.registry import metric, program, tool

DOCUMENTS = (
    "Trio is a Python library for async concurrency and I/O.",
    "Trio's nurseries give structured concurrency: a task never outlives its nursery.",
    "DSPy is a framework for programming language models with signatures and modules.",
    "DSPy optimizers such as BootstrapFewShot compile demos into a program's predictors.",
    "A zygote process imports libraries once and forks workers that share its memory.",
    "Cancel scopes in Trio cancel everything inside them, with deadlines.",
)
"""The corpus of the in-memory retriever (built once, at import: every forked worker shares it)."""

STALL_S = 3600.0
"""How long ``stall`` hangs, in seconds (longer than any test waits)."""
stall_started = threading.Event()


def retrieve(query: str, k: int = 2) -> list[str]:
    """The ``k`` documents sharing the most words with ``query`` (ties: corpus order)."""
    words = set(query.lower().split())
    ranked = sorted(DOCUMENTS, key=lambda doc: -len(words & set(doc.lower().split())))
    return ranked[:k]


@program("rag")
class RAG(dspy.Module):
    """Answer a question from the documents the retriever finds."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.ChainOfThought("context: list[str], question: str -> answer: str")

    def forward(self, question: str) -> dspy.Prediction:
        return self.respond(context=retrieve(question), question=question)


@program("two_hop")
class TwoHop(dspy.Module):
    """Two rounds of search-query generation and retrieval, then an answer."""

    def __init__(self) -> None:
        super().__init__()
        self.generate_query = dspy.ChainOfThought("context: list[str], question: str -> query: str")
        self.answer = dspy.ChainOfThought("context: list[str], question: str -> answer: str")

    def forward(self, question: str) -> dspy.Prediction:
        context: list[str] = []
        for _hop in range(2):
            query = self.generate_query(context=context, question=question).query
            context = list(dict.fromkeys([*context, *retrieve(query)]))
        return self.answer(context=context, question=question)


class Verdict(pydantic.BaseModel):
    label: Literal["positive", "negative"]
    score: float
    reasons: list[str]


class JudgeSignature(dspy.Signature):
    """Judge the tone of a text."""

    text: str = dspy.InputField()
    verdict: Verdict = dspy.OutputField()


@program("judge")
def judge() -> dspy.Module:
    return dspy.Predict(JudgeSignature)


class ChatSignature(dspy.Signature):
    """Answer the question, given the conversation so far."""

    history: dspy.History = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


@program("chat")
def chat() -> dspy.Module:
    return dspy.Predict(ChatSignature)


@program("pipeline")
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


@program("broken")
def broken() -> dspy.Module:
    raise RuntimeError("the retriever index is missing")


@program("not_a_module")
def not_a_module() -> object:
    return 42


@tool
def lookup(key: str) -> str:
    """Look a term up in the documents; the best matching one."""
    return retrieve(key, k=1)[0]


@tool
def word_count(key: str) -> int:
    """Count the words of a text."""
    return len(key.split())


@tool
def explode(key: str) -> str:
    """Always fails (to see a tool's exception in the trajectory)."""
    raise ValueError(f"explode cannot handle {key!r}")


@tool
def noisy(key: str) -> str:
    """Prints to stdout, then answers."""
    print("noisy tool output " * 100)
    return "printed"


@tool
def stall(key: str) -> str:
    """Hangs (far longer than any execution may take)."""
    stall_started.set()
    time.sleep(STALL_S)
    return "too late"


@program("agent")
def agent() -> dspy.Module:
    return dspy.ReAct("question: str -> answer: str", tools=[lookup, word_count], max_iters=3)


@metric
def exact_match(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    """The prediction's answer is the example's, ignoring case."""
    return str(example.answer).strip().lower() == str(prediction.answer).strip().lower()


@metric
def short_answer(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
    """1.0 for an answer of at most five words, less for longer ones."""
    return min(1.0, 5 / max(1, len(str(prediction.answer).split())))
