"""A FastAPI endpoint that hands the browser what it needs for a realtime WebRTC session.

    ICEGATE_TARGET=127.0.0.1:50051 ICEGATE_API_KEY=igk_... \\
        uvicorn --factory examples.fastapi_app:create_app

The browser calls `POST /api/realtime-session` and gets `{ephemeralToken, expiresAt,
iceServers, sessionId}`; the icegate key and the provider key never reach it.
"""

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import icegate

# The framework-independent part (browser answer, error mapping) sits next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from realtime_session import browser_session, http_error


class SessionRequest(BaseModel):
    voice: str = ""
    instructions: str = ""


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
        status, body, headers = http_error(error)
        return JSONResponse(body, status_code=status, headers=headers)

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
        return browser_session(session)

    @app.post("/api/realtime-session/{session_id}/end")
    async def end_session(request: Request, session_id: str) -> dict[str, Any]:
        # A real app checks that this session belongs to the signed-in user first.
        client: icegate.AsyncClient = request.app.state.icegate
        await client.end_session(session_id, project_id=project, timeout=5)
        return {"sessionId": session_id, "ended": True}

    return app

