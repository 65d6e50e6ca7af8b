"""OpenTelemetry tracing, as an operator and a caller see it.

In process: one real server (gRPC and Connect) traced into the SDK's in-memory exporter, a
fake OpenAI on a real socket. Out of process: a real `icegate-server` configured only through
`OTEL_*` variables, exporting over OTLP/gRPC to a receiver this module starts (grpc.aio, the
TraceService of opentelemetry-proto).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    SpanKind,
    StatusCode,
    format_span_id,
    format_trace_id,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation, openai_error
from harness.icegate_server import (
    TEST_ADMIN_KEY,
    TEST_MASTER_KEY,
    TEST_TURN_SECRET,
    RunningServer,
    ServerFactory,
)
from harness.server_process import ServerProcess, free_port
from icegate_server.observability.spans import Tracing

OPENAI_KEY = "sk-test-SECRET-tracing-openai-9876"
ISSUE = "icegate.v1.CredentialService/IssueTurnCredentials"
CREATE_SESSION = "icegate.v1.SessionService/CreateSession"
CALLER = TracerProvider().get_tracer("a-caller")
"""The calling service's own tracer: its spans' context is what it sends icegate."""


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def openai() -> Iterator[FakeUpstream]:
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory, exporter: InMemorySpanExporter,
           openai: FakeUpstream) -> RunningServer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return module_server_factory(tracing=Tracing(provider), openai_base_url=openai.base_url)


@pytest.fixture(scope="module", params=["grpc", "connect"])
def target(request: pytest.FixtureRequest, server: RunningServer) -> str:
    """Each transport in turn: the gRPC target, then the Connect URL."""
    return server.grpc_target if request.param == "grpc" else server.http_url


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[icegate.Client]:
    """The admin's client over the transport of `target`."""
    with icegate.Client(target, TEST_ADMIN_KEY) as made:
        made.set_provider_key("default", "openai", OPENAI_KEY)
        yield made


@pytest.fixture(autouse=True)
def fresh(exporter: InMemorySpanExporter) -> None:
    exporter.clear()


def _rpc_system(target: str) -> str:
    return "connect_rpc" if target.startswith("http") else "grpc"


def _server_spans(exporter: InMemorySpanExporter, name: str,
                  count: int = 1) -> list[ReadableSpan]:
    """The finished server spans named `name`, once there are `count` of them: a refused
    gRPC call's status reaches the caller (`context.abort` sends it) before the guard has
    ended its span."""
    deadline = time.monotonic() + 10
    while True:
        spans = [span for span in exporter.get_finished_spans()
                 if span.name == name and span.kind is SpanKind.SERVER]
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def _children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans()
            if span.parent is not None and span.parent.span_id == parent.context.span_id]


def _traced_call_metadata() -> tuple[object, list[tuple[str, str]]]:
    """A caller's span and the metadata that carries its context (W3C traceparent)."""
    span = CALLER.start_span("caller")
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, set_span_in_context(span))
    span.end()
    return span, list(carrier.items())


def test_each_call_is_a_server_span_with_the_store_round_trip_as_its_child(
        client, target, exporter):
    client.issue_turn_credentials("alice", metadata=[("x-request-id", "trace-req-1")])

    (span,) = _server_spans(exporter, ISSUE)
    assert span.parent is None  # the caller sent no trace context: a new trace
    assert span.status.status_code is StatusCode.UNSET
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == _rpc_system(target)
    assert (attributes["rpc.service"], attributes["rpc.method"]) == (
        "icegate.v1.CredentialService", "IssueTurnCredentials")
    assert attributes["icegate.project_id"] == "default"
    assert attributes["icegate.request_id"] == "trace-req-1"
    assert "icegate.error_reason" not in attributes
    if attributes["rpc.system"] == "grpc":
        assert attributes["rpc.grpc.status_code"] == 0
    (admit,) = _children(exporter, span)
    assert admit.name == "store.admit" and admit.kind is SpanKind.CLIENT
    assert admit.context.trace_id == span.context.trace_id
    assert dict(admit.attributes or {})["db.system.name"] == "sqlite"


def test_the_callers_trace_is_continued(client, exporter):
    caller, metadata = _traced_call_metadata()
    client.issue_turn_credentials("alice", metadata=metadata)

    (span,) = _server_spans(exporter, ISSUE)
    assert span.context.trace_id == caller.get_span_context().trace_id
    assert span.parent is not None and span.parent.is_remote
    assert span.parent.span_id == caller.get_span_context().span_id


