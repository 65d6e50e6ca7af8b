"""The call guard on a real grpc.aio server and a real Connect listener: admission, statuses,
trailers and headers, metrics, log lines.

The guard is served through `MethodTable` and `ConnectApplication` exactly as `create_server`
wires them, with a stand-in `AccessControl` (keys decided by the test) and a
CredentialService servicer whose behaviour each test picks through the request's `user_id`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.client
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from icegate.v1 import credentials_pb2, credentials_pb2_grpc
from icegate_server.access.control import CallContext, MethodPolicy
from icegate_server.access.guard import REQUEST_ID_HEADER, CallGuard, current_call
from icegate_server.access.keys import Caller
from icegate_server.errors import (
    InvalidApiKeyError,
    InvalidFieldError,
    MalformedRequestError,
    ProjectForbiddenError,
    RateLimitedError,
)
from icegate_server.observability.logs import FIELDS_ATTRIBUTE, JsonFormatter
from icegate_server.observability.metrics import IcegateMetrics
from icegate_server.projects.records import Project
from icegate_server.status import INTERNAL_STATUS, lookup, to_grpc_status
from icegate_server.transports.connect_app import ConnectApplication
from icegate_server.transports.grpc_methods import MethodTable
from icegate_server.transports.http_listener import HttpListener, bind_http_socket

ISSUE = "/icegate.v1.CredentialService/IssueTurnCredentials"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
RPC_LOGGER = "icegate_server.rpc"

GOOD_KEY = "good-key-0123456789"
LIMITED_KEY = "limited-key-0123456789"
FOREIGN_KEY = "foreign-key-0123456789"
SECRET = "s3cret-bug-detail-4f9a"
ACME = CallContext(Caller(key_id="key-1", is_admin=False, project_id="acme"),
                   Project(project_id="acme"))
RATE_LIMITED = RateLimitedError(limit=100, window_seconds=900,
                                reset_at=datetime(2030, 1, 1, tzinfo=timezone.utc),
                                retry_after_seconds=30.0)


class StandInAccess:
    """Admits by key as a test decides; records what it was asked."""

    admits_identities = False

    def __init__(self) -> None:
        self.asked: list[tuple[str, MethodPolicy, str]] = []
        self.may_linger: list[bool] = []

    async def admit(self, key: str, policy: MethodPolicy, project_id: str, *,
                    turn_subject: str | None = None, may_linger: bool = False) -> CallContext:
        self.asked.append((key, policy, project_id))
        self.may_linger.append(may_linger)
        if key == GOOD_KEY:
            return ACME
        if key == LIMITED_KEY:
            raise RATE_LIMITED
        if key == FOREIGN_KEY:
            raise ProjectForbiddenError("the key may not act on this project")
        raise InvalidApiKeyError("unknown or revoked API key")


class Credentials(credentials_pb2_grpc.CredentialServiceServicer):
    """Answers, raises or hangs as the request's `user_id` says."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.seen: list[CallContext] = []

    async def IssueTurnCredentials(self, request: Any, context: Any) -> Any:
        self.seen.append(current_call())
        if request.user_id == "domain-error":
            raise InvalidFieldError("user_id", "not a user id we like")
        if request.user_id == "bug":
            raise KeyError(SECRET)
        if request.user_id == "hang":
            self.started.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.ended.set()
        return credentials_pb2.IssueTurnCredentialsResponse(username=f"for-{request.user_id}")


class Served:
    def __init__(self, channel: grpc.aio.Channel, metrics: IcegateMetrics,
                 access: StandInAccess, servicer: Credentials) -> None:
        self.channel = channel
        self.metrics = metrics
        self.access = access
        self.servicer = servicer
        self.stub = credentials_pb2_grpc.CredentialServiceStub(channel)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def calls(self, method: str, code: str) -> float | None:
        return self.sample("icegate_rpcs_total", method=method, code=code)

    def recorded(self) -> float:
        """IssueTurnCredentials calls the guard has recorded so far."""
        return self.sample("icegate_rpc_duration_seconds_count", method=ISSUE) or 0.0

    async def recorded_after(self, before: float) -> None:
        # An error status reaches the caller from inside `context.abort`, before the guard's
        # `finally` records the call; that runs on this same loop right after.
        for _ in range(1000):
            if self.recorded() > before:
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the guard never recorded the call")


