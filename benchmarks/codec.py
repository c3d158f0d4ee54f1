"""Codec choice for the wire protocol: time and size of a typical call and its reply.

Run with ``python -m benchmarks.codec [--number N] [--repeat R]``. For each codec it times encode + decode
of one ``Call`` and of its ``Result`` (the best of ``repeat`` runs of ``number`` round trips each, per round
trip, in microseconds) and prints the size of the encoded call. The figures are quoted in
``docs/protocol.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import timeit
from collections.abc import Callable
from typing import Any

import msgspec

from bridge_child.wire import (
    FLAG_IDEMPOTENT,
    HEADER_SIZE,
    NEED_DATA,
    Call,
    ChildMessage,
    Connection,
    ParentMessage,
    Result,
    Role,
    encode_frame,
)

CALL = Call(
    id=1042,
    method="run",
    params={
        "program": "qa",
        "inputs": {"question": "What is the capital of France?"},
        "config": {"temperature": 0.0, "max_tokens": 512},
        "trace": False,
    },
    timeout=29.5,
    flags=FLAG_IDEMPOTENT,
)
"""A typical call: run a cached program on one input, with a deadline, retryable."""
RESULT = Result(
    id=1042,
    value={
        "answer": "Paris",
        "reasoning": "France's capital and largest city is Paris.",
        "usage": {"prompt_tokens": 112, "completion_tokens": 24},
    },
)
"""Its reply."""


def as_dict(message: Any) -> dict[str, Any]:
    """The message as a JSON-style object: ``{"kind": ..., field: value, ...}``."""
    return {"kind": message.__struct_config__.tag, **msgspec.structs.asdict(message)}


CALL_DICT = as_dict(CALL)
RESULT_DICT = as_dict(RESULT)

RoundTrip = Callable[[], Any]
"""Encodes and decodes the call and the result once; returns the decoded pair."""


def stdlib_json() -> tuple[RoundTrip, bytes]:
    dumps, loads = json.dumps, json.loads

    def round_trip() -> Any:
        return loads(dumps(CALL_DICT).encode()), loads(dumps(RESULT_DICT).encode())

    return round_trip, dumps(CALL_DICT).encode()


def orjson_dicts() -> tuple[RoundTrip, bytes]:
    import orjson

    dumps, loads = orjson.dumps, orjson.loads

    def round_trip() -> Any:
        return loads(dumps(CALL_DICT)), loads(dumps(RESULT_DICT))

    return round_trip, dumps(CALL_DICT)


def msgspec_json_structs() -> tuple[RoundTrip, bytes]:
    enc = msgspec.json.Encoder().encode
    dec_call = msgspec.json.Decoder(ParentMessage).decode
    dec_result = msgspec.json.Decoder(ChildMessage).decode

    def round_trip() -> Any:
        return dec_call(enc(CALL)), dec_result(enc(RESULT))

    return round_trip, enc(CALL)


def msgspec_msgpack_structs() -> tuple[RoundTrip, bytes]:
    enc = msgspec.msgpack.Encoder().encode
    dec_call = msgspec.msgpack.Decoder(ParentMessage).decode
    dec_result = msgspec.msgpack.Decoder(ChildMessage).decode

    def round_trip() -> Any:
        return dec_call(enc(CALL)), dec_result(enc(RESULT))

    return round_trip, enc(CALL)


def msgspec_msgpack_dicts() -> tuple[RoundTrip, bytes]:
    enc = msgspec.msgpack.Encoder().encode
    dec = msgspec.msgpack.Decoder().decode

    def round_trip() -> Any:
        return dec(enc(CALL_DICT)), dec(enc(RESULT_DICT))

    return round_trip, enc(CALL_DICT)


def wire_connection() -> tuple[RoundTrip, bytes]:
    """For reference, not a codec: the whole wire path (framing, header checks, no state checks)."""
    child = Connection(Role.CHILD, check_states=False)
    parent = Connection(Role.PARENT, check_states=False)

    def round_trip() -> Any:
        child.receive_data(encode_frame(CALL))
        call = child.next_event()
        parent.receive_data(encode_frame(RESULT))
        result = parent.next_event()
        assert child.next_event() is NEED_DATA
        return call, result

    return round_trip, encode_frame(CALL)


CODECS: list[tuple[str, Callable[[], tuple[RoundTrip, bytes]], bool]] = [
    ("stdlib json (dicts)", stdlib_json, False),
    ("orjson (dicts)", orjson_dicts, False),
    ("msgspec JSON typed Structs", msgspec_json_structs, True),
    ("msgspec msgpack typed Structs", msgspec_msgpack_structs, True),
    ("msgspec msgpack dicts", msgspec_msgpack_dicts, False),
    ("(wire.py frames, msgpack Structs)", wire_connection, True),
]
"""(name, setup, decodes to Structs)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__)
    parser.add_argument("--number", type=int, default=20_000, help="round trips per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported (default 5)")
    args = parser.parse_args(argv)

    print(f"CPython {platform.python_version()}, msgspec {msgspec.__version__}, {platform.machine()}")
    print(f"encode+decode of a Call and its Result, best of {args.repeat} x {args.number:,}")
    print()
    print(f"{'codec':<36} {'µs / call+reply':>16} {'call bytes':>11}")
    for name, setup, structs in CODECS:
        try:
            round_trip, call_bytes = setup()
        except ImportError as exc:
            print(f"{name:<36} {'(' + exc.name + ' not installed)' if exc.name else 'n/a':>16}")
            continue
        call, result = round_trip()
        if structs:
            assert (call, result) == (CALL, RESULT), name
        else:
            assert (call, result) == (CALL_DICT, RESULT_DICT), name
        best = min(timeit.repeat(round_trip, number=args.number, repeat=args.repeat))
        print(f"{name:<36} {best / args.number * 1e6:>16.2f} {len(call_bytes):>11}")
    print()
    frame_size = len(encode_frame(CALL))
    print(f"call frame on the wire: {frame_size} bytes ({HEADER_SIZE}-byte header + msgpack array)")
    print(f"the same call as stdlib JSON (dict): {len(json.dumps(CALL_DICT).encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
