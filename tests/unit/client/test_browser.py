"""icegate.browser: what a backend hands its browser, and the HTTP answer for every error.

Errors are made the way a backend meets them: the server's domain error, through the
server's status table, read back by the client's one conversion (`from_rpc_error`).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from test_public_api import public_error_classes

import icegate
from icegate.errors import from_rpc_error
from icegate.ice import iso_timestamp
from icegate.v1 import credentials_pb2, sessions_pb2
from icegate_server import errors as server
from icegate_server import status as server_status

NOW = datetime(2026, 12, 6, 8, 4, 55, 299_000_064 // 1000, tzinfo=timezone.utc)
STUN = credentials_pb2.IceServer(urls=["stun:turn.example.test:3478"])
TURN = credentials_pb2.IceServer(urls=["turn:turn.example.test:3478?transport=udp",
                                       "turns:turn.example.test:5349?transport=tcp"],
                                 username="1767000000:default/alice", credential="c2VjcmV0")
ORGA = credentials_pb2.IceServer(urls=["turn:relay.orga.test:443"], username="orga-user",
                                 credential="orga-pass")


class _Failed(grpc.RpcError):
    """A failed call as gRPC hands it to the client."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._status.details  # type: ignore[no-any-return]

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


def received(error: server.IcegateError) -> icegate.IcegateError:
    """The client's exception for the server's `error`."""
    return from_rpc_error(_Failed(server_status.to_grpc_status(error)))


def bare(cls: type[icegate.IcegateError], code: grpc.StatusCode) -> icegate.IcegateError:
    return cls("something failed", code=code)


RESET = datetime(2030, 5, 6, 7, 8, 9, 123_456, tzinfo=timezone.utc)
UPSTREAM = {"provider": "openai", "upstream_status": 401, "upstream_request_id": "req_1"}

