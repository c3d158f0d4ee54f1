"""The websocket API's jobs: ``job/submit``, ``job/cancel``, ``job/list`` (``_ws_api`` registers them).

``job/submit {kind: "evaluate", program, metric, devset, session?, max_errors?, concurrency?}`` checks
everything a job needs (the program, the metric, every example against the program's inputs, the
connection's limits) and answers ``{job}``; the job then runs in the connection's nursery and sends
``job/event`` notifications ``{job, seq, event, data}``: ``progress`` (``{done, total, errors, score}``, at
most one per ``job_progress_interval``, the latest), then exactly one terminal ``completed`` (the result:
``{score, errors, results: [{index, outputs, score, error}]}``), ``failed`` (``{type, error, message}``)
or ``cancelled`` (``{reason}``). ``job/cancel {job}`` is idempotent; ``job/list`` describes the
connection's jobs. A connection that closes cancels its jobs (every pending example, in its worker).

Limits (``WebsocketOptions``): ``max_jobs`` running per connection, ``max_job_examples`` per job,
``max_job_concurrency`` examples of one job in flight; a message is at most ``max_message_size`` bytes
in any case (a devset larger than that closes the connection with 1009 before it is parsed).
"""

from __future__ import annotations

import collections
import functools
import logging
import secrets
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from dspex_trio import _jsonrpc as rpc
from dspex_trio._errors import DspexError, InvalidParams, LimitExceeded
from dspex_trio._jsonrpc import _name, _name_field
from dspex_trio._util import open_service_nursery
from dspex_trio._ws_errors import failure

if TYPE_CHECKING:
    from dspex_trio._jobs import Job
    from dspex_trio._ws_api import ApiConnection, _Method

logger = logging.getLogger("dspex_trio.websocket")

JOB_KINDS: Final = ("evaluate", "compile")
CLIENT_CANCEL: Final = "cancelled by the client"


@attrs.frozen(kw_only=True)
class JobSubmitParams:
    kind: str = attrs.field(validator=_name)
    """``evaluate`` or ``compile``."""
    program: str = attrs.field(validator=_name)
    metric: str = attrs.field(validator=_name)
    session: str | None = _name_field()
    devset: Any = None
    """``evaluate``: ``[{"inputs": {...}, "labels": {...}}, ...]``."""
    trainset: Any = None
    """``compile``: the training examples."""
    valset: Any = None
    """``compile``: the validation examples (optional)."""
    optimizer: str | None = _name_field()
    """``compile``: ``bootstrap_few_shot`` or ``bootstrap_few_shot_with_random_search``."""
    options: dict[str, Any] | None = None
    """``compile``: the optimizer's options."""
    max_errors: int | None = None
    concurrency: int | None = None


@attrs.frozen(kw_only=True)
class JobRefParams:
    job: str = attrs.field(validator=_name)


@attrs.define(eq=False)
class _JobRecord:
    id: str
    kind: str
    program: str
    job: Job
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    seq: int = 0
    state: str = "running"
    cancel_reason: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "kind": self.kind,
            "program": self.program,
            "state": self.state,
            "progress": self.job.progress.to_json(),
        }


