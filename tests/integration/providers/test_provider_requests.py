"""What each adapter sends and how it reads a good answer, checked at the fake's socket."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fake_upstreams import CannedResponse, FakeUpstream, RecordedRequest
from fake_upstreams.harness import API_KEY, AZURE_DEPLOYMENT, CASES_BY_KIND, ProviderCase, mint
from fake_upstreams.orga import ICE_PATH, SECRETS_PATH
from icegate_server.errors import InvalidFieldError, UpstreamUnavailableError
from icegate_server.sessions.providers import IceServer, ProviderKind, SessionOptions

RICH = SessionOptions(
    model="gpt-realtime", voice="cedar", instructions="Be brief.", speed=1.25,
    token_ttl_seconds=120, modalities=("audio",),
)


@pytest.fixture
def fake_for(request: pytest.FixtureRequest) -> Iterator[tuple[ProviderCase, FakeUpstream]]:
    case = CASES_BY_KIND[request.param]
    with FakeUpstream(case.emulation()) as server:
        yield case, server


def only_request(fake: FakeUpstream) -> RecordedRequest:
    assert len(fake.requests) == 1
    return fake.requests[0]


def assert_json_post(request: RecordedRequest, path: str) -> None:
    assert (request.method, request.path) == ("POST", path)
    assert request.headers["content-type"] == "application/json"


@pytest.mark.parametrize("fake_for", [ProviderKind.OPENAI], indirect=True)
def test_openai_ga_posts_client_secrets(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    before = time.time()
    token = mint(case, fake.base_url, RICH)

    request = only_request(fake)
    assert_json_post(request, "/v1/realtime/client_secrets")
    assert request.query == {}
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert "api-key" not in request.headers
    assert request.json == {
        "expires_after": {"anchor": "created_at", "seconds": 120},
        "session": {
            "type": "realtime", "model": "gpt-realtime", "instructions": "Be brief.",
            "output_modalities": ["audio"],
            "audio": {"output": {"voice": "cedar", "speed": 1.25}},
        },
    }
    assert token.value.startswith("ek_ga_")
    assert before + 119 <= token.expires_at <= time.time() + 121
    assert token.upstream_session_id.startswith("sess_")
    assert (token.model, token.voice, token.ice_servers) == ("gpt-realtime", "cedar", ())
    assert token.upstream_request_id.startswith("req_")
    assert token.value not in repr(token)


@pytest.mark.parametrize("fake_for", [ProviderKind.OPENAI], indirect=True)
def test_openai_ga_defaults(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    mint(case, fake.base_url, SessionOptions())
    assert only_request(fake).json == {
        "expires_after": {"anchor": "created_at", "seconds": 600},
        "session": {"type": "realtime", "model": "gpt-realtime"},
    }


@pytest.mark.parametrize("fake_for", [ProviderKind.OPENAI_BETA], indirect=True)
def test_openai_beta_posts_flat_sessions(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    options = SessionOptions(model="gpt-4o-realtime-preview", voice="verse", instructions="Hi",
                             temperature=0.8, modalities=("text", "audio"))
    token = mint(case, fake.base_url, options)

    request = only_request(fake)
    assert_json_post(request, "/v1/realtime/sessions")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.json == {
        "model": "gpt-4o-realtime-preview", "voice": "verse", "instructions": "Hi",
        "modalities": ["audio", "text"], "temperature": 0.8,
    }
    assert token.value.startswith("ek_beta_")
    assert token.upstream_session_id.startswith("sess_")
    assert (token.model, token.voice) == ("gpt-4o-realtime-preview", "verse")
    assert 0 < token.expires_at - time.time() <= 61


@pytest.mark.parametrize("fake_for", [ProviderKind.AZURE], indirect=True)
def test_azure_ga_uses_api_key_and_deployment(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    token = mint(case, fake.base_url + "/", SessionOptions(model=AZURE_DEPLOYMENT, voice="ash"))

    request = only_request(fake)
    assert_json_post(request, "/openai/v1/realtime/client_secrets")
    assert request.headers["api-key"] == API_KEY
    assert "authorization" not in request.headers
    assert request.json["session"] == {
        "type": "realtime", "model": AZURE_DEPLOYMENT, "audio": {"output": {"voice": "ash"}},
    }
    assert request.json["expires_after"] == {"anchor": "created_at", "seconds": 600}
    assert token.model == AZURE_DEPLOYMENT
    assert token.upstream_request_id.startswith("azreq-")  # from apim-request-id


@pytest.mark.parametrize("fake_for", [ProviderKind.AZURE_LEGACY], indirect=True)
def test_azure_legacy_sends_the_preview_api_version(
    fake_for: tuple[ProviderCase, FakeUpstream],
) -> None:
    case, fake = fake_for
    token = mint(case, fake.base_url, SessionOptions(model=AZURE_DEPLOYMENT, voice="verse"))

    request = only_request(fake)
    assert_json_post(request, "/openai/realtimeapi/sessions")
    assert request.query == {"api-version": ["2025-04-01-preview"]}
    assert request.headers["api-key"] == API_KEY
    assert request.json == {"model": AZURE_DEPLOYMENT, "voice": "verse"}
    assert token.value.startswith("ek_beta_")
    assert token.upstream_request_id.startswith("azreq-")


@pytest.mark.parametrize("fake_for", [ProviderKind.ORGA], indirect=True)
def test_orga_fetches_secret_then_ice_config(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    token = mint(case, fake.base_url, SessionOptions(email="ada@example.com"))

    secret_request, ice_request = fake.requests
    assert (secret_request.method, secret_request.path) == ("POST", SECRETS_PATH)
    assert secret_request.query == {"email": ["ada@example.com"]}
    assert secret_request.headers["authorization"] == f"Bearer {API_KEY}"
    assert secret_request.body == b""
    assert (ice_request.method, ice_request.path) == ("GET", ICE_PATH)
    assert ice_request.headers["authorization"] == f"Bearer {token.value}"
    assert token.value.startswith("orga_eph_")
    assert token.ice_servers == (
        IceServer(urls=("stun:stun.orga-ai.test:3478",)),
        IceServer(urls=("turn:turn.orga-ai.test:3478?transport=udp",
                        "turns:turn.orga-ai.test:5349"),
                  username="1700000000:orga", credential="turn-pass"),
    )
    assert "turn-pass" not in repr(token)
    assert token.upstream_request_id == f"orga-req-{token.value}"
    assert 0 < token.expires_at - time.time() <= 61  # Orga states no lifetime: assume 60 s


@pytest.mark.parametrize("fake_for", [ProviderKind.ORGA], indirect=True)
def test_orga_without_email_is_refused_naming_the_field_before_any_request(
        fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    # Orga answers 401 "Invalid API key or email" without one: the key is not to blame.
    case, fake = fake_for
    with pytest.raises(InvalidFieldError) as caught:
        mint(case, fake.base_url, SessionOptions())
    assert caught.value.violations[0].field == "email"
    assert not fake.requests


@pytest.mark.parametrize("fake_for", [ProviderKind.ORGA], indirect=True)
def test_orga_sends_the_email(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    mint(case, fake.base_url, SessionOptions(email="dev@example.test"))
    assert fake.requests[0].query == {"email": ["dev@example.test"]}


@pytest.mark.parametrize("fake_for", [ProviderKind.ORGA], indirect=True)
def test_orga_reads_expiry_from_a_jwt_token(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    # header {"alg":"none"}, payload {"exp": 1900000000}
    jwt = "eyJhbGciOiJub25lIn0.eyJleHAiOiAxOTAwMDAwMDAwfQ.sig"
    fake.enqueue(CannedResponse(200, {"ephemeral_token": jwt}),
                 CannedResponse(200, {"iceServers": []}))
    token = mint(case, fake.base_url, SessionOptions(email="dev@example.test"))
    assert (token.value, token.expires_at, token.ice_servers) == (jwt, 1_900_000_000.0, ())


@pytest.mark.parametrize("fake_for", [ProviderKind.ORGA], indirect=True)
def test_orga_refusing_its_own_token_is_unavailable(
    fake_for: tuple[ProviderCase, FakeUpstream],
) -> None:
    case, fake = fake_for
    fake.enqueue(CannedResponse(200, {"ephemeral_token": "eph"}), case.error(401, "no", {}))
    with pytest.raises(UpstreamUnavailableError) as caught:
        mint(case, fake.base_url, SessionOptions(email="dev@example.test"))
    assert caught.value.upstream_status == 401


@pytest.mark.parametrize("fake_for", [ProviderKind.ORGA], indirect=True)
def test_orga_malformed_ice_servers(fake_for: tuple[ProviderCase, FakeUpstream]) -> None:
    case, fake = fake_for
    fake.enqueue(CannedResponse(200, {"ephemeral_token": "eph"}),
                 CannedResponse(200, {"iceServers": [{"username": "no urls"}]}))
    with pytest.raises(UpstreamUnavailableError, match="malformed answer"):
        mint(case, fake.base_url, SessionOptions(email="dev@example.test"))


@pytest.mark.parametrize("fake_for", [ProviderKind.GEMINI], indirect=True)
def test_gemini_posts_auth_tokens_with_locked_setup(
    fake_for: tuple[ProviderCase, FakeUpstream],
) -> None:
    case, fake = fake_for
    options = SessionOptions(model="gemini-live-2.5-flash-preview", voice="Kore",
                             instructions="Speak French.", temperature=0.4,
                             token_ttl_seconds=900, modalities=("audio",))
    before = time.time()
    token = mint(case, fake.base_url, options)

    request = only_request(fake)
    assert_json_post(request, "/v1alpha/auth_tokens")
    assert request.headers["x-goog-api-key"] == API_KEY
    assert "authorization" not in request.headers
    body = request.json
    assert body["uses"] == 1
    assert body["bidiGenerateContentSetup"] == {
        "model": "models/gemini-live-2.5-flash-preview",
        "generationConfig": {
            "responseModalities": ["AUDIO"], "temperature": 0.4,
            "speechConfig": {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Kore"}}},
        },
        "systemInstruction": {"parts": [{"text": "Speak French."}]},
    }
    assert body["expireTime"].endswith("Z")
    assert body["newSessionExpireTime"].endswith("Z")
    assert token.value.startswith("auth_tokens/")
    assert before + 899 <= token.expires_at <= time.time() + 901
    assert token.model == "gemini-live-2.5-flash-preview"
