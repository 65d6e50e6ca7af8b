"""Calling icegate over Connect (an `http://` or `https://` target) instead of gRPC.

The clients call every RPC through a stub method of the form gRPC's stubs have,
`method(request, timeout=, metadata=, wait_for_ready=)`; over Connect those methods are
built here from the generated Connect clients (`icegate/v1/*_connect.py`, binary protobuf
over HTTP/1.1, connection pool of `pyqwest`), one per service, with the same behaviour as
the gRPC channel's:

- the deadline covers the whole call, retries included (sent as `connect-timeout-ms`);
- UNAVAILABLE is retried for the services gRPC's service config names, with its policy
  (`connection.RETRY_POLICY`: attempts, exponential backoff with jitter);
- with `wait_for_ready`, a server that cannot be reached is tried again (with the same
  backoff) until the deadline instead of failing at once.

A failed call raises the typed exception of `icegate.errors` (`from_connect_error`), the
same the client makes of gRPC's `RpcError`. Only clients given an http(s) target import this
module (`connection.connect_transport`): the Connect runtime needs Python 3.11.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from connectrpc.client import ConnectClient, ConnectClientSync
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from pyqwest import Client as HttpClient
from pyqwest import HTTPTransport, SyncHTTPTransport
from pyqwest import SyncClient as SyncHttpClient

from icegate.connection import (
    RETRY_POLICY,
    RETRYING_SERVICES,
    ConfigurationError,
    Connection,
    Stubs,
    read_pem,
)
from icegate.errors import from_connect_error
from icegate.v1 import (
    admin_connect,
    admin_pb2,
    credentials_connect,
    credentials_pb2,
    sessions_connect,
    sessions_pb2,
    usage_connect,
    usage_pb2,
)

IDLE_CONNECTION_SECONDS = 60.0
"""How long an idle pooled connection is kept: under icegate's 75 s, so the server never
closes one just as the client sends on it."""
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


def base_url(target: str) -> str:
    """The URL the Connect paths (`/icegate.v1.X/Method`) are appended to.

    Raises:
        ConfigurationError: Not a URL with a host (a path prefix is kept).
    """
    scheme, _, rest = target.partition("://")
    if not re.fullmatch(r"[\x21-\x7e]+", rest) or rest.startswith("/"):
        raise ConfigurationError(f"not an http(s) URL with a host: {target[:200]!r}")
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def _transport_options(connection: Connection) -> dict[str, Any]:
    tls = connection.tls
    options: dict[str, Any] = {"pool_idle_timeout": IDLE_CONNECTION_SECONDS,
                               "tls_include_system_certs": True}
    if tls is None:
        return options
    if not connection.target.lower().startswith("https://"):
        # Files meant for TLS must not silently go unused: the key would cross in clear.
        raise ConfigurationError("TLS files are given (tls=, ICEGATE_TLS_*) but the target "
                                 "is an http:// URL; use https://")
    if tls.server_name:
        raise ConfigurationError("TLS: server_name is not supported over Connect; dial the "
                                 "name on the server's certificate in the URL instead")
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigurationError("TLS: a client certificate and its key go together "
                                 "(cert_file and key_file, ICEGATE_TLS_CERT and "
                                 "ICEGATE_TLS_KEY)")
    if tls.ca_file:
        options.update(tls_ca_cert=read_pem("CA", tls.ca_file), tls_include_system_certs=False)
    if tls.cert_file:
        options.update(tls_cert=read_pem("certificate", tls.cert_file),
                       tls_key=read_pem("key", tls.key_file))
    return options


@dataclass(frozen=True)
class _Retry:
    """Whether and how one call is tried again, from the channel's rules."""

    on_unavailable: bool
    wait_for_ready: bool

    def delays(self) -> list[float]:
        """The waits before the 2nd, 3rd, ... attempt (gRPC's: random up to the backoff)."""
        backoff = RETRY_POLICY.initial_backoff
        delays = []
        for _ in range(RETRY_POLICY.max_attempts - 1):
            delays.append(random.uniform(0, backoff))  # noqa: S311 - jitter, not a secret
            backoff = min(backoff * RETRY_POLICY.multiplier, RETRY_POLICY.max_backoff)
        return delays

    def again(self, error: ConnectError, attempt: int, left: float, delay: float) -> bool:
        if error.code is not Code.UNAVAILABLE or left <= delay:
            return False
        # The server's own UNAVAILABLE answer (or none at all) within the retry budget; past
        # it, only a server that cannot be reached while the caller waits for it.
        unreachable = error.__cause__ is not None
        return (self.on_unavailable and attempt < RETRY_POLICY.max_attempts) or \
            (self.wait_for_ready and unreachable)


def _headers(metadata: Any) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in metadata or ():
        headers[name] = value
    return headers


def _snake(name: str) -> str:
    # The generated clients' method names: IssueTurnCredentials -> issue_turn_credentials.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class SyncServiceStub:
    """One service's methods over Connect, each called as a gRPC stub method is."""

    def __init__(self, client: ConnectClientSync, service: ServiceDescriptor) -> None:
        retrying = service.full_name in RETRYING_SERVICES
        for method in service.methods:
            send = getattr(client, _snake(method.name), None)
            if send is None:  # not generated (grpc.health.v1): the generic call
                send = _generic_sync(client, service, method.name)
            setattr(self, method.name, _sync_method(send, retrying))