@pytest.mark.parametrize("traceparent", [
    "00-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-00f067aa0ba902b7-01",  # not hex
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # the invalid all-zero id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the forbidden version
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "-x" * 2000,
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper case
])
def test_a_malformed_traceparent_is_ignored_not_an_error(client, exporter, traceparent):
    answer = client.issue_turn_credentials(
        "alice", metadata=[("traceparent", traceparent), ("tracestate", "=,=;" * 100)])
    assert answer.username.endswith(":default/alice")

    (span,) = _server_spans(exporter, ISSUE)
    assert span.parent is None
    assert span.context.trace_id != 0
    assert format_trace_id(span.context.trace_id) != "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_refused_call_carries_its_reason_and_is_not_an_error_of_the_server(
        client, target, exporter):
    with pytest.raises(icegate.InvalidArgumentError):
        client.issue_turn_credentials("alice", ttl=5)  # under the 60 s minimum
    with pytest.raises(icegate.IcegateError):
        client.issue_turn_credentials("alice", project_id="no-such-project")

    invalid, missing = _server_spans(exporter, ISSUE, count=2)
    assert dict(invalid.attributes or {})["icegate.error_reason"] == "INVALID_FIELD"
    assert dict(invalid.attributes or {})["icegate.project_id"] == "default"
    assert invalid.status.status_code is StatusCode.UNSET
    if _rpc_system(target) == "grpc":
        assert dict(invalid.attributes or {})["rpc.grpc.status_code"] == 3
    else:
        assert dict(invalid.attributes or {})["rpc.connect_rpc.error_code"] == (
            "invalid_argument")
    # The project the caller named is spelled like one, so it is said, though unknown.
    assert dict(missing.attributes or {})["icegate.project_id"] == "no-such-project"
    assert missing.status.status_code is StatusCode.UNSET


def test_a_session_traces_its_store_calls_and_its_upstream_request(client, exporter, openai):
    caller, metadata = _traced_call_metadata()
    before = len(openai.requests_to("/v1/realtime/client_secrets"))
    client.create_session("openai", metadata=metadata)

    (span,) = _server_spans(exporter, CREATE_SESSION)
    children = _children(exporter, span)
    names = [child.name for child in children]
    assert names[0] == "store.admit"
    assert {"store.begin_session", "store.confirm_session"} <= set(names)
    (upstream,) = [child for child in children if child.kind is SpanKind.CLIENT
                   and child.name == "POST"]
    upstream_attributes = dict(upstream.attributes or {})
    assert upstream_attributes.get("http.response.status_code",
                                   upstream_attributes.get("http.status_code")) == 200
    # The provider is handed the trace on, as the instrumented HTTP client does.
    sent = openai.requests_to("/v1/realtime/client_secrets")[before:]
    (request,) = sent
    trace_id = format_trace_id(caller.get_span_context().trace_id)
    assert request.headers["traceparent"].split("-")[1] == trace_id
    assert request.headers["traceparent"].split("-")[2] == format_span_id(
        upstream.context.span_id)


def test_an_upstream_failure_is_an_error_span_described_by_its_reason(client, exporter,
                                                                      openai):
    openai.enqueue(openai_error(503, "overloaded", type="server_error",
                                headers={"x-should-retry": "false"}))
    with pytest.raises(icegate.UpstreamUnavailableError):
        client.create_session("openai")

    (span,) = _server_spans(exporter, CREATE_SESSION)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "UPSTREAM_UNAVAILABLE"
    assert dict(span.attributes or {})["icegate.error_reason"] == "UPSTREAM_UNAVAILABLE"
    (upstream,) = [child for child in _children(exporter, span) if child.name == "POST"]
    assert upstream.status.status_code is StatusCode.ERROR
    # The quota unit and lease given back are traced too.
    assert "store.cancel_session" in [child.name for child in _children(exporter, span)]


def test_no_span_holds_a_key_token_secret_or_credential(client, target, exporter):
    created_key = client.create_api_key("default", display_name="traced").secret
    with icegate.Client(target, created_key) as caller:
        turn = caller.issue_turn_credentials("alice")
        session = caller.create_session("openai", user_id="bob")
    client.set_provider_key("default", "openai", OPENAI_KEY)
    with pytest.raises(icegate.AuthenticationError), \
            icegate.Client(target, "igk_wrong_" + "x" * 30) as stranger:
        stranger.issue_turn_credentials("alice")

    spans = exporter.get_finished_spans()
    assert len(spans) >= 8
    secrets = {
        "the admin key": TEST_ADMIN_KEY, "a created caller key": created_key,
        "a refused key": "igk_wrong_" + "x" * 30, "the provider key": OPENAI_KEY,
        "the TURN secret": TEST_TURN_SECRET, "the master key": TEST_MASTER_KEY,
        "a TURN password": turn.password, "a TURN password of a session":
        session.ice_servers[1].credential, "an ephemeral token": session.ephemeral_token.value,
    }
    for span in spans:
        exported = span.to_json()
        for what, secret in secrets.items():
            assert secret and secret not in exported, f"{what} in span {span.name}"