@contextlib.asynccontextmanager
async def guarded_server() -> AsyncIterator[Served]:
    metrics, access, servicer = IcegateMetrics(), StandInAccess(), Credentials()
    methods = MethodTable()
    methods.add(credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"], servicer,
                CallGuard(access, metrics))  # type: ignore[arg-type]
    methods.add(health_pb2.DESCRIPTOR.services_by_name["Health"], health.aio.HealthServicer())
    methods.add(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
                reflection.aio.ReflectionServicer(("icegate.v1.CredentialService",)))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((methods,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(channel, metrics, access, servicer)
    finally:
        await server.stop(None)


def bearer(key: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"), *extra)


async def issue(served: Served, user_id: str, metadata: Any = ()) -> grpc.aio.UnaryUnaryCall:
    """Makes one IssueTurnCredentials call and waits for its end, whatever its status, and
    for the guard to record it."""
    before = served.recorded()
    call = served.stub.IssueTurnCredentials(
        credentials_pb2.IssueTurnCredentialsRequest(user_id=user_id, project_id="acme"),
        metadata=metadata)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call
    await served.recorded_after(before)
    return call


def rpc_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == RPC_LOGGER]


def logged_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, FIELDS_ATTRIBUTE)
    return fields


@pytest.fixture(autouse=True)
def _capture_rpc_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RPC_LOGGER)


@pytest.mark.parametrize(("metadata", "error"), [
    (bearer(GOOD_KEY), None),
    ((), InvalidApiKeyError("x")),
    (bearer("unknown-key-0123456789"), InvalidApiKeyError("x")),
    (bearer(FOREIGN_KEY), ProjectForbiddenError("x")),
    (bearer(LIMITED_KEY), RATE_LIMITED),
])
def test_the_admission_outcome_decides_the_status(caplog, metadata, error):
    code, reason = (grpc.StatusCode.OK, "") if error is None else lookup(error)

    async def scenario() -> None:
        async with guarded_server() as served:
            call = await issue(served, "alice", metadata)
            assert await call.code() is code
            assert served.calls(ISSUE, code.name) == 1
            assert served.sample("icegate_rpc_duration_seconds_count", method=ISSUE) == 1
            if metadata:  # a PROJECT method asks for the project the request names
                assert served.access.asked == [(metadata[0][1][len("Bearer "):],
                                                MethodPolicy.PROJECT, "acme")]
                # gRPC's calls may wait for others to go to the store with them.
                assert served.access.may_linger == [True]
            if error is None:
                # The servicer ran with the admitted call, and only then.
                assert (await call).username == "for-alice"
                assert served.servicer.seen == [ACME]
            else:
                assert served.servicer.seen == []
                assert await error_reason(call) == reason
            refused = served.sample("icegate_limit_refusals_total", reason="RATE_LIMITED")
            assert refused == (1 if error is RATE_LIMITED else 0)

    asyncio.run(scenario())
    [line] = rpc_records(caplog)
    fields = logged_fields(line)
    assert (fields["method"], fields["code"], fields["reason"]) == (ISSUE, code.name, reason)
    assert fields["project"] == "acme"
    assert fields["key_id"] == ("key-1" if error is None else "")


def test_the_request_id_goes_back_on_success_and_on_error(caplog):
    async def scenario() -> list[tuple[str, str | None]]:
        async with guarded_server() as served:
            seen = []
            for key, user_id in ((GOOD_KEY, "alice"), (GOOD_KEY, "domain-error"),
                                 ("unknown-key-0123456789", "alice"), (GOOD_KEY, "bug")):
                given = await issue(served, user_id, bearer(key, (REQUEST_ID_HEADER, "req-7")))
                fresh = await issue(served, user_id, bearer(key))
                for call, expected in ((given, "req-7"), (fresh, None)):
                    trailers = dict(await call.trailing_metadata() or ())
                    seen.append((trailers[REQUEST_ID_HEADER], expected))
            return seen

    seen = asyncio.run(scenario())
    assert all(trailer == expected for trailer, expected in seen if expected is not None)
    fresh_ids = [trailer for trailer, expected in seen if expected is None]
    assert len(set(fresh_ids)) == len(fresh_ids) == 4
    assert all(len(value) == 32 for value in fresh_ids)
    # Each log line carries the id its caller got back.
    logged = [logged_fields(record)["request_id"] for record in rpc_records(caplog)]
    assert logged == [trailer for trailer, _ in seen]


