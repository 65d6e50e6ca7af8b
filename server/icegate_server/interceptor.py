"""The server interceptor every icegate RPC passes through: authenticate, run, map errors.

It wraps each unary-unary handler once (wrapped handlers are cached per method, so a call
does no set-up), authenticates the caller from its metadata, makes the `Caller` available to
the servicer through `current_caller()`, and turns any `IcegateError` into a gRPC status with
rich details through `icegate_server.status`, the one place that mapping lives. Health
checking and reflection stay open: load balancers and grpcurl carry no key.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
import grpc.aio

from icegate_server.auth import Caller, bearer_key
from icegate_server.errors import IcegateError
from icegate_server.status import INTERNAL_STATUS, to_grpc_status

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("icegate_caller")


def current_caller() -> Caller:
    """The authenticated caller of the RPC being served (set by `CallGuard`)."""
    return _current_caller.get()


class Authenticator(Protocol):
    """Resolves a presented key to a caller; raises `InvalidApiKeyError` when it cannot."""

    async def authenticate(self, key: str) -> Caller: ...


UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class CallGuard(grpc.aio.ServerInterceptor):
    """Authenticates every non-open RPC and maps domain errors to statuses."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if handler.unary_unary is None:
            raise TypeError(f"{method}: icegate serves unary-unary RPCs only")
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._guard(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _guard(self, behavior: UnaryBehavior) -> UnaryBehavior:
        authenticator = self._authenticator

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                key = bearer_key(context.invocation_metadata() or ())
                _current_caller.set(await authenticator.authenticate(key))
                return await behavior(request, context)
            except IcegateError as error:
                await context.abort_with_status(to_grpc_status(error))
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error serving a call")
                await context.abort_with_status(INTERNAL_STATUS)

        return guarded