class AsyncServiceStub:
    """One service's methods over Connect, each awaited as a grpc.aio stub method is."""

    def __init__(self, client: ConnectClient, service: ServiceDescriptor) -> None:
        retrying = service.full_name in RETRYING_SERVICES
        for method in service.methods:
            send = getattr(client, _snake(method.name), None)
            if send is None:
                send = _generic_async(client, service, method.name)
            setattr(self, method.name, _async_method(send, retrying))


def _method_info(service: ServiceDescriptor, name: str) -> MethodInfo[Any, Any]:
    method = service.methods_by_name[name]
    return MethodInfo(name=name, service_name=service.full_name,
                      input=GetMessageClass(method.input_type),
                      output=GetMessageClass(method.output_type),
                      idempotency_level=IdempotencyLevel.UNKNOWN, stream_type=StreamType.UNARY)


def _generic_sync(client: ConnectClientSync, service: ServiceDescriptor,
                  name: str) -> Callable[..., Any]:
    info = _method_info(service, name)

    def send(request: Any, *, headers: Mapping[str, str], timeout_ms: int) -> Any:
        return client.execute_unary(request=request, method=info, headers=headers,
                                    timeout_ms=timeout_ms)

    return send


def _generic_async(client: ConnectClient, service: ServiceDescriptor,
                   name: str) -> Callable[..., Awaitable[Any]]:
    info = _method_info(service, name)

    async def send(request: Any, *, headers: Mapping[str, str], timeout_ms: int) -> Any:
        return await client.execute_unary(request=request, method=info, headers=headers,
                                          timeout_ms=timeout_ms)

    return send


def _sync_method(send: Callable[..., Any], retrying: bool) -> Callable[..., Any]:
    def call(request: Any, *, timeout: float, metadata: Any = (),
             wait_for_ready: bool = False) -> Any:
        deadline = time.monotonic() + timeout
        headers = _headers(metadata)
        retry = _Retry(retrying, wait_for_ready)
        delays = retry.delays()
        attempt = 1
        while True:
            left = deadline - time.monotonic()
            try:
                return send(request, headers=headers, timeout_ms=max(int(left * 1000), 1))
            except ConnectError as error:
                delay = delays[min(attempt - 1, len(delays) - 1)] if delays else 0.0
                if not retry.again(error, attempt, deadline - time.monotonic(), delay):
                    raise from_connect_error(error) from None
                time.sleep(delay)
                attempt += 1

    return call


def _async_method(send: Callable[..., Awaitable[Any]], retrying: bool) -> Callable[..., Any]:
    async def call(request: Any, *, timeout: float, metadata: Any = (),
                   wait_for_ready: bool = False) -> Any:
        deadline = time.monotonic() + timeout
        headers = _headers(metadata)
        retry = _Retry(retrying, wait_for_ready)
        delays = retry.delays()
        attempt = 1
        while True:
            left = deadline - time.monotonic()
            try:
                return await send(request, headers=headers,
                                  timeout_ms=max(int(left * 1000), 1))
            except ConnectError as error:
                delay = delays[min(attempt - 1, len(delays) - 1)] if delays else 0.0
                if not retry.again(error, attempt, deadline - time.monotonic(), delay):
                    raise from_connect_error(error) from None
                await asyncio.sleep(delay)
                attempt += 1

    return call


def client_options(http_client: Any) -> dict[str, Any]:
    """What every Connect client is built with: the shared pool, binary protobuf over the
    google.protobuf classes, no request compression (icegate's requests are a few hundred bytes),
    and a bound on the answer's size."""
    return {"http_client": http_client, "codec": google_protobuf_binary_codec(),
            "send_compression": None, "read_max_bytes": MAX_RESPONSE_BYTES}


_SERVICES = (
    (credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"],
     credentials_connect.CredentialServiceClientSync, credentials_connect.CredentialServiceClient),
    (health_pb2.DESCRIPTOR.services_by_name["Health"], ConnectClientSync, ConnectClient),
    (admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
     admin_connect.AdminServiceClientSync, admin_connect.AdminServiceClient),
    (usage_pb2.DESCRIPTOR.services_by_name["UsageService"],
     usage_connect.UsageServiceClientSync, usage_connect.UsageServiceClient),
    (sessions_pb2.DESCRIPTOR.services_by_name["SessionService"],
     sessions_connect.SessionServiceClientSync, sessions_connect.SessionServiceClient),
)
"""Each service in `Stubs` order: its descriptor and its generated sync and asyncio clients
(health has none generated: the generic ones, fed by its descriptor)."""


def sync_stubs(connection: Connection) -> tuple[SyncHTTPTransport, Stubs]:
    """The sync client's stubs over Connect, and the connection pool to close with it.

    Raises:
        ConfigurationError: The target is not a usable URL, or TLS files are missing.
    """
    url = base_url(connection.target)
    transport = SyncHTTPTransport(**_transport_options(connection))
    options = client_options(SyncHttpClient(transport))
    return transport, Stubs(*(SyncServiceStub(sync_client(url, **options), service)
                              for service, sync_client, _ in _SERVICES))


def async_stubs(connection: Connection) -> tuple[HTTPTransport, Stubs]:
    """The asyncio client's stubs over Connect, and the connection pool to close with it."""
    url = base_url(connection.target)
    transport = HTTPTransport(**_transport_options(connection))
    options = client_options(HttpClient(transport))
    return transport, Stubs(*(AsyncServiceStub(async_client(url, **options), service)
                              for service, _, async_client in _SERVICES))
