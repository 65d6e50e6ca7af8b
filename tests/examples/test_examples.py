"""The FastAPI, Flask and Django examples, driven in-process against a real icegate server.

Each test runs one example app (FastAPI through Starlette's TestClient, Flask through its
test client, Django through django.test.Client) against a real icegate grpc.aio server on a
free port, which mints tokens from a fake OpenAI on a real local socket. Every answer is
checked for leaked keys.

Errors icegate cannot blame on the browser (no provider key for the project, provider refused
the key, icegate refused the app's key) answer 502: the app's upstream is misconfigured.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import icegate
from fake_upstreams import CannedResponse, FakeUpstream, OpenAIEmulation, RecordedRequest
from fake_upstreams.server import unused_port
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, server_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OPENAI_KEY = "sk-test-examples-0123456789abcdef"
SESSION = "/api/realtime-session"

# Newer Starlette nags about its TestClient's httpx backend; nothing the examples control.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as a module (once per process: Django configures itself once)."""
    module_name = f"icegate_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


class ExampleApp:
    """One example app behind the same tiny HTTP interface, checking no key ever leaks."""

    def __init__(self, post: Callable[[str, Any, dict[str, str]], tuple[int, bytes, Any]],
                 secrets: list[str]) -> None:
        self._post = post
        self.secrets = secrets

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None
             ) -> Answer:
        status, raw, raw_headers = self._post(path, body, headers or {})
        text = raw.decode() + json.dumps(dict(raw_headers))
        for secret in self.secrets:
            # Not the key, and not the recognisable tail some upstreams echo back.
            assert secret not in text and secret[-8:] not in text, "a key leaked to the browser"
        return Answer(status, json.loads(raw), {k.lower(): v for k, v in raw_headers.items()})

    def create(self, body: Any = None, user: str | None = None) -> Answer:
        return self.post(SESSION, body, {"X-User-Id": user} if user else {})

    def end(self, session_id: str) -> Answer:
        return self.post(f"{SESSION}/{session_id}/end")


Post = Callable[[str, Any, dict[str, str]], tuple[int, bytes, Any]]


@contextmanager
def fastapi_app(target: str, api_key: str) -> Iterator[Post]:
    from fastapi.testclient import TestClient

    app = load_example("fastapi_app").create_app(target, api_key)
    with TestClient(app) as client:  # runs the lifespan: the AsyncClient opens and closes

        def post(path: str, body: Any, headers: dict[str, str]) -> tuple[int, bytes, Any]:
            answer = client.post(path, headers=headers, json=body)
            return answer.status_code, answer.content, answer.headers

        yield post


@contextmanager
def flask_app(target: str, api_key: str) -> Iterator[Post]:
    app = load_example("flask_app").create_app(target, api_key)
    app.testing = True
    client = app.test_client()

    def post(path: str, body: Any, headers: dict[str, str]) -> tuple[int, bytes, Any]:
        answer = client.post(path, headers=headers, json=body)
        return answer.status_code, answer.data, answer.headers

    try:
        yield post
    finally:
        app.extensions["icegate"].close()


@contextmanager
def django_app(target: str, api_key: str) -> Iterator[Post]:
    module = load_example("django_app")  # configures Django once per process
    from django.test import Client

    module.client.close()
    module.client = icegate.Client(target, api_key)  # what ICEGATE_TARGET/_API_KEY would give
    client = Client(SERVER_NAME="localhost", raise_request_exception=True)

    def post(path: str, body: Any, headers: dict[str, str]) -> tuple[int, bytes, Any]:
        answer = client.post(path, data="" if body is None else json.dumps(body),
                             content_type="application/json", headers=headers)
        return answer.status_code, answer.content, answer.headers

    yield post


APPS = {"fastapi": fastapi_app, "flask": flask_app, "django": django_app}


class RecordingOpenAI(OpenAIEmulation):
    """The fake OpenAI, remembering every token it issued."""

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self.issued: list[dict[str, Any]] = []

    def __call__(self, request: RecordedRequest) -> CannedResponse:
        response = super().__call__(request)
        if response.status == 200:
            self.issued.append(response.json_body)
        return response


@pytest.fixture
def openai() -> Iterator[FakeUpstream]:
    with FakeUpstream(RecordingOpenAI(OPENAI_KEY)) as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, openai: FakeUpstream) -> Iterator[RunningServer]:
    with RunningServer(server_settings(tmp_path, openai_base_url=openai.base_url)) as server:
        yield server


