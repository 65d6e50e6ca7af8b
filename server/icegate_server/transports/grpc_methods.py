"""gRPC through grpc.aio: the server's one method table, each guarded method a thin adapter.

`MethodTable.add(service, servicer, guard)` puts each method of a protobuf service into the
table: its handler is built from the service's descriptor (method name, request and response
message classes, streaming kind) and the servicer's method of the same name, wrapped once by
the guard (`access/guard.py`) when one is given. Health checking and reflection go in
unguarded and stay open (load balancers and grpcurl carry no key).

The adapter reads the call's metadata, peer and verified client certificate from the
`ServicerContext`, and writes what the guard decided as gRPC does: the request id in the
trailing metadata (merged with the rich-status trailer on error), a refusal through
`context.abort` with its google.rpc.Status details.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_status import rpc_status

from icegate_server.access.control import CallContext
from icegate_server.access.guard import (
    REQUEST_ID_HEADER,
    UNDECODABLE,
    CallGuard,
    GuardedMethod,
    refusal,
    request_id_of,
)
from icegate_server.access.tls import peer_identities

if TYPE_CHECKING:  # grpc's stubs make the handler generic; at run time it is not subscriptable.
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


_METHOD_HANDLERS: dict[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
"""grpc's handler factory for each (client streaming, server streaming) kind of method."""


class MethodTable(grpc.GenericRpcHandler):
    """Every method the server serves, found by one dict look-up; no registered methods.

    grpc.aio's server waits for the next call of each *registered* method separately: its
    accept loop runs `asyncio.wait` over one pending future per registered method (and one
    for all others), so every call pays in Python for every method the server has. One
    generic handler leaves one future to wait on, and it depends on nothing but the
    descriptors and the servicers' method names, not on how generated code registers.

    Measured (`bench/instructions.py`, IssueTurnCredentials, two targets at a time,
    2026-12-06): this table 558k-562k instructions a call; grpc's own extension point instead
    (the generated `add_XServicer_to_server` registrations and a `grpc.aio.ServerInterceptor`
    wrapping each method's handler once, cached) 714k, 27 % more, past the 5 % rule.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def add(self, service: ServiceDescriptor, servicer: object,
            guard: CallGuard | None = None) -> None:
        """Serves every method of `service` by `servicer`'s method of the same name, each
        wrapped by `guard` when given (else open)."""
        for method in service.methods:
            name = f"/{service.full_name}/{method.name}"
            request = GetMessageClass(method.input_type)
            response = GetMessageClass(method.output_type)
            behavior = getattr(servicer, method.name)
            if guard is None:
                self._handlers[name] = _METHOD_HANDLERS[
                    method.client_streaming, method.server_streaming](
                    behavior, request_deserializer=request.FromString,
                    response_serializer=response.SerializeToString)
                continue
            if method.client_streaming or method.server_streaming:
                raise TypeError(f"{name}: icegate guards unary-unary RPCs only")
            self._handlers[name] = grpc.unary_unary_rpc_method_handler(
                _guarded(guard.method(name), behavior),
                request_deserializer=_tolerant(request.FromString),
                response_serializer=response.SerializeToString)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._handlers.get(handler_call_details.method)


def _guarded(method: GuardedMethod, behavior: UnaryBehavior) -> UnaryBehavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        metadata = context.invocation_metadata() or ()
        request_id = request_id_of(metadata)
        trailer = ((REQUEST_ID_HEADER, request_id),)
        context.set_trailing_metadata(trailer)
        code, reason, bug = grpc.StatusCode.OK, "", None
        call: CallContext | None = None
        try:
            call = await method.admit(request, metadata,
                                      lambda: peer_identities(context.auth_context()))
            return await behavior(request, context)
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            code, reason, status, bug = refusal(error)
            answer = rpc_status.to_status(status)
            await context.abort(answer.code, answer.details,
                                (*answer.trailing_metadata, *trailer))
        finally:
            method.observe(code, reason, started, request_id, context.peer(), call, request,
                           bug)

    return guarded


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # grpcio answers a deserializer's exception UNKNOWN with the exception's text; a sentinel
    # lets the guard answer INVALID_ARGUMENT through the one error table instead.
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return UNDECODABLE

    return parse


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    # A servicer that aborted by itself: the code it set, when grpc tells it.
    try:
        code = context.code()
    except Exception:
        return grpc.StatusCode.UNKNOWN
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN
