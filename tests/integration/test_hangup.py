"""Ending what was opened: EndSession hangs up the provider call CreateCall started."""

from __future__ import annotations

import logging

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
    return server_factory(store=store_url, openai_base_url=openai.base_url)


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
