"""What turns OpenTelemetry tracing on: the standard `OTEL_*` variables, read once at start.

Tracing is off by default. It is on when `OTEL_TRACES_EXPORTER` names one or more exporters
(comma-separated: `otlp`, `console`, or the entry point name of any installed exporter), unless
`OTEL_SDK_DISABLED` is `true`; unset, empty or `none` leaves it off. Off, nothing of
OpenTelemetry is imported by icegate and no call does any tracing work: the server picks the
untraced guard, store and HTTP client once, at start (`server.create_server`), instead of
asking on every call. On, `spans.py` (imported only then) makes the spans.

Everything else is the SDK's own variables, read by the SDK: `OTEL_SERVICE_NAME` (icegate
defaults it to `icegate`) and `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_TRACES_SAMPLER` and
`OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`: a caller's sampling decision is
followed); `OTEL_PROPAGATORS` (default `tracecontext,baggage`); `OTEL_EXPORTER_OTLP_*` and
`OTEL_EXPORTER_OTLP_TRACES_*` (endpoint, headers, certificates, timeout, compression);
`OTEL_BSP_*` (how spans are batched). `otlp` is OTLP over gRPC (the exporter the `tracing`
extra installs); with `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`) set to
`http/protobuf` it is OTLP over HTTP, which needs opentelemetry-exporter-otlp-proto-http.

Refused at start with one line naming the variable (`ConfigError`, before any worker starts):
tracing asked for without the packages (`pip install 'icegate[tracing]'`), an exporter no
installed package provides, an OTLP protocol other than those two, a propagator that is not
installed, and `OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST` / `_RESPONSE`: the
requests to AI providers carry their API keys in headers, and no header goes into a span.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from icegate_server.settings import ConfigError

if TYPE_CHECKING:
    from icegate_server.observability.spans import Tracing

TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
SDK_DISABLED = "OTEL_SDK_DISABLED"
INSTALL_HINT = "pip install 'icegate[tracing]'"
EXPORTER_ENTRY_POINTS = "opentelemetry_traces_exporter"
"""The entry point group through which exporter packages offer their `OTEL_TRACES_EXPORTER`
names (the SDK's own auto-configuration resolves names the same way)."""
REFUSED_VARIABLES = (
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE",
)
"""opentelemetry-instrumentation-httpx would copy these headers of every provider request into
its spans; the request headers hold the provider API keys."""

_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
_OTLP_PACKAGES = {"otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc",
                  "otlp_proto_http": "opentelemetry-exporter-otlp-proto-http"}
_EXPORTER_NAME = re.compile(r"[a-z0-9_]{1,64}")


def exporter_names() -> tuple[str, ...]:
    """The exporters `OTEL_TRACES_EXPORTER` names; empty when tracing is off.

    Raises:
        ConfigError: the variable is not a comma-separated list of exporter names.
    """
    if os.environ.get(SDK_DISABLED, "").strip().lower() == "true":
        return ()
    listed = (name.strip().lower()
              for name in os.environ.get(TRACES_EXPORTER, "").split(","))
    names = tuple(dict.fromkeys(name for name in listed if name and name != "none"))
    if not all(_EXPORTER_NAME.fullmatch(name) for name in names):
        raise ConfigError(f"invalid setting {TRACES_EXPORTER}: expected exporter names such as "
                          "otlp or console, comma-separated (or none)")
    return names


def exporter_classes() -> list[type[Any]]:
    """The span exporter classes the environment asks for (empty: tracing is off), with the
    OpenTelemetry packages imported and every refusal of the module docstring checked.

    Raises:
        ConfigError: one line naming the variable at fault.
    """
    names = exporter_names()
    if not names:
        return []
    for variable in REFUSED_VARIABLES:
        if os.environ.get(variable, "").strip():
            raise ConfigError(f"invalid setting {variable}: icegate puts no HTTP header in a "
                              "span (provider requests carry API keys in theirs); unset it")
    try:
        import opentelemetry.instrumentation.httpx
        import opentelemetry.sdk.trace
        from opentelemetry.sdk.trace.export import SpanExporter
    except ImportError:
        raise ConfigError(f"{TRACES_EXPORTER} asks for tracing, but the OpenTelemetry packages "
                          f"are not installed: {INSTALL_HINT}") from None
    try:
        import opentelemetry.propagate  # noqa: F401  (reads OTEL_PROPAGATORS on import)
    except ValueError:
        raise ConfigError("invalid setting OTEL_PROPAGATORS: it names a propagator that is not "
                          "installed (tracecontext and baggage are)") from None
    classes: list[type[Any]] = []
    for name in names:
        entry = _entry_point_name(name)
        found = entry_points(group=EXPORTER_ENTRY_POINTS, name=entry)
        if not found:
            package = _OTLP_PACKAGES.get(entry)
            need = (f"install {package}" if package
                    else "no installed package provides it (otlp and console are built in)")
            raise ConfigError(f"invalid setting {TRACES_EXPORTER}: no exporter {name!r}: {need}")
        exporter = next(iter(found)).load()
        if not (isinstance(exporter, type) and issubclass(exporter, SpanExporter)):
            raise ConfigError(f"invalid setting {TRACES_EXPORTER}: {name!r} is not a span "
                              "exporter")
        classes.append(exporter)
    return classes


def check_tracing_environment() -> None:
    """Refuses, before anything starts, the tracing settings `tracing_from_environment`
    would refuse (the command line calls it once, before any worker is started).

    Raises:
        ConfigError: see `exporter_classes`.
    """
    exporter_classes()


def tracing_from_environment() -> Tracing | None:
    """The tracing the `OTEL_*` variables ask for (exporters built, spans batched), or None
    when tracing is off; the caller shuts it down (`Tracing.shutdown`) when it stops.

    Raises:
        ConfigError: see `exporter_classes`; or an exporter refused its own settings.
    """
    classes = exporter_classes()
    if not classes:
        return None
    from icegate_server.observability.spans import Tracing, tracer_provider

    exporters = []
    for exporter in classes:
        try:
            exporters.append(exporter())
        except Exception as error:
            # The exception's text can quote a header value (OTEL_EXPORTER_OTLP_HEADERS may
            # hold the tracing backend's key): its type only.
            raise ConfigError(f"invalid setting OTEL_EXPORTER_*: the {exporter.__name__} "
                              f"refused its settings ({type(error).__name__})") from None
    return Tracing(tracer_provider(exporters))


def _entry_point_name(name: str) -> str:
    # `otlp` is OTLP over gRPC unless the protocol variables say HTTP, as in the SDK.
    if name != "otlp":
        return name
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(variable, "").strip()
        if protocol:
            entry = _OTLP_BY_PROTOCOL.get(protocol)
            if entry is None:
                raise ConfigError(f"invalid setting {variable}: expected grpc or "
                                  "http/protobuf")
            return entry
    return _OTLP_BY_PROTOCOL["grpc"]
