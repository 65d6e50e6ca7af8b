"""Realtime sessions end to end: real server and client (over each transport), a fake OpenAI on
a real socket."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import pytest

import icegate
from fake_upstreams import CannedResponse, FakeUpstream, OpenAIEmulation, openai_error
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from icegate_server.clock import FrozenClock

OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
NOVEMBER = datetime(2026, 11, 30, 23, 0, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def openai():
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


@pytest.fixture
def server(transport: str, server_factory: ServerFactory, store_url: str,
           openai) -> RunningServer:
    """A real icegate server, its clock frozen in November, on each store backend."""
    return server_factory(FrozenClock(NOVEMBER), store=store_url,
                          openai_base_url=openai.base_url, session_lease_seconds=600)


@pytest.fixture
def admin(server):
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
        yield client


def test_create_session_returns_token_ice_servers_and_metadata(server, admin, openai):
    created = admin.create_session("openai", voice="echo", instructions="Be brief.",
                                   token_ttl=120, user_id="alice")
    assert created.ephemeral_token.value.startswith("ek_")
    assert created.ephemeral_token.expire_time.seconds > 0
    assert created.upstream_session_id.startswith("sess_")
    assert (created.model, created.voice) == ("gpt-realtime", "echo")
    assert created.session_id.startswith("ses_")
    assert created.create_time.seconds == int(NOVEMBER)
    assert created.lease_expire_time.seconds == int(NOVEMBER) + 600
    servers = icegate.rtc_ice_servers(created.ice_servers)
    assert servers[0] == {"urls": ["stun:127.0.0.1:3478"]}
    assert servers[1]["username"] == f"{int(NOVEMBER) + 3600}:default/alice"

    (request,) = openai.requests_to("/v1/realtime/client_secrets")
    assert request.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert request.json["expires_after"] == {"anchor": "created_at", "seconds": 120}
    assert request.json["session"]["audio"]["output"]["voice"] == "echo"
    assert request.json["session"]["instructions"] == "Be brief."


def test_the_provider_key_never_comes_back(server, admin):
    listed = admin.list_provider_keys("default")
    assert [(k.provider, k.last4) for k in listed] == [("openai", "…1234")]
    created = admin.create_session("openai")
    for message in (*listed, created, admin.get_usage()):
        assert OPENAI_KEY.encode() not in message.SerializeToString()


def test_bad_options_are_refused_before_any_upstream_call(server, admin, openai):
    cases = {"voice": {"voice": "nobody"}, "speed": {"speed": 9.0},
             "token_ttl": {"token_ttl": 5}, "temperature": {"temperature": 0.9}}
    for field, options in cases.items():
        with pytest.raises(icegate.InvalidArgumentError) as caught:
            admin.create_session("openai", **options)
        assert [v.field for v in caught.value.field_violations] == [field]
    with pytest.raises(icegate.InvalidArgumentError):
        admin.create_session(0)  # PROVIDER_UNSPECIFIED
    assert openai.requests_to("/v1/realtime/client_secrets") == []
    usage = admin.get_usage()
    assert (usage.sessions.used_this_month, usage.sessions.active) == (0, 0)


def test_missing_provider_key_is_failed_precondition(server, admin):
    admin.delete_provider_key("default", "openai")
    with pytest.raises(icegate.UpstreamNotConfiguredError) as caught:
        admin.create_session("openai")
    assert caught.value.provider == "openai"
    assert admin.get_usage().sessions.used_this_month == 0


def test_concurrency_limit_keepalive_end_and_expiry(server, admin):
    admin.update_project("default", max_concurrent_sessions=2)
    first = admin.create_session("openai")
    admin.create_session("openai")
    with pytest.raises(icegate.ConcurrentLimitError) as caught:
        admin.create_session("openai")
    assert (caught.value.current, caught.value.max_sessions) == (2, 2)

    admin.end_session(first.session_id)
    with pytest.raises(icegate.NotFoundError):
        admin.end_session(first.session_id)
    third = admin.create_session("openai")

    # Inactivity: leases expire after 600 s unless kept alive.
    server.clock.advance(500)
    renewed = admin.keep_alive_session(third.session_id)
    assert renewed.lease_expire_time.seconds == int(server.clock.now()) + 600
    server.clock.advance(200)  # the unrenewed second session has now expired
    assert admin.get_usage().sessions.active == 1
    admin.create_session("openai")
    with pytest.raises(icegate.ConcurrentLimitError):
        admin.create_session("openai")
    server.clock.advance(601)
    with pytest.raises(icegate.NotFoundError):
        admin.keep_alive_session(third.session_id)
    assert admin.get_usage().sessions.active == 0


def test_monthly_quota_and_rollover(server, admin):
    admin.update_project("default", monthly_session_quota=2, plan="free",
                         upgrade_url="https://example.test/upgrade")
    for _ in range(2):
        admin.end_session(admin.create_session("openai").session_id)
    with pytest.raises(icegate.QuotaExceededError) as caught:
        admin.create_session("openai")
    error = caught.value
    assert error.usage == icegate.QuotaUsage(plan="free", sessions_included=2, sessions_used=2,
                                             sessions_remaining=0)
    assert error.upgrade_url == "https://example.test/upgrade"
    assert error.resets_at == datetime(2026, 12, 1, tzinfo=timezone.utc)

    server.clock.set(datetime(2026, 12, 1, 0, 0, 1, tzinfo=timezone.utc).timestamp())
    admin.create_session("openai")
    usage = admin.get_usage().sessions
    assert (usage.used_this_month, usage.remaining_this_month) == (1, 1)


def test_mint_ephemeral_token_uses_no_quota(server, admin):
    admin.update_project("default", monthly_session_quota=0)
    minted = admin.mint_ephemeral_token("openai", voice="marin")
    assert minted.ephemeral_token.value.startswith("ek_")
    assert admin.get_usage().sessions.used_this_month == 0


def test_failed_upstream_gives_back_lease_and_quota_unit(server, admin, openai):
    admin.update_project("default", max_concurrent_sessions=1, monthly_session_quota=5)
    openai.enqueue(openai_error(401, "Incorrect API key provided: sk-tes**********1234.",
                                code="invalid_api_key"))
    with pytest.raises(icegate.UpstreamAuthFailedError) as caught:
        admin.create_session("openai")
    assert caught.value.upstream_status == 401
    assert caught.value.upstream_request_id.startswith("req_")
    assert OPENAI_KEY not in str(caught.value)

    openai.enqueue(openai_error(429, "You exceeded your current quota.",
                                type="insufficient_quota", code="insufficient_quota"))
    with pytest.raises(icegate.UpstreamQuotaError):
        admin.create_session("openai")
    sessions = admin.get_usage().sessions
    assert (sessions.used_this_month, sessions.active) == (0, 0)
    admin.create_session("openai")  # the single slot is free


def test_upstream_slower_than_the_deadline(server, admin, openai):
    openai.enqueue(CannedResponse(200, {}, delay=5.0))
    started = time.monotonic()
    with pytest.raises(icegate.DeadlineExceededError):
        admin.create_session("openai", timeout=0.5)
    assert time.monotonic() - started < 2.0
    # The server notices the caller left and gives the slot back.
    deadline = time.monotonic() + 5
    while admin.get_usage().sessions.active and time.monotonic() < deadline:
        time.sleep(0.05)
    sessions = admin.get_usage().sessions
    assert (sessions.used_this_month, sessions.active) == (0, 0)


def test_project_key_sessions_are_scoped(server, admin):
    admin.create_project("acme")
    admin.set_provider_key("acme", "openai", OPENAI_KEY)
    secret = admin.create_api_key("acme").secret
    with icegate.Client(server.target, secret) as acme:
        created = acme.create_session("openai")
        with pytest.raises(icegate.NotFoundError):
            admin.end_session(created.session_id)  # it is acme's session, not default's
        acme.end_session(created.session_id)
        with pytest.raises(icegate.ProjectForbiddenError):
            acme.create_session("openai", project_id="default")


def test_async_client_sessions(server, admin):
    async def scenario():
        async with icegate.AsyncClient(server.target, TEST_ADMIN_KEY) as client:
            created = await client.create_session("openai", voice="coral")
            await client.keep_alive_session(created.session_id)
            await client.end_session(created.session_id)
            return created

    created = asyncio.run(scenario())
    assert created.voice == "coral"
