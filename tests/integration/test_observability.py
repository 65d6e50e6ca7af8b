"""Metrics and logs as an operator sees them: a real server, real calls, a scraped /metrics
endpoint and every log line of a full session flow, checked for secrets."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation, openai_error
from harness.icegate_server import (
    TEST_ADMIN_KEY,
    TEST_MASTER_KEY,
    TEST_TURN_SECRET,
    RunningServer,
)
from harness.server_process import ServerProcess
from icegate.errors import from_rpc_error
from icegate.v1 import credentials_pb2, credentials_pb2_grpc
from icegate_server.clock import FrozenClock
from icegate_server.observability.logs import JsonFormatter, TextFormatter
from icegate_server.servicers.credential_service import CredentialServicer
from icegate_server.turn.credentials import TurnCredentialIssuer

OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
USER_ID = "alice-7f3a@example.test"
BAD_KEY = "igk_0123456789ab_not-a-real-key-but-long-enough-to-be-secret"
NOVEMBER = datetime(2026, 11, 30, 23, 0, tzinfo=timezone.utc).timestamp()
CREDENTIALS = "/icegate.v1.CredentialService/"
SESSIONS = "/icegate.v1.SessionService/"
ADMIN = "/icegate.v1.AdminService/"


@pytest.fixture
def openai():
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


@pytest.fixture
def server(server_factory, openai):
    return server_factory(FrozenClock(NOVEMBER), openai_base_url=openai.base_url,
                          metrics_listen="127.0.0.1:0")


def scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics: (name, sorted labels) -> value."""
    answer = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5)
    assert answer.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_after(server: RunningServer, rpcs: int, timeout: float = 5.0):
    """The samples once `rpcs` calls are counted: a call is counted just after its answer."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        counted = sum(v for (name, _), v in samples.items() if name == "icegate_rpcs_total")
        if counted >= rpcs or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)


@dataclass
class Flow:
    """What a full session flow handed out: every secret that must stay out of logs/labels."""

    secrets: dict[str, str] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    """request id sent -> full method name of the call."""


def run_full_flow(server: RunningServer, openai: FakeUpstream) -> Flow:
    """Projects, keys, provider key, TURN, sessions, an upstream 401, a bad key, a rate limit."""
    flow = Flow(secrets={"admin key": TEST_ADMIN_KEY, "provider key": OPENAI_KEY,
                         "TURN secret": TEST_TURN_SECRET, "master key": TEST_MASTER_KEY,
                         "bad key": BAD_KEY, "user id": USER_ID})
    ids = itertools.count(1)

    def rid(method: str) -> tuple[tuple[str, str], ...]:
        request_id = f"flow-{next(ids)}"
        flow.request_ids[request_id] = method
        return (("x-request-id", request_id),)

    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("acme", rate_limit_requests=8, rate_limit_window=900,
                             metadata=rid(ADMIN + "CreateProject"))
        secret = admin.create_api_key("acme", metadata=rid(ADMIN + "CreateApiKey")).secret
        flow.secrets["project key"] = secret
        admin.set_provider_key("acme", "openai", OPENAI_KEY,
                               metadata=rid(ADMIN + "SetProviderKey"))

    with icegate.Client(server.target, secret) as acme:
        credential = acme.issue_turn_credentials(
            USER_ID, metadata=rid(CREDENTIALS + "IssueTurnCredentials"))
        flow.secrets["TURN password"] = credential.password
        with pytest.raises(icegate.InvalidArgumentError):
            acme.issue_turn_credentials("bad:id", metadata=rid(CREDENTIALS +
                                                                "IssueTurnCredentials"))
        created = acme.create_session("openai", user_id=USER_ID,
                                      metadata=rid(SESSIONS + "CreateSession"))
        flow.secrets["ephemeral token"] = created.ephemeral_token.value
        flow.secrets["session TURN password"] = created.ice_servers[1].credential
        acme.keep_alive_session(created.session_id,
                                metadata=rid(SESSIONS + "KeepAliveSession"))
        acme.end_session(created.session_id, metadata=rid(SESSIONS + "EndSession"))
        openai.enqueue(openai_error(401, "Incorrect API key provided: sk-tes**********1234.",
                                    code="invalid_api_key"))
        with pytest.raises(icegate.UpstreamAuthFailedError):
            acme.create_session("openai", user_id=USER_ID,
                                metadata=rid(SESSIONS + "CreateSession"))
        # 8 requests per window: 6 spent above, so the 9th call of the project is refused.
        acme.get_ice_servers(USER_ID, metadata=rid(CREDENTIALS + "GetIceServers"))
        acme.get_ice_servers(USER_ID, metadata=rid(CREDENTIALS + "GetIceServers"))
        with pytest.raises(icegate.RateLimitedError):
            acme.get_ice_servers(USER_ID, metadata=rid(CREDENTIALS + "GetIceServers"))

    with icegate.Client(server.target, BAD_KEY) as stranger, \
            pytest.raises(icegate.AuthenticationError):
        stranger.issue_turn_credentials(USER_ID, metadata=rid(CREDENTIALS +
                                                               "IssueTurnCredentials"))
    return flow


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_are_off_unless_configured(icegate_server):
    assert icegate_server.server.metrics_port is None


def test_metrics_count_calls_refusals_upstream_calls_and_credentials(server, openai):
    flow = run_full_flow(server, openai)
    samples = scrape_after(server, len(flow.request_ids))

    rpcs = "icegate_rpcs_total"
    assert value(samples, rpcs, method=CREDENTIALS + "IssueTurnCredentials", code="OK") == 1
    assert value(samples, rpcs, method=CREDENTIALS + "IssueTurnCredentials",
                 code="INVALID_ARGUMENT") == 1
    assert value(samples, rpcs, method=CREDENTIALS + "IssueTurnCredentials",
                 code="UNAUTHENTICATED") == 1
    assert value(samples, rpcs, method=CREDENTIALS + "GetIceServers", code="OK") == 2
    assert value(samples, rpcs, method=CREDENTIALS + "GetIceServers",
                 code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, rpcs, method=SESSIONS + "CreateSession", code="OK") == 1
    assert value(samples, rpcs, method=SESSIONS + "CreateSession",
                 code="FAILED_PRECONDITION") == 1
    assert value(samples, rpcs, method=SESSIONS + "EndSession", code="OK") == 1
    assert value(samples, rpcs, method=ADMIN + "CreateProject", code="OK") == 1
    assert value(samples, "icegate_rpc_duration_seconds_count",
                 method=CREDENTIALS + "IssueTurnCredentials") == 3
    assert value(samples, "icegate_rpc_duration_seconds_bucket",
                 method=SESSIONS + "CreateSession", le="+Inf") == 2

    refusals = "icegate_limit_refusals_total"
    assert value(samples, refusals, reason="RATE_LIMITED") == 1
    assert value(samples, refusals, reason="QUOTA_EXCEEDED") == 0
    assert ("icegate_limit_refusals_total", (("reason", "CONCURRENT_LIMIT"),)) in samples

    upstream = "icegate_upstream_calls_total"
    assert value(samples, upstream, provider="openai", outcome="ok") == 1
    assert value(samples, upstream, provider="openai", outcome="auth_failed") == 1
    assert value(samples, "icegate_upstream_duration_seconds_count", provider="openai") == 2

    # Signed: the one IssueTurnCredentials, two GetIceServers, and one per CreateSession (the
    # failed one signs before the provider refuses); the bad user id and refused calls sign none.
    assert value(samples, "icegate_turn_credentials_issued_total") == 5
    assert value(samples, "icegate_store_errors_total", operation="admit") == 0

    for (_, labels), _ in samples.items():
        for label, shown in labels:
            for what, secret in flow.secrets.items():
                assert secret not in shown, f"{what} in label {label}"


def test_active_lease_gauge_follows_the_store(server, openai):
    gauge = server.server.lease_gauge
    assert gauge is not None
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.set_provider_key("default", "openai", OPENAI_KEY)
        admin.create_project("acme")
        admin.set_provider_key("acme", "openai", OPENAI_KEY)
        first = admin.create_session("openai")
        admin.create_session("openai", project_id="acme")
        assert server.run(gauge.refresh()) == 2
        assert value(scrape(server), "icegate_active_leases") == 2

        admin.end_session(first.session_id)
        server.clock.advance(3601)  # acme's lease expires unrenewed: no RPC tells this process
        server.run(gauge.refresh())
    assert value(scrape(server), "icegate_active_leases") == 0


def test_sessions_started_near_the_quota_are_counted(server, openai):
    # A quota of 10: the 9th and 10th sessions of the month start at 90 % and more of it, the
    # 11th is refused (QUOTA_EXCEEDED) and counts as no start.
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("acme", monthly_session_quota=10, max_concurrent_sessions=20)
        admin.set_provider_key("acme", "openai", OPENAI_KEY)
        counted = []
        for _ in range(10):
            admin.create_session("openai", project_id="acme")
            counted.append(value(scrape(server), "icegate_sessions_near_quota_total"))
        with pytest.raises(icegate.QuotaExceededError):
            admin.create_session("openai", project_id="acme")
        after_refusal = value(scrape(server), "icegate_sessions_near_quota_total")
    assert counted == [0] * 8 + [1, 2]
    assert after_refusal == 2


def test_two_servers_in_one_process_keep_separate_figures(server, server_factory, tmp_path):
    with server_factory(data_dir=tmp_path / "other", metrics_listen="127.0.0.1:0") as other, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        client.issue_turn_credentials("bob")
        assert value(scrape(server), "icegate_turn_credentials_issued_total") == 1
        assert value(scrape(other), "icegate_turn_credentials_issued_total") == 0


def test_stop_closes_the_metrics_port(server_factory):
    running = server_factory(metrics_listen="127.0.0.1:0")
    port = running.server.metrics_port
    running.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


# --- request ids -------------------------------------------------------------------------------


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield credentials_pb2_grpc.CredentialServiceStub(channel)


def auth(*extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TEST_ADMIN_KEY}"), *extra)


def test_request_id_comes_back_on_success(stub):
    _, call = stub.IssueTurnCredentials.with_call(
        credentials_pb2.IssueTurnCredentialsRequest(user_id="u"),
        metadata=auth(("x-request-id", "req-ok-1")), timeout=5)
    assert ("x-request-id", "req-ok-1") in call.trailing_metadata()


def test_request_id_comes_back_on_error_beside_the_rich_details(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.IssueTurnCredentials(credentials_pb2.IssueTurnCredentialsRequest(user_id="a:b"),
                                  metadata=auth(("x-request-id", "req-bad-1")), timeout=5)
    trailers = dict(caught.value.trailing_metadata())
    assert trailers["x-request-id"] == "req-bad-1"
    assert "grpc-status-details-bin" in trailers
    typed = from_rpc_error(caught.value)
    assert isinstance(typed, icegate.InvalidArgumentError)
    assert [v.field for v in typed.field_violations] == ["user_id"]


def test_request_id_comes_back_when_the_key_is_refused(server):
    with grpc.insecure_channel(server.target) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        credentials_pb2_grpc.CredentialServiceStub(channel).IssueTurnCredentials(
            credentials_pb2.IssueTurnCredentialsRequest(user_id="u"),
            metadata=(("x-request-id", "req-nokey"),), timeout=5)
    assert ("x-request-id", "req-nokey") in caught.value.trailing_metadata()
    assert isinstance(from_rpc_error(caught.value), icegate.AuthenticationError)


@pytest.mark.parametrize("sent", ["x" * 129, "", None])
def test_a_missing_or_unusable_request_id_is_replaced(stub, sent):
    # gRPC itself refuses non-printable header values, so length and absence are what is left.
    metadata = auth() if sent is None else auth(("x-request-id", sent))
    _, call = stub.IssueTurnCredentials.with_call(
        credentials_pb2.IssueTurnCredentialsRequest(user_id="u"), metadata=metadata, timeout=5)
    returned = dict(call.trailing_metadata())["x-request-id"]
    assert returned != sent
    assert len(returned) == 32 and int(returned, 16) >= 0


# --- logs --------------------------------------------------------------------------------------


class Capture(logging.Handler):
    """Every record of the process, formatted by the formatter under test."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def wait_for(self, *needles: str, timeout: float = 5.0) -> None:
        """Waits until lines hold every needle: the server logs a call after answering it."""
        deadline = time.monotonic() + timeout
        while not all(any(n in line for line in list(self.lines)) for n in needles):
            assert time.monotonic() < deadline, f"no log line with {needles}"
            time.sleep(0.01)


@pytest.fixture
def capture(request) -> Iterator[Capture]:
    handler = Capture(request.param())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize("capture", [JsonFormatter, TextFormatter], indirect=True,
                         ids=["json", "text"])
def test_no_secret_reaches_any_log_line(capture, server, openai):
    flow = run_full_flow(server, openai)
    capture.wait_for(*(f"{request_id}" for request_id in flow.request_ids))
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.health()
    server.stop()  # shutdown and its log lines too

    everything = "\n".join(capture.lines)
    assert "/icegate.v1.SessionService/CreateSession" in everything  # it did log
    for what, secret in flow.secrets.items():
        assert secret not in everything, f"the {what} reached the log"
    assert "sk-tes" not in everything  # not even the provider's masked echo of the key


@pytest.mark.parametrize("capture", [JsonFormatter], indirect=True, ids=["json"])
def test_every_rpc_is_one_json_line_with_its_request_id(capture, server, openai):
    flow = run_full_flow(server, openai)
    with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.health()
    capture.wait_for(*(f'"{request_id}"' for request_id in flow.request_ids))
    entries = [json.loads(line) for line in capture.lines]  # every line is JSON
    rpc_lines = [entry for entry in entries if entry["logger"] == "icegate_server.rpc"]

    by_id = {}
    for entry in rpc_lines:
        assert entry["request_id"] not in by_id, "two lines for one RPC"
        by_id[entry["request_id"]] = entry
    assert set(by_id) == set(flow.request_ids)  # one per RPC; the health check logs nothing
    for request_id, method in flow.request_ids.items():
        entry = by_id[request_id]
        assert entry["method"] == method
        assert entry["level"] == "INFO" and entry["msg"] == "rpc"
        assert isinstance(entry["duration_ms"], (int, float)) and entry["duration_ms"] >= 0
        assert entry["peer"].startswith(("ipv4:", "ipv6:"))
        assert set(entry) <= {"ts", "level", "logger", "msg", "method", "project", "key_id",
                              "code", "reason", "duration_ms", "request_id", "peer"}

    codes = [(by_id[r]["code"], by_id[r].get("reason", "")) for r in flow.request_ids]
    assert codes == [("OK", "")] * 4 + [
        ("INVALID_ARGUMENT", "INVALID_FIELD"), ("OK", ""), ("OK", ""), ("OK", ""),
        ("FAILED_PRECONDITION", "UPSTREAM_AUTH_FAILED"), ("OK", ""), ("OK", ""),
        ("RESOURCE_EXHAUSTED", "RATE_LIMITED"), ("UNAUTHENTICATED", "INVALID_API_KEY")]
    first_project_call = by_id["flow-4"]
    assert first_project_call["project"] == "acme"
    assert first_project_call["key_id"] != "static-0"
    assert flow.secrets["project key"].startswith(f"igk_{first_project_call['key_id']}_")
    assert by_id["flow-1"]["key_id"] == "static-0"
    assert "key_id" not in by_id["flow-13"]  # the unknown key has no id to show


