"""The HTTP listener (`ICEGATE_HTTP_LISTEN`): uvicorn with httptools, on the server's own loop.

It serves `ConnectApplication` (Connect and gRPC-Web, HTTP/1.1) beside grpc.aio, in the same
process and on the same uvloop event loop, so both transports share one store connection,
one set of servicers, one guard and one metrics registry. uvicorn is driven through its
`Server.startup` / `shutdown` on a socket this module binds (port 0 for tests; SO_REUSEPORT
under `--workers N`, as the gRPC port); its own signal handling and main loop are not used,
the icegate server starts and stops it.

What uvicorn leaves to the application, `IcegateHttpProtocol` (its httptools protocol, with
four additions) provides:

- **Read deadline.** uvicorn bounds idle keep-alive connections but not a request that is
  trickled in (slowloris): the whole request, headers and body, must arrive within
  `read_timeout` seconds of the connection (or of the previous response), or the connection
  is closed.
- **Header size.** httptools takes headers of any size; past `MAX_HEADER_BYTES` (request line
  and headers together) the request is refused (400) and the connection closed. The body is
  bounded by the application (`MAX_REQUEST_BYTES`: RESOURCE_EXHAUSTED).
- **Client certificate.** uvicorn puts nothing of TLS in the ASGI scope; with mutual TLS the
  verified peer certificate is put under the ASGI TLS extension
  (`scope["extensions"]["tls"]["client_cert_chain"]`, PEM), where `ConnectApplication` reads
  it for the certificate-to-project mapping, as the gRPC side reads grpc's auth context.

- **One write per response.** What uvicorn writes in one turn of the loop (a response's head
  and body) goes out in one system call (`_CoalescedWrites`).

Connections beyond `MAX_CONNECTIONS` (and requests in flight beyond it) are answered 503 by
uvicorn. `X-Forwarded-*` headers are not trusted (the peer is the socket's).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from icegate_server.settings import parse_listen_address
from icegate_server.transports.connect_app import ConnectApplication, client_certificate_pem

if TYPE_CHECKING:
    from google.protobuf.descriptor import ServiceDescriptor

    from icegate_server.access.guard import CallGuard
    from icegate_server.settings import Settings

MAX_HEADER_BYTES = 16 * 1024
"""The longest request line plus headers accepted (a bearer key and a request id need <1 KiB)."""
MAX_CONNECTIONS = 2048
"""Connections (and requests in flight) per process beyond which uvicorn answers 503."""
KEEP_ALIVE_SECONDS = 75
"""How long an idle keep-alive connection stays open (above common load balancers' 60 s, so
that the balancer, not icegate, closes it and no request races a close)."""

# uvicorn's own lines say nothing icegate's do not (every RPC has its line), and a line per
# malformed request would let any client flood the log.
for _name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class _RequestTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into a parse error, answered 400."""


class IcegateHttpConfig(uvicorn.Config):
    """uvicorn's configuration plus the request read deadline the protocol enforces."""

    def __init__(self, app: Any, *, read_timeout: float, **options: Any) -> None:
        super().__init__(app, **options)
        self.read_timeout = read_timeout


class IcegateHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request read deadline, a header size bound and
    the verified client certificate in the ASGI scope (module docstring)."""

    def __init__(self, config: IcegateHttpConfig, server_state: Any, app_state: Any,
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._read_timeout = config.read_timeout
        self._read_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._extensions: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every response of the connection is written through it (module docstring).
        self.transport = _CoalescedWrites(transport, self.loop)  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            pem = client_certificate_pem(ssl_object)
            self._extensions = {"tls": {
                "server_cert": None, "client_cert_chain": [pem] if pem else [],
                "client_cert_name": None, "client_cert_error": None,
                "tls_version": None, "cipher_suite": None}}
        self._arm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._extensions is not None:
            self.scope["extensions"] = self._extensions
        if self._read_deadline is None:
            self._arm_read_deadline()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        self._disarm_read_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_read_deadline()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEADER_BYTES:
            raise _RequestTooLarge

    def _arm_read_deadline(self) -> None:
        self._disarm_read_deadline()
        self._read_deadline = self.loop.call_later(self._read_timeout, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        # A request still arriving (or none yet) after the deadline: hang up. A call whose
        # handler already runs sees the disconnect and is cancelled.
        self._read_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class _CoalescedWrites:
    """A connection's transport whose writes in one turn of the event loop go out in one.

    uvicorn writes a response's head and its body separately; sent as they come, that is two
    system calls (and two segments for the client to read) per response. Held until the end of
    the loop's turn (or a close), they go out together. A hand-built fast path that pays: CPU
    per Connect IssueTurnCredentials call (icegate process, utime + stime over h2load rounds
    alternating with and without it, 6 rounds, 16 clients) 128 us without, 112 us with it
    (-12 %); the FastAPI endpoint 148 us in the same rounds.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@dataclass(frozen=True)
