"""The sync client against a scripted server: what it sends, and what each answer raises."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2

import icegate
from icegate.connection import DEFAULT_TIMEOUT
from icegate.v1 import credentials_pb2
from icegate_server import errors as server_errors
from icegate_server import status as server_status

API_KEY = "igk_test_client_key_0123456789"
CREDENTIALS = credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"]
ISSUE = CREDENTIALS.methods_by_name["IssueTurnCredentials"]
ICE_SERVERS = CREDENTIALS.methods_by_name["GetIceServers"]
HEALTH_CHECK = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
RESET_AT = datetime(2030, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


class DeadlineRecordingChannel(grpc.Channel):
    """The scripted channel, remembering the timeout of each call (grpc_testing drops it)."""

    def __init__(self, inner: grpc.Channel) -> None:
        self.inner = inner
        self.timeouts: list[float | None] = []

    def unary_unary(self, method, request_serializer=None, response_deserializer=None,
                    _registered_method=False):
        call = self.inner.unary_unary(method, request_serializer, response_deserializer,
                                      _registered_method)
        timeouts = self.timeouts

        def invoke(request, timeout=None, metadata=None, **options):
            timeouts.append(timeout)
            return call(request, timeout=timeout, metadata=metadata, **options)

        return invoke

    def unary_stream(self, *args, **kwargs):
        return self.inner.unary_stream(*args, **kwargs)

    def stream_unary(self, *args, **kwargs):
        return self.inner.stream_unary(*args, **kwargs)

    def stream_stream(self, *args, **kwargs):
        return self.inner.stream_stream(*args, **kwargs)

    def subscribe(self, callback, try_to_connect=False):
        self.inner.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        self.inner.unsubscribe(callback)

    def close(self):
        self.inner.close()


@dataclass
class Outcome:
    """What one scripted call did: its result or the exception it raised, and what it sent."""

    result: Any = None
    error: BaseException | None = None
    sent: dict[str, list[str]] = field(default_factory=dict)
    request: Any = None


class ScriptedServer:
    """A grpc_testing channel the client calls over; each test answers the calls it makes."""

    def __init__(self) -> None:
        self.channel = grpc_testing.channel(
            [CREDENTIALS, health_pb2.DESCRIPTOR.services_by_name["Health"]],
            grpc_testing.strict_real_time())
        self.recording = DeadlineRecordingChannel(self.channel)

    @property
    def timeouts(self) -> list[float | None]:
        return self.recording.timeouts

    def client(self, **options: Any) -> icegate.Client:
        options.setdefault("api_key", API_KEY)
        return icegate.Client(channel=self.recording, **options)

    def answer(self, call: Callable[[], Any], method, *, response: Any = None,
               code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "",
               trailing_metadata: tuple = ()) -> Outcome:
        """Makes `call` while a server thread answers the RPC it sends."""
        outcome = Outcome()

        def serve() -> None:
            metadata, outcome.request, rpc = self.channel.take_unary_unary(method)
            for key, value in metadata:
                outcome.sent.setdefault(key, []).append(value)
            rpc.terminate(response, trailing_metadata, code, details)

        # A daemon: if the client fails before calling, nothing waits for this thread.
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            outcome.result = call()
        except icegate.IcegateError as error:
            outcome.error = error
        server.join(timeout=5)
        return outcome

    def fail_with(self, call: Callable[[], Any], error: server_errors.IcegateError):
        """Answers the call the way icegate's server answers `error`; returns what it raised."""
        answer = server_status.to_grpc_status(error)
        return self.answer(call, ISSUE, code=answer.code, details=answer.details,
                           trailing_metadata=answer.trailing_metadata).error


@pytest.fixture
def server():
    return ScriptedServer()


def test_issue_turn_credentials_sends_key_fields_and_deadline(server):
    client = server.client()
    reply = credentials_pb2.IssueTurnCredentialsResponse(
        username="1700000600:alice", password="c2lnbmVk", ttl=duration_pb2.Duration(seconds=600),
        expire_time=timestamp_pb2.Timestamp(seconds=1_700_000_600),
        uris=["turn:turn.example.test:3478?transport=udp"])

    outcome = server.answer(
        lambda: client.issue_turn_credentials("alice", ttl=600, project_id="proj_1",
                                              metadata=[("x-request-id", "req-1")]),
        ISSUE, response=reply)

    assert outcome.error is None
    assert outcome.result == reply
    assert outcome.sent["authorization"] == [f"Bearer {API_KEY}"]
    assert outcome.sent["x-request-id"] == ["req-1"]
    assert outcome.request.user_id == "alice"
    assert outcome.request.project_id == "proj_1"
    assert outcome.request.ttl == duration_pb2.Duration(seconds=600)
    assert server.timeouts == [DEFAULT_TIMEOUT]


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (timedelta(minutes=10), duration_pb2.Duration(seconds=600)),
        (90.5, duration_pb2.Duration(seconds=90, nanos=500_000_000)),
        (86400, duration_pb2.Duration(seconds=86400)),
    ],
)
def test_ttl_is_sent_as_a_duration(server, ttl, expected):
    client = server.client()
    outcome = server.answer(lambda: client.get_ice_servers("bob", ttl=ttl), ICE_SERVERS,
                            response=credentials_pb2.GetIceServersResponse())
    assert outcome.request.user_id == "bob"
    assert outcome.request.ttl == expected
    assert outcome.sent["authorization"] == [f"Bearer {API_KEY}"]


