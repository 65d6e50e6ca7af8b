"""An OTLP/gRPC trace receiver that counts and discards what it is sent: the collector a
traced icegate exports to in `instructions.py icegate-sqlite-traced` (its own CPU is the
benchmark process's, not icegate's)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Listens on a free loopback port until `stop()`; `spans` counts the spans received."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def Export(self, request: Any, context: Any) -> Any:
        received = sum(len(scope.spans) for resource in request.resource_spans
                       for scope in resource.scope_spans)
        with self._lock:
            self.spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(0).wait()
