"""OpenAI's side of an incoming call: the `realtime.call.incoming` webhook it sends.

The signature is computed here by hand from the Standard Webhooks specification (HMAC-SHA256
over `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64-decoded part of the
`whsec_` secret, sent as `v1,<base64>`), not with the library icegate verifies with, so
that the two sides are independent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import itertools
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

_ids = itertools.count(1)


def new_webhook_secret() -> str:
    """A secret as OpenAI shows it for a webhook endpoint: `whsec_` and 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def incoming_call_event(call_id: str, *, event_id: str = "",
                        created_at: int | None = None) -> bytes:
    """The body OpenAI posts when a SIP call rings the project."""
    return json.dumps({
        "object": "event",
        "id": event_id or f"evt_{next(_ids)}",
        "type": "realtime.call.incoming",
        "created_at": int(time.time()) if created_at is None else created_at,
        "data": {"call_id": call_id, "sip_headers": [
            {"name": "From", "value": "sip:+15551230000@sip.example.test"},
            {"name": "To", "value": "sip:+15559870000@sip.openai.com"}]},
    }).encode()


def signature(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Delivered:
    """What the webhook's endpoint answered."""

    status: int
    body: bytes


@dataclass
class WebhookSender:
    """Posts signed deliveries to an endpoint (`http://127.0.0.1:<port>/webhooks/openai`)."""

    port: int
    secret: str
    path: str = "/webhooks/openai"

    def headers(self, body: bytes, *, delivery_id: str = "", timestamp: int | None = None,
                secret: str = "") -> dict[str, str]:
        delivery_id = delivery_id or f"wh_{secrets.token_hex(12)}"
        timestamp = int(time.time()) if timestamp is None else timestamp
        return {"webhook-id": delivery_id, "webhook-timestamp": str(timestamp),
                "webhook-signature": signature(secret or self.secret, delivery_id, timestamp,
                                               body),
                "content-type": "application/json", "user-agent": "OpenAI/1.0"}

    def ring(self, call_id: str, **signing: Any) -> Delivered:
        """Delivers `realtime.call.incoming` for `call_id`, signed with the sender's secret
        (or `secret=`), now (or at `timestamp=`), with a fresh `delivery_id=` by default."""
        body = incoming_call_event(call_id)
        return self.post(body, self.headers(body, **signing))

    def post(self, body: bytes, headers: dict[str, str], *, method: str = "POST",
             path: str = "") -> Delivered:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path or self.path, body=body, headers=headers)
            answer = connection.getresponse()
            return Delivered(answer.status, answer.read())
        finally:
            connection.close()
