"""Jobs through the remote client: ``remote.evaluate(...)`` and ``remote.compile(...)`` speak
``job/submit``, follow ``job/event`` and give the same objects as the pool's (:mod:`dspex_trio._jobs`).

The job runs on the server; a :class:`RemoteJob` is its progress and outcome as this client sees them:
``async for progress in job`` (``JobProgress`` / ``CompileProgress``), ``await job.wait()``
(``EvaluationResult`` / ``CompileResult``, or the error: ``JobFailed`` and the other errors a ``failed``
event names, ``JobCancelled`` when the server cancelled it). Leaving the block early sends ``job/cancel``.
A job is not resumed on a new connection: when the connection drops the job fails with
``ConnectionLost`` (the server cancelled it with the connection).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio

from dspex_trio._client_protocol import RemoteProtocolError, error_from_failure_untrusted
from dspex_trio._compile import CompileProgress, CompileResult
from dspex_trio._errors import DspexError, JobCancelled
from dspex_trio._jobs import EvaluationResult, ExampleResult, Job, JobProgress

if TYPE_CHECKING:
    from dspex_trio._client import RemoteBackend, _Link

TERMINAL: Final = ("completed", "failed", "cancelled")


class RemoteJob(Job):
    """A job running on the server, as its ``job/event`` notifications tell it."""

    def __init__(self, kind: str) -> None:
        super().__init__(0)
        self.kind = kind
        self.id = ""
        """The server's id of it, once ``job/submit`` was answered."""
        self.link: _Link | None = None
        self.seq = 0
        if kind == "compile":
            self._progress = CompileProgress("bootstrap", 0, 0, 0, None)

    async def run(self) -> Any:  # pragma: no cover - the server runs it
        raise NotImplementedError("a remote job runs on the server")

    def offer_untrusted(self, params: dict[str, Any]) -> bool:
        """One ``job/event`` of this job (checked: ``seq`` in order, nothing after the terminal event);
        True when it was the terminal one. Raises ``RemoteProtocolError``."""
        seq, event, data = params.get("seq"), params.get("event"), params.get("data")
        if self.finished or seq != self.seq + 1 or not isinstance(data, dict):
            raise RemoteProtocolError(
                f"job {self.id[:32]!r}: event {str(event)[:32]!r} out of order or malformed"
            )
        self.seq = seq
        try:
            if event == "progress":
                self._publish(self._progress_from(data))
                return False
            if event == "completed":
                self._finish(self._result_from(data))
            elif event == "failed":
                self._finish(error=error_from_failure_untrusted(data))
            elif event == "cancelled":
                self._finish(
                    error=JobCancelled(f"the server cancelled the job ({str(data.get('reason'))[:200]})")
                )
            else:
                raise RemoteProtocolError(f"job {self.id[:32]!r}: unknown event {str(event)[:32]!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"job {self.id[:32]!r}: malformed {event} event ({exc})") from None
        return True

    def _progress_from(self, data: dict[str, Any]) -> Any:
        if self.kind == "compile":
            return CompileProgress(
                **{
                    k: data[k]
                    for k in (
                        "stage",
                        "trials",
                        "total_trials",
                        "bootstrapped",
                        "best_score",
                        "done",
                        "total",
                    )
                },
                score=data.get("score"),  # mipro_v2's last trial (absent from an older server)
            )
        done = int(data["done"])
        return JobProgress(
            done=done,
            total=int(data["total"]),
            errors=int(data["errors"]),
            score_sum=float(data["score"]) * done / 100,
        )

    def _result_from(self, data: dict[str, Any]) -> Any:
        if self.kind == "compile":
            return CompileResult(
                str(data["program"]), dict(data["state"]), data["score"], tuple(data.get("candidates") or ())
            )
        results = tuple(
            ExampleResult(int(r["index"]), r["outputs"], r["score"], r.get("error")) for r in data["results"]
        )
        return EvaluationResult(score=float(data["score"]), results=results, errors=int(data["errors"]))

    @property
    def result(self) -> Any:
        if not self.finished:
            raise RuntimeError("the job has not finished")
        if self._error is not None:
            raise self._error
        return self._outcome

    def fail(self, error: DspexError) -> None:
        """The connection ended with the job in flight."""
        if not self.finished:
            self._finish(error=error)


@asynccontextmanager
async def open_remote_job(
    client: RemoteBackend, kind: str, params: dict[str, Any]
) -> AsyncIterator[RemoteJob]:
    """Submit a job (its checks refused at ``async with``: ``InvalidParams``, ``ProgramNotFound``,
    ``LimitExceeded``), then follow it while the block runs; leaving early cancels it on the server."""
    job = RemoteJob(kind)
    await client._request("job/submit", {"kind": kind, **params}, job=job, resend=False)
    try:
        yield job
    finally:
        if not job.finished:
            job._finish(error=JobCancelled("the job was cancelled"))
            link = job.link
            if link is not None:
                link.jobs.pop(job.id, None)
                with trio.CancelScope(shield=True), trio.move_on_after(client.options.write_timeout):
                    try:
                        await client._request_on(link, "job/cancel", {"job": job.id})
                    except Exception:  # lost, or not sent: the server cancelled the job with the connection
                        pass
