"""A client of the support desk: what a front end does over the websocket (JSON-RPC, ``dspex.v1``).

Start the server first (from the repository root)::

    .venv/bin/dspex-trio serve --programs examples.support.programs

then, in another shell::

    .venv/bin/python -m examples.support.client [--url ws://127.0.0.1:8765]

It lists what the server offers (``program/available``), streams an answer (``execution/submit``: the
``status`` and ``chunk`` events as they come), triages a message into a ticket (a JSON object), runs an
agent built from a signature over the registered tools, and keeps the best of three answers by the
registered metric. With the embedded offline LM the texts are placeholders; serve with
``--lm openai/gpt-4o-mini`` (and a key) to read real ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from typing import Any

import trio
from trio_websocket import open_websocket_url

SUBPROTOCOL = "dspex.v1"
TIMEOUT_S = 60.0
"""Longest wait for one reply or event, in seconds."""


class Client:
    """One websocket connection: requests by id, and the execution events in between."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def request(self, method: str, **params: Any) -> Any:
        request_id = next(self.ids)
        await self.ws.send_message(
            json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        )
        while True:
            message = json.loads(await self.ws.get_message())
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']['message']}")
                return message["result"]

    async def stream(self, program: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Submit an execution and print its events; its outputs."""
        execution = (await self.request("execution/submit", program=program, inputs=inputs))["execution"]
        field = None
        while True:
            message = json.loads(await self.ws.get_message())
            params = message.get("params", {})
            if message.get("method") != "execution/event" or params.get("execution") != execution:
                continue
            event, data = params["event"], params["data"]
            if event == "status":
                print(f"\n  [{data['message']}]", end="")
            elif event == "chunk":
                if data["field"] != field:
                    field = data["field"]
                    print(f"\n  {field}: ", end="")
                print(data["chunk"], end="", flush=True)
            elif event == "completed":
                print()
                return data["outputs"]
            elif event in ("failed", "cancelled"):
                raise RuntimeError(f"execution {event}: {data}")


async def main(url: str) -> None:
    headers = (
        [("Authorization", f"Bearer {os.environ['DSPEX_TOKEN']}")] if "DSPEX_TOKEN" in os.environ else []
    )
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL], extra_headers=headers) as ws:
        client = Client(ws)
        with trio.fail_after(TIMEOUT_S):
            available = await client.request("program/available")
        print("programs:", ", ".join(p["name"] for p in available["programs"]))
        print("tools:   ", ", ".join(t["name"] for t in available["tools"]))
        print("metrics: ", ", ".join(m["name"] for m in available["metrics"]))

        with trio.fail_after(TIMEOUT_S):
            answer = (await client.request("program/create", module="answer"))["program"]
            print("\nanswer, streamed:", end="")
            outputs = await client.stream(answer, {"question": "How long does a refund take?"})
            print("answer:", outputs["answer"])

            triage = (await client.request("program/create", module="triage"))["program"]
            run = await client.request(
                "execution/run", program=triage, inputs={"message": "My parcel A-1001 has not arrived!"}
            )
            print("\nticket:", json.dumps(run["outputs"]["ticket"]))

            agent = await client.request(
                "program/create",
                signature="question -> answer",
                module="react",
                tools=["search_faq", "order_status"],
                max_iters=4,
                include=["trajectory"],
            )
            run = await client.request(
                "execution/run", program=agent["program"], inputs={"question": "Where is A-1001?"}
            )
            steps = [v for k, v in run["outputs"]["trajectory"].items() if k.startswith("tool_name_")]
            print("\nagent used:", ", ".join(steps), "->", run["outputs"]["answer"])

            best = await client.request(
                "program/create", module="best_of_n", base="answer", reward="grounded", n=3, threshold=0.9
            )
            run = await client.request(
                "execution/run", program=best["program"], inputs={"question": "Can I change my address?"}
            )
            print("\nbest of 3:", run["outputs"]["answer"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="ws://127.0.0.1:8765")
    trio.run(main, parser.parse_args().url)
