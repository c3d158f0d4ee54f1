"""``dspex-trio evaluate`` and ``dspex-trio compile``: a job on a pool of their own, from the shell.

Both start a pool (``--workers``, the operator's ``--programs``), or, with ``--url``, connect to a
served endpoint through the remote client (``dspex_trio.connect``: the server's programs, workers and
limits; ``--token-file`` or ``DSPEX_TOKEN`` for its token), create the registered ``--program``,
read the examples from JSONL files (one ``{"inputs": {...}, "labels": {...}}`` per line), run the job
with a progress bar on stderr, and print a summary table. ``evaluate`` may write every example's
outputs and score (``--out results.jsonl``); ``compile`` writes the optimized program's DSPy JSON state
(``--out state.json``: ``program.load("state.json")`` reads it in plain DSPy). The exit status is 0
when the job completed, 1 when it failed (too many failed examples, bad input: one line says why).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import dspex_trio
from dspex_trio._cli_client import client_token
from dspex_trio._cli_settings import CliError, lm_key_from_environment, read_secret
from dspex_trio._compile import OPTIMIZERS

SESSION: Final = "cli"
"""The session of the job's own pool."""
MAX_LINE_BYTES: Final = 1024 * 1024
"""Longest line of an examples file, in bytes."""
DEFAULT_WORKERS: Final = 2
"""Workers of the command's own pool when ``--workers`` is not given."""
CONNECT_TIMEOUT_S: Final = 10.0
"""``--url``: bound on connecting to the server, in s."""


def add_job_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``evaluate`` and ``compile`` to the ``dspex-trio`` subcommands; their entry points."""
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a registered program on a devset, spread over a pool's workers",
        description="Evaluate a program of --programs on a JSONL devset with a registered metric "
        '(one {"inputs": {...}, "labels": {...}} per line), as dspy.Evaluate does.',
    )
    _common(evaluate)
    evaluate.add_argument("--devset", required=True, metavar="FILE.jsonl")
    evaluate.add_argument("--max-errors", type=int, default=None, help="failed examples that stop it (10)")
    evaluate.add_argument("--out", default=None, metavar="FILE.jsonl", help="write each example's result")
    compile_ = commands.add_parser(
        "compile",
        help="optimize a registered program with a DSPy optimizer, spread over a pool's workers",
        description="Run bootstrap_few_shot, bootstrap_few_shot_with_random_search, mipro_v2 or gepa on a "
        "program of --programs (or of the server at --url) and write its optimized DSPy JSON state.",
    )
    _common(compile_)
    compile_.add_argument("--trainset", required=True, metavar="FILE.jsonl")
    compile_.add_argument("--valset", default=None, metavar="FILE.jsonl")
    compile_.add_argument(
        "--optimizer",
        required=True,
        choices=list(OPTIMIZERS),
    )
    compile_.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an optimizer option, e.g. --option max_bootstrapped_demos=4 (repeatable)",
    )
    compile_.add_argument("--max-errors", type=int, default=None, help="failed examples that stop it (10)")
    compile_.add_argument("--out", required=True, metavar="state.json", help="where to write the state")
    return {"evaluate": _cmd_evaluate, "compile": _cmd_compile}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--programs",
        action="append",
        default=None,
        metavar="MODULE",
        help="a program module of the command's own pool (repeatable; required without --url)",
    )
    parser.add_argument("--program", required=True, metavar="NAME", help="a program the modules registered")
    parser.add_argument("--metric", required=True, metavar="NAME", help="a metric the modules registered")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"worker processes of its own pool (default {DEFAULT_WORKERS})",
    )
    parser.add_argument(
        "--url", default=None, help="run the job on the server at this ws:// URL instead of a pool of its own"
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="with --url: the server's token (default DSPEX_TOKEN)",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="examples in flight at once")
    parser.add_argument("--lm", default=None, help="'offline' (default: the embedded LM) or provider/model")
    parser.add_argument("--lm-base-url", default=None, help="base URL of an OpenAI-compatible endpoint")
    parser.add_argument(
        "--lm-api-key-file",
        default=None,
        metavar="PATH",
        help="read the LM's key from PATH (with --url only this file's key is sent; --lm NAME without a "
        "'/' selects one of the server's LMs)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def read_examples(path: str, what: str) -> list[dict[str, Any]]:
    """The examples of a JSONL file; ``CliError`` naming the line of anything else."""
    examples = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise CliError(f"{what} {path}:{number}: longer than {MAX_LINE_BYTES} bytes")
                if not raw.strip():
                    continue
                try:
                    example = json.loads(raw)
                except ValueError as exc:
                    raise CliError(f"{what} {path}:{number}: not JSON ({exc})") from None
                if not isinstance(example, dict) or not isinstance(example.get("inputs"), dict):
                    raise CliError(
                        f'{what} {path}:{number}: each line must be {{"inputs": {{...}}, "labels": {{...}}}}'
                    )
                examples.append(example)
    except OSError as exc:
        raise CliError(f"cannot read the {what} {path}: {exc.strerror}") from None
    return examples


def _options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--option takes NAME=JSON, not {item!r}")
        try:
            options[name.strip()] = json.loads(value)
        except ValueError:
            raise CliError(f"--option {name}: {value!r} is not JSON (e.g. 4, 0.5, true, null)") from None
    return options


async def _pool_program(args: argparse.Namespace, pool: dspex_trio.Pool) -> str:
    if args.lm not in (None, "offline"):
        key = read_secret(args.lm_api_key_file, "LM key") if args.lm_api_key_file else None
        key = key or lm_key_from_environment(os.environ)
        try:
            await pool.configure_lm(args.lm, api_base=args.lm_base_url, api_key=key, session=SESSION)
        except dspex_trio.InvalidParams as exc:
            raise CliError(f"--lm {args.lm}: {exc}") from None
    elif args.lm_base_url is not None:
        raise CliError("--lm-base-url needs --lm provider/model")
    try:
        return await pool.create_program(module=args.program, session=SESSION)
    except dspex_trio.InvalidParams as exc:
        raise CliError(f"--program {args.program}: {exc}") from None


async def _remote_program(args: argparse.Namespace, remote: Any) -> str:
    """``--url``: the LM (``--lm NAME`` selects one of the server's; ``--lm provider/model`` configures one
    as far as the server allows, with the key of ``--lm-api-key-file`` only: a key from this shell's
    environment is never sent to a server), then the program, in the connection's session."""
    if args.lm not in (None, "offline"):
        key = read_secret(args.lm_api_key_file, "LM key") if args.lm_api_key_file else None
        try:
            await remote.configure_lm(args.lm, api_base=args.lm_base_url, api_key=key, session=SESSION)
        except dspex_trio.DspexError as exc:
            raise CliError(f"--lm {args.lm}: {exc}") from None
    elif args.lm_base_url is not None:
        raise CliError("--lm-base-url needs --lm provider/model")
    try:
        program: str = await remote.create_program(module=args.program, session=SESSION)
    except (dspex_trio.InvalidParams, dspex_trio.ProgramNotFound) as exc:
        raise CliError(f"--program {args.program}: {exc}") from None
    return program


