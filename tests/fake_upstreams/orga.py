"""Orga AI as the fakes see it: client secret, then ice-config with the ephemeral token."""

from __future__ import annotations

import itertools

from fake_upstreams.server import CannedResponse, RecordedRequest

SECRETS_PATH = "/v1/realtime/client-secrets"
ICE_PATH = "/v1/realtime/ice-config"
ICE_SERVERS = [
    {"urls": "stun:stun.orga-ai.test:3478"},
    {"urls": ["turn:turn.orga-ai.test:3478?transport=udp", "turns:turn.orga-ai.test:5349"],
     "username": "1700000000:orga", "credential": "turn-pass"},
]
_ids = itertools.count(1)


def orga_error(status: int, message: str = "error") -> CannedResponse:
    """Orga's error body is unconfirmed; this is a plausible one."""
    return CannedResponse(status, {"error": message, "message": message},
                          headers={"x-request-id": f"orga-err-{next(_ids)}"})


class OrgaEmulation:
    """Answers like api.orga-ai.com for one key (and, optionally, one allowed e-mail)."""

    def __init__(self, api_key: str, email: str | None = None) -> None:
        self.api_key = api_key
        self.email = email
        self.issued: set[str] = set()

    def __call__(self, request: RecordedRequest) -> CannedResponse:
        auth = request.headers.get("authorization", "")
        if request.method == "POST" and request.path == SECRETS_PATH:
            emails = request.query.get("email", [])
            if auth != f"Bearer {self.api_key}" or (self.email and emails != [self.email]):
                return orga_error(401, "Invalid API key or email")
            token = f"orga_eph_{next(_ids)}"
            self.issued.add(token)
            return CannedResponse(200, {"ephemeral_token": token},
                                  headers={"x-request-id": f"orga-req-{token}"})
        if request.method == "GET" and request.path == ICE_PATH:
            if auth.removeprefix("Bearer ") not in self.issued:
                return orga_error(401, "Invalid token")
            return CannedResponse(200, {"iceServers": ICE_SERVERS})
        return orga_error(404, "Not found")
