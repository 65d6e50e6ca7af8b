"""The server interceptor every icegate RPC passes through: admit, run, map errors.

It wraps each unary-unary handler once (wrapped handlers are cached per method, so a call
does no set-up), admits the call through `AccessControl` (key, project, rate limit: one store
round trip), makes the `CallContext` available to the servicer through `current_call()`, and
turns any `IcegateError` into a gRPC status with rich details through `icegate_server.status`,
the one place that mapping lives. Health checking and reflection stay open: load balancers
and grpcurl carry no key.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio

from icegate_server.access import AccessControl, CallContext, MethodPolicy
from icegate_server.auth import bearer_key
from icegate_server.errors import IcegateError
from icegate_server.status import INTERNAL_STATUS, to_grpc_status

log = logging.getLogger(__name__)

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

    def __init__(self, access: AccessControl) -> None:
        self._access = access
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
            self._guard(cast(UnaryBehavior, handler.unary_unary), method_policy(method)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _guard(self, behavior: UnaryBehavior, policy: MethodPolicy) -> UnaryBehavior:
        admit = self._access.admit

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                key = bearer_key(context.invocation_metadata() or ())
                project_id = getattr(request, "project_id", "")
                _current_call.set(await admit(key, policy, project_id))
                return await behavior(request, context)
            except IcegateError as error:
                await context.abort_with_status(to_grpc_status(error))
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error serving a call")
                await context.abort_with_status(INTERNAL_STATUS)

        return guarded
