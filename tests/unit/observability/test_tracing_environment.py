"""What turns tracing on (the OTEL_* variables), what is refused at start, and the pieces the
server is given when it is on: the traced guard, the traced store, the metadata reader."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from icegate_server import cli
from icegate_server.access.guard import (
    CONNECT_TRANSPORT,
    GRPC_TRANSPORT,
    CallGuard,
    GuardedMethod,
    TracedMethod,
)
from icegate_server.errors import StoreUnavailableError
from icegate_server.observability.metrics import STORE_OPERATIONS, IcegateMetrics
from icegate_server.observability.spans import METADATA_GETTER, Tracing
from icegate_server.observability.tracing import (
    exporter_classes,
    exporter_names,
    tracing_from_environment,
)
from icegate_server.settings import ConfigError

ISSUE = "/icegate.v1.CredentialService/IssueTurnCredentials"


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("value", "names"), [
    (None, ()), ("", ()), ("none", ()), (" None ", ()), ("otlp", ("otlp",)),
    ("OTLP, console,otlp", ("otlp", "console")), ("none,console", ("console",)),
])
def test_tracing_is_on_only_when_an_exporter_is_named(monkeypatch, value, names):
    if value is not None:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    assert exporter_names() == names


def test_the_sdk_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "TRUE")
    assert exporter_names() == ()
    assert tracing_from_environment() is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    assert exporter_names() == ("otlp",)


def test_otlp_is_grpc_and_console_is_the_sdks(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,console")
    assert exporter_classes() == [OTLPSpanExporter, ConsoleSpanExporter]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert exporter_classes()[0] is OTLPSpanExporter


@pytest.mark.parametrize(("variables", "message"), [
    ({"OTEL_TRACES_EXPORTER": "otlp;rm -rf /"},
     "invalid setting OTEL_TRACES_EXPORTER: expected exporter names such as otlp or console, "
     "comma-separated (or none)"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"},
     "invalid setting OTEL_TRACES_EXPORTER: no exporter 'zipkin': no installed package "
     "provides it (otlp and console are built in)"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     "invalid setting OTEL_TRACES_EXPORTER: no exporter 'otlp': install "
     "opentelemetry-exporter-otlp-proto-http"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "carrier-pigeon"},
     "invalid setting OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: expected grpc or http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "console",
      "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST": ".*"},
     "invalid setting OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST: icegate puts "
     "no HTTP header in a span (provider requests carry API keys in theirs); unset it"),
    ({"OTEL_TRACES_EXPORTER": "console",
      "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE": "x-request-id"},
     "invalid setting OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE: icegate puts "
     "no HTTP header in a span (provider requests carry API keys in theirs); unset it"),
])
def test_what_cannot_be_honoured_is_refused_in_one_line(monkeypatch, variables, message):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        tracing_from_environment()
    assert str(refused.value) == message


def test_an_unknown_propagator_is_refused(monkeypatch):
    # The API reads OTEL_PROPAGATORS when opentelemetry.propagate is first imported: a fresh
    # import here, the module already loaded put back afterwards.
    monkeypatch.delitem(sys.modules, "opentelemetry.propagate")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_PROPAGATORS", "tracecontext,b3-that-is-not-installed")
    with pytest.raises(ConfigError) as refused:
        tracing_from_environment()
    assert str(refused.value) == ("invalid setting OTEL_PROPAGATORS: it names a propagator "
                                  "that is not installed (tracecontext and baggage are)")


def test_the_command_line_refuses_before_anything_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    assert cli.main(["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err.strip() == (
        "icegate-server: invalid setting OTEL_TRACES_EXPORTER: no exporter 'zipkin': no "
        "installed package provides it (otlp and console are built in)")
    assert not (tmp_path / "data").exists()  # no dev secrets written, nothing opened


def test_the_service_is_named_icegate_unless_the_operator_names_it(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracing = tracing_from_environment()
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "icegate"
    finally:
        tracing.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-icegate")
    tracing = tracing_from_environment()
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "edge-icegate"
    finally:
        tracing.shutdown()


def _tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def test_the_guard_is_the_untraced_one_unless_tracing_is_given():
    access: Any = types.SimpleNamespace()
    untraced = CallGuard(access, IcegateMetrics())
    assert type(untraced.method(ISSUE)) is GuardedMethod
    assert type(untraced.method(ISSUE, CONNECT_TRANSPORT)) is GuardedMethod

    traced = CallGuard(access, IcegateMetrics(), _tracing()[0])
    on_grpc = traced.method(ISSUE, GRPC_TRANSPORT)
    assert isinstance(on_grpc, TracedMethod)
    assert traced.method(ISSUE) is on_grpc
    assert traced.method(ISSUE, CONNECT_TRANSPORT) is not on_grpc


def test_a_span_ended_without_being_started_is_no_error():
    tracing, exporter = _tracing()
    tracing.rpc_spans(ISSUE, GRPC_TRANSPORT).end(grpc.StatusCode.OK, "", "r", "")
    assert exporter.get_finished_spans() == ()


def test_only_text_metadata_is_read_for_the_trace_context():
    carrier = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
               ("tracestate", "a=b"), ("tracestate", "c=d")]
    assert METADATA_GETTER.get(carrier, "traceparent") is None
    assert METADATA_GETTER.get(carrier, "tracestate") == ["a=b", "c=d"]
    assert METADATA_GETTER.keys(carrier) == ["traceparent", "tracestate", "tracestate"]


class _Store:
    """Every store operation; `admit` fails as an unreachable Redis would, with a message
    that must not reach a span."""

    def __init__(self) -> None:
        for operation in STORE_OPERATIONS:
            if operation != "admit":
                setattr(self, operation, self._answer)

    async def _answer(self, *args: Any, **kwargs: Any) -> str:
        return "answered"

    async def admit(self, **kwargs: Any) -> None:
        raise StoreUnavailableError("redis://:hunter2@cache:6379 timed out")


def test_store_calls_are_spans_inside_a_traced_call_only():
    tracing, exporter = _tracing()
    store: Any = tracing.traced_store(_Store(), "redis://cache:6379/0")
    tracer = tracing.provider.get_tracer("test")

    async def calls() -> None:
        assert await store.get_project("p") == "answered"  # no call being traced: no span
        with tracer.start_as_current_span("call"):
            assert await store.get_project("p") == "answered"
            with pytest.raises(StoreUnavailableError):
                await store.admit(digest=None, project_id="p", now_ms=0, count=True)

    asyncio.run(calls())
    call, = [span for span in exporter.get_finished_spans() if span.name == "call"]
    children = [span for span in exporter.get_finished_spans() if span.name != "call"]
    assert [span.name for span in children] == ["store.get_project", "store.admit"]
    assert all(span.parent is not None and span.parent.span_id == call.context.span_id
               for span in children)
    assert dict(children[0].attributes or {}) == {"db.system.name": "redis",
                                                  "db.operation.name": "get_project"}
    failed = children[1]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "StoreUnavailableError"
    assert failed.events == ()
    assert "hunter2" not in failed.to_json()