ERRORS: dict[type[icegate.IcegateError], tuple[icegate.IcegateError, int, str]] = {
    icegate.InvalidArgumentError: (
        received(server.InvalidFieldError("voice", "unknown voice")), 400, "invalid_argument"),
    icegate.SessionPolicyError: (
        received(server.SessionPolicyError("model", "not allowed")), 403, "session_policy"),
    icegate.TurnCredentialsRevokedError: (
        received(server.TurnCredentialsRevokedError(subject="alice", revoked_until=RESET)),
        403, "turn_credentials_revoked"),
    icegate.NotFoundError: (received(server.NotFoundError("no such session")), 404,
                            "session_not_found"),
    icegate.QuotaExceededError: (received(server.QuotaExceededError(
        plan="free", included=10, used=10, upgrade_url="https://billing.test/up",
        resets_at=RESET)), 402, "quota_exceeded"),
    icegate.TurnByteQuotaExceededError: (received(server.TurnByteQuotaExceededError(
        plan="free", used=2_000, quota=1_000, upgrade_url="https://billing.test/up",
        resets_at=RESET)), 402, "turn_byte_quota_exceeded"),
    icegate.RateLimitedError: (received(server.RateLimitedError(
        limit=100, window_seconds=900, reset_at=RESET, retry_after_seconds=41.2)),
        429, "rate_limited"),
    icegate.ConcurrentLimitError: (received(server.ConcurrentLimitError(current=5, maximum=5)),
                                   429, "concurrent_limit_exceeded"),
    icegate.TurnAllocationLimitError: (
        received(server.TurnAllocationLimitError(current=7, maximum=7)), 429,
        "turn_allocation_limit_exceeded"),
    icegate.UnavailableError: (received(server.StoreUnavailableError("store down")), 503,
                               "temporarily_unavailable"),
    icegate.UpstreamUnavailableError: (received(server.UpstreamUnavailableError(
        "provider down", retry_after_seconds=3, **UPSTREAM)), 503, "temporarily_unavailable"),
    icegate.CoturnCliUnavailableError: (received(server.CoturnCliUnavailableError("cli down")),
                                        503, "temporarily_unavailable"),
    icegate.DeadlineExceededError: (bare(icegate.DeadlineExceededError,
                                         grpc.StatusCode.DEADLINE_EXCEEDED),
                                    503, "temporarily_unavailable"),
    icegate.UpstreamTimeoutError: (received(server.UpstreamTimeoutError("slow", **UPSTREAM)),
                                   503, "temporarily_unavailable"),
    icegate.CancelledError: (bare(icegate.CancelledError, grpc.StatusCode.CANCELLED), 503,
                             "temporarily_unavailable"),
    icegate.IcegateError: (bare(icegate.IcegateError, grpc.StatusCode.UNKNOWN), 502,
                           "session_unavailable"),
    icegate.AuthenticationError: (received(server.InvalidApiKeyError("unknown API key")), 502,
                                  "session_unavailable"),
    icegate.PermissionDeniedError: (bare(icegate.PermissionDeniedError,
                                         grpc.StatusCode.PERMISSION_DENIED),
                                    502, "session_unavailable"),
    icegate.ProjectForbiddenError: (received(server.ProjectForbiddenError("not yours")), 502,
                                    "session_unavailable"),
    icegate.AlreadyExistsError: (received(server.AlreadyExistsError("exists")), 502,
                                 "session_unavailable"),
    icegate.ResourceExhaustedError: (bare(icegate.ResourceExhaustedError,
                                          grpc.StatusCode.RESOURCE_EXHAUSTED),
                                     502, "session_unavailable"),
    icegate.UpstreamQuotaError: (received(server.UpstreamQuotaError("no credit", **UPSTREAM)),
                                 502, "session_unavailable"),
    icegate.FailedPreconditionError: (bare(icegate.FailedPreconditionError,
                                           grpc.StatusCode.FAILED_PRECONDITION),
                                      502, "session_unavailable"),
    icegate.UpstreamNotConfiguredError: (received(server.UpstreamNotConfiguredError(
        "no key", provider="openai")), 502, "session_unavailable"),
    icegate.UpstreamAuthFailedError: (received(server.UpstreamAuthFailedError(
        "refused the API key", **UPSTREAM)), 502, "session_unavailable"),
    icegate.UpstreamRejectedError: (received(server.UpstreamRejectedError(
        "bad request", **UPSTREAM)), 502, "session_unavailable"),
    icegate.CoturnOutOfStepError: (received(server.CoturnOutOfStepError("no userdb")), 502,
                                   "session_unavailable"),
    icegate.CoturnCliNotConfiguredError: (received(server.CoturnCliNotConfiguredError("no cli")),
                                          502, "session_unavailable"),
    icegate.InternalError: (bare(icegate.InternalError, grpc.StatusCode.INTERNAL), 502,
                            "session_unavailable"),
}


def test_every_error_class_has_a_decided_answer() -> None:
    # A new error class must be added here, and so given a deliberate HTTP answer.
    assert set(ERRORS) == set(public_error_classes())


@pytest.mark.parametrize("cls", sorted(ERRORS, key=lambda cls: cls.__name__),
                         ids=lambda cls: cls.__name__)
def test_each_error_answers_its_status_and_a_json_body_without_the_message(cls: type) -> None:
    error, status, name = ERRORS[cls]
    assert type(error) is cls
    answer = icegate.http_error(error)

    assert (answer.status, answer.body["error"]) == (status, name)
    text = json.dumps(answer.body) + json.dumps(answer.headers)
    # The message is for the backend's log; the browser gets the figures it can act on.
    assert error.message not in text
    assert "req_1" not in text


def test_quota_exceeded_has_the_seeds_usage_and_upgrade_url() -> None:
    answer = icegate.http_error(ERRORS[icegate.QuotaExceededError][0])
    assert answer.body["upgrade_url"] == "https://billing.test/up"
    assert answer.body["usage"] == {"plan": "free", "sessions_included": 10,
                                    "sessions_used": 10, "sessions_remaining": 0}
    assert answer.body["resetsAt"] == "2030-05-06T07:08:09.123Z"