@asynccontextmanager
async def open_backend(args: argparse.Namespace) -> AsyncIterator[tuple[Any, str]]:
    """Where the job runs, and the program in it: a pool of the command's own, or (``--url``) the
    server at that address through the remote client. ``CliError`` for options that do not fit
    together or a server that cannot be reached."""
    if args.url is None:
        if not args.programs:
            raise CliError("give the program modules with --programs MODULE (or a server with --url)")
        if args.token_file is not None:
            raise CliError("--token-file is for a server (--url)")
        workers = DEFAULT_WORKERS if args.workers is None else args.workers
        async with dspex_trio.open_pool(workers=workers, programs=args.programs) as pool:
            yield pool, await _pool_program(args, pool)
        return
    if args.programs or args.workers is not None:
        raise CliError("--programs and --workers are for a pool of its own: with --url the server's are used")
    token = client_token(None, args.token_file, os.environ)
    connected = False
    try:
        async with dspex_trio.connect(args.url, token=token, connect_timeout=CONNECT_TIMEOUT_S) as remote:
            connected = True
            yield remote, await _remote_program(args, remote)
    except (dspex_trio.HandshakeRefused, dspex_trio.PoolUnavailable, ValueError) as exc:
        if connected:
            raise
        raise CliError(f"cannot connect to {args.url}: {exc}") from None


JOB_ERRORS: Final = (
    dspex_trio.InvalidParams,
    dspex_trio.JobFailed,
    dspex_trio.ProgramNotFound,
    dspex_trio.JobCancelled,
    dspex_trio.LimitExceeded,
    dspex_trio.ConnectionLost,
)
"""What ends a job with one line and exit status 1."""


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _fail(exc: dspex_trio.DspexError) -> CliError:
    return CliError(str(exc))