def test_a_domain_error_is_mapped_through_the_error_table():
    expected = to_grpc_status(InvalidFieldError("user_id", "not a user id we like"))

    async def scenario() -> None:
        async with guarded_server() as served:
            call = await issue(served, "domain-error", bearer(GOOD_KEY))
            assert await call.code() is expected.code
            assert await call.details() == expected.details
            trailers = await call.trailing_metadata()
            status = rpc_status.from_call(_TrailersOnly(expected.code, expected.details,
                                                        trailers))
            assert status == rpc_status.from_call(
                _TrailersOnly(expected.code, expected.details, expected.trailing_metadata))
            assert served.calls(ISSUE, "INVALID_ARGUMENT") == 1

    asyncio.run(scenario())


def test_an_unexpected_exception_is_internal_and_leaks_nothing(caplog):
    async def scenario() -> None:
        async with guarded_server() as served:
            call = await issue(served, "bug", bearer(GOOD_KEY))
            assert await call.code() is grpc.StatusCode.INTERNAL
            assert await call.details() == INTERNAL_STATUS.details
            trailers = await call.trailing_metadata()
            assert all(SECRET.encode() not in (v if isinstance(v, bytes) else v.encode())
                       for _, v in trailers)
            assert served.calls(ISSUE, "INTERNAL") == 1

    asyncio.run(scenario())
    [line] = rpc_records(caplog)
    assert line.levelno == logging.ERROR
    assert logged_fields(line)["reason"] == "INTERNAL"
    written = JsonFormatter().format(line)
    assert "KeyError" in written  # the type and frames are there to find the bug...
    assert SECRET not in written  # ...never what the exception carried


def test_a_cancelled_call_is_counted_cancelled(caplog):
    async def scenario() -> None:
        async with guarded_server() as served:
            call = served.stub.IssueTurnCredentials(
                credentials_pb2.IssueTurnCredentialsRequest(user_id="hang"),
                metadata=bearer(GOOD_KEY))
            await served.servicer.started.wait()
            call.cancel()
            await served.servicer.ended.wait()
            await served.recorded_after(0)
            assert served.calls(ISSUE, "CANCELLED") == 1
            assert served.calls(ISSUE, "OK") is None

    asyncio.run(scenario())
    [line] = rpc_records(caplog)
    assert logged_fields(line)["code"] == "CANCELLED"


