"""The support desk's program module: what the pool may run, by name (nothing else crosses the wire).

Serve it, from the repository root::

    .venv/bin/dspex-trio serve --programs examples.support.programs

It registers (``PROGRAMS``, ``TOOLS``, ``METRICS``, here through the decorators):

- ``answer``: retrieve FAQ entries, then answer with chain of thought (a RAG module);
- ``triage``: read a customer message into a ``Ticket`` (a pydantic output: a JSON object);
- ``chat``: answer given the conversation so far (a ``dspy.History`` input: a JSON list of turns);
- tools ``search_faq`` and ``order_status``, for ``react`` programs a client builds from a signature;
- the metric ``grounded``, the reward of ``best_of_n``/``refine`` programs and a metric for evaluation.

The FAQ index is built at import: once, in the zygote template, and shared by every forked worker. The
order-system client is built lazily, once per worker (``functools.cache``): a client holding sockets or
threads must never be built at import, since the template forks after importing this module.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

import dspy
import numpy as np
import pydantic

from bridge_child.registry import metric, program, tool

FAQ = (
    "To reset your password, open Settings > Account > Reset password; the link arrives by email within 5 minutes.",
    "Refunds are paid to the original card within 7 days of the return reaching our warehouse.",
    "Standard shipping takes 3 to 5 working days; express shipping takes 1 to 2 working days.",
    "You can change the delivery address until the order ships, from Orders > Edit address.",
    "Invoices are in Orders > Invoices, as PDF files, for every order of the last 24 months.",
    "To close your account, write to support; we delete your data within 30 days.",
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


_VOCABULARY = sorted({word for entry in FAQ for word in _words(entry)})
_COLUMN = {word: i for i, word in enumerate(_VOCABULARY)}


def _vector(text: str) -> np.ndarray:
    vector = np.zeros(len(_VOCABULARY))
    for word in _words(text):
        if word in _COLUMN:
            vector[_COLUMN[word]] += 1.0
    norm = np.linalg.norm(vector)
    return vector / norm if norm else vector


_INDEX = np.stack([_vector(entry) for entry in FAQ])
"""One unit vector per FAQ entry (bag of words): built once, at import."""


def search_faq_entries(query: str, k: int = 2) -> list[str]:
    """The ``k`` FAQ entries closest to ``query`` (cosine similarity)."""
    scores = _INDEX @ _vector(query)
    return [FAQ[i] for i in np.argsort(-scores, kind="stable")[:k]]


@program("answer")
class Answer(dspy.Module):
    """Answer a customer's question from the FAQ."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.ChainOfThought("faq: list[str], question: str -> answer: str")

    def forward(self, question: str) -> dspy.Prediction:
        return self.respond(faq=search_faq_entries(question), question=question)


class Ticket(pydantic.BaseModel):
    category: Literal["billing", "account", "shipping", "other"]
    priority: int = pydantic.Field(ge=1, le=3, description="1: urgent, 3: can wait")
    summary: str


class Triage(dspy.Signature):
    """Read a customer's message into a support ticket."""

    message: str = dspy.InputField()
    ticket: Ticket = dspy.OutputField()


@program("triage")
def triage() -> dspy.Module:
    return dspy.Predict(Triage)


class Chat(dspy.Signature):
    """Answer the customer's question, given the conversation so far."""

    history: dspy.History = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


@program("chat")
def chat() -> dspy.Module:
    return dspy.Predict(Chat)


@tool
def search_faq(query: str) -> list[str]:
    """Search the FAQ; the two best matching entries."""
    return search_faq_entries(query)


class _OrderSystem:
    """Stands for a client of an order service (a connection pool, a session...)."""

    def __init__(self) -> None:
        self.orders = {"A-1001": "shipped on Monday", "A-1002": "waiting for payment"}

    def status(self, order_id: str) -> str:
        return self.orders.get(order_id.strip().upper(), "no such order")


@functools.cache
def _order_system() -> _OrderSystem:
    """Built on first use, once per worker (never at import: the zygote template forks after it)."""
    return _OrderSystem()


@tool
def order_status(order_id: str) -> str:
    """The status of an order, by its id (like A-1001)."""
    return _order_system().status(order_id)


@metric
def grounded(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
    """The share of the answer's words found in the FAQ entries the question retrieves."""
    known = {word for entry in search_faq_entries(example.question) for word in _words(entry)}
    words = _words(str(prediction.answer))
    return sum(word in known for word in words) / len(words) if words else 0.0
