"""Health records: what ``health()`` returns and what a ``worker_state`` health event carries.

Every backend builds them here (the pool, the bridge, the mock, the fallback), so the backend interface
(:mod:`dspex_trio._backend`) names them without importing any backend.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from dspex_trio._breaker import CircuitState
from dspex_trio._states import WorkerState
from dspex_trio._worker import Worker


@attrs.frozen
class WorkerHealth:
    """One worker in a health snapshot."""

    worker_id: str
    pid: int
    state: WorkerState
    in_flight: int
    last_heartbeat_age: float
    """Seconds since the worker last sent anything (a pong, an ack, a result)."""
    restarts: int
    """Restarts of its slot so far."""
    retiring: bool
    node: str = ""
    """Where it runs when not on this machine (the Ray node id of a worker on a cluster), else ""."""

    @classmethod
    def of(cls, worker: Worker, *, restarts: int, retiring: bool = False) -> WorkerHealth:
        """The health of ``worker`` now."""
        return cls(
            worker_id=worker.worker_id,
            pid=worker.pid,
            state=worker.state,
            in_flight=worker.in_flight,
            last_heartbeat_age=max(0.0, trio.current_time() - worker.last_seen),
            restarts=restarts,
            retiring=retiring,
            node=getattr(worker.process, "node", ""),
        )


def worker_state_data(worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> dict[str, Any]:
    """The data of a ``worker_state`` health event (the same for every backend); with ``node`` for a
    worker that runs on another node (a Ray cluster: ``_ray_launcher``)."""
    data = {
        "worker_id": worker.worker_id,
        "pid": worker.pid,
        "from": str(old),
        "to": str(new),
        "reason": reason,
    }
    node = getattr(worker.process, "node", "")
    if node:
        data["node"] = node
    return data


@attrs.frozen
class HealthSnapshot:
    """The health of a backend at one moment."""

    backend: str
    workers: tuple[WorkerHealth, ...]
    size: int
    restarts: int
    circuit: CircuitState
    circuit_reason: str
    launcher: str
    seq: int
    """Events published before this snapshot (a subscriber resyncs from here)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "size": self.size,
            "restarts": self.restarts,
            "circuit": str(self.circuit),
            "circuit_reason": self.circuit_reason,
            "launcher": self.launcher,
            "seq": self.seq,
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "pid": w.pid,
                    "state": str(w.state),
                    "in_flight": w.in_flight,
                    "last_heartbeat_age": round(w.last_heartbeat_age, 3),
                    "restarts": w.restarts,
                    "retiring": w.retiring,
                    **({"node": w.node} if w.node else {}),
                }
                for w in self.workers
            ],
        }
