"""icegate.v1.CredentialService as a servicer: what its two RPCs answer, and what they refuse."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import duration_pb2

from icegate.v1 import credentials_pb2
from icegate_server.access import guard as call_guard
from icegate_server.access.control import CallContext
from icegate_server.access.keys import Caller
from icegate_server.clock import FrozenClock
from icegate_server.errors import InvalidFieldError
from icegate_server.projects.records import Project
from icegate_server.servicers.credential_service import CredentialServicer
from icegate_server.turn.credentials import TurnCredentialIssuer, TurnSecretKeyring

SIGNING = "signing-secret-0123456789"
PREVIOUS = "previous-secret-0123456789"
NOW = 1_700_000_000
MIN_TTL = 60
TURN_URIS = ("turn:turn.example.test:3478?transport=udp", "turns:turn.example.test:5349")
STUN_URIS = ("stun:stun.example.test:3478", "stun:stun2.example.test:3478")
# The project's own TTL policy, different from the server-wide defaults so the test sees it used.
PROJECT = Project(project_id="acme", turn_ttl_default_seconds=900, turn_ttl_max_seconds=7200)
CALL = CallContext(Caller(key_id="key-1", is_admin=False, project_id="acme"), PROJECT)

SERVICE = credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"]
ISSUE = SERVICE.methods_by_name["IssueTurnCredentials"]
ICE_SERVERS = SERVICE.methods_by_name["GetIceServers"]


def hmac_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def make_servicer(*, turn_uris=TURN_URIS, stun_uris=STUN_URIS) -> CredentialServicer:
    issuer = TurnCredentialIssuer(TurnSecretKeyring([SIGNING, PREVIOUS]), FrozenClock(NOW),
                                  turn_uris, min_ttl_seconds=MIN_TTL)
    return CredentialServicer(issuer, stun_uris)


async def as_admitted(coroutine_function, request, context) -> Any:
    # Stands in for CallGuard, which admits the call and sets its CallContext first.
    call_guard._current_call.set(CALL)
    return await coroutine_function(request, context)


class SyncCredentialServicer:
    """grpc_testing calls servicers synchronously: run each async method to completion."""

    def __init__(self, real: CredentialServicer) -> None:
        self._real = real

    def IssueTurnCredentials(self, request, context):
        return asyncio.run(as_admitted(self._real.IssueTurnCredentials, request, context))

    def GetIceServers(self, request, context):
        return asyncio.run(as_admitted(self._real.GetIceServers, request, context))


def call(method, request, servicer: CredentialServicer | None = None) -> Any:
    """Serves one call through grpc_testing; returns the response (the status must be OK)."""
    server = grpc_testing.server_from_dictionary(
        {SERVICE: SyncCredentialServicer(servicer or make_servicer())},
        grpc_testing.strict_real_time())
    rpc = server.invoke_unary_unary(method, (), request, None)
    response, _, code, details = rpc.termination()
    assert code is grpc.StatusCode.OK, details
    return response


def test_issue_turn_credentials_with_the_project_default_ttl():
    response = call(ISSUE, credentials_pb2.IssueTurnCredentialsRequest(user_id="alice"))

    expiry = NOW + PROJECT.turn_ttl_default_seconds
    assert response.username == f"{expiry}:acme/alice"
    assert response.password == hmac_password(SIGNING, response.username)
    assert response.password != hmac_password(PREVIOUS, response.username)
    assert response.ttl == duration_pb2.Duration(seconds=PROJECT.turn_ttl_default_seconds)
    assert response.expire_time.seconds == expiry
    assert list(response.uris) == list(TURN_URIS)


@pytest.mark.parametrize("ttl", [MIN_TTL, 600, PROJECT.turn_ttl_max_seconds])
def test_issue_turn_credentials_with_a_requested_ttl(ttl):
    request = credentials_pb2.IssueTurnCredentialsRequest(
        user_id="bob", ttl=duration_pb2.Duration(seconds=ttl))
    response = call(ISSUE, request)
    assert response.username == f"{NOW + ttl}:acme/bob"
    assert response.ttl.seconds == ttl
    assert response.expire_time.seconds == NOW + ttl
    assert response.password == hmac_password(SIGNING, response.username)


def test_ice_servers_list_stun_first_then_turn_with_credentials():
    request = credentials_pb2.GetIceServersRequest(
        user_id="carol", ttl=duration_pb2.Duration(seconds=120))
    response = call(ICE_SERVERS, request)

    stun, turn = response.ice_servers
    assert list(stun.urls) == list(STUN_URIS)
    assert stun.username == "" and stun.credential == ""
    assert list(turn.urls) == list(TURN_URIS)
    assert turn.username == f"{NOW + 120}:acme/carol"
    assert turn.credential == hmac_password(SIGNING, turn.username)
    assert response.expire_time.seconds == NOW + 120


def test_ice_servers_default_ttl():
    response = call(ICE_SERVERS, credentials_pb2.GetIceServersRequest(user_id="dave"))
    expiry = NOW + PROJECT.turn_ttl_default_seconds
    assert response.expire_time.seconds == expiry
    assert response.ice_servers[-1].username == f"{expiry}:acme/dave"


def test_ice_servers_without_stun_hold_only_turn():
    response = call(ICE_SERVERS, credentials_pb2.GetIceServersRequest(user_id="erin"),
                    make_servicer(stun_uris=()))
    (turn,) = response.ice_servers
    assert turn.username.endswith(":acme/erin")
    assert turn.credential == hmac_password(SIGNING, turn.username)


def test_ice_servers_without_turn_hold_only_stun_and_no_expiry():
    response = call(ICE_SERVERS, credentials_pb2.GetIceServersRequest(user_id="frank"),
                    make_servicer(turn_uris=()))
    (stun,) = response.ice_servers
    assert not stun.username and not stun.credential
    assert not response.HasField("expire_time")


INVALID_REQUESTS = [
    pytest.param("", None, "user_id", id="empty-user"),
    pytest.param("alice:admin", None, "user_id", id="separator"),
    pytest.param("alice\n", None, "user_id", id="control-character"),
    pytest.param("x" * 257, None, "user_id", id="user-too-long"),
    pytest.param("alice", duration_pb2.Duration(seconds=MIN_TTL - 1), "ttl",
                 id="ttl-below-minimum"),
    pytest.param("alice", duration_pb2.Duration(seconds=PROJECT.turn_ttl_max_seconds + 1), "ttl",
                 id="ttl-above-project-maximum"),
    pytest.param("alice", duration_pb2.Duration(seconds=0), "ttl", id="ttl-zero"),
    pytest.param("alice", duration_pb2.Duration(seconds=-600), "ttl", id="ttl-negative"),
    pytest.param("alice", duration_pb2.Duration(seconds=600, nanos=500_000_000), "ttl",
                 id="ttl-fractional"),
]


@pytest.mark.parametrize("method_name", ["IssueTurnCredentials", "GetIceServers"])
@pytest.mark.parametrize(("user_id", "ttl", "field"), INVALID_REQUESTS)
def test_invalid_input_raises_the_domain_error_naming_the_field(method_name, user_id, ttl,
                                                                field):
    request = getattr(credentials_pb2, f"{method_name}Request")(user_id=user_id)
    if ttl is not None:
        request.ttl.CopyFrom(ttl)
    method = getattr(make_servicer(), method_name)
    with pytest.raises(InvalidFieldError) as caught:
        asyncio.run(as_admitted(method, request, None))
    assert [v.field for v in caught.value.violations] == [field]
