"""The guard every icegate RPC passes through: admit, run, map errors, observe.

`MethodTable.add(service, servicer, guard)` puts each method of a protobuf service into the
server's one method table: its handler is built from the service's descriptor (method name,
request and response message classes, streaming kind) and the servicer's method of the same
name, wrapped once by the guard. Health checking and reflection go in unguarded and stay
open (load balancers and grpcurl carry no key).

A guarded call is admitted through `AccessControl` (key, or else a verified client
certificate; project, rate limit: one store round trip at most), its `CallContext` is made
available to the servicer through `current_call()`, and any `IcegateError` becomes a gRPC
status with rich details through `icegate_server.status`, the one place that mapping lives.

It also observes every guarded call: the request id (the caller's `x-request-id` if valid,
else a fresh one) goes back in the trailing metadata on success and on error (merged with
the rich-status trailer), and each call ends in one `icegate_rpcs_total` count, one latency
observation and one log line (`icegate_server.observability.logs`). Open methods are neither
counted nor logged.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from icegate_server.access.control import AccessControl, CallContext, MethodPolicy
from icegate_server.access.keys import bearer_key, has_authorization
from icegate_server.access.tls import peer_identities
from icegate_server.errors import IcegateError, MalformedRequestError
from icegate_server.observability.logs import RpcLogEvent, log_rpc, valid_request_id
from icegate_server.observability.metrics import IcegateMetrics
from icegate_server.projects.records import PROJECT_ID_PATTERN
from icegate_server.status import INTERNAL_REASON, INTERNAL_STATUS, lookup, to_grpc_status

REQUEST_ID_HEADER = "x-request-id"

TURN_ISSUING_METHODS = frozenset({
    "/icegate.v1.CredentialService/IssueTurnCredentials",
    "/icegate.v1.CredentialService/GetIceServers",
    "/icegate.v1.SessionService/CreateSession",
})
"""Methods that sign TURN credentials: their admission checks the project's TURN limits and
whether the request's `user_id` is revoked (`turn.limits`)."""
MAX_TURN_SUBJECT = 256
"""A `user_id` longer than this is never a subject (the call then fails its own check)."""

SERVICE_POLICIES = {
    "/icegate.v1.AdminService/": MethodPolicy.ADMIN,
    "/icegate.v1.UsageService/": MethodPolicy.PROJECT_UNCOUNTED,
}
"""Services whose methods are not ordinary counted project calls (the default: fail closed)."""

_current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("icegate_call")


def current_call() -> CallContext:
    """The caller and project of the RPC being served (set by `CallGuard`)."""
    return _current_call.get()


_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_numbers = itertools.count(1)


def new_request_id() -> str:
    """A request id unique to this process's life: a random prefix and a call number.

    32 hex digits like a random id, but with one random draw per process instead of a
    `getrandom` system call per call; ids need to be unique, not unguessable.
    """
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"


def request_id_of(metadata: Any) -> str:
    """The caller's `x-request-id` when it is 1-128 printable ASCII characters, else a new one."""
    for name, value in metadata:
        if name == REQUEST_ID_HEADER:
            if isinstance(value, str) and valid_request_id(value):
                return value
            break
    return new_request_id()


def method_policy(method: str) -> MethodPolicy:
    """The policy of a full method name such as `/icegate.v1.AdminService/CreateProject`."""
    for prefix, policy in SERVICE_POLICIES.items():
        if method.startswith(prefix):
            return policy
    return MethodPolicy.PROJECT


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
            handler = _METHOD_HANDLERS[method.client_streaming, method.server_streaming](
                getattr(servicer, method.name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString)
            self._handlers[name] = handler if guard is None else guard.wrap(name, handler)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._handlers.get(handler_call_details.method)


class CallGuard:
    """Admits every guarded RPC and maps domain errors to statuses."""

    def __init__(self, access: AccessControl, metrics: IcegateMetrics | None = None) -> None:
        self._access = access
        self._metrics = metrics if metrics is not None else IcegateMetrics()

    def wrap(self, method: str, handler: Handler) -> Handler:
        """`handler` of the full method name `method`, admitted and observed by this guard."""
        if handler.unary_unary is None:
            raise TypeError(f"{method}: icegate serves unary-unary RPCs only")
        return grpc.unary_unary_rpc_method_handler(
            self._guard(cast(UnaryBehavior, handler.unary_unary), method_policy(method),
                        method),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _guard(self, behavior: UnaryBehavior, policy: MethodPolicy,
               method: str) -> UnaryBehavior:
        access = self._access
        metrics = self._metrics
        observe = metrics.rpc(method).observe
        issues_turn = method in TURN_ISSUING_METHODS

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            metadata = context.invocation_metadata() or ()
            trailer = ((REQUEST_ID_HEADER, request_id_of(metadata)),)
            context.set_trailing_metadata(trailer)
            code, reason, call, bug = grpc.StatusCode.OK, "", None, None
            try:
                if request is UNDECODABLE:
                    raise MalformedRequestError("the request body is not a valid message")
                project_id = getattr(request, "project_id", "")
                subject = _turn_subject(request) if issues_turn else None
                # A bearer key, when present, wins; a verified client certificate stands in
                # for a missing one (mutual TLS with ICEGATE_TLS_CLIENT_PROJECTS).
                if access.admits_identities and not has_authorization(metadata):
                    call = await access.admit_identity(
                        peer_identities(context.auth_context()), policy, project_id,
                        turn_subject=subject)
                else:
                    call = await access.admit(bearer_key(metadata), policy, project_id,
                                              turn_subject=subject)
                _current_call.set(call)
                return await behavior(request, context)
            except IcegateError as error:
                code, reason = lookup(error)
                status = to_grpc_status(error)
                await context.abort(status.code, status.details,
                                    (*status.trailing_metadata, *trailer))
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code, reason, bug = grpc.StatusCode.INTERNAL, INTERNAL_REASON, error
                await context.abort(INTERNAL_STATUS.code, INTERNAL_STATUS.details,
                                    (*INTERNAL_STATUS.trailing_metadata, *trailer))
            finally:
                seconds = time.perf_counter() - started
                observe(code, seconds)
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    metrics.limit_refused(reason)
                log_rpc(RpcLogEvent(
                    method, code, seconds * 1000, trailer[0][1], context.peer(),
                    _project_of(call, request), call.caller.key_id if call is not None else "",
                    reason), bug)

        return guarded


UNDECODABLE = object()
"""What the request deserializer hands over for a body that does not parse."""


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpcio answers a deserializer's exception UNKNOWN with the exception's text; a sentinel
    # lets CallGuard answer INVALID_ARGUMENT through the one error table instead.
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return UNDECODABLE

    return parse


def _turn_subject(request: Any) -> str:
    # The user id TURN credentials are asked for ("" for a session that takes its own id);
    # validated later by the issuer, bounded here before it reaches the store.
    user_id = getattr(request, "user_id", "")
    return user_id if isinstance(user_id, str) and len(user_id) <= MAX_TURN_SUBJECT else ""


def _project_of(call: CallContext | None, request: Any) -> str:
    # The admitted project; else the one the request named, if it is spelled like a project id.
    if call is not None and call.project is not None:
        return call.project.project_id
    named = getattr(request, "project_id", "")
    return named if isinstance(named, str) and PROJECT_ID_PATTERN.fullmatch(named) else ""


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
