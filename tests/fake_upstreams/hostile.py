"""An upstream that echoes the key it was sent into every header and field it can.

What a hostile or broken provider, or an egress proxy that reflects request headers, would do:
the Authorization (or `api-key`, `x-goog-api-key`) value it received comes back as the request
id, the error message and code, the session id, the model, the voice, beside the client secret
and inside ICE server urls, usernames and credentials. Every provider path is served by this
one fake, so one server can point all its base URLs at it.

`mode` picks the answer: "echo" (a 200 with a good token and every other field hostile),
"token_is_key" (a 200 whose token is the key), "error" (`status` with a hostile error body),
"benign" (well-formed values, to show they still pass through unchanged).
"""

from __future__ import annotations

import time
from typing import Any

from fake_upstreams.orga import ICE_PATH, SECRETS_PATH
from fake_upstreams.server import CannedResponse, RecordedRequest

KEY_HEADERS = ("authorization", "api-key", "x-goog-api-key")
REQUEST_ID_HEADERS = ("x-request-id", "apim-request-id", "x-goog-request-id")
GA_PATHS = ("/v1/realtime/client_secrets", "/openai/v1/realtime/client_secrets")
BETA_PATHS = ("/v1/realtime/sessions", "/openai/realtimeapi/sessions")
GEMINI_PATH = "/v1alpha/auth_tokens"

# Well-formed values the benign mode answers with; the caller must see them unchanged.
BENIGN_REQUEST_ID = "req_Benign-0123.abc"
BENIGN_SESSION_ID = "sess_C9xPz0Benign"
BENIGN_TOKEN = "ek_benign_token_0123"
BENIGN_ERROR_MESSAGE = "Unknown parameter: 'session.foo'."
BENIGN_ICE_SERVERS = [
    {"urls": "stun:stun.orga-ai.test:3478"},
    {"urls": ["turn:turn.orga-ai.test:3478?transport=udp", "turns:turn.orga-ai.test:5349"],
     "username": "1700000000:orga", "credential": "turn-pass+/="},
]


class HostileUpstream:
    """The responder; set `mode` and `status` between calls."""

    def __init__(self) -> None:
        self.mode = "echo"
        self.status = 200
        self.keys_seen: set[str] = set()

    def __call__(self, request: RecordedRequest) -> CannedResponse:
        received = [request.headers[h] for h in KEY_HEADERS if request.headers.get(h)]
        if request.path != ICE_PATH:  # the ICE call carries Orga's token, not the key
            self.keys_seen.update(v.removeprefix("Bearer ") for v in received)
        # The raw header value ("Bearer sk-..."), the bare key, and every key seen so far.
        echoes = [*received, *sorted(self.keys_seen)]
        echo = " ".join(echoes) or "no-key"
        key = sorted(self.keys_seen)[0] if self.keys_seen else echo
        if self.mode == "benign":
            return self._benign(request)
        headers = {name: echo for name in REQUEST_ID_HEADERS}
        # A retry-after no Duration can hold rides along: the answer must stay a clean error.
        headers.update({"x-echo-authorization": echo, "openai-organization": key,
                        "x-should-retry": "false", "retry-after": "1e400"})
        if self.mode == "error":
            return CannedResponse(self.status, _error_body(echo, key), headers=headers)
        token = key if self.mode == "token_is_key" else f"ek_hostile_{int(time.time())}"
        return CannedResponse(200, self._success(request, token, key, echo), headers=headers)

    def _success(self, request: RecordedRequest, token: str, key: str,
                 echo: str) -> dict[str, Any]:
        expires_at = int(time.time()) + 600
        if request.path in GA_PATHS:
            return {"value": token, "expires_at": expires_at, "client_secret_hint": echo,
                    "session": {"type": "realtime", "object": echo, "id": key, "model": key,
                                "audio": {"output": {"voice": echo}},
                                "instructions": echo}}
        if request.path in BETA_PATHS:
            return {"id": key, "object": echo, "model": key, "voice": key,
                    "client_secret": {"value": token, "expires_at": expires_at,
                                      "hint": echo, "key": key}}
        if request.path == SECRETS_PATH:
            return {"ephemeral_token": token, "session_id": key, "expires_in": key,
                    "message": echo}
        if request.path == ICE_PATH:
            return {"iceServers": [
                {"urls": f"stun:{key}"},
                {"urls": [f"turn:turn.orga-ai.test:3478?k={key}"]},
                {"urls": ["turn:turn.orga-ai.test:3478"], "username": key,
                 "credential": "turn-pass"},
                {"urls": ["turn:turn.orga-ai.test:3478"], "username": "u",
                 "credential": echo},
                *BENIGN_ICE_SERVERS,
            ]}
        if request.path == GEMINI_PATH:
            name = f"auth_tokens/{token}" if self.mode == "token_is_key" else "auth_tokens/g1"
            return {"name": name, "echo": echo, "model": key}
        return _error_body(echo, key)

    def _benign(self, request: RecordedRequest) -> CannedResponse:
        headers = {name: BENIGN_REQUEST_ID for name in REQUEST_ID_HEADERS}
        headers["x-should-retry"] = "false"
        if self.status != 200:
            body = {"error": {"message": BENIGN_ERROR_MESSAGE, "type": "invalid_request_error",
                              "code": "unknown_parameter", "status": "INVALID_ARGUMENT"}}
            return CannedResponse(self.status, body, headers=headers)
        expires_at = int(time.time()) + 600
        body: dict[str, Any]
        if request.path in GA_PATHS:
            session = request.json["session"]
            body = {"value": BENIGN_TOKEN, "expires_at": expires_at,
                    "session": {"type": "realtime", "id": BENIGN_SESSION_ID,
                                "model": session["model"],
                                "audio": {"output": {"voice": "marin"}}}}
        elif request.path in BETA_PATHS:
            body = {"id": BENIGN_SESSION_ID, "model": request.json["model"], "voice": "marin",
                    "client_secret": {"value": BENIGN_TOKEN, "expires_at": expires_at}}
        elif request.path == SECRETS_PATH:
            body = {"ephemeral_token": BENIGN_TOKEN}
        elif request.path == ICE_PATH:
            body = {"iceServers": BENIGN_ICE_SERVERS}
        else:
            body = {"name": f"auth_tokens/{BENIGN_TOKEN}"}
        return CannedResponse(200, body, headers=headers)


def _error_body(echo: str, key: str) -> dict[str, Any]:
    """One body every adapter's error parser reads (OpenAI, Azure, Orga and Google dialects)."""
    return {
        "error": {"message": f"Incorrect API key provided: {echo}. Also {key}.",
                  "type": key, "code": key, "param": key, "status": key,
                  "details": [{"reason": key, "metadata": {"key": key}}]},
        "message": echo,
    }
