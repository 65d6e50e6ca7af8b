"""The server interceptor every icegate RPC passes through: admit, run, map errors.

It wraps each unary-unary handler once (wrapped handlers are cached per method, so a call
does no set-up), admits the call through `AccessControl` (key, or else a verified client
certificate; project, rate limit: one store round trip), makes the `CallContext` available
to the servicer through `current_call()`, and turns any `IcegateError` into a gRPC status
with rich details through `icegate_server.status`, the one place that mapping lives. Health
checking and reflection stay open: load balancers and grpcurl carry no key.

It also observes every guarded call: the request id (the caller's `x-request-id` if valid,
else a fresh one) goes back in the trailing metadata on success and on error (merged with
the rich-status trailer), and each call ends in one `icegate_rpcs_total` count, one latency
observation and one log line (`icegate_server.logs`). Open methods are neither counted nor
logged.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio

from icegate_server.access import AccessControl, CallContext, MethodPolicy
from icegate_server.auth import bearer_key, has_authorization
from icegate_server.errors import IcegateError, MalformedRequestError
from icegate_server.logs import RpcLogEvent, log_rpc, valid_request_id
from icegate_server.metrics import IcegateMetrics
from icegate_server.projects import PROJECT_ID_PATTERN
from icegate_server.status import INTERNAL_STATUS, lookup, to_grpc_status
from icegate_server.tls import peer_identities

REQUEST_ID_HEADER = "x-request-id"

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

SERVICE_POLICIES = {
    "/icegate.v1.AdminService/": MethodPolicy.ADMIN,
    "/icegate.v1.UsageService/": MethodPolicy.PROJECT_UNCOUNTED,
}
"""Services whose methods are not ordinary counted project calls (the default: fail closed)."""

_current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("icegate_call")


def current_call() -> CallContext:
    """The caller and project of the RPC being served (set by `CallGuard`)."""
    return _current_call.get()


def request_id_of(metadata: Any) -> str:
    """The caller's `x-request-id` when it is 1-128 printable ASCII characters, else a new one."""
    for name, value in metadata:
        if name == REQUEST_ID_HEADER:
            if isinstance(value, str) and valid_request_id(value):
                return value
            break
    return os.urandom(16).hex()


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


class CallGuard(grpc.aio.ServerInterceptor):
    """Admits every non-open RPC and maps domain errors to statuses."""

    def __init__(self, access: AccessControl, metrics: IcegateMetrics | None = None) -> None:
        self._access = access
        self._metrics = metrics if metrics is not None else IcegateMetrics()
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if handler.unary_unary is None:
            raise TypeError(f"{method}: icegate serves unary-unary RPCs only")
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._guard(cast(UnaryBehavior, handler.unary_unary), method_policy(method),
                        method),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _guard(self, behavior: UnaryBehavior, policy: MethodPolicy,
               method: str) -> UnaryBehavior:
        access = self._access
        metrics = self._metrics
        observe = metrics.rpc(method).observe

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
                # A bearer key, when present, wins; a verified client certificate stands in
                # for a missing one (mutual TLS with ICEGATE_TLS_CLIENT_PROJECTS).
                if access.admits_identities and not has_authorization(metadata):
                    call = await access.admit_identity(
                        peer_identities(context.auth_context()), policy, project_id)
                else:
                    call = await access.admit(bearer_key(metadata), policy, project_id)
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
                code, reason, bug = grpc.StatusCode.INTERNAL, "INTERNAL", error
                await context.abort(INTERNAL_STATUS.code, INTERNAL_STATUS.details,
                                    (*INTERNAL_STATUS.trailing_metadata, *trailer))
            finally:
                seconds = time.perf_counter() - started
                observe(code, seconds)
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    metrics.limit_refused(reason)
                log_rpc(RpcLogEvent(
                    method=method, code=code, duration_ms=seconds * 1000,
                    request_id=trailer[0][1], peer=context.peer(),
                    project=_project_of(call, request), reason=reason,
                    key_id=call.caller.key_id if call is not None else ""), bug)

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


def _project_of(call: CallContext | None, request: Any) -> str:
    # The admitted project; else the one the request named, if it is spelled like a project id.
    if call is not None and call.project is not None:
        return call.project.project_id
    named = getattr(request, "project_id", "")
    return named if isinstance(named, str) and PROJECT_ID_PATTERN.match(named) else ""


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