@pytest.fixture
def admin(server: RunningServer) -> Iterator[icegate.Client]:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
        yield client


@pytest.fixture
def app_key(admin: icegate.Client) -> str:
    """A caller key of the project, as a web app would hold it."""
    return admin.create_api_key("default", display_name="web app").secret


@pytest.fixture(params=sorted(APPS))
def make_app(request: pytest.FixtureRequest, server: RunningServer,
             app_key: str) -> Iterator[Callable[..., ExampleApp]]:
    """Starts the example app against `target` (default: the test server) with `api_key`."""
    with ExitStack() as stack:

        def make(target: str = server.target, api_key: str = app_key) -> ExampleApp:
            post = stack.enter_context(APPS[request.param](target, api_key))
            return ExampleApp(post, [OPENAI_KEY, TEST_ADMIN_KEY, app_key, api_key])

        yield make


@pytest.fixture
def app(make_app: Callable[..., ExampleApp]) -> ExampleApp:
    return make_app()


def test_session_hands_the_browser_token_and_ice_servers(app: ExampleApp,
                                                         openai: FakeUpstream) -> None:
    answer = app.create({"voice": "echo", "instructions": "Be brief."}, user="alice")

    assert answer.status == 200, answer.body
    issued = openai.responder.issued[-1]
    assert answer.body["ephemeralToken"] == issued["value"]
    assert answer.body["ephemeralToken"].startswith("ek_")
    assert datetime.fromisoformat(answer.body["expiresAt"]) == \
        datetime.fromtimestamp(issued["expires_at"], timezone.utc)
    sent = openai.requests_to("/v1/realtime/client_secrets")[-1].json["session"]
    assert sent["audio"]["output"]["voice"] == "echo"
    assert sent["instructions"] == "Be brief."

    servers = answer.body["iceServers"]
    assert isinstance(servers, list)
    stun = [s for s in servers if s["urls"][0].startswith("stun:")]
    turn = [s for s in servers if s["urls"][0].startswith("turn")]
    assert stun and all(set(s) == {"urls"} for s in stun)
    assert turn and all(s["username"] and s["credential"] for s in turn)

    session_id = answer.body["sessionId"]
    assert session_id
    ended = app.end(session_id)
    assert (ended.status, ended.body) == (200, {"sessionId": session_id, "ended": True})
    again = app.end(session_id)
    assert (again.status, again.body) == (404, {"error": "session_not_found"})


def test_no_body_means_the_defaults(app: ExampleApp) -> None:
    answer = app.create()
    assert answer.status == 200, answer.body
    assert answer.body["ephemeralToken"].startswith("ek_")


def test_concurrent_limit_is_429_with_current_and_max(app: ExampleApp,
                                                      admin: icegate.Client) -> None:
    admin.update_project("default", max_concurrent_sessions=1)
    first = app.create()
    assert first.status == 200, first.body

    refused = app.create()
    assert refused.status == 429
    assert refused.body == {"error": "concurrent_limit_exceeded", "current": 1, "max": 1}

    assert app.end(first.body["sessionId"]).status == 200
    assert app.create().status == 200  # the slot is free again


def test_quota_exceeded_is_402_with_usage_and_upgrade_url(app: ExampleApp,
                                                          admin: icegate.Client) -> None:
    admin.update_project("default", monthly_session_quota=1,
                         upgrade_url="https://billing.example.test/upgrade")
    first = app.create()
    assert first.status == 200, first.body
    assert app.end(first.body["sessionId"]).status == 200

    refused = app.create()
    assert refused.status == 402
    assert refused.body["error"] == "quota_exceeded"
    assert refused.body["upgrade_url"] == "https://billing.example.test/upgrade"
    usage = refused.body["usage"]
    assert (usage["sessions_included"], usage["sessions_used"], usage["sessions_remaining"]) \
        == (1, 1, 0)
    assert usage["plan"]


def test_rate_limited_is_429_with_retry_after_and_reset_time(app: ExampleApp,
                                                             admin: icegate.Client) -> None:
    admin.update_project("default", rate_limit_requests=1)
    assert app.create().status == 200

    refused = app.create()
    assert refused.status == 429
    assert refused.body["error"] == "rate_limited"
    assert datetime.fromisoformat(refused.body["resetAt"]).tzinfo is not None
    assert int(refused.headers["retry-after"]) >= 1


