"""``dspex-trio run``: one program from the shell, streamed to the terminal.

Without ``--url`` it starts a pool of its own (one worker, a few seconds) and stops it at the end; with
``--url`` it runs the program on that server instead, over the websocket API, in the connection's
private session. Either way the inputs are checked against the program's fields first (an unknown name
gets a "did you mean"), and the failures a person can fix (no LM key, a typed input given as text, a
timeout) are one line saying how (a :class:`~dspex_trio._cli_settings.CliError`).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

import attrs

import dspex_trio
from dspex_trio._cli_client import RemoteError, client_token, open_rpc
from dspex_trio._cli_settings import KEY_VARIABLES, CliError, lm_key_from_environment, read_secret

CONNECT_TIMEOUT_S: Final = 10.0
"""``run --url``: bound on connecting to the server, in s."""
SESSION: Final = "cli"
"""The session of ``run``'s own pool."""
LM_KEY_ERRORS: Final = frozenset({"LMNotConfiguredError", "AuthenticationError", "LMAuthenticationError"})
"""Error types (as a failed program names them) that mean the LM has no usable key."""


@attrs.frozen(kw_only=True)
class RunRequest:
    """What ``run`` was asked, from its flags."""

    signature: str
    inputs: dict[str, Any]
    text_inputs: frozenset[str]
    """Input names given with ``--input`` (text) rather than ``--inputs-json``."""
    module: str = "predict"
    instructions: str | None = None
    lm: str | None = None
    lm_base_url: str | None = None
    lm_key_file: str | None = None
    timeout: float | None = None
    url: str | None = None
    token: str | None = attrs.field(default=None, repr=False)
    token_file: str | None = None
    json: bool = False


def parse_inputs(items: Sequence[str], inputs_json: str | None) -> tuple[dict[str, Any], frozenset[str]]:
    """``--inputs-json`` then each ``--input NAME=VALUE`` (a string): the inputs, and the names given
    as text."""
    inputs: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            loaded = json.loads(inputs_json)
        except json.JSONDecodeError as exc:
            raise CliError(f"--inputs-json is not JSON ({exc}): e.g. --inputs-json '{{\"n\": 3}}'") from None
        if not isinstance(loaded, dict):
            raise CliError("--inputs-json must be a JSON object, e.g. --inputs-json '{\"n\": 3}'")
        inputs.update(loaded)
    text: set[str] = set()
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--input takes NAME=VALUE, not {item!r}")
        inputs[name.strip()] = value
        text.add(name.strip())
    return inputs, frozenset(text)


def check_inputs(request: RunRequest, fields: Sequence[Mapping[str, Any]]) -> None:
    """Every input of the program given, and no other (with a "did you mean" for a misspelt name)."""
    names = [str(f["name"]) for f in fields]
    unknown = [name for name in request.inputs if name not in names]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CliError(
            f"unknown input {name!r}{hint}: the inputs of {request.signature!r} are {', '.join(names)}"
        )
    missing = [name for name in names if name not in request.inputs]
    if missing:
        raise CliError(
            f"missing input {missing[0]!r}: give it with --input {missing[0]}=VALUE"
            + (" (or in --inputs-json)" if len(missing) == 1 else f" (all missing: {', '.join(missing)})")
        )


