"""What the FastAPI, Flask and Django examples share, whatever the framework: the browser's
answer for a new session, and the HTTP answer for each icegate error. Copy it next to your app.
"""

import logging
import math
from dataclasses import asdict
from datetime import timezone
from typing import Any, NamedTuple

import icegate
from icegate.v1 import sessions_pb2

log = logging.getLogger(__name__)


class HttpAnswer(NamedTuple):
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def browser_session(created: sessions_pb2.CreateSessionResponse) -> dict[str, Any]:
    """`{ephemeralToken, expiresAt, iceServers, sessionId}`: all the browser needs, no keys."""
    expires_at = created.ephemeral_token.expire_time.ToDatetime(tzinfo=timezone.utc)
    return {
        "ephemeralToken": created.ephemeral_token.value,
        "expiresAt": expires_at.isoformat(),
        "iceServers": icegate.rtc_ice_servers(
            [*created.ice_servers, *created.provider_ice_servers]),
        "sessionId": created.session_id,
    }


def http_error(error: icegate.IcegateError) -> HttpAnswer:
    """The HTTP answer to the browser for an icegate error (never the keys, never internals)."""
    body: dict[str, Any]
    headers: dict[str, str] = {}
    if isinstance(error, icegate.QuotaExceededError):
        status, body = 402, {"error": "quota_exceeded", "usage": asdict(error.usage),
                             "upgrade_url": error.upgrade_url}
    elif isinstance(error, icegate.ConcurrentLimitError):
        status, body = 429, {"error": "concurrent_limit_exceeded", "current": error.current,
                             "max": error.max_sessions}
    elif isinstance(error, icegate.RateLimitedError):
        reset_at = error.reset_at
        status, body = 429, {"error": "rate_limited",
                             "resetAt": reset_at.isoformat() if reset_at else None}
        if error.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after.total_seconds())))
    elif isinstance(error, icegate.InvalidArgumentError):
        status, body = 400, {"error": "invalid_argument", "fields": [
            {"field": v.field, "description": v.description} for v in error.field_violations]}
    elif isinstance(error, icegate.NotFoundError):
        status, body = 404, {"error": "session_not_found"}
    elif isinstance(error, (icegate.UnavailableError, icegate.DeadlineExceededError)):
        status, body = 503, {"error": "temporarily_unavailable"}
    else:  # misconfiguration (no provider key, key refused, bad icegate key...): ours to fix
        log.error("icegate: %s", error)
        status, body = 502, {"error": "session_unavailable", "reason": error.reason}
    return HttpAnswer(status, body, headers)
