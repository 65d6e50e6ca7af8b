"""Incoming calls: OpenAI's `realtime.call.incoming` webhook on `ICEGATE_WEBHOOK_LISTEN`.

The fake OpenAI rings a call and sends the delivery as OpenAI does (Standard Webhooks,
signed by hand in `fake_upstreams.openai_webhooks`); icegate verifies it, maps it to the
project whose secret signed it, and accepts the call with the project's policy session
under a quota unit and a lease, or rejects it. Hostile deliveries (replayed, stale, badly
signed, unknown secret, oversized, slow, wrong content type, garbage) are refused with their
status, and nothing of a body or a secret is logged.
"""

from __future__ import annotations

import http.client
import logging
import socket
import time
from collections.abc import Iterator

import pytest

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation
from fake_upstreams.openai_webhooks import (
    WebhookSender,
    incoming_call_event,
    new_webhook_secret,
)
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory
from icegate_server.clock import FrozenClock
from icegate_server.settings import ConfigError, Settings, load_settings

OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
READ_TIMEOUT = 1.0
POLICY = {"instructions": "Answer the phone for the tea shop.",
          "allowed_models": ["gpt-realtime-mini"], "default_model": "gpt-realtime-mini"}


@pytest.fixture
def emulation() -> OpenAIEmulation:
    return OpenAIEmulation(OPENAI_KEY)


@pytest.fixture
def openai(emulation: OpenAIEmulation) -> Iterator[FakeUpstream]:
    with FakeUpstream(emulation) as fake:
        yield fake


@pytest.fixture
def server(server_factory: ServerFactory, store_url: str, openai: FakeUpstream) -> RunningServer:
    # The clock reads the real time: Standard Webhooks timestamps are real times.
    return server_factory(FrozenClock(float(int(time.time()))), store=store_url,
                          openai_base_url=openai.base_url, session_lease_seconds=600,
                          webhook_listen="127.0.0.1:0", http_read_timeout=READ_TIMEOUT)


@pytest.fixture
def secret() -> str:
    return new_webhook_secret()


@pytest.fixture
def admin(server: RunningServer, secret: str) -> Iterator[icegate.Client]:
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
        client.set_provider_key("default", "openai_webhook", secret)
        yield client


@pytest.fixture
def sender(server: RunningServer, secret: str, admin: icegate.Client) -> WebhookSender:
    assert server.server.webhook_port is not None
    return WebhookSender(server.server.webhook_port, secret)


def counts(admin: icegate.Client, project: str = "default") -> tuple[int, int]:
    sessions = admin.get_usage(project).sessions
    return sessions.used_this_month, sessions.active


def wait_for_hangup(emulation: OpenAIEmulation, call_id: str) -> bool:
    """Whether `call_id` is hung up within 5 s (the reaper runs every second)."""
    deadline = time.monotonic() + 5
    while call_id not in emulation.hung_up and time.monotonic() < deadline:
        time.sleep(0.05)
    return call_id in emulation.hung_up


def test_a_signed_call_is_accepted_with_the_policy_session_and_counted(
        server, admin, sender, emulation, openai):
    admin.set_session_policy("default", "openai", POLICY)
    call_id = emulation.ring()
    assert sender.ring(call_id).status == 200
    ((accepted, session),) = emulation.accepted
    assert accepted == call_id
    assert session["instructions"] == POLICY["instructions"]
    assert session["model"] == "gpt-realtime-mini"
    (accept,) = openai.requests_to(f"/v1/realtime/calls/{call_id}/accept")
    assert accept.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert counts(admin) == (1, 1)
    # Its session ends when its lease does (nobody keeps it alive): the call is hung up.
    server.clock.advance(601)
    assert wait_for_hangup(emulation, call_id)
    assert counts(admin) == (1, 0)


def test_the_call_goes_to_the_project_whose_secret_signed_it(server, admin, sender, emulation):
    other_secret = new_webhook_secret()
    admin.create_project("tea-shop")
    admin.set_provider_key("tea-shop", "openai", OPENAI_KEY)
    admin.set_provider_key("tea-shop", "openai_webhook", other_secret)
    call_id = emulation.ring()
    assert sender.ring(call_id, secret=other_secret).status == 200
    assert [c for c, _ in emulation.accepted] == [call_id]
    assert counts(admin, "tea-shop") == (1, 1)
    assert counts(admin) == (0, 0)


