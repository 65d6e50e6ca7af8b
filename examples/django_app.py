"""A Django backend that hands its browser a realtime AI session (ICEGATE_TARGET, ICEGATE_API_KEY),
settings, URLs and views in one file (in a project: settings.py, urls.py, views.py):

    python examples/django_app.py runserver
"""

import functools
import os
import sys

from django.conf import settings
from django.core.management.utils import get_random_secret_key
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.http import require_POST

import icegate

settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["localhost", "127.0.0.1"],
                   SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY") or get_random_secret_key())
client = icegate.Client()  # one, shared by every request and thread


def icegate_view(view):
    """A POST view answering its dict as JSON, and icegate's errors in the seeds' shapes."""
    @require_POST
    @functools.wraps(view)
    def answer(request, *args, **kwargs):
        try:
            return JsonResponse(view(request, *args, **kwargs))
        except icegate.IcegateError as error:
            status, headers, body = icegate.http_error(error)
            return JsonResponse(body, status=status, headers=headers)
    return answer


# X-User-Id stands in for your own authentication: use request.user's id.
@icegate_view
def realtime_session(request):
    options = icegate.browser_options(request.body)
    created = client.create_session(
        user_id=request.headers.get("X-User-Id", "anonymous"), timeout=5, **options)
    return icegate.browser_session(created)


@icegate_view
def end_session(request, session_id):
    # A real app checks first that the session is request.user's.
    client.end_session(session_id, timeout=5)
    return {"sessionId": session_id, "ended": True}


urlpatterns = [path("api/realtime-session", realtime_session),
               path("api/realtime-session/<str:session_id>/end", end_session)]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