class JobTable:
    """One connection's jobs."""

    def __init__(self, connection: ApiConnection) -> None:
        self.connection = connection
        self.jobs: dict[str, _JobRecord] = {}
        self.finished: collections.OrderedDict[str, _JobRecord] = collections.OrderedDict()
        self._ended = trio.Event()
        """Set (and replaced) whenever the last running job ended."""

    def methods(self) -> dict[str, _Method]:
        from dspex_trio._ws_api import _Method

        return {
            "job/submit": _Method(JobSubmitParams, self.submit, True),
            "job/cancel": _Method(JobRefParams, self.cancel, False),
            "job/list": _Method(rpc.NoParams, self.list, False),
        }

    # -- job/submit -----------------------------------------------------------------------------------
    def _examples(self, p: JobSubmitParams) -> int:
        total = 0
        for value in (p.devset, p.trainset, p.valset):
            if isinstance(value, list):
                total += len(value)
        return total

    async def submit(self, p: JobSubmitParams) -> Any:
        from dspex_trio._ws_api import _AndThen

        connection = self.connection
        connection._check_open()
        options = connection.options
        if p.kind not in JOB_KINDS:
            raise InvalidParams(f"unknown job kind {p.kind!r}; kinds: {', '.join(JOB_KINDS)}")
        if len(self.jobs) >= options.max_jobs:
            raise LimitExceeded(
                f"at most {options.max_jobs} jobs may run at once on one connection",
                limit="jobs",
                max=options.max_jobs,
            )
        examples = self._examples(p)
        if examples > options.max_job_examples:
            raise LimitExceeded(
                f"the job holds {examples} examples; at most {options.max_job_examples} are allowed",
                limit="job_examples",
                max=options.max_job_examples,
            )
        session = connection._read_session(p.session)
        if session is None:
            raise connection._program_not_found(p.program)
        backend = connection.backend
        concurrency = min(p.concurrency or options.max_job_concurrency, options.max_job_concurrency)
        job = await self._prepare(backend, p, session, concurrency)
        record = _JobRecord(f"j_{secrets.token_hex(8)}", p.kind, p.program, job)
        self.jobs[record.id] = record
        return _AndThen({"job": record.id}, functools.partial(self._start, record))

    async def _prepare(self, backend: Any, p: JobSubmitParams, session: str, concurrency: int) -> Job:
        from dspex_trio._jobs import start_evaluation

        if not hasattr(backend, "_job_call"):
            await trio.lowlevel.checkpoint()
            raise InvalidParams(f"jobs run on a pool or a bridge; this server's backend is {backend.name!r}")
        if p.kind == "evaluate":
            if p.trainset is not None or p.valset is not None or p.optimizer is not None or p.options:
                raise InvalidParams(
                    "an evaluate job takes a devset (not trainset, valset, optimizer, options)"
                )
            return await start_evaluation(
                backend,
                p.program,
                p.devset,
                metric=p.metric,
                session=session,
                max_errors=p.max_errors,
                concurrency=concurrency,
                timeout=None,
                limit=self.connection.options.max_job_examples,
            )
        return await self._prepare_compile(backend, p, session, concurrency)

    async def _prepare_compile(self, backend: Any, p: JobSubmitParams, session: str, concurrency: int) -> Job:
        from dspex_trio._compile import start_compile

        if p.devset is not None:
            raise InvalidParams("a compile job takes a trainset and a valset (not a devset)")
        if p.optimizer is None:
            raise InvalidParams("a compile job names its optimizer")
        return await start_compile(
            backend,
            p.program,
            optimizer=p.optimizer,
            trainset=p.trainset,
            valset=p.valset,
            metric=p.metric,
            options=p.options or {},
            session=session,
            max_errors=p.max_errors,
            concurrency=concurrency,
            limit=self.connection.options.max_job_examples,
        )

    async def _start(self, record: _JobRecord) -> None:
        self.connection.nursery.start_soon(self._run, record)
        await trio.lowlevel.checkpoint()

    async def _emit(self, record: _JobRecord, event: str, data: dict[str, Any]) -> None:
        record.seq += 1
        params = {"job": record.id, "seq": record.seq, "event": event, "data": data}
        await self.connection.outbox.send(rpc.notification("job/event", params))

    async def _forward_progress(self, record: _JobRecord) -> None:
        interval = self.connection.options.job_progress_interval
        try:
            async for progress in record.job:
                await self._emit(record, "progress", progress.to_json())
                await trio.sleep(interval)
        except DspexError:  # the job's own error: its terminal event says it
            pass

    async def _run(self, record: _JobRecord) -> None:
        terminal: tuple[str, dict[str, Any]] | None = None
        try:
            with record.scope:
                try:
                    async with open_service_nursery() as nursery:
                        nursery.start_soon(self._forward_progress, record)
                        outcome = await record.job.run()
                        nursery.cancel_scope.cancel()
                    terminal = "completed", outcome.to_json()
                except Exception as exc:
                    terminal = "failed", failure(exc)
                    logger.info("job %s failed: %s", record.id, terminal[1]["type"])
            if terminal is None:
                terminal = "cancelled", {"reason": record.cancel_reason or "cancelled"}
            record.state = terminal[0]
            await self._emit(record, *terminal)
        finally:
            if record.state == "running":
                record.state = "cancelled"
            self.jobs.pop(record.id, None)
            if not self.jobs:
                self._ended.set()
                self._ended = trio.Event()
            self.finished[record.id] = record
            while len(self.finished) > self.connection.options.remember_finished:
                self.finished.popitem(last=False)

    # -- job/cancel, job/list -------------------------------------------------------------------------
    async def cancel(self, p: JobRefParams) -> Any:
        await trio.lowlevel.checkpoint()
        record = self.jobs.get(p.job)
        if record is not None:
            self._cancel(record, CLIENT_CANCEL)
            return {"job": p.job, "cancelled": True}
        done = self.finished.get(p.job)
        if done is not None:
            return {"job": p.job, "cancelled": False, "state": done.state}
        raise rpc.RpcError(rpc.UNKNOWN_EXECUTION, f"no job {p.job[:64]!r} on this connection")

    @staticmethod
    def _cancel(record: _JobRecord, reason: str) -> None:
        if not record.cancel_reason:
            record.cancel_reason = reason
        record.scope.cancel()

    async def list(self, p: rpc.NoParams) -> Any:
        await trio.lowlevel.checkpoint()
        return {"jobs": [r.describe() for r in [*self.jobs.values(), *self.finished.values()]]}

    async def wait_ended(self) -> None:
        """Return once no job of this connection runs (each queued its terminal event)."""
        if self.jobs:
            await self._ended.wait()
        else:
            await trio.lowlevel.checkpoint()

    def stop(self, reason: str) -> None:
        """End every job now with its terminal ``cancelled`` event (``reason``): the server's shutdown."""
        for record in list(self.jobs.values()):
            self._cancel(record, reason)