async def evaluate(args: argparse.Namespace, devset: list[dict[str, Any]]) -> int:
    console = Console(stderr=True)
    started = time.perf_counter()
    async with open_backend(args) as (pool, program):
        try:
            async with pool.evaluate(
                program,
                devset,
                metric=args.metric,
                session=SESSION,
                max_errors=args.max_errors,
                concurrency=args.concurrency,
            ) as job:
                with _progress(console) as bar:
                    task = bar.add_task("evaluate", total=len(devset), note="")
                    async for p in job:
                        bar.update(task, completed=p.done, note=f"score {p.score:.2f}  errors {p.errors}")
            result = job.result
        except JOB_ERRORS as exc:
            raise _fail(exc) from None
    seconds = time.perf_counter() - started
    if args.out is not None:
        lines = "".join(json.dumps(r.to_json()) + "\n" for r in result.results)
        await trio.Path(args.out).write_text(lines)
    if args.json:
        print(json.dumps({"score": result.score, "errors": result.errors, "examples": len(devset)}))
        return 0
    table = Table(title=f"evaluate {args.program} with {args.metric}")
    for column in ("score", "examples", "errors", "seconds", "examples/s"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{result.score:.2f}",
        str(len(devset)),
        str(result.errors),
        f"{seconds:.1f}",
        f"{len(devset) / seconds:.0f}",
    )
    Console().print(table)
    return 0


async def compile_(
    args: argparse.Namespace, trainset: list[dict[str, Any]], valset: list[dict[str, Any]] | None
) -> int:
    options = _options(args.option)
    console = Console(stderr=True)
    started = time.perf_counter()
    async with open_backend(args) as (pool, program):
        try:
            async with pool.compile(
                program,
                optimizer=args.optimizer,
                trainset=trainset,
                valset=valset,
                metric=args.metric,
                options=options,
                session=SESSION,
                max_errors=args.max_errors,
                concurrency=args.concurrency,
            ) as job:
                with _progress(console) as bar:
                    task = bar.add_task("compile", total=None, note="")
                    async for p in job:
                        best = "" if p.best_score is None else f"  best {p.best_score:.2f}"
                        best += "" if p.score is None else f"  last {p.score:.2f}"
                        trials = f"  trials {p.trials}/{p.total_trials}" if p.total_trials else ""
                        bar.update(
                            task,
                            description=p.stage,
                            completed=p.done,
                            total=p.total or None,
                            note=f"demos {p.bootstrapped}{trials}{best}",
                        )
            result = job.result
        except JOB_ERRORS as exc:
            raise _fail(exc) from None
    seconds = time.perf_counter() - started
    await trio.Path(args.out).write_text(json.dumps(result.state, indent=2))
    demos = {
        name: len(value.get("demos", []))
        for name, value in ({"self": result.state} if "demos" in result.state else result.state).items()
        if name != "metadata" and isinstance(value, dict)
    }
    if args.json:
        print(json.dumps({"score": result.score, "candidates": list(result.candidates), "demos": demos}))
        return 0
    table = Table(title=f"{args.optimizer} on {args.program} with {args.metric}: state in {args.out}")
    table.add_column("predictor")
    table.add_column("demos", justify="right")
    for name, count in demos.items():
        table.add_row(name, str(count))
    out = Console()
    out.print(table)
    if result.candidates and "trial" in result.candidates[0]:  # mipro_v2: its trials
        trial_table = Table(title="trials")
        for column in ("trial", "evaluation", "score", "parameters"):
            trial_table.add_column(column, justify="left" if column == "parameters" else "right")
        for t in result.candidates:
            params = t["params"] or {}
            trial_table.add_row(
                str(t["trial"]),
                "full" if t["full_eval"] else "minibatch",
                f"{t['score']:.2f}",
                " ".join(f"{k}={v}" for k, v in params.items()) or "the student",
            )
        out.print(trial_table)
        out.print(f"best full evaluation: {result.score:.2f}")
    elif result.candidates and "instructions" in result.candidates[0]:  # gepa: its candidates
        gepa_table = Table(title="candidates")
        for column in ("candidate", "parents", "score", "instructions"):
            gepa_table.add_column(column, justify="left" if column == "instructions" else "right")
        for c in result.candidates:
            mark = " (best)" if c["score"] == result.score else ""
            gepa_table.add_row(
                str(c["candidate"]),
                ", ".join("-" if p is None else str(p) for p in c["parents"]),
                f"{c['score']:.2f}{mark}",
                " | ".join(f"{k}: {v}" for k, v in c["instructions"].items()),
            )
        out.print(gepa_table)
    elif result.candidates:
        candidates = Table(title="candidates")
        candidates.add_column("seed", justify="right")
        candidates.add_column("score", justify="right")
        for c in result.candidates:
            mark = " (best)" if c["score"] == result.score else ""
            candidates.add_row(str(c["seed"]), f"{c['score']:.2f}{mark}")
        out.print(candidates)
    out.print(f"{seconds:.1f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    return trio.run(evaluate, args, read_examples(args.devset, "devset"))


def _cmd_compile(args: argparse.Namespace) -> int:
    trainset = read_examples(args.trainset, "trainset")
    valset = read_examples(args.valset, "valset") if args.valset else None
    return trio.run(compile_, args, trainset, valset)
