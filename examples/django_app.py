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
import logging
import math
import os
import sys
from dataclasses import asdict
from datetime import timezone
from typing import Any

from django.conf import settings
from django.core.management.utils import get_random_secret_key
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.http import require_POST

import icegate

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

log = logging.getLogger(__name__)
PROJECT_ID = os.environ.get("ICEGATE_PROJECT", "")

# One client (one channel) for the whole process, shared by every request and thread.
icegate_client = icegate.Client()  # ICEGATE_TARGET, ICEGATE_API_KEY


def use_icegate(target: str | None = None, api_key: str | None = None) -> None:
    """Points the views at another icegate (settings read elsewhere, or tests)."""
    global icegate_client
    icegate_client.close()
    icegate_client = icegate.Client(target, api_key)


def error_response(error: icegate.IcegateError) -> JsonResponse:
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
    expires_at = session.ephemeral_token.expire_time.ToDatetime(tzinfo=timezone.utc)
    return JsonResponse({
        "ephemeralToken": session.ephemeral_token.value,
        "expiresAt": expires_at.isoformat(),
        "iceServers": icegate.rtc_ice_servers(
            [*session.ice_servers, *session.provider_ice_servers]),
        "sessionId": session.session_id,
    })


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
