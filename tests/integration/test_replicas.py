"""Several icegate processes sharing one real Redis: every limit holds exactly as on one."""

from __future__ import annotations

import asyncio
import time

import pytest

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation
from harness.icegate_server import TEST_ADMIN_KEY
from harness.server_process import ServerProcess

pytestmark = pytest.mark.redis
OPENAI_KEY = "sk-test-replica-openai-key-0001"


@pytest.fixture
def replicas(tmp_path, redis_server):
    # A store timeout well above the default 0.1 s: these tests count outcomes exactly, and on
    # a loaded 2-core machine a Redis reply can take longer (UNAVAILABLE, not a limit's answer).
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as openai, \
            ServerProcess(tmp_path / "a", store=redis_server.url, store_timeout="2",
                          openai_base_url=openai.base_url) as first, \
            ServerProcess(tmp_path / "b", store=redis_server.url, store_timeout="2",
                          openai_base_url=openai.base_url) as second:
        yield first, second


async def hammer(targets, key, calls, method, **kwargs):
    """`calls` concurrent calls spread over `targets`; returns the outcome of each."""
    clients = [icegate.AsyncClient(t, key) for t in targets]
    try:
        async def one(index):
            client = clients[index % len(clients)]
            try:
                await getattr(client, method)(**kwargs)
                return "ok"
            except icegate.IcegateError as error:
                return error.reason or error.code.name
        return await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for client in clients:
            await client.close()


def test_rate_limit_is_exact_across_replicas(replicas):
    first, second = replicas
    with icegate.Client(first.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("shared", rate_limit_requests=25, rate_limit_window=3600)
        key = admin.create_api_key("shared").secret
    outcomes = asyncio.run(hammer([first.target, second.target], key, 80,
                                  "issue_turn_credentials", user_id="u"))
    assert outcomes.count("ok") == 25
    assert outcomes.count("RATE_LIMITED") == 55


def test_revocation_through_one_replica_is_seen_by_the_other(replicas):
    first, second = replicas
    with icegate.Client(first.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("acme")
        created = admin.create_api_key("acme")
        with icegate.Client(second.target, created.secret) as caller:
            caller.issue_turn_credentials("u")
            admin.revoke_api_key(created.api_key.key_id)
            with pytest.raises(icegate.AuthenticationError):
                caller.issue_turn_credentials("u")


def test_concurrent_session_limit_is_exact_across_replicas(replicas):
    first, second = replicas
    with icegate.Client(first.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("live", max_concurrent_sessions=6, rate_limit_requests=1000)
        admin.set_provider_key("live", "openai", OPENAI_KEY)
        key = admin.create_api_key("live").secret
    outcomes = asyncio.run(hammer([first.target, second.target], key, 30, "create_session",
                                  provider="openai"))
    assert outcomes.count("ok") == 6
    assert outcomes.count("CONCURRENT_LIMIT") == 24


def test_state_survives_a_restart_of_every_process(tmp_path, redis_server):
    with ServerProcess(tmp_path / "one", store=redis_server.url) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("durable", rate_limit_requests=3, rate_limit_window=3600)
        key = admin.create_api_key("durable").secret
        with icegate.Client(server.target, key) as caller:
            caller.issue_turn_credentials("u")
            caller.issue_turn_credentials("u")
    redis_server.restart()
    with ServerProcess(tmp_path / "two", store=redis_server.url) as server, \
            icegate.Client(server.target, key) as caller:
        caller.issue_turn_credentials("u")  # the third of three
        with pytest.raises(icegate.RateLimitedError):
            caller.issue_turn_credentials("u")


def test_sqlite_state_survives_a_restart(tmp_path):
    store = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    with ServerProcess(tmp_path / "one", store=store) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("durable", rate_limit_requests=2, rate_limit_window=3600)
        key = admin.create_api_key("durable").secret
        with icegate.Client(server.target, key) as caller:
            caller.issue_turn_credentials("u")
    with ServerProcess(tmp_path / "two", store=store) as server, \
            icegate.Client(server.target, key) as caller:
        caller.issue_turn_credentials("u")
        with pytest.raises(icegate.RateLimitedError):
            caller.issue_turn_credentials("u")


def test_redis_down_fails_fast_and_recovers(tmp_path, redis_server):
    with ServerProcess(tmp_path / "one", store=redis_server.url) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.issue_turn_credentials("u")
        redis_server.kill()
        started = time.monotonic()
        with pytest.raises(icegate.UnavailableError) as caught:
            admin.issue_turn_credentials("u", timeout=5)
        elapsed = time.monotonic() - started
        assert "store" in caught.value.message.lower()
        # 100 ms store timeout; the client retries UNAVAILABLE twice with backoff.
        assert elapsed < 1.5, elapsed
        redis_server.start()
        deadline = time.monotonic() + 5
        while True:
            try:
                admin.issue_turn_credentials("u")
                break
            except icegate.UnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_fail_open_admits_known_callers_while_redis_is_down(tmp_path, redis_server):
    with ServerProcess(tmp_path / "one", store=redis_server.url,
                       rate_limit_fail_open="true") as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("acme")
        key = admin.create_api_key("acme").secret
        stranger_key = admin.create_api_key("acme").secret
        with icegate.Client(server.target, key) as caller:
            caller.issue_turn_credentials("u")
            redis_server.pause()
            try:
                assert caller.issue_turn_credentials("u").username.endswith(":acme/u")
                with icegate.Client(server.target, stranger_key) as stranger, \
                        pytest.raises(icegate.UnavailableError):
                    stranger.issue_turn_credentials("u", timeout=5)
                with pytest.raises(icegate.UnavailableError):
                    admin.create_project("during-outage", timeout=5)
            finally:
                redis_server.resume()