def test_tracing_off_imports_nothing_of_the_sdk_and_on_refuses_without_it(tmp_path):
    # Off (no OTEL_TRACES_EXPORTER): the server's start-up path decides without the SDK.
    script = (
        "import sys\n"
        "from icegate_server import cli, server\n"
        "from icegate_server.observability.tracing import tracing_from_environment\n"
        "assert tracing_from_environment() is None\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace',"
        " 'opentelemetry.instrumentation', 'icegate_server.observability.spans'))]\n"
        "print(loaded)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    off = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    assert off.stdout.strip() == "[]"

    # Asked for, with the packages missing: one line, exit 2, nothing started.
    hidden = ("import sys\n"
              "sys.modules['opentelemetry.sdk'] = None\n"
              "sys.modules['opentelemetry.instrumentation'] = None\n"
              "from icegate_server.cli import main\n"
              "sys.exit(main())\n")
    port = free_port()
    refused = subprocess.run(
        [sys.executable, "-c", hidden], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, env={**env, "OTEL_TRACES_EXPORTER": "otlp",
                         "ICEGATE_LISTEN": f"127.0.0.1:{port}", "ICEGATE_DATA_DIR": str(tmp_path),
                         "ICEGATE_DEV_SECRETS": "true"})
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "icegate-server: OTEL_TRACES_EXPORTER asks for tracing, but the OpenTelemetry "
        "packages are not installed: pip install 'icegate[tracing]'")


# --- a real process, a real OTLP/gRPC receiver ------------------------------------------------


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on a free loopback port (grpc.aio, in its own thread)."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._run(self._start())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    async def Export(self, request, context):
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, object], object]]:
        """Every span received, with its resource's attributes."""
        with self._lock:
            received = list(self.requests)
        found = []
        for request in received:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value
                            for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope_spans.spans)
        return found

    def stop(self) -> None:
        self._run(self._server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def test_a_real_server_exports_its_spans_to_an_otlp_receiver(tmp_path: Path):
    receiver = OtlpReceiver()
    try:
        http_port = free_port()
        process = ServerProcess(tmp_path, http_listen=f"127.0.0.1:{http_port}")
        process.env = {k: v for k, v in process.env.items() if not k.startswith("OTEL_")}
        process.env.update({
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_SERVICE_NAME": "icegate-under-test",
        })
        callers = {}
        with process:  # starts it
            for target in (process.target, f"http://127.0.0.1:{http_port}"):
                caller, metadata = _traced_call_metadata()
                with icegate.Client(target, TEST_ADMIN_KEY) as client:
                    answer = client.issue_turn_credentials("carol", metadata=metadata)
                callers[target] = (caller, answer.password)
            assert process.stop() == 0  # SIGTERM: the batch is exported before exit
    finally:
        receiver.stop()

    received = receiver.spans()
    issued = [(resource, span) for resource, span in received if span.name == ISSUE]
    assert len(issued) == 2
    for (caller, _), (resource, span) in zip(callers.values(), issued, strict=True):
        assert resource["service.name"] == "icegate-under-test"
        assert span.trace_id == caller.get_span_context().trace_id.to_bytes(16, "big")
        assert span.parent_span_id == caller.get_span_context().span_id.to_bytes(8, "big")
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["icegate.project_id"].string_value == "default"
        admits = [s for _, s in received if s.name == "store.admit"
                  and s.parent_span_id == span.span_id]
        assert len(admits) == 1
    systems = {a.value.string_value for _, span in issued for a in span.attributes
               if a.key == "rpc.system"}
    assert systems == {"grpc", "connect_rpc"}
    exported = b"".join(request.SerializeToString() for request in receiver.requests)
    for secret in (TEST_ADMIN_KEY, TEST_TURN_SECRET, TEST_MASTER_KEY,
                   *(password for _, password in callers.values())):
        assert secret.encode() not in exported


def test_a_collector_that_is_down_fails_no_call_and_its_key_stays_out_of_the_log(
        tmp_path: Path):
    http_port = free_port()
    process = ServerProcess(tmp_path, http_listen=f"127.0.0.1:{http_port}")
    process.env = {k: v for k, v in process.env.items() if not k.startswith("OTEL_")}
    process.env.update({
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer collector-key-0123456789",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",  # seconds: how long the stop waits for it
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # milliseconds: export while the server runs
    })
    with process:  # starts it
        for target in (process.target, f"http://127.0.0.1:{http_port}"):
            with icegate.Client(target, TEST_ADMIN_KEY) as client:
                for _ in range(3):
                    assert client.issue_turn_credentials("dave").username
        assert process.stop() == 0
    log = process.read_log()
    assert "opentelemetry.exporter" in log  # the failed export was logged...
    assert "collector-key-0123456789" not in log  # ...without the collector's key
