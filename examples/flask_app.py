"""A Flask backend that hands its browser a realtime AI session (ICEGATE_TARGET, ICEGATE_API_KEY):

    flask --app examples/flask_app.py run
"""

from flask import Flask, request

import icegate


def create_app(target: str | None = None, api_key: str | None = None) -> Flask:
    app = Flask(__name__)
    client = app.extensions["icegate"] = icegate.Client(target, api_key)  # one, shared

    @app.errorhandler(icegate.IcegateError)
    def icegate_error(error: icegate.IcegateError):
        status, headers, body = icegate.http_error(error)  # 402, 429... in the seeds' shapes
        return body, status, headers

    # X-User-Id stands in for your own authentication: use your signed-in user's id.
    @app.post("/api/realtime-session")
    def realtime_session():
        options = icegate.browser_options(request.get_data())
        created = client.create_session(
            user_id=request.headers.get("X-User-Id", "anonymous"), timeout=5, **options)
        return icegate.browser_session(created)

    @app.post("/api/realtime-session/<session_id>/end")
    def end_session(session_id: str):
        # A real app checks first that the session is its signed-in user's.
        client.end_session(session_id, timeout=5)
        return {"sessionId": session_id, "ended": True}

    return app  # `flask --app examples/flask_app.py run` finds this factory by its name