def test_a_call_over_the_concurrent_limit_is_rejected_busy(server, admin, sender, emulation):
    admin.update_project("default", max_concurrent_sessions=1)
    first, second = emulation.ring(), emulation.ring()
    assert sender.ring(first).status == 200
    assert sender.ring(second).status == 200
    assert [c for c, _ in emulation.accepted] == [first]
    assert emulation.rejected == [(second, 486)]
    assert counts(admin) == (1, 1)  # the rejected call took nothing


def test_a_call_over_the_monthly_quota_is_rejected_and_takes_nothing(
        server, admin, sender, emulation):
    admin.update_project("default", monthly_session_quota=1, max_concurrent_sessions=5)
    first, second = emulation.ring(), emulation.ring()
    assert sender.ring(first).status == 200
    assert sender.ring(second).status == 200  # one slot of five held: the quota refuses
    assert emulation.rejected == [(second, 486)]
    assert counts(admin) == (1, 1)


def test_a_failed_accept_gives_back_the_unit_and_the_slot(server, admin, sender, emulation):
    call_id = "rtc_never_rang"  # the fake answers 404 to its accept
    assert sender.ring(call_id).status == 502
    assert emulation.accepted == []
    assert counts(admin) == (0, 0)


def test_a_replayed_delivery_is_refused(server, admin, sender, emulation):
    call_id = emulation.ring()
    body = incoming_call_event(call_id)
    headers = sender.headers(body, delivery_id="wh_replayed_1")
    assert sender.post(body, headers).status == 200
    assert sender.post(body, headers).status == 409
    assert [c for c, _ in emulation.accepted] == [call_id]
    assert counts(admin) == (1, 1)


def test_a_stale_or_future_timestamp_is_refused(server, admin, sender, emulation, openai):
    call_id = emulation.ring()
    now = int(time.time())
    assert sender.ring(call_id, timestamp=now - 600).status == 401
    assert sender.ring(call_id, timestamp=now + 600).status == 401
    assert openai.requests == []
    assert counts(admin) == (0, 0)


def test_a_bad_signature_or_an_unknown_secret_is_refused(server, admin, sender, emulation,
                                                         openai):
    call_id = emulation.ring()
    body = incoming_call_event(call_id)
    tampered = incoming_call_event("rtc_someone_else")
    assert sender.post(tampered, sender.headers(body)).status == 401
    assert sender.ring(call_id, secret=new_webhook_secret()).status == 401
    headers = sender.headers(body)
    headers["webhook-signature"] = "v1,bm90IGEgc2lnbmF0dXJl"
    assert sender.post(body, headers).status == 401
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        headers = sender.headers(body)
        del headers[missing]
        assert sender.post(body, headers).status == 401
    assert openai.requests == []
    # The genuine delivery still gets through afterwards.
    assert sender.ring(call_id).status == 200


def test_a_deleted_secret_signs_no_more_calls(server, admin, sender, emulation, openai):
    assert [k.provider for k in admin.list_provider_keys("default")] == \
        ["openai", "openai_webhook"]
    admin.delete_provider_key("default", "openai_webhook")
    assert sender.ring(emulation.ring()).status == 401
    assert openai.requests == []


@pytest.mark.parametrize("secret_value", ["", "whsec_", "whsec_c2hvcnQ=", "not-a-secret-at-all",
                                          "whsec_!!!!!!!!!!!!!!!!!!!!!!!!!!!!"])
def test_a_webhook_secret_that_is_not_one_is_refused(server, admin, secret_value):
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        admin.set_provider_key("default", "openai_webhook", secret_value)
    assert [v.field for v in caught.value.field_violations] == ["api_key"]
    sent = secret_value.removeprefix("whsec_")
    assert not sent or sent not in str(caught.value)  # never echoed


def test_hostile_requests_are_refused_with_their_status(server, admin, sender, emulation,
                                                        openai):
    call_id = emulation.ring()
    body = incoming_call_event(call_id)
    # Oversized (declared, then streamed without a length).
    big = b'{"x": "' + b"a" * (128 * 1024) + b'"}'
    assert sender.post(big, sender.headers(big)).status == 413
    assert chunked_post(sender, big, sender.headers(big)) == 413
    # Wrong content type, wrong path, wrong method.
    headers = sender.headers(body)
    headers["content-type"] = "text/plain"
    assert sender.post(body, headers).status == 415
    assert sender.post(body, sender.headers(body), path="/webhooks/other").status == 404
    assert sender.post(b"", {}, method="GET").status == 405
    # Garbage, correctly signed: the signature passes, the body does not.
    for garbage in (b"not json", b"[1, 2]", b'{"type": "realtime.call.incoming"}',
                    b'{"type": "realtime.call.incoming", "data": {"call_id": "../../x"}}'):
        assert sender.post(garbage, sender.headers(garbage)).status == 400
    # Another event type, signed: acknowledged, nothing done.
    other = b'{"type": "response.completed", "data": {}}'
    assert sender.post(other, sender.headers(other)).status == 200
    assert openai.requests == []
    assert sender.ring(call_id).status == 200  # still serving