def test_no_ttl_leaves_the_field_unset_for_the_server_default(server):
    client = server.client()
    outcome = server.answer(lambda: client.issue_turn_credentials("carol"), ISSUE,
                            response=credentials_pb2.IssueTurnCredentialsResponse())
    assert not outcome.request.HasField("ttl")


def test_timeouts_client_default_then_per_call(server):
    client = server.client(default_timeout=3.0)
    for timeout in (None, 0.75):
        server.answer(lambda t=timeout: client.issue_turn_credentials("dave", timeout=t), ISSUE,
                      response=credentials_pb2.IssueTurnCredentialsResponse())
    assert server.timeouts == [3.0, 0.75]


def test_health_sends_no_key(server):
    client = server.client()
    outcome = server.answer(
        client.health, HEALTH_CHECK,
        response=health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))
    assert outcome.result == "SERVING"
    assert "authorization" not in outcome.sent
    assert server.timeouts == [DEFAULT_TIMEOUT]


def test_missing_key_fails_before_calling(server, monkeypatch, tmp_path):
    monkeypatch.delenv("ICEGATE_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .icegate/dev-secrets.json to fall back on
    client = icegate.Client(channel=server.recording)
    with pytest.raises(icegate.ConfigurationError):
        client.issue_turn_credentials("erin")
    assert server.timeouts == []


def test_unauthenticated_raises_authentication_error(server):
    client = server.client()
    raised = server.fail_with(lambda: client.issue_turn_credentials("frank"),
                              server_errors.InvalidApiKeyError("unknown API key"))
    assert type(raised) is icegate.AuthenticationError
    assert raised.code is grpc.StatusCode.UNAUTHENTICATED
    assert raised.reason == "INVALID_API_KEY"
    assert raised.message == "unknown API key"
    assert API_KEY not in str(raised)


def test_rate_limited_raises_with_reset_time_and_retry_delay(server):
    client = server.client()
    raised = server.fail_with(
        lambda: client.issue_turn_credentials("grace"),
        server_errors.RateLimitedError(limit=100, window_seconds=900, reset_at=RESET_AT,
                                       retry_after_seconds=12.0))
    assert type(raised) is icegate.RateLimitedError
    assert isinstance(raised, icegate.ResourceExhaustedError)
    assert raised.reset_at == RESET_AT
    assert raised.retry_after == timedelta(seconds=12)
    assert raised.limit == 100


def test_invalid_field_raises_with_field_violations(server):
    client = server.client()
    raised = server.fail_with(lambda: client.issue_turn_credentials("a:b"),
                              server_errors.InvalidFieldError("user_id", "must not contain ':'"))
    assert type(raised) is icegate.InvalidArgumentError
    assert raised.field_violations == (icegate.FieldViolation("user_id", "must not contain ':'"),)


def test_unavailable_raises_unavailable_error(server):
    client = server.client()
    raised = server.answer(lambda: client.issue_turn_credentials("heidi"), ISSUE,
                           code=grpc.StatusCode.UNAVAILABLE, details="connection refused").error
    assert type(raised) is icegate.UnavailableError
    assert raised.message == "connection refused"
    assert raised.retry_after is None


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, icegate.AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, icegate.PermissionDeniedError),
        (grpc.StatusCode.INVALID_ARGUMENT, icegate.InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, icegate.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, icegate.NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, icegate.AlreadyExistsError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, icegate.ResourceExhaustedError),
        (grpc.StatusCode.FAILED_PRECONDITION, icegate.FailedPreconditionError),
        (grpc.StatusCode.UNAVAILABLE, icegate.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, icegate.DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, icegate.CancelledError),
        (grpc.StatusCode.INTERNAL, icegate.InternalError),
        (grpc.StatusCode.UNKNOWN, icegate.InternalError),
        (grpc.StatusCode.UNIMPLEMENTED, icegate.InternalError),
        (grpc.StatusCode.DATA_LOSS, icegate.InternalError),
    ],
    ids=lambda value: getattr(value, "name", None) or value.__name__,
)
def test_status_without_details_is_classified_by_code(server, code, expected):
    client = server.client()
    raised = server.answer(lambda: client.issue_turn_credentials("ivan"), ISSUE,
                           code=code, details="plain status").error
    assert type(raised) is expected
    assert raised.code is code
    assert raised.reason == ""
    assert raised.message == "plain status"
    assert not isinstance(raised, grpc.RpcError)  # callers catch icegate's errors only
