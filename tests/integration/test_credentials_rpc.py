"""CredentialService through a real server, driven by the real sync and async clients over
each transport (the `transport` fixture: gRPC, then Connect)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET
from harness.raw_connect import connect_status
from icegate.v1 import credentials_pb2, credentials_pb2_grpc


def expected_password(username: str, secret: str = TEST_TURN_SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
                            ).decode()


@pytest.fixture
def client(transport, icegate_server):
    with icegate.Client(icegate_server.target, TEST_ADMIN_KEY) as client:
        yield client


def test_issue_turn_credentials_signs_expiry_and_user(icegate_server, client):
    now = int(icegate_server.clock.now())
    credential = client.issue_turn_credentials("alice", ttl=600)
    assert credential.username == f"{now + 600}:default/alice"
    assert credential.password == expected_password(credential.username)
    assert credential.ttl.seconds == 600
    assert credential.expire_time.seconds == now + 600
    assert list(credential.uris) == list(icegate_server.settings.turn_uris)


def test_default_ttl_is_one_hour(icegate_server, client):
    credential = client.issue_turn_credentials("bob")
    assert credential.ttl.seconds == 3600
    assert credential.username == f"{int(icegate_server.clock.now()) + 3600}:default/bob"


def test_ttl_accepts_a_timedelta(client):
    assert client.issue_turn_credentials("carol", ttl=timedelta(minutes=5)).ttl.seconds == 300


def test_ice_servers_are_browser_ready(icegate_server, client):
    response = client.get_ice_servers("alice", ttl=120)
    servers = icegate.rtc_ice_servers(response.ice_servers)
    assert servers[0] == {"urls": ["stun:127.0.0.1:3478"]}
    turn = servers[1]
    assert turn["urls"] == list(icegate_server.settings.turn_uris)
    assert turn["username"] == f"{int(icegate_server.clock.now()) + 120}:default/alice"
    assert turn["credential"] == expected_password(turn["username"])
    assert response.expire_time.seconds == int(icegate_server.clock.now()) + 120


@pytest.mark.parametrize(
    ("user_id", "ttl", "field"),
    [
        ("", None, "user_id"),
        ("a:b", None, "user_id"),
        ("line\nbreak", None, "user_id"),
        ("x" * 257, None, "user_id"),
        ("alice", 59, "ttl"),
        ("alice", 86401, "ttl"),
        ("alice", 90.5, "ttl"),
        ("alice", -5, "ttl"),
    ],
)
def test_bad_fields_are_invalid_argument_naming_the_field(client, user_id, ttl, field):
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        client.issue_turn_credentials(user_id, ttl=ttl)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_FIELD"
    assert [v.field for v in caught.value.field_violations] == [field]


@pytest.mark.parametrize("key", [None, "igk_wrong_key_0123456789abcdef"])
def test_missing_or_wrong_key_is_unauthenticated(transport, icegate_server, key, monkeypatch,
                                                 tmp_path):
    monkeypatch.delenv("ICEGATE_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .icegate/dev-secrets.json to fall back on
    with icegate.Client(icegate_server.target, key) as client:
        if key is None:
            with pytest.raises(icegate.ConfigurationError):
                client.issue_turn_credentials("alice")
        else:
            with pytest.raises(icegate.AuthenticationError) as caught:
                client.issue_turn_credentials("alice")
            assert caught.value.reason == "INVALID_API_KEY"
            assert key not in str(caught.value)


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {TEST_ADMIN_KEY}"),
         ("authorization", f"Bearer {TEST_ADMIN_KEY}")),
    ],
    ids=["none", "basic-scheme", "empty-bearer", "repeated"],
)
def test_malformed_authorization_is_unauthenticated(transport, icegate_server, metadata):
    if transport == "connect":
        status = connect_status(icegate_server.http_url,
                                credentials_pb2.IssueTurnCredentialsRequest(user_id="a"), metadata)
        assert status is grpc.StatusCode.UNAUTHENTICATED
        return
    with grpc.insecure_channel(icegate_server.grpc_target) as channel:
        stub = credentials_pb2_grpc.CredentialServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.IssueTurnCredentials(credentials_pb2.IssueTurnCredentialsRequest(user_id="a"),
                                      metadata=metadata, timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_key(icegate_server):
    with grpc.insecure_channel(icegate_server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "icegate.v1.CredentialService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"icegate.v1.CredentialService", "grpc.health.v1.Health"} <= names


def test_reflection_reveals_no_secret(icegate_server):
    with grpc.insecure_channel(icegate_server.grpc_target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflection.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
            for name in ("icegate.v1.CredentialService", "grpc.health.v1.Health")
        ]), timeout=5))
    blob = b"".join(a.SerializeToString() for a in answers)
    assert TEST_TURN_SECRET.encode() not in blob
    assert TEST_ADMIN_KEY.encode() not in blob


def test_client_health_reports_serving(client):
    assert client.health() == "SERVING"


def test_health_turns_not_serving_on_shutdown(icegate_server, client):
    icegate_server.run(icegate_server.server.health.enter_graceful_shutdown())
    assert client.health() == "NOT_SERVING"


def test_async_client_twin(transport, icegate_server):
    async def scenario():
        async with icegate.AsyncClient(icegate_server.target, TEST_ADMIN_KEY) as client:
            credential = await client.issue_turn_credentials("dave", ttl=300)
            servers = await client.get_ice_servers("dave")
            assert await client.health() == "SERVING"
            with pytest.raises(icegate.InvalidArgumentError):
                await client.get_ice_servers("da:ve")
            return credential, servers

    credential, servers = asyncio.run(scenario())
    assert credential.username == f"{int(icegate_server.clock.now()) + 300}:default/dave"
    assert credential.password == expected_password(credential.username)
    assert servers.ice_servers[1].username.endswith(":default/dave")


def test_async_client_raises_typed_unauthenticated(transport, icegate_server):
    async def scenario():
        async with icegate.AsyncClient(icegate_server.target, "igk_not_a_key_000000000") as c:
            await c.issue_turn_credentials("alice")

    with pytest.raises(icegate.AuthenticationError):
        asyncio.run(scenario())


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_unreachable_server_is_unavailable(free_port_unused, scheme):
    with icegate.Client(f"{scheme}127.0.0.1:{free_port_unused}", TEST_ADMIN_KEY,
                        default_timeout=2) as client, pytest.raises(
            (icegate.UnavailableError, icegate.DeadlineExceededError)):
        client.issue_turn_credentials("alice")


def test_rotation_signs_with_the_first_secret(tmp_path):
    from harness.icegate_server import RunningServer, server_settings

    new_secret = "rotated-secret-abcdefghijklmnop"
    settings = server_settings(tmp_path, turn_secrets=(new_secret, TEST_TURN_SECRET))
    with RunningServer(settings) as server, icegate.Client(server.target, TEST_ADMIN_KEY) as c:
        credential = c.issue_turn_credentials("erin")
    assert credential.password == expected_password(credential.username, new_secret)
    assert credential.password != expected_password(credential.username, TEST_TURN_SECRET)
