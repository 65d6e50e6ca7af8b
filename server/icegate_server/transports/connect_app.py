"""Connect and gRPC-Web over HTTP: one ASGI application for every service of the contract.

`ConnectApplication` is the official `connectrpc` ASGI application (which speaks the Connect
protocol, binary protobuf and JSON, and gRPC-Web) over one table of endpoints built, like
the gRPC method table (`grpc_methods.py`), from the protobuf service descriptors and the
servicers' methods of the same names: a method added to the contract is served here with no
further code. Guarded methods pass through the same guard as on gRPC (`access/guard.py`);
this module only translates:

- the caller's metadata is the HTTP request headers (`authorization`, `x-request-id`); its
  verified client certificate comes from the ASGI TLS extension of the connection
  (`http_listener.py` puts it there), its peer from the connection's address;
- the request id goes back as the `x-request-id` response header, on success and on error;
- a refusal is a `ConnectError` with the same code and message as on gRPC, and the rich
  status's details (ErrorInfo, BadRequest, RetryInfo, QuotaFailure, Help) as Connect error
  details, so the client raises the same typed errors from them;
- a body that does not parse (binary or JSON) reaches the guard as `UNDECODABLE`, answered
  INVALID_ARGUMENT (MALFORMED_REQUEST) through the one error table, counted and logged.

A plain binary unary call (`application/proto`, no compression: what icegate's clients and
Connect-ES send) is served by this module's own short path over the same endpoint table
(`_serve_binary_unary`: measured, see there); every other request goes through connectrpc.

Only unary methods are served over HTTP (the Connect protocol's streaming needs HTTP/2 for
what icegate would use it for): health's Check is, its Watch and reflection stay on gRPC.
Servicers receive a small stand-in for grpc's `ServicerContext` with what they use of it
(`time_remaining`, `abort`, `peer`, `invocation_metadata`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn

import grpc
from connectrpc._protocol import ConnectWireError
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import Headers, RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2
from protobuf.wkt import Any as AnyDetail

from icegate_server.access.control import CallContext
from icegate_server.access.guard import (
    CONNECT_TRANSPORT,
    MAX_REQUEST_BYTES,
    REQUEST_ID_HEADER,
    UNDECODABLE,
    CallGuard,
    GuardedMethod,
    new_request_id,
    refusal,
)
from icegate_server.access.tls import certificate_names
from icegate_server.observability.logs import valid_request_id
from icegate_server.status import INTERNAL_RPC_STATUS

Behavior = Callable[[Any, Any], Awaitable[Any]]

CONNECT_CODES: dict[grpc.StatusCode, Code] = {
    grpc.StatusCode.CANCELLED: Code.CANCELED,
    **{status: Code[status.name] for status in grpc.StatusCode
       if status.name in Code.__members__},
}
"""The Connect code of each gRPC status code (the same names, Connect spells CANCELED)."""
GRPC_CODES = {connect: status for status, connect in CONNECT_CODES.items()}

_TLS_EXTENSION = "tls"
_client_certificate: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "icegate_client_certificate", default=None)


class _TolerantCodec:
    """A codec of connectrpc's google.protobuf compatibility layer, except that a body that
    does not parse decodes to `UNDECODABLE`, for the guard to answer through the error
    table (connectrpc would answer it itself, quoting the parser's message)."""

    def __init__(self, codec: Any) -> None:
        self._codec = codec
        self.name = codec.name
        self.encode = codec.encode

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self._codec.decode(data, message_class)
        except Exception:
            return UNDECODABLE


CODECS = (_TolerantCodec(google_protobuf_binary_codec()),
          _TolerantCodec(google_protobuf_json_codec(ignore_unknown_fields=True)))
"""Binary protobuf (`application/proto`) and JSON (`application/json`), over the same
google.protobuf message classes as gRPC."""


class ConnectServicerContext:
    """What servicers use of grpc's `ServicerContext`, for a call that came over Connect."""

    __slots__ = ("_context",)

    def __init__(self, context: RequestContext[Any, Any]) -> None:
        self._context = context

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline (`connect-timeout-ms`), None without."""
        remaining = self._context.timeout_ms
        return None if remaining is None else max(remaining / 1000, 0.0)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._context.request_headers.allitems())

    def peer(self) -> str:
        return self._context.client_address or ""

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: object = ()) -> NoReturn:
        """Ends the call with `code`, as `grpc.aio.ServicerContext.abort` does."""
        raise ConnectError(CONNECT_CODES.get(code, Code.UNKNOWN), details)


def connect_error(status: status_pb2.Status) -> ConnectError:
    """The Connect error for a google.rpc.Status: its code, message and details, each detail
    sent as the same `google.protobuf.Any` it is on gRPC."""
    return ConnectError(
        _CONNECT_CODE_OF_NUMBER.get(status.code, Code.UNKNOWN), status.message,
        [ErrorDetail(AnyDetail(type_url=detail.type_url, value=detail.value))
         for detail in status.details])


_CONNECT_CODE_OF_NUMBER = {status.value[0]: code for status, code in CONNECT_CODES.items()}


def peer_identities() -> list[str]:
    """The typed names of the verified client certificate of the call being served (none
    without mutual TLS)."""
    pem = _client_certificate.get()
    return certificate_names(pem.encode("ascii")) if pem else []


class ConnectApplication(ConnectASGIApplication[None]):
    """The contract's services over Connect and gRPC-Web, built from their descriptors.

    Args:
        read_max_bytes: The largest request message accepted, compressed or not; a larger
            one is answered RESOURCE_EXHAUSTED.
    """

    def __init__(self, *, read_max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self._table: dict[str, Any] = {}
        self._max_request_bytes = read_max_bytes
        super().__init__(service=None, endpoints=lambda _: self._table,
                         read_max_bytes=read_max_bytes, codecs=CODECS)

    @property
    def path(self) -> str:
        """The prefix this application is mounted at: the root (it serves every service)."""
        return ""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # The verified client certificate (ASGI TLS extension), for `peer_identities`: the
        # endpoint runs in this task and sees the context variable.
        extensions: Mapping[str, Any] | None = scope.get("extensions")
        if extensions is not None:
            chain: Sequence[str] = (extensions.get(_TLS_EXTENSION) or {}).get(
                "client_cert_chain") or ()
            _client_certificate.set(chain[0] if chain else None)
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._table.get(scope["path"])
            if endpoint is not None:
                timeout_ms = binary_unary_timeout(scope["headers"])
                if timeout_ms is not _NOT_PLAIN:
                    await _serve_binary_unary(endpoint, timeout_ms, self._max_request_bytes,
                                              scope, receive, send)
                    return
        # connectrpc answers a request it cannot serve (native gRPC without HTTP trailers, a
        # header that is not UTF-8) and then raises for the server to log: a line per hostile
        # request would let any client flood the log. Calls that reach a servicer are logged
        # by the guard; one left unanswered gets uvicorn's 500.
        with contextlib.suppress(Exception):
            await super().__call__(scope, receive, send)

    def add(self, service: ServiceDescriptor, servicer: object,
            guard: CallGuard | None = None) -> None:
        """Serves every unary method of `service` by `servicer`'s method of the same name,
        each through `guard` when given (else open); streaming methods are left out."""
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                if guard is not None:
                    raise TypeError(f"{service.full_name}/{method.name}: icegate guards "
                                    "unary-unary RPCs only")
                continue
            path = f"/{service.full_name}/{method.name}"
            info = MethodInfo(
                name=method.name, service_name=service.full_name,
                input=GetMessageClass(method.input_type),
                output=GetMessageClass(method.output_type),
                idempotency_level=IdempotencyLevel.UNKNOWN, stream_type=StreamType.UNARY)
            behavior = getattr(servicer, method.name)
            function = (_open(behavior) if guard is None
                        else _guarded(guard.method(path, CONNECT_TRANSPORT), behavior))
            self._table[path] = Endpoint.unary(method=info, function=function)


# --- the binary unary call, served without connectrpc's per-request machinery -----------------
#
# The hot path (a unary call with a binary protobuf body, as icegate's clients and Connect-ES
# send it) is served here; everything else (JSON, compression, GET, gRPC-Web, any header the
# path below does not expect) goes through connectrpc's application. It does what connectrpc
# does for such a call: the same endpoint table and functions, the same size limit and
# deadline (`connect-timeout-ms`, else DEADLINE_EXCEEDED), a client that hangs up cancels the
# call, and errors are written by connectrpc's own `ConnectWireError` (the version is pinned
# exactly in pyproject.toml for this import). tests/integration/test_http_*.py and
# tests/unit/access/test_guard.py drive both paths.
#
# Measured (`bench/instructions.py icegate-sqlite-connect fastapi`, IssueTurnCredentials,
# 2026-12-06): 562k instructions a call through connectrpc's `_handle_request` (its Headers,
# deadline scope, metadata interceptors, compression negotiation, disconnect watch, response
# assembly), 435k here (-23 %, far past the 5 % rule); the FastAPI endpoint 582k. With one
# write per answer (http_listener._CoalescedWrites), Connect with every feature on measured
# 1.46-1.52 x FastAPI in paired rounds (docs/PERFORMANCE.md, last section).

_NOT_PLAIN = object()
"""`binary_unary_timeout`'s answer for a request connectrpc's application must serve."""
_PROTO = b"application/proto"


def binary_unary_timeout(headers: Sequence[tuple[bytes, bytes]]) -> Any:
    """For a POST's raw headers: the call's deadline in milliseconds (None: none) when it is a
    plain binary unary call this module serves itself, else `_NOT_PLAIN`."""
    content_type: bytes = b""
    timeout_ms: int | None = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value
        elif name == b"connect-timeout-ms":
            # connectrpc's rule: 1-10 ASCII digits; anything else is its to refuse.
            if not (0 < len(value) <= 10 and value.isdigit()):
                return _NOT_PLAIN
            timeout_ms = int(value)
        elif (name == b"connect-protocol-version" and value != b"1") or \
                (name == b"content-encoding" and value not in (b"", b"identity")):
            return _NOT_PLAIN
    return timeout_ms if content_type == _PROTO else _NOT_PLAIN


async def _serve_binary_unary(endpoint: Any, timeout_ms: int | None, read_max_bytes: int,
                              scope: Any, receive: Any, send: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if timeout_ms is None else loop.time() + timeout_ms / 1000
    body = b""
    disconnected = False
    context: RequestContext[Any, Any] | None = None
    try:
        async with asyncio.timeout_at(deadline) as scope_timeout:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before its request was whole: nobody to answer
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > read_max_bytes:
                    raise ConnectError(Code.RESOURCE_EXHAUSTED,
                                       f"message is larger than configured max {read_max_bytes}")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            info = endpoint.method
            try:
                request = info.input.FromString(body)
            except Exception:
                request = UNDECODABLE
            client = scope.get("client")
            context = RequestContext(
                method=info, http_method="POST",
                request_headers=Headers([(name.decode("latin-1"), value.decode("latin-1"))
                                         for name, value in scope["headers"]]),
                timeout_ms=timeout_ms,
                client_address=f"{client[0]}:{client[1]}" if client else None)

            def hung_up() -> None:
                nonlocal disconnected
                disconnected = True
                if not scope_timeout.expired():
                    scope_timeout.reschedule(loop.time())

            # Watched only once the call suspends (as connectrpc does): a call answered
            # without waiting pays for no task.
            watch = _DisconnectWatch(receive, hung_up)
            started = loop.call_soon(watch.start)
            try:
                response = await endpoint.function(request, context)
            finally:
                started.cancel()
                watch.stop()
        answer = response.SerializeToString()
    except TimeoutError:
        if disconnected:
            return
        error: ConnectError = ConnectError(Code.DEADLINE_EXCEEDED, "Request timed out")
    except ConnectError as refused:
        error = refused
    else:
        headers = [(b"content-type", _PROTO), (b"content-length", b"%d" % len(answer))]
        if context is not None:
            headers.extend((name.encode("latin-1"), value.encode("latin-1"))
                           for name, value in context.response_headers.allitems())
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        return
    wire = ConnectWireError.from_exception(error)
    body = wire.to_json_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if context is not None:
        headers.extend((name.encode("latin-1"), value.encode("latin-1"))
                       for name, value in context.response_headers.allitems())
    await send({"type": "http.response.start", "status": wire.to_http_status().code,
                "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _DisconnectWatch:
    """Calls `on_hang_up` when the client disconnects while the call runs."""

    __slots__ = ("_on_hang_up", "_receive", "_task")

    def __init__(self, receive: Any, on_hang_up: Callable[[], None]) -> None:
        self._receive = receive
        self._on_hang_up = on_hang_up
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        # uvicorn's receive() returns http.disconnect once the client is gone (or once the
        # answer is complete, by which time this watch has been stopped).
        with contextlib.suppress(Exception):
            while (await self._receive())["type"] != "http.disconnect":
                pass
            self._on_hang_up()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _open(behavior: Behavior) -> Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]]:
    async def served(request: Any, context: RequestContext[Any, Any]) -> Any:
        if request is UNDECODABLE:
            raise ConnectError(Code.INVALID_ARGUMENT, "the request body is not a valid message")
        try:
            return await behavior(request, ConnectServicerContext(context))
        except ConnectError:
            raise
        except Exception:
            # connectrpc would answer with the exception's text; nothing of it goes out.
            raise connect_error(INTERNAL_RPC_STATUS) from None

    return served


def _guarded(method: GuardedMethod,
             behavior: Behavior) -> Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]]:
    async def guarded(request: Any, context: RequestContext[Any, Any]) -> Any:
        started = time.perf_counter()
        headers = context.request_headers
        request_id = headers.get(REQUEST_ID_HEADER)
        if request_id is None or not valid_request_id(request_id):
            request_id = new_request_id()
        context.response_headers[REQUEST_ID_HEADER] = request_id
        code, reason, bug = grpc.StatusCode.OK, "", None
        call: CallContext | None = None
        try:
            call = await method.admit(request, headers.allitems(), peer_identities)
            return await behavior(request, ConnectServicerContext(context))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except ConnectError as error:  # a servicer's own abort
            code = GRPC_CODES.get(error.code, grpc.StatusCode.UNKNOWN)
            raise
        except Exception as error:
            code, reason, status, bug = refusal(error)
            raise connect_error(status) from None
        finally:
            method.observe(code, reason, started, request_id, context.client_address or "",
                           call, request, bug)

    return guarded


def client_certificate_pem(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The PEM of the certificate the TLS peer presented and the handshake verified."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der) if der else None
