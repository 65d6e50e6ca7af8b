"""The webhook listener (`ICEGATE_WEBHOOK_LISTEN`): OpenAI's `realtime.call.incoming` deliveries.

Its own port, off by default, served by the same uvicorn machinery as the Connect listener
(`http_listener.py`: the read deadline against trickled requests, the header size bound,
TLS with the `ICEGATE_TLS_CERT` files) but never asking for a client certificate (OpenAI
presents none: the Standard Webhooks signature is the delivery's authentication). One
route, `POST /webhooks/openai`; what a delivery becomes is decided by
`sessions.incoming_calls`, and answered here:

| outcome | status |
|---|---|
| accepted, rejected, another event type | 200 |
| body not the event's JSON | 400 |
| headers missing, no project's secret signed it, timestamp over 5 minutes off | 401 |
| another path / method | 404 / 405 |
| replayed `webhook-id` | 409 |
| body over `MAX_WEBHOOK_BODY_BYTES` | 413 |
| not `application/json` | 415 |
| neither accepted nor rejected (store, key, provider) | 502 |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from icegate_server.sessions.incoming_calls import DeliveryOutcome, IncomingCalls
from icegate_server.transports.http_listener import HttpListener, HttpTls, bind_http_socket

if TYPE_CHECKING:
    from icegate_server.settings import Settings

WEBHOOK_PATH = "/webhooks/openai"
MAX_WEBHOOK_BODY_BYTES = 64 * 1024
"""The largest delivery read: an incoming call's event with its SIP headers is under 4 KiB."""

STATUS_OF_OUTCOME = {
    DeliveryOutcome.ACCEPTED: 200,
    DeliveryOutcome.REJECTED: 200,
    DeliveryOutcome.IGNORED: 200,
    DeliveryOutcome.MALFORMED: 400,
    DeliveryOutcome.UNSIGNED: 401,
    DeliveryOutcome.STALE: 401,
    DeliveryOutcome.REPLAYED: 409,
    DeliveryOutcome.FAILED: 502,
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


class WebhookApplication:
    """The ASGI application of the webhook listener (module docstring)."""

    def __init__(self, incoming: IncomingCalls) -> None:
        self._incoming = incoming

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        if scope["path"] != WEBHOOK_PATH:
            await _answer(send, 404)
            return
        if scope["method"] != "POST":
            await _answer(send, 405, (b"allow", b"POST"))
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            await _answer(send, 415)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_WEBHOOK_BODY_BYTES:
            await _answer(send, 413)
            return
        try:
            body = await _read_body(receive)
        except _TooLarge:
            await _answer(send, 413)
            return
        except _Gone:
            return  # the sender left (or the read deadline closed it): nobody to answer
        delivery = await self._incoming.receive(headers, body)
        await _answer(send, STATUS_OF_OUTCOME[delivery.outcome])


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_WEBHOOK_BODY_BYTES:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Send, status: int, *headers: tuple[bytes, bytes]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"0"), *headers]})
    await send({"type": "http.response.body", "body": b""})


def webhook_listener(incoming: IncomingCalls, settings: Settings) -> HttpListener:
    """The listener of `ICEGATE_WEBHOOK_LISTEN`, with the gRPC port's certificate (no client
    certificate asked) and the HTTP read deadline (`ICEGATE_HTTP_READ_TIMEOUT`).

    Raises:
        OSError: The address is taken or not available.
    """
    tls = HttpTls(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    return HttpListener(
        WebhookApplication(incoming),
        bind_http_socket(settings.webhook_listen, reuse_port=settings.workers > 1,
                         setting="ICEGATE_WEBHOOK_LISTEN"),
        read_timeout=settings.http_read_timeout, tls=tls)
