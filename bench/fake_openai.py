"""A local stand-in for OpenAI's `POST /v1/realtime/client_secrets`, with a fixed latency.

A raw ASGI app on uvicorn (no framework in the way): it checks the bearer key, waits
`--latency-ms`, and answers the GA shape with fixed-length values, so every answer has the
same size.

    python bench/fake_openai.py --port PORT --latency-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import scenario
import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_counter = itertools.count(1)
_latency = 0.020


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _answer(send: Send, status: int, payload: dict[str, Any], request_id: str) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"x-request-id", request_id.encode()),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = await _read_body(receive)
    n = next(_counter)
    request_id = f"req_{n:012d}"
    headers = dict(scope["headers"])
    if headers.get(b"authorization") != f"Bearer {scenario.OPENAI_KEY}".encode():
        await _answer(send, 401, {"error": {"message": "Incorrect API key provided",
                                            "type": "invalid_request_error",
                                            "code": "invalid_api_key"}}, request_id)
        return
    if scope["method"] != "POST" or scope["path"] != "/v1/realtime/client_secrets":
        await _answer(send, 404, {"error": {"message": "not here"}}, request_id)
        return
    request = json.loads(body)
    await asyncio.sleep(_latency)
    await _answer(send, 200, {
        "value": f"ek_bench_{n:012d}",
        "expires_at": int(time.time()) + request["expires_after"]["seconds"],
        "session": {"type": "realtime", "object": "realtime.session", "id": f"sess_{n:012d}",
                    **request["session"]},
    }, request_id)


def main() -> None:
    global _latency
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    _latency = args.latency_ms / 1000
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop", backlog=4096)


if __name__ == "__main__":
    main()