def test_the_server_process_writes_sanitised_json_lines(tmp_path):
    with ServerProcess(tmp_path, metrics_listen="127.0.0.1:0") as process, \
            icegate.Client(process.target, TEST_ADMIN_KEY) as client:
        credential = client.issue_turn_credentials(
            "carol", metadata=(("x-request-id", "proc-1"),))
        with pytest.raises(icegate.InvalidArgumentError):
            client.issue_turn_credentials("a:b")
    assert process.stop() == 0
    lines = process.read_log().splitlines()
    entries = [json.loads(line) for line in lines]  # nothing but JSON on stderr
    rpc = [entry for entry in entries if entry["logger"] == "icegate_server.rpc"]
    assert [(entry["code"], entry.get("request_id") == "proc-1") for entry in rpc] == [
        ("OK", True), ("INVALID_ARGUMENT", False)]
    assert any(entry["msg"].startswith("icegate-server listening on 127.0.0.1:")
               for entry in entries)
    text = process.read_log()
    for secret in (TEST_ADMIN_KEY, TEST_TURN_SECRET, TEST_MASTER_KEY, credential.password):
        assert secret not in text


@pytest.mark.parametrize("capture", [JsonFormatter], indirect=True, ids=["json"])
def test_a_bug_is_one_error_line_without_its_message(capture, server, stub, monkeypatch):
    def broken_issue_for(self, project, user_id, requested_ttl, *, ttl_field="ttl"):
        raise KeyError(f"no cached signer for {TEST_TURN_SECRET}")

    monkeypatch.setattr(TurnCredentialIssuer, "issue_for", broken_issue_for)
    with pytest.raises(grpc.RpcError) as caught:
        stub.IssueTurnCredentials(credentials_pb2.IssueTurnCredentialsRequest(user_id="u"),
                                  metadata=auth(("x-request-id", "bug-1")), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert TEST_TURN_SECRET not in caught.value.details()
    assert dict(caught.value.trailing_metadata())["x-request-id"] == "bug-1"
    assert isinstance(from_rpc_error(caught.value), icegate.InternalError)

    capture.wait_for('"bug-1"')
    (line,) = [json.loads(text) for text in capture.lines if '"bug-1"' in text]
    assert (line["level"], line["code"], line["reason"]) == ("ERROR", "INTERNAL", "INTERNAL")
    assert line["exc_type"] == "builtins.KeyError"
    assert line["exc_frames"][-1].endswith(":broken_issue_for")
    assert TEST_TURN_SECRET not in "\n".join(capture.lines)
    assert value(scrape_after(server, 1), "icegate_rpcs_total", code="INTERNAL",
                 method=CREDENTIALS + "IssueTurnCredentials") == 1


def test_a_servicer_abort_keeps_its_code_and_the_request_id(monkeypatch, server_factory):
    async def aborting(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")

    # Handlers are bound when the server is built: patch first, then start one.
    monkeypatch.setattr(CredentialServicer, "IssueTurnCredentials", aborting)
    with server_factory(metrics_listen="127.0.0.1:0") as server, \
            grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            credentials_pb2_grpc.CredentialServiceStub(channel).IssueTurnCredentials(
                credentials_pb2.IssueTurnCredentialsRequest(user_id="u"),
                metadata=auth(("x-request-id", "abort-1")), timeout=5)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert dict(caught.value.trailing_metadata())["x-request-id"] == "abort-1"
        assert value(scrape_after(server, 1), "icegate_rpcs_total", code="NOT_FOUND",
                     method=CREDENTIALS + "IssueTurnCredentials") == 1