def test_open_methods_are_neither_guarded_counted_nor_logged(caplog):
    async def scenario() -> None:
        async with guarded_server() as served:
            checked = await health_pb2_grpc.HealthStub(served.channel).Check(
                health_pb2.HealthCheckRequest(service=""))
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(served.channel)
            answers = [answer async for answer in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            listed = {s.name for s in answers[0].list_services_response.service}
            assert "icegate.v1.CredentialService" in listed
            assert served.access.asked == []  # no key asked for
            for method in (HEALTH_CHECK, REFLECTION):
                assert served.calls(method, "OK") is None
                assert served.sample("icegate_rpc_duration_seconds_count",
                                     method=method) is None

    asyncio.run(scenario())
    assert rpc_records(caplog) == []


def test_an_undecodable_body_is_invalid_argument(caplog):
    async def scenario() -> None:
        async with guarded_server() as served:
            raw = served.channel.unary_unary(ISSUE)  # bytes in, bytes out
            call = raw(b"\xff\xff\xff\xff", metadata=bearer(GOOD_KEY))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            await served.recorded_after(0)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == to_grpc_status(
                MalformedRequestError("the request body is not a valid message")).details
            assert served.access.asked == []  # refused before admission
            assert served.servicer.seen == []
            assert served.calls(ISSUE, "INVALID_ARGUMENT") == 1

    asyncio.run(scenario())
    [line] = rpc_records(caplog)
    assert logged_fields(line)["code"] == "INVALID_ARGUMENT"


async def error_reason(call: grpc.aio.UnaryUnaryCall) -> str:
    """The ErrorInfo reason in the rich status of a finished, failed call."""
    status = rpc_status.from_call(_TrailersOnly(await call.code(), await call.details(),
                                                await call.trailing_metadata()))
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo in the status")


class _TrailersOnly:
    """What `rpc_status.from_call` reads of a finished call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


# --- the same guard behind the Connect adapter --------------------------------------------------


class ConnectServed:
    """The guarded CredentialService (and open health) over Connect, on a real uvicorn
    listener on a free port, with the same stand-in access control and servicer."""

    def __init__(self, port: int, metrics: IcegateMetrics, access: StandInAccess,
                 servicer: Credentials) -> None:
        self.port, self.metrics, self.access, self.servicer = port, metrics, access, servicer

    async def post(self, path: str, body: bytes, headers: dict[str, str]
                   ) -> tuple[int, dict[str, str], bytes]:
        def exchange() -> tuple[int, dict[str, str], bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                connection.request("POST", path, body=body, headers=headers)
                answer = connection.getresponse()
                return (answer.status, {k.lower(): v for k, v in answer.getheaders()},
                        answer.read())
            finally:
                connection.close()

        return await asyncio.to_thread(exchange)

    async def issue(self, user_id: str, key: str | None) -> tuple[int, dict[str, str], bytes]:
        headers = {"content-type": "application/proto"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        body = credentials_pb2.IssueTurnCredentialsRequest(
            user_id=user_id, project_id="acme").SerializeToString()
        return await self.post(ISSUE, body, headers)

    def calls(self, code: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "icegate_rpcs_total", {"method": ISSUE, "code": code})


@contextlib.asynccontextmanager
async def connect_server() -> AsyncIterator[ConnectServed]:
    metrics, access, servicer = IcegateMetrics(), StandInAccess(), Credentials()
    guard = CallGuard(access, metrics)  # type: ignore[arg-type]
    app = ConnectApplication()
    app.add(credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"], servicer, guard)
    app.add(health_pb2.DESCRIPTOR.services_by_name["Health"], health.aio.HealthServicer())
    listener = HttpListener(app, bind_http_socket("127.0.0.1:0", reuse_port=False),
                            read_timeout=5)
    await listener.start()
    try:
        yield ConnectServed(listener.port, metrics, access, servicer)
    finally:
        await listener.stop(0.5)


def connect_reason(body: bytes) -> str:
    """The ErrorInfo reason among a Connect error's details."""
    for detail in json.loads(body)["details"]:
        if detail["type"] == "google.rpc.ErrorInfo":
            value = detail["value"]
            return str(error_details_pb2.ErrorInfo.FromString(
                base64.b64decode(value + "=" * (-len(value) % 4))).reason)
    raise AssertionError("no ErrorInfo in the Connect error")


@pytest.mark.parametrize(("key", "error", "http_status"), [
    (GOOD_KEY, None, 200),
    (None, InvalidApiKeyError("x"), 401),
    (FOREIGN_KEY, ProjectForbiddenError("x"), 403),
    (LIMITED_KEY, RATE_LIMITED, 429),
])
def test_over_connect_the_admission_outcome_decides_the_status(caplog, key, error,
                                                               http_status):
    code, reason = (grpc.StatusCode.OK, "") if error is None else lookup(error)

    async def scenario() -> None:
        async with connect_server() as served:
            status, headers, body = await served.issue("alice", key)
            assert status == http_status
            assert len(headers["x-request-id"]) == 32
            # Connect's may not: a held call would hold its connection's next request back.
            assert served.access.may_linger == ([] if key is None else [False])
            assert served.calls(code.name) == 1
            if error is None:
                answer = credentials_pb2.IssueTurnCredentialsResponse.FromString(body)
                assert answer.username == "for-alice"
                assert served.servicer.seen == [ACME]
            else:
                assert served.servicer.seen == []
                assert connect_reason(body) == reason

    asyncio.run(scenario())
    [line] = rpc_records(caplog)
    fields = logged_fields(line)
    assert (fields["method"], fields["code"], fields["reason"]) == (ISSUE, code.name, reason)
    assert fields["key_id"] == ("key-1" if error is None else "")


def test_over_connect_an_unexpected_exception_is_internal_and_leaks_nothing(caplog):
    async def scenario() -> None:
        async with connect_server() as served:
            status, headers, body = await served.issue("bug", GOOD_KEY)
            assert status == 500
            assert json.loads(body)["message"] == INTERNAL_STATUS.details
            assert SECRET.encode() not in body
            assert all(SECRET not in value for value in headers.values())
            assert served.calls("INTERNAL") == 1

    asyncio.run(scenario())
    [line] = rpc_records(caplog)
    assert line.levelno == logging.ERROR
    assert SECRET not in JsonFormatter().format(line)


def test_over_connect_an_undecodable_body_is_refused_before_admission(caplog):
    async def scenario() -> None:
        async with connect_server() as served:
            status, _, body = await served.post(ISSUE, b"\xff\xff\xff\xff", {
                "content-type": "application/proto", "authorization": f"Bearer {GOOD_KEY}"})
            assert status == 400
            assert connect_reason(body) == "MALFORMED_REQUEST"
            assert served.access.asked == []
            assert served.calls("INVALID_ARGUMENT") == 1

    asyncio.run(scenario())


def test_over_connect_health_is_open_and_not_counted(caplog):
    async def scenario() -> None:
        async with connect_server() as served:
            status, _, body = await served.post("/grpc.health.v1.Health/Check", b"{}",
                                                {"content-type": "application/json"})
            assert status == 200 and json.loads(body) == {"status": "SERVING"}
            status, _, body = await served.post("/grpc.health.v1.Health/Check",
                                                b'{"service": "nope"}',
                                                {"content-type": "application/json"})
            assert status == 404 and json.loads(body)["code"] == "not_found"
            assert served.access.asked == []

    asyncio.run(scenario())
    assert rpc_records(caplog) == []


def test_over_connect_a_client_that_hangs_up_is_counted_cancelled(caplog):
    async def scenario() -> None:
        async with connect_server() as served:
            body = credentials_pb2.IssueTurnCredentialsRequest(user_id="hang").SerializeToString()
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"POST " + ISSUE.encode() + b" HTTP/1.1\r\nhost: x\r\n"
                         b"content-type: application/proto\r\n"
                         b"authorization: Bearer " + GOOD_KEY.encode() + b"\r\n"
                         b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            await served.servicer.started.wait()
            writer.close()
            await served.servicer.ended.wait()
            for _ in range(1000):
                if served.calls("CANCELLED"):
                    break
                await asyncio.sleep(0.001)
            assert served.calls("CANCELLED") == 1
            assert served.calls("OK") is None
            del reader

    asyncio.run(scenario())


@pytest.mark.parametrize("encoding", [None, "gzip"], ids=["binary-unary-path", "connectrpc-path"])
def test_over_connect_a_deadline_ends_the_call_deadline_exceeded(caplog, encoding):
    # A plain binary call is served by the module's own unary path; a compressed one by
    # connectrpc's application: the same deadline, answer and record either way.
    async def scenario() -> None:
        async with connect_server() as served:
            body = credentials_pb2.IssueTurnCredentialsRequest(user_id="hang").SerializeToString()
            headers = {"content-type": "application/proto", "connect-timeout-ms": "200",
                       "authorization": f"Bearer {GOOD_KEY}"}
            if encoding:
                body = gzip.compress(body)
                headers["content-encoding"] = encoding
            status, answer_headers, answer = await served.post(ISSUE, body, headers)
            assert status == 504
            assert json.loads(answer)["code"] == "deadline_exceeded"
            assert len(answer_headers["x-request-id"]) == 32
            await served.servicer.ended.wait()
            assert served.calls("CANCELLED") == 1

    asyncio.run(scenario())
    [line] = rpc_records(caplog)
    assert logged_fields(line)["code"] == "CANCELLED"
