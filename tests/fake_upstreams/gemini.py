"""Gemini Live auth tokens as the fakes see them: `x-goog-api-key`, Google error bodies."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

from fake_upstreams.server import CannedResponse, RecordedRequest

AUTH_TOKENS_PATH = "/v1alpha/auth_tokens"
_ids = itertools.count(1)


def gemini_error(
    status: int, message: str, status_name: str, *, reason: str | None = None,
    headers: dict[str, str] | None = None,
) -> CannedResponse:
    """An error in Google's shape (`details` carries an ErrorInfo reason when given)."""
    error: dict[str, object] = {"code": status, "message": message, "status": status_name}
    if reason:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                             "reason": reason, "domain": "googleapis.com"}]
    return CannedResponse(status, {"error": error}, headers=dict(headers or {}))


class GeminiEmulation:
    """Answers like generativelanguage.googleapis.com for one key."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def __call__(self, request: RecordedRequest) -> CannedResponse:
        if request.method != "POST" or request.path != AUTH_TOKENS_PATH:
            return gemini_error(404, "Not found", "NOT_FOUND")
        if request.headers.get("x-goog-api-key") != self.api_key:
            # Google answers a bad key with 400, not 401.
            return gemini_error(400, "API key not valid. Please pass a valid API key.",
                                "INVALID_ARGUMENT", reason="API_KEY_INVALID")
        body = request.json or {}
        expire = datetime.fromisoformat(body.get("expireTime", "").replace("Z", "+00:00"))
        if expire - datetime.now(timezone.utc) >= timedelta(hours=20):
            return gemini_error(400, "expire_time must be less than 20 hours in the future",
                                "INVALID_ARGUMENT")
        return CannedResponse(200, {"name": f"auth_tokens/gem{next(_ids)}"})
