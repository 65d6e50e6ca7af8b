"""A Django endpoint (a whole project in one file) that hands the browser what it needs for a
realtime WebRTC session.

    ICEGATE_TARGET=127.0.0.1:50051 ICEGATE_API_KEY=igk_... \\
        python examples/django_app.py runserver

The browser calls `POST /api/realtime-session` and gets `{ephemeralToken, expiresAt,
iceServers, sessionId}`; the icegate key and the provider key never reach it. In your own
project the views go in views.py, the paths in urls.py and `icegate_client` in a module
of your choice.
"""

import json
import os
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.utils import get_random_secret_key
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.http import require_POST

import icegate

# The framework-independent part (browser answer, error mapping) sits next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from realtime_session import browser_session, http_error

if not settings.configured:
    settings.configure(
        DEBUG=os.environ.get("DJANGO_DEBUG") == "1",
        SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY") or get_random_secret_key(),
        ALLOWED_HOSTS=os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(","),
        ROOT_URLCONF=__name__,
        # A real project keeps its own middleware (sessions, auth, CSRF): nothing here needs
        # an exemption.
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    )

PROJECT_ID = os.environ.get("ICEGATE_PROJECT", "")

# One client (one channel) for the whole process, shared by every request and thread.
icegate_client = icegate.Client()  # ICEGATE_TARGET, ICEGATE_API_KEY


def use_icegate(target: str | None = None, api_key: str | None = None) -> None:
    """Points the views at another icegate (settings read elsewhere, or tests)."""
    global icegate_client
    icegate_client.close()
    icegate_client = icegate.Client(target, api_key)


def error_response(error: icegate.IcegateError) -> JsonResponse:
    status, body, headers = http_error(error)
    return JsonResponse(body, status=status, headers=headers)


@require_POST
def create_session(request: HttpRequest) -> JsonResponse:
    try:
        options = json.loads(request.body or b"{}")
    except ValueError:
        options = None
    if not isinstance(options, dict) or not all(
            isinstance(options.get(name, ""), str) for name in ("voice", "instructions")):
        return JsonResponse({"error": "invalid_argument"}, status=400)
    try:
        session = icegate_client.create_session(
            "openai", project_id=PROJECT_ID,
            # Stands in for your own authentication: use request.user's id.
            user_id=request.headers.get("X-User-Id", "anonymous"),
            voice=options.get("voice", ""), instructions=options.get("instructions", ""),
            timeout=5)
    except icegate.IcegateError as error:
        return error_response(error)
    return JsonResponse(browser_session(session))


@require_POST
def end_session(request: HttpRequest, session_id: str) -> JsonResponse:
    # A real app checks that this session belongs to request.user first.
    try:
        icegate_client.end_session(session_id, project_id=PROJECT_ID, timeout=5)
    except icegate.IcegateError as error:
        return error_response(error)
    return JsonResponse({"sessionId": session_id, "ended": True})


urlpatterns = [
    path("api/realtime-session", create_session),
    path("api/realtime-session/<str:session_id>/end", end_session),
]

application = get_wsgi_application()

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
