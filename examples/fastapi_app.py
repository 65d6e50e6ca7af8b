"""A FastAPI endpoint that hands the browser what it needs for a realtime WebRTC session.

    ICEGATE_TARGET=127.0.0.1:50051 ICEGATE_API_KEY=igk_... \\
        uvicorn --factory examples.fastapi_app:create_app

The browser calls `POST /api/realtime-session` and gets `{ephemeralToken, expiresAt,
iceServers, sessionId}`; the icegate key and the provider key never reach it.
"""

import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import timezone
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import icegate

log = logging.getLogger(__name__)


class SessionRequest(BaseModel):
    voice: str = ""
    instructions: str = ""


def error_response(error: icegate.IcegateError) -> JSONResponse:
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
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(target: str | None = None, api_key: str | None = None,
               project_id: str | None = None) -> FastAPI:
    """The app; target, key and project default to ICEGATE_TARGET/_API_KEY/_PROJECT."""
    project = os.environ.get("ICEGATE_PROJECT", "") if project_id is None else project_id

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One client (one channel) for the app's lifetime, created inside the event loop.
        async with icegate.AsyncClient(target, api_key) as client:
            app.state.icegate = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(icegate.IcegateError)
    async def icegate_error(request: Request, error: icegate.IcegateError) -> JSONResponse:
        return error_response(error)

    @app.post("/api/realtime-session")
    async def create_session(
        request: Request, body: SessionRequest | None = None,
        # Stands in for your own authentication: use your logged-in user's id.
        x_user_id: Annotated[str, Header()] = "anonymous",
    ) -> dict[str, Any]:
        options = body or SessionRequest()
        client: icegate.AsyncClient = request.app.state.icegate
        session = await client.create_session(
            "openai", project_id=project, user_id=x_user_id, voice=options.voice,
            instructions=options.instructions, timeout=5)
        expires_at = session.ephemeral_token.expire_time.ToDatetime(tzinfo=timezone.utc)
        return {
            "ephemeralToken": session.ephemeral_token.value,
            "expiresAt": expires_at.isoformat(),
            "iceServers": icegate.rtc_ice_servers(
                [*session.ice_servers, *session.provider_ice_servers]),
            "sessionId": session.session_id,
        }

    @app.post("/api/realtime-session/{session_id}/end")
    async def end_session(request: Request, session_id: str) -> dict[str, Any]:
        # A real app checks that this session belongs to the signed-in user first.
        client: icegate.AsyncClient = request.app.state.icegate
        await client.end_session(session_id, project_id=project, timeout=5)
        return {"sessionId": session_id, "ended": True}

    return app