def _typed_text_inputs(request: RunRequest, fields: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(name, type) of the inputs given as text whose field is not a string."""
    return [
        (str(f["name"]), str(f.get("type")))
        for f in fields
        if f["name"] in request.text_inputs and f.get("type") not in ("str", None)
    ]


def explain_failure(
    request: RunRequest, fields: Sequence[Mapping[str, Any]], error_type: str, message: str
) -> CliError:
    """The one line for a failed execution: what failed and, where a person can fix it, how."""
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    if error_type in LM_KEY_ERRORS:
        if request.url is not None:
            fix = (
                "select one of the server's LMs with --lm NAME, or give this LM's key with --lm-api-key-file"
            )
        else:
            fix = f"set {' or '.join(KEY_VARIABLES)}, or give --lm-api-key-file PATH"
        return CliError(f"the LM {request.lm or ''} has no usable API key ({error_type}): {fix}")
    if error_type == "CallTimeout":
        return CliError(f"{first}: give it longer with --timeout SECONDS")
    typed = _typed_text_inputs(request, fields)
    if typed and any(repr(name) in message for name, _ in typed):
        name, type_ = next((n, t) for n, t in typed if repr(n) in message)
        example = json.dumps({name: 3 if type_ == "int" else 0.5 if type_ == "float" else None})
        return CliError(
            f"{first}: --input gives text; give {name} ({type_}) as JSON: --inputs-json '{example}'"
        )
    return CliError(f"{first} ({error_type})" if error_type and error_type not in first else first)


class Printer:
    """Writes a run's events to the terminal: chunks as they stream, then the fields not streamed."""

    def __init__(self, out: TextIO, *, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.field: str | None = None
        self.streamed: set[str] = set()

    def chunk(self, field: str, chunk: Any) -> None:
        if self.as_json:
            return
        if field != self.field:
            self.out.write(("\n" if self.field is not None else "") + f"{field}: ")
            self.field = field
            self.streamed.add(field)
        self.out.write(str(chunk))
        self.out.flush()

    def completed(self, outputs: Mapping[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(dict(outputs), ensure_ascii=False), file=self.out, flush=True)
            return
        if self.field is not None:
            self.out.write("\n")
        for name, value in outputs.items():
            if name not in self.streamed:
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                self.out.write(f"{name}: {text}\n")
        self.out.flush()


def _lm_key(request: RunRequest) -> str | None:
    if request.lm_key_file is not None:
        return read_secret(request.lm_key_file, "LM key")
    return lm_key_from_environment(os.environ)


async def run_local(request: RunRequest) -> int:
    """Run the program on a pool of its own (one worker)."""
    key = _lm_key(request)
    if request.lm in (None, "offline") and request.lm_base_url is not None:
        raise CliError("--lm-base-url needs --lm provider/model")
    printer = Printer(sys.stdout, as_json=request.json)
    async with dspex_trio.open_pool(workers=1) as pool:
        if request.lm not in (None, "offline"):
            try:
                await pool.configure_lm(
                    request.lm, api_base=request.lm_base_url, api_key=key, session=SESSION
                )
            except dspex_trio.InvalidParams as exc:
                raise CliError(f"--lm {request.lm}: {exc}") from None
        try:
            program = await pool.create_program(
                request.signature, module=request.module, instructions=request.instructions, session=SESSION
            )
        except dspex_trio.InvalidParams as exc:
            raise CliError(f"the signature {request.signature!r}: {exc}") from None
        info = await pool.get_program(program, session=SESSION)
        check_inputs(request, info["inputs"])
        try:
            async with pool.stream(
                program, request.inputs, session=SESSION, timeout=request.timeout
            ) as events:
                async for event in events:
                    if event["event"] == "chunk":
                        printer.chunk(event["field"], event["chunk"])
                    elif event["event"] == "completed":
                        printer.completed(event["outputs"])
        except (dspex_trio.ProgramError, dspex_trio.InvalidParams, dspex_trio.CallTimeout) as exc:
            error_type = getattr(exc, "error_type", "") or type(exc).__name__
            raise explain_failure(request, info["inputs"], error_type, str(exc)) from exc
    return 0


async def run_remote(request: RunRequest) -> int:
    """Run the program on the server at ``request.url``, in the connection's private session."""
    assert request.url is not None
    token = client_token(request.token, request.token_file, os.environ)
    printer = Printer(sys.stdout, as_json=request.json)
    async with open_rpc(request.url, token, timeout=CONNECT_TIMEOUT_S) as client:
        if request.lm is not None:
            await _choose_lm(client, request)
        params: dict[str, Any] = {"signature": request.signature, "module": request.module}
        if request.instructions is not None:
            params["instructions"] = request.instructions
        program = (await client.request("program/create", params))["program"]
        info = await client.request("program/get", {"program": program})
        check_inputs(request, info["inputs"])
        submit: dict[str, Any] = {"program": program, "inputs": request.inputs, "stream": True}
        if request.timeout is not None:
            submit["timeout"] = request.timeout
        execution = (await client.request("execution/submit", submit))["execution"]
        while True:
            message = await client.notification()
            params = message.get("params", {})
            if message.get("method") != "execution/event" or params.get("execution") != execution:
                continue
            event, data = params["event"], params.get("data") or {}
            if event == "chunk":
                printer.chunk(data["field"], data["chunk"])
            elif event == "completed":
                printer.completed(data["outputs"])
                return 0
            elif event == "failed":
                raise explain_failure(request, info["inputs"], data.get("type", ""), data.get("message", ""))
            elif event == "cancelled":
                raise CliError(f"the server cancelled the execution ({data.get('reason')})")


async def _choose_lm(client: Any, request: RunRequest) -> None:
    """``--lm NAME`` selects one of the server's LMs; ``--lm provider/model`` configures one (as far as
    the server's ``client_lm`` policy allows), with the key of ``--lm-api-key-file`` only: a key from this
    shell's environment is never sent to a server."""
    assert request.lm is not None
    try:
        if "/" not in request.lm:
            await client.request("lm/select", {"name": request.lm})
            return
        params: dict[str, Any] = {"model": request.lm}
        if request.lm_base_url is not None:
            params["api_base"] = request.lm_base_url
        if request.lm_key_file is not None:
            params["api_key"] = read_secret(request.lm_key_file, "LM key")
        await client.request("lm/configure", params)
    except RemoteError as exc:
        if exc.kind == "unauthorized":
            raise CliError(f"{exc} (here: --lm NAME selects one of the server's LMs)") from None
        raise
