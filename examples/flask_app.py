"""A Flask endpoint that hands the browser what it needs for a realtime WebRTC session.

    ICEGATE_TARGET=127.0.0.1:50051 ICEGATE_API_KEY=igk_... flask --app examples/flask_app.py run

The browser calls `POST /api/realtime-session` and gets `{ephemeralToken, expiresAt,
iceServers, sessionId}`; the icegate key and the provider key never reach it.
"""

import logging
import math
import os
from dataclasses import asdict
from datetime import timezone
from typing import Any

from flask import Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue

import icegate

log = logging.getLogger(__name__)


def error_response(error: icegate.IcegateError) -> ResponseReturnValue:
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
    return jsonify(body), status, headers


def create_app(target: str | None = None, api_key: str | None = None,
               project_id: str | None = None) -> Flask:
    """The app; target, key and project default to ICEGATE_TARGET/_API_KEY/_PROJECT."""
    app = Flask(__name__)
    # One client (one channel) for the whole app, shared by every request and thread.
    app.extensions["icegate"] = icegate.Client(target, api_key)
    project = os.environ.get("ICEGATE_PROJECT", "") if project_id is None else project_id
    app.register_error_handler(icegate.IcegateError, error_response)

    @app.post("/api/realtime-session")
    def create_session() -> ResponseReturnValue:
        options = request.get_json(silent=True) or {}
        if not isinstance(options, dict) or not all(
                isinstance(options.get(name, ""), str) for name in ("voice", "instructions")):
            return jsonify(error="invalid_argument"), 400
        client: icegate.Client = current_app.extensions["icegate"]
        session = client.create_session(
            "openai", project_id=project,
            # Stands in for your own authentication: use your logged-in user's id.
            user_id=request.headers.get("X-User-Id", "anonymous"),
            voice=options.get("voice", ""), instructions=options.get("instructions", ""),
            timeout=5)
        expires_at = session.ephemeral_token.expire_time.ToDatetime(tzinfo=timezone.utc)
        return jsonify(
            ephemeralToken=session.ephemeral_token.value,
            expiresAt=expires_at.isoformat(),
            iceServers=icegate.rtc_ice_servers(
                [*session.ice_servers, *session.provider_ice_servers]),
            sessionId=session.session_id,
        )

    @app.post("/api/realtime-session/<session_id>/end")
    def end_session(session_id: str) -> ResponseReturnValue:
        # A real app checks that this session belongs to the signed-in user first.
        client: icegate.Client = current_app.extensions["icegate"]
        client.end_session(session_id, project_id=project, timeout=5)
        return jsonify(sessionId=session_id, ended=True)

    return app
