"""The spans icegate makes when tracing is on (imported only then: see `tracing.py`).

- One server span per guarded RPC, on either transport: `RpcSpans`, made once per method and
  transport, started and ended by the guard's `TracedMethod` (`access/guard.py`). It is named
  as OpenTelemetry's RPC conventions name it (`icegate.v1.CredentialService/IssueTurnCredentials`)
  and continues the caller's trace when the call's gRPC metadata or HTTP headers carry a W3C
  `traceparent` (the configured propagators read it; a malformed one is ignored: the call
  starts a new trace). Its attributes: `rpc.system` (`grpc` or `connect_rpc`), `rpc.service`,
  `rpc.method`, the status (`rpc.grpc.status_code`, or `rpc.connect_rpc.error_code` for a
  failed Connect call), `icegate.request_id`, `icegate.project_id` and, for a refused call,
  `icegate.error_reason` (the ErrorInfo reason). Its status is ERROR, described by the
  reason, only for the codes that say the server failed (UNKNOWN, DEADLINE_EXCEEDED,
  UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), as the conventions ask of a gRPC server
  span: a caller refused for its key or its limits is not a failure of icegate.
- One client span per store call made inside a traced RPC (`TracedStore`): `store.admit`,
  `store.begin_session`..., with `db.system.name` and `db.operation.name`. Background work
  (the reaper, the coturn meter, the lease gauge) makes no spans.
- One client span per HTTP request to an AI provider: opentelemetry-instrumentation-httpx on
  the providers' one client (`Tracing.instrument_http`), which also sends the trace context on.

What a span holds is chosen, never copied from the call: no request field but the project id,
no header, no exception (none is recorded as an event: a message can quote anything; a failed
store call's status names its exception's class only). The ids are checked before they get
here: the request id is 1-128 printable ASCII characters, the project id matches
`PROJECT_ID_PATTERN`, the reason is an `ErrorReason` name.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, cast

import grpc
import httpx
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from icegate_server.observability.metrics import STORE_OPERATIONS
from icegate_server.store.base import Store

DEFAULT_SERVICE_NAME = "icegate"
"""`service.name` when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES sets one."""
TRACER_NAME = "icegate_server"

SERVER_FAULTS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
"""The codes whose server span has status ERROR (OpenTelemetry's gRPC conventions)."""

GRPC_SYSTEM = "grpc"

Metadata = Collection[tuple[str, Any]]

_rpc_span: contextvars.ContextVar[tuple[trace.Span, object] | None] = contextvars.ContextVar(
    "icegate_rpc_span", default=None)
"""The server span of the call being served and the token that restores the context."""


class _MetadataGetter(Getter[Metadata]):
    """Reads propagation fields from (lower-case name, value) pairs: gRPC metadata or HTTP
    headers; binary (`-bin`) values are not text and never match."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        values = [value for name, value in carrier if name == key and isinstance(value, str)]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [name for name, _ in carrier]


METADATA_GETTER = _MetadataGetter()


class RpcSpans:
    """Starts and ends the server spans of one guarded method on one transport."""

    __slots__ = ("_attributes", "_grpc", "_name", "_tracer")

    def __init__(self, tracer: trace.Tracer, method: str, transport: str) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self._tracer = tracer
        self._name = f"{service}/{name}"
        self._attributes: dict[str, AttributeValue] = {
            "rpc.system": transport, "rpc.service": service, "rpc.method": name}
        self._grpc = transport == GRPC_SYSTEM

    def start(self, metadata: Metadata) -> None:
        """Starts the call's span, a child of the caller's trace context if it sent a valid
        one, and makes it current for what the call does next (store, upstream)."""
        parent = propagate.extract(metadata, getter=METADATA_GETTER)
        span = self._tracer.start_span(self._name, context=parent, kind=SpanKind.SERVER,
                                       attributes=self._attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        _rpc_span.set((span, token))

    def end(self, code: grpc.StatusCode, reason: str, request_id: str, project_id: str) -> None:
        """Ends the call's span with its outcome (a no-op if `start` did not run)."""
        current = _rpc_span.get()
        if current is None:
            return
        _rpc_span.set(None)
        span, token = current
        if span.is_recording():
            attributes: dict[str, AttributeValue] = {"icegate.request_id": request_id}
            if self._grpc:
                attributes["rpc.grpc.status_code"] = code.value[0]
            elif code is not grpc.StatusCode.OK:
                attributes["rpc.connect_rpc.error_code"] = _connect_code(code)
            if project_id:
                attributes["icegate.project_id"] = project_id
            if reason:
                attributes["icegate.error_reason"] = reason
            span.set_attributes(attributes)
            if code in SERVER_FAULTS:
                span.set_status(Status(StatusCode.ERROR, reason or code.name))
        span.end()
        otel_context.detach(cast(Any, token))


class TracedStore:
    """A `Store` whose calls made inside a traced RPC each get a client span.

    The wrappers are made once, here; attributes that are not `Store` methods pass through
    to the wrapped store.
    """

    def __init__(self, store: Store, tracer: trace.Tracer, system: str) -> None:
        self.wrapped = store
        for operation in STORE_OPERATIONS:
            setattr(self, operation,
                    _traced(operation, getattr(store, operation), tracer, system))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _traced(operation: str, method: Callable[..., Awaitable[Any]], tracer: trace.Tracer,
            system: str) -> Callable[..., Awaitable[Any]]:
    name = f"store.{operation}"
    attributes: dict[str, AttributeValue] = {"db.system.name": system,
                                             "db.operation.name": operation}

    async def traced(*args: Any, **kwargs: Any) -> Any:
        if not trace.get_current_span().is_recording():
            return await method(*args, **kwargs)
        with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes,
                                          record_exception=False,
                                          set_status_on_exception=False) as span:
            try:
                return await method(*args, **kwargs)
            except Exception as error:
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                raise

    return traced


class Tracing:
    """Tracing, on: what the server's parts are given to make their spans with.

    Args:
        provider: The tracer provider spans go to. The server's own comes from the
            environment (`tracing.tracing_from_environment`); tests pass one with an
            in-memory exporter. It is not made the global provider.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(TRACER_NAME)

    def rpc_spans(self, method: str, transport: str) -> RpcSpans:
        """The server spans of the guarded `method` (full name) on `transport`."""
        return RpcSpans(self._tracer, method, transport)

    def traced_store(self, store: Store, store_url: str) -> Store:
        """`store`, with a client span per call inside a traced RPC."""
        system = "redis" if store_url.startswith(("redis", "unix")) else "sqlite"
        return cast(Store, TracedStore(store, self._tracer, system))

    def instrument_http(self, client: httpx.AsyncClient) -> None:
        """Gives every request of the providers' HTTP client a client span."""
        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def shutdown(self) -> None:
        """Exports what is still batched and stops the exporters (blocks: run it off the
        event loop)."""
        self.provider.shutdown()


def tracer_provider(exporters: Sequence[SpanExporter]) -> TracerProvider:
    """A tracer provider batching spans to each of `exporters`, with the environment's
    resource (service name `icegate` unless set) and sampler."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _connect_code(code: grpc.StatusCode) -> str:
    # Connect spells the gRPC codes in lower case, and CANCELLED with one L.
    return "canceled" if code is grpc.StatusCode.CANCELLED else code.name.lower()
