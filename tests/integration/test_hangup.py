"""Ending what was opened: EndSession hangs up the provider call CreateCall started."""

from __future__ import annotations

import logging
import time

import pytest

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation, openai_error
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory

OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
OFFER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


@pytest.fixture
def emulation():
    return OpenAIEmulation(OPENAI_KEY)


@pytest.fixture
def openai(emulation):
    with FakeUpstream(emulation) as fake:
        yield fake


@pytest.fixture
def server(server_factory: ServerFactory, store_url: str, openai) -> RunningServer:
    return server_factory(store=store_url, openai_base_url=openai.base_url,
                          session_lease_seconds=600)


def wait_for_hangup(emulation: OpenAIEmulation, call_id: str) -> bool:
    """Whether `call_id` is hung up within 5 s (the reaper runs every second)."""
    deadline = time.monotonic() + 5
    while call_id not in emulation.hung_up and time.monotonic() < deadline:
        time.sleep(0.05)
    return call_id in emulation.hung_up


@pytest.fixture
def admin(server):
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
        yield client


def test_ending_a_call_session_hangs_the_call_up(server, admin, openai, emulation):
    started = admin.create_call(OFFER, "openai")
    admin.end_session(started.session_id)
    (hangup,) = openai.requests_to(f"/v1/realtime/calls/{started.call_id}/hangup")
    assert hangup.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert emulation.hung_up == [started.call_id]
    with pytest.raises(icegate.NotFoundError):
        admin.end_session(started.session_id)
    assert emulation.hung_up == [started.call_id]  # once


def test_a_session_without_a_call_hangs_nothing_up(server, admin, openai):
    created = admin.create_session("openai")
    admin.end_session(created.session_id)
    assert [r.path for r in openai.requests] == ["/v1/realtime/client_secrets"]


def test_a_failed_hangup_still_ends_the_session_and_logs_no_key(server, admin, openai, caplog):
    started = admin.create_call(OFFER, "openai")
    openai.enqueue(openai_error(404, f"No call for key {OPENAI_KEY}"))
    with caplog.at_level(logging.WARNING, logger="icegate_server"):
        admin.end_session(started.session_id)
    assert admin.get_usage().sessions.active == 0
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert started.call_id in logged and "not hung up" in logged
    assert OPENAI_KEY not in logged


def test_a_call_whose_lease_expires_is_hung_up(server, admin, emulation):
    kept = admin.create_call(OFFER, "openai")
    expiring = admin.create_call(OFFER, "openai")
    server.clock.advance(500)
    admin.keep_alive_session(kept.session_id)
    server.clock.advance(101)  # `expiring` was not kept alive
    assert wait_for_hangup(emulation, expiring.call_id)
    assert kept.call_id not in emulation.hung_up
    with pytest.raises(icegate.NotFoundError):
        admin.end_session(expiring.session_id)
    assert emulation.hung_up.count(expiring.call_id) == 1


def test_a_call_at_its_policys_maximum_duration_is_hung_up(server, admin, emulation):
    admin.set_session_policy("default", "openai", {"max_session_duration": "300s"})
    started = admin.create_call(OFFER, "openai")
    assert started.lease_expire_time.seconds == int(server.clock.now()) + 300
    server.clock.advance(200)
    admin.keep_alive_session(started.session_id)  # cannot reach past the 300 s
    server.clock.advance(100)
    assert wait_for_hangup(emulation, started.call_id)
