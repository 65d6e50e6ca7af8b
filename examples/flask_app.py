"""A Flask endpoint that hands the browser what it needs for a realtime WebRTC session.

    ICEGATE_TARGET=127.0.0.1:50051 ICEGATE_API_KEY=igk_... flask --app examples/flask_app.py run

The browser calls `POST /api/realtime-session` and gets `{ephemeralToken, expiresAt,
iceServers, sessionId}`; the icegate key and the provider key never reach it.
"""

import os
import sys
from pathlib import Path

from flask import Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue

import icegate

# The framework-independent part (browser answer, error mapping) sits next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from realtime_session import browser_session, http_error


def error_response(error: icegate.IcegateError) -> ResponseReturnValue:
    status, body, headers = http_error(error)
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
        return jsonify(browser_session(session))

    @app.post("/api/realtime-session/<session_id>/end")
    def end_session(session_id: str) -> ResponseReturnValue:
        # A real app checks that this session belongs to the signed-in user first.
        client: icegate.Client = current_app.extensions["icegate"]
        client.end_session(session_id, project_id=project, timeout=5)
        return jsonify(sessionId=session_id, ended=True)

    return app
