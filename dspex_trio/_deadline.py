"""The calling task's effective Trio deadline, read on every call's hot path.

The worker handle tells each call's worker the caller's deadline (``Call.timeout``), however the caller
set it (``_worker._wire_timeout``). ``trio.current_effective_deadline()`` answers that by a recursive
method call per enclosing cancel status (every ``CancelScope`` and nursery of the task, and of the tasks
that started it, up to the run's root): ~0.25 µs per level, 1.5-3 µs per call at the depth of a caller in
a served pool, about a tenth of the pool's whole no-op path (docs/benchmarks.md, families 1 and 2).

:func:`current_effective_deadline` gives the same answer from one loop over the same chain, about 4x
faster at those depths. It reads Trio's cancel status chain (``Task._cancel_status``, each status's
``_scope`` and ``_parent``, each scope's ``_deadline`` and ``_shield``): private attributes, stable
across the Trio versions this project supports (``tests/dspex_trio/test_deadline.py`` compares both
answers over nested, shielded, cancelled and re-deadlined scopes and across nurseries). If a Trio
release renames them, the first call finds out (``AttributeError``) and every later call uses
``trio.current_effective_deadline()``: slower, never wrong.
"""

from __future__ import annotations

import math
from typing import Any

import trio

_fast = True
"""False once Trio's private chain was not where this module reads it (then: Trio's public function)."""


def _walk(task: Any) -> float:
    status = task._cancel_status
    deadline = math.inf
    while status is not None:
        if status.effectively_cancelled:
            return -math.inf
        scope = status._scope
        scope_deadline: float = scope._deadline
        if scope_deadline < deadline:
            deadline = scope_deadline
        if scope._shield:
            break
        status = status._parent
    return deadline


def current_effective_deadline() -> float:
    """``trio.current_effective_deadline()``: the earliest deadline of the scopes in effect for the
    calling task (shields included), ``-inf`` if it is cancelled now, ``inf`` if none has one."""
    global _fast
    if _fast:
        try:
            return _walk(trio.lowlevel.current_task())
        except AttributeError:
            _fast = False
    return trio.current_effective_deadline()
