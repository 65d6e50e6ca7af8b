"""A FastAPI backend that hands its browser a realtime AI session (ICEGATE_TARGET, ICEGATE_API_KEY):

    uvicorn examples.fastapi_app:app
"""

from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import icegate


class SessionRequest(BaseModel):
    voice: str = ""
    instructions: str = ""


class CallRequest(SessionRequest):
    sdp: str  # the browser's offer


def create_app(target: str | None = None, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):  # one client (one channel) for the app's lifetime
        async with icegate.AsyncClient(target, api_key) as app.state.icegate:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(icegate.IcegateError)
    async def icegate_error(request: Request, error: icegate.IcegateError) -> JSONResponse:
        answer = icegate.http_error(error)  # 402, 429 and the rest, in the seeds' shapes
        return JSONResponse(answer.body, answer.status, answer.headers)

    # X-User-Id stands in for your own authentication: use your signed-in user's id.
    @app.post("/api/realtime-session")
    async def realtime_session(request: Request, body: SessionRequest | None = None,
                               x_user_id: Annotated[str, Header()] = "anonymous") -> dict:
        body = body or SessionRequest()
        created = await request.app.state.icegate.create_session(
            user_id=x_user_id, voice=body.voice, instructions=body.instructions, timeout=5)
        return icegate.browser_session(created)

    @app.post("/api/realtime-call")  # the browser's SDP in, the answer out: no token at all
    async def realtime_call(request: Request, body: CallRequest,
                            x_user_id: Annotated[str, Header()] = "anonymous") -> dict:
        created = await request.app.state.icegate.create_call(
            body.sdp, user_id=x_user_id, voice=body.voice, instructions=body.instructions,
            timeout=10)
        return icegate.browser_call(created)

    @app.post("/api/realtime-session/{session_id}/end")
    async def end_session(request: Request, session_id: str) -> dict:
        # A real app checks first that the session is its signed-in user's.
        await request.app.state.icegate.end_session(session_id, timeout=5)
        return {"sessionId": session_id, "ended": True}

    return app


app = create_app()