def test_bad_voice_is_400_naming_the_field(app: ExampleApp) -> None:
    answer = app.create({"voice": "not-a-voice"})
    assert answer.status == 400
    assert answer.body["error"] == "invalid_argument"
    assert [f["field"] for f in answer.body["fields"]] == ["voice"]


def test_bad_user_id_is_400_naming_the_field(app: ExampleApp) -> None:
    answer = app.create(user="eve:admin")
    assert answer.status == 400
    assert [f["field"] for f in answer.body["fields"]] == ["user_id"]


def test_malformed_body_is_refused_before_icegate(app: ExampleApp,
                                                  openai: FakeUpstream) -> None:
    answer = app.create({"voice": ["echo"]})
    assert answer.status in (400, 422)  # FastAPI answers its validation errors with 422
    assert not openai.requests


def test_no_provider_key_is_502(app: ExampleApp, admin: icegate.Client) -> None:
    admin.delete_provider_key("default", "openai")
    answer = app.create()
    assert answer.status == 502
    assert answer.body == {"error": "session_unavailable", "reason": "UPSTREAM_NOT_CONFIGURED"}


def test_provider_refusing_the_key_is_502_and_leaks_nothing(app: ExampleApp,
                                                            admin: icegate.Client) -> None:
    wrong = "sk-wrong-key-for-examples-9876543210"
    admin.set_provider_key("default", "openai", wrong)
    app.secrets.append(wrong)
    answer = app.create()
    assert answer.status == 502
    assert answer.body == {"error": "session_unavailable", "reason": "UPSTREAM_AUTH_FAILED"}


def test_unknown_icegate_key_is_502(make_app: Callable[..., ExampleApp]) -> None:
    app = make_app(api_key="igk_not_a_key_of_this_server_0123456789")
    answer = app.create()
    assert answer.status == 502
    assert answer.body == {"error": "session_unavailable", "reason": "INVALID_API_KEY"}


def test_icegate_down_is_503(make_app: Callable[..., ExampleApp]) -> None:
    app = make_app(target=f"127.0.0.1:{unused_port()}")
    answer = app.create()
    assert answer.status == 503
    assert answer.body == {"error": "temporarily_unavailable"}


OFFER = ("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
         "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n")


@pytest.fixture
def fastapi(server: RunningServer, app_key: str) -> Iterator[ExampleApp]:
    with fastapi_app(server.target, app_key) as post:
        yield ExampleApp(post, [OPENAI_KEY, TEST_ADMIN_KEY, app_key])


def test_fastapi_call_answers_the_offer_without_a_token(fastapi: ExampleApp,
                                                        openai: FakeUpstream) -> None:
    answer = fastapi.post("/api/realtime-call", {"sdp": OFFER, "voice": "marin"},
                          {"X-User-Id": "alice"})

    assert answer.status == 200, answer.body
    assert set(answer.body) == {"sessionId", "callId", "answer", "iceServers", "model"}
    assert answer.body["answer"]["type"] == "answer"
    assert answer.body["answer"]["sdp"].startswith("v=0")
    assert answer.body["callId"].startswith("rtc_")
    assert any(s["urls"][0].startswith("turn") and s["credential"]
               for s in answer.body["iceServers"])
    sent = openai.requests_to("/v1/realtime/calls")[-1]
    assert OFFER.encode() in sent.body and b'"marin"' in sent.body
    assert not openai.requests_to("/v1/realtime/client_secrets")  # no token was minted
    assert fastapi.end(answer.body["sessionId"]).status == 200


@pytest.mark.parametrize("body", [{"sdp": "hello"}, {"sdp": OFFER, "voice": "not-a-voice"}])
def test_fastapi_call_with_a_bad_offer_or_voice_is_400(fastapi: ExampleApp,
                                                       openai: FakeUpstream,
                                                       body: dict[str, str]) -> None:
    answer = fastapi.post("/api/realtime-call", body)
    assert answer.status == 400
    assert answer.body["error"] == "invalid_argument"
    assert [f["field"] for f in answer.body["fields"]] in (["sdp_offer"], ["voice"])
    assert not openai.requests_to("/v1/realtime/calls")


def test_fastapi_call_without_an_offer_is_refused_before_icegate(fastapi: ExampleApp,
                                                                 openai: FakeUpstream) -> None:
    assert fastapi.post("/api/realtime-call", {"voice": "marin"}).status == 422
    assert not openai.requests