def chunked_post(sender: WebhookSender, body: bytes, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", sender.port, timeout=30)
    try:
        connection.putrequest("POST", sender.path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("transfer-encoding", "chunked")
        connection.endheaders()
        try:
            for start in range(0, len(body), 8192):
                chunk = body[start:start + 8192]
                connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            connection.send(b"0\r\n\r\n")
        except OSError:
            pass  # answered and closed before the whole body went
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_slow_client_is_hung_up_on_and_others_are_served(server, admin, sender, emulation):
    with socket.create_connection(("127.0.0.1", sender.port), timeout=10) as slow:
        slow.sendall(b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\n")
        assert sender.ring(emulation.ring()).status == 200  # meanwhile
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < READ_TIMEOUT * 10:
            try:
                slow.sendall(b"x")
                if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.05)
        assert closed


def test_nothing_of_a_body_or_a_secret_is_logged(server, admin, sender, emulation, secret,
                                                 caplog):
    call_id = emulation.ring()
    body = incoming_call_event(call_id, event_id="evt_SECRET_BODY_MARK")
    with caplog.at_level(logging.INFO, logger="icegate_server"):
        headers = sender.headers(body, delivery_id="wh_logged_1")
        assert sender.post(body, headers).status == 200
        assert sender.post(body, headers).status == 409
        assert sender.post(body, sender.headers(body, secret=new_webhook_secret())).status \
            == 401
        garbage = b'{"type": "realtime.call.incoming", "SECRET_BODY_MARK": 1}'
        assert sender.post(garbage, sender.headers(garbage)).status == 400
        admin.update_project("default", max_concurrent_sessions=1)
        assert sender.ring(emulation.ring()).status == 200  # rejected
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "wh_logged_1" in logged and "replayed" in logged and "rejected" in logged
    for forbidden in ("SECRET_BODY_MARK", "sip.example.test", secret,
                      secret.removeprefix("whsec_"), OPENAI_KEY):
        assert forbidden not in logged


def test_the_listener_is_off_by_default(server_factory, tmp_path):
    assert Settings().webhook_listen == ""
    assert server_factory(webhook_listen="").server.webhook_port is None


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999"])
def test_a_bad_webhook_listen_stops_the_server_at_start(listen):
    with pytest.raises(ConfigError, match="ICEGATE_WEBHOOK_LISTEN"):
        load_settings([], {"ICEGATE_WEBHOOK_LISTEN": listen})


def test_the_webhook_port_must_be_its_own():
    with pytest.raises(ConfigError, match="ICEGATE_WEBHOOK_LISTEN"):
        load_settings([], {"ICEGATE_WEBHOOK_LISTEN": "127.0.0.1:50051",
                           "ICEGATE_LISTEN": "127.0.0.1:50051"})


def test_a_project_without_an_openai_key_fails_the_delivery_and_keeps_nothing(
        server, admin, sender, emulation, openai):
    admin.delete_provider_key("default", "openai")
    assert sender.ring(emulation.ring()).status == 502
    assert openai.requests == []
    assert counts(admin) == (0, 0)


@pytest.mark.redis
def test_a_store_that_stalls_fails_the_delivery_and_the_next_one_is_served(
        server_factory, redis_server, openai, emulation, secret):
    server = server_factory(FrozenClock(float(int(time.time()))), store=redis_server.url,
                            openai_base_url=openai.base_url, webhook_listen="127.0.0.1:0")
    with icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.set_provider_key("default", "openai", OPENAI_KEY)
        client.set_provider_key("default", "openai_webhook", secret)
        assert server.server.webhook_port is not None
        sender = WebhookSender(server.server.webhook_port, secret)
        redis_server.pause()
        try:
            assert sender.ring(emulation.ring()).status == 502
        finally:
            redis_server.resume()
        assert openai.requests == []
        call_id = emulation.ring()
        assert sender.ring(call_id).status == 200
        assert [c for c, _ in emulation.accepted] == [call_id]
        assert counts(client) == (1, 1)