def test_rate_limited_has_reset_at_and_retry_after_in_whole_seconds() -> None:
    answer = icegate.http_error(ERRORS[icegate.RateLimitedError][0])
    assert answer.body == {"error": "rate_limited", "resetAt": "2030-05-06T07:08:09.123Z",
                           "limit": 100}
    assert answer.headers == {"Retry-After": "42"}


def test_concurrent_limit_has_current_and_max() -> None:
    answer = icegate.http_error(ERRORS[icegate.ConcurrentLimitError][0])
    assert answer.body == {"error": "concurrent_limit_exceeded", "current": 5, "max": 5}
    assert answer.headers == {}


def test_invalid_argument_names_the_field() -> None:
    answer = icegate.http_error(ERRORS[icegate.InvalidArgumentError][0])
    assert answer.body["fields"] == [{"field": "voice", "description": "unknown voice"}]


def test_upstream_unavailable_passes_on_the_providers_retry_delay() -> None:
    assert icegate.http_error(ERRORS[icegate.UpstreamUnavailableError][0]).headers == \
        {"Retry-After": "3"}


def test_misconfiguration_names_the_reason_and_is_logged(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    error = ERRORS[icegate.UpstreamAuthFailedError][0]
    with caplog.at_level("ERROR", logger="icegate.browser"):
        answer = icegate.http_error(error)
    assert answer.body == {"error": "session_unavailable", "reason": "UPSTREAM_AUTH_FAILED"}
    assert "refused the API key" in caplog.text


@settings(max_examples=60, deadline=None, database=None)
@given(retry=st.floats(min_value=0, max_value=1e6, allow_nan=False),
       current=st.integers(0, 2**31), maximum=st.integers(0, 2**31))
def test_limit_answers_hold_for_any_figures(retry: float, current: int, maximum: int) -> None:
    limited = icegate.http_error(received(server.RateLimitedError(
        limit=1, window_seconds=1, reset_at=RESET, retry_after_seconds=retry)))
    seconds = int(limited.headers["Retry-After"])
    assert seconds >= 1 and seconds >= retry and seconds < retry + 1.001
    concurrent = icegate.http_error(received(server.ConcurrentLimitError(current=current,
                                                                         maximum=maximum)))
    assert (concurrent.body["current"], concurrent.body["max"]) == (current, maximum)


def session(**fields: Any) -> sessions_pb2.CreateSessionResponse:
    created = sessions_pb2.CreateSessionResponse(
        session_id="ses_1", model="gpt-realtime", voice="echo",
        ephemeral_token=sessions_pb2.EphemeralToken(value="ek_123"), **fields)
    created.ephemeral_token.expire_time.FromDatetime(NOW)
    created.ephemeral_token.expire_time.nanos = 299_000_064
    return created


def test_browser_session_is_json_with_one_ice_list_and_a_clean_expiry() -> None:
    created = session(ice_servers=[STUN, TURN], provider_ice_servers=[ORGA])
    answer = icegate.browser_session(created)

    assert json.loads(json.dumps(answer)) == answer
    assert answer == {
        "sessionId": "ses_1", "ephemeralToken": "ek_123",
        "expiresAt": "2026-12-06T08:04:55.299Z",
        "iceServers": [
            {"urls": list(STUN.urls)},
            {"urls": list(TURN.urls), "username": TURN.username, "credential": TURN.credential},
            {"urls": list(ORGA.urls), "username": "orga-user", "credential": "orga-pass"},
        ],
        "model": "gpt-realtime", "voice": "echo",
    }


def test_browser_session_joins_get_ice_servers_once_each() -> None:
    other_turn = credentials_pb2.IceServer(urls=list(TURN.urls), username="1767009999:x",
                                           credential="b3RoZXI=")
    ice = credentials_pb2.GetIceServersResponse(ice_servers=[STUN, other_turn])
    answer = icegate.browser_session(session(ice_servers=[STUN, TURN]), ice)
    assert answer["iceServers"] == [
        {"urls": list(STUN.urls)},
        {"urls": list(TURN.urls), "username": TURN.username, "credential": TURN.credential},
        {"urls": list(TURN.urls), "username": other_turn.username,
         "credential": other_turn.credential},
    ]


def test_browser_session_without_expiry_says_none() -> None:
    created = sessions_pb2.CreateSessionResponse(
        session_id="s", ephemeral_token=sessions_pb2.EphemeralToken(value="t"))
    assert icegate.browser_session(created)["expiresAt"] is None


ice_servers = st.lists(st.builds(
    credentials_pb2.IceServer,
    urls=st.lists(st.sampled_from([*STUN.urls, *TURN.urls, *ORGA.urls]), max_size=3),
    username=st.sampled_from(["", "u1", "u2"]), credential=st.sampled_from(["", "c"])),
    max_size=6)


@settings(max_examples=80, deadline=None, database=None)
@given(own=ice_servers, extra=ice_servers, provider=ice_servers)
def test_merged_list_keeps_every_server_once_in_order(own: list[Any], extra: list[Any],
                                                      provider: list[Any]) -> None:
    answer = icegate.browser_session(
        session(ice_servers=own, provider_ice_servers=provider),
        credentials_pb2.GetIceServersResponse(ice_servers=extra))["iceServers"]

    def key(entry: dict[str, Any]) -> tuple[Any, ...]:
        return (tuple(entry["urls"]), entry.get("username", ""), entry.get("credential", ""))

    expected = []
    for listed in [*own, *extra, *provider]:
        entry = (tuple(listed.urls), listed.username, listed.credential)
        if listed.urls and entry not in expected:
            expected.append(entry)
    assert [key(entry) for entry in answer] == expected


def test_browser_call_gives_the_answer_and_ice_servers_and_no_token() -> None:
    created = sessions_pb2.CreateCallResponse(
        session_id="ses_2", sdp_answer="v=0\r\n", call_id="rtc_1", ice_servers=[STUN, TURN],
        model="gpt-realtime")
    answer = icegate.browser_call(created)
    assert answer == {
        "sessionId": "ses_2", "callId": "rtc_1", "answer": {"type": "answer", "sdp": "v=0\r\n"},
        "iceServers": [{"urls": list(STUN.urls)}, {"urls": list(TURN.urls),
                       "username": TURN.username, "credential": TURN.credential}],
        "model": "gpt-realtime",
    }
    assert "token" not in json.dumps(answer).lower()


@pytest.mark.parametrize("body", [None, b"", "  ", {}, b'{"other": 1}'])
def test_browser_options_without_options_are_none(body: Any) -> None:
    assert icegate.browser_options(body) == {}


def test_browser_options_take_voice_and_instructions_only() -> None:
    body = b'{"voice": "echo", "instructions": "Be brief.", "model": "x", "email": "a@b"}'
    assert icegate.browser_options(body) == {"voice": "echo", "instructions": "Be brief."}


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "body"), (b"[1]", "body"), ("\"text\"", "body"), ([1], "body"),
    (b'{"voice": ["echo"]}', "voice"), ({"instructions": 3}, "instructions"),
])
def test_browser_options_refuse_what_is_not_a_json_object_of_strings(body: Any,
                                                                     field: str) -> None:
    with pytest.raises(icegate.InvalidArgumentError) as caught:
        icegate.browser_options(body)
    answer = icegate.http_error(caught.value)
    assert answer.status == 400
    assert [f["field"] for f in answer.body["fields"]] == [field]


@pytest.mark.parametrize("value", [
    timestamp_pb2.Timestamp(seconds=1_765_008_295, nanos=299_000_064),
    datetime(2025, 12, 6, 9, 4, 55, 299_999, tzinfo=timezone(timedelta(hours=1))),
])
def test_timestamps_read_to_the_millisecond_in_utc(value: Any) -> None:
    assert iso_timestamp(value) == "2025-12-06T08:04:55.299Z"


def test_a_whole_second_reads_without_a_fraction() -> None:
    assert iso_timestamp(timestamp_pb2.Timestamp(seconds=1_765_008_295, nanos=999_999)) == \
        "2025-12-06T08:04:55Z"