class HttpTls:
    """The listener's TLS: the same files as the gRPC port's (`ICEGATE_TLS_*`)."""

    cert: str
    key: str
    client_ca: str = ""

    def context(self) -> ssl.SSLContext:
        """A server context: TLS 1.2 or later, HTTP/1.1 by ALPN, and with a client CA, a
        client certificate it signed is required (the handshake fails without one)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key, password=lambda: "")
        context.set_alpn_protocols(["http/1.1"])
        if self.client_ca:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def bind_http_socket(listen: str, *, reuse_port: bool,
                     setting: str = "ICEGATE_HTTP_LISTEN") -> socket.socket:
    """A listening-ready TCP socket bound to `listen` (host:port; port 0 picks one).

    Raises:
        OSError: The address is taken or not available (one line naming the setting).
    """
    host, port = parse_listen_address(listen)
    host = host.removeprefix("[").removesuffix("]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise OSError(f"cannot listen on {listen} ({setting}): "
                      f"{error.strerror}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        problem = ("address in use" if error.errno == errno.EADDRINUSE
                   else error.strerror or "not available")
        raise OSError(f"cannot listen on {listen} ({setting}): {problem}") from None
    return sock


class HttpListener:
    """An ASGI application (`ConnectApplication`, or the webhook listener's) served by
    uvicorn on a bound socket, until `stop`."""

    def __init__(self, app: Any, sock: socket.socket, *,
                 read_timeout: float, tls: HttpTls | None = None) -> None:
        self._socket = sock
        self.port: int = sock.getsockname()[1]
        context = tls.context() if tls is not None else None
        self._config = IcegateHttpConfig(
            app, read_timeout=read_timeout, http=IcegateHttpProtocol, ws="none",
            lifespan="off", loop="none", access_log=False, log_config=None,
            proxy_headers=False, server_header=False, date_header=False,
            timeout_keep_alive=KEEP_ALIVE_SECONDS, limit_concurrency=MAX_CONNECTIONS,
            backlog=2048, ssl_certfile=tls.cert if tls is not None else None,
            ssl_context_factory=(lambda _config, _default: context) if context else None)
        self._config.load()
        self._server = uvicorn.Server(self._config)
        self._started = False

    @property
    def scheme(self) -> str:
        return "https" if self._config.ssl is not None else "http"

    async def start(self) -> None:
        """Starts accepting connections on the bound socket."""
        server = self._server
        server.lifespan = self._config.lifespan_class(self._config)
        await server.startup(sockets=[self._socket])
        self._started = True

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets requests in flight finish within `grace` seconds (then
        cancels them), and closes every connection."""
        if not self._started:
            self._socket.close()
            return
        self._started = False
        self._config.timeout_graceful_shutdown = max(grace, 0.1)  # type: ignore[assignment]
        await self._server.shutdown(sockets=[self._socket])


def connect_listener(served: Sequence[tuple[ServiceDescriptor, object, CallGuard | None]],
                     settings: Settings) -> HttpListener:
    """The HTTP listener of `ICEGATE_HTTP_LISTEN`: every service in `served` (descriptor,
    servicer, guard or None for an open one) over Connect and gRPC-Web, with the gRPC port's
    TLS files.

    Raises:
        OSError: The address is taken or not available.
    """
    connect = ConnectApplication()
    for descriptor, servicer, guard in served:
        connect.add(descriptor, servicer, guard)
    tls = (HttpTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
           if settings.tls_cert else None)
    return HttpListener(
        connect, bind_http_socket(settings.http_listen, reuse_port=settings.workers > 1),
        read_timeout=settings.http_read_timeout, tls=tls)
