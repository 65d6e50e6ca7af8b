"""gRPC spoken by hand: HTTP/2 frames over a plain TCP socket (h2c, prior knowledge).

For tests that need what no well-behaved client sends: bodies whose length prefix lies,
streams that never end, header values a grpc client refuses to put on the wire. Every wait
is bounded by a deadline; nothing here blocks forever.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

GRPC_OK = 0


def grpc_frame(payload: bytes, *, length: int | None = None, compressed: bool = False) -> bytes:
    """The 5-byte gRPC message prefix (flag, big-endian length) followed by `payload`.

    `length` overrides the announced length (to lie about it); `compressed` sets the flag.
    """
    announced = len(payload) if length is None else length
    return struct.pack(">BI", 1 if compressed else 0, announced) + payload


@dataclass
class StreamResult:
    """What came back on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    ended: bool = False
    reset_code: int | None = None
    connection_closed: bool = False

    @property
    def finished(self) -> bool:
        return self.ended or self.reset_code is not None or self.connection_closed

    @property
    def grpc_status(self) -> int | None:
        """grpc-status from the trailers, or from the headers of a trailers-only answer."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))


def _decode(headers: list[tuple[bytes, bytes]] | None) -> dict[str, str]:
    return {bytes(k).decode("latin-1"): bytes(v).decode("latin-1") for k, v in headers or ()}


class RawGrpcConnection:
    """One HTTP/2 connection to a gRPC server, driven by hand."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self.authority = f"{host}:{port}"
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        # A large receive window, so answers are never held up by our flow control.
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**24})
        self.conn.increment_flow_control_window(2**30)
        self.results: dict[int, StreamResult] = {}
        self.closed = False
        self._flush()

    # -- sending ---------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def request_headers(self, path: str, api_key: str | None,
                        extra: list[tuple[bytes, bytes]] | None = None,
                        ) -> list[tuple[bytes, bytes]]:
        headers = [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
            (b":authority", self.authority.encode()),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        ]
        if api_key is not None:
            headers.append((b"authorization", f"Bearer {api_key}".encode()))
        return headers + list(extra or ())

    def start(self, path: str, api_key: str | None, *,
              extra: list[tuple[bytes, bytes]] | None = None) -> int:
        """Opens a stream with the request headers; returns its id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, self.request_headers(path, api_key, extra))
        self.results[stream_id] = StreamResult()
        self._flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Sends `data` on the stream, waiting (bounded) for flow-control window as needed.

        Stops quietly if the server finishes the stream first (e.g. refusing a message that
        is too large before it has all arrived).
        """
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        while view:
            result = self.results[stream_id]
            if result.finished or self.closed:
                return
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                if time.monotonic() > deadline:
                    raise TimeoutError("no flow-control window from the server")
                self._receive(deadline)
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream_id, bytes(chunk))
            self._flush()
        if end_stream and not self.results[stream_id].finished and not self.closed:
            try:
                self.conn.end_stream(stream_id)
            except h2.exceptions.StreamClosedError:
                return
            self._flush()

    def call(self, path: str, api_key: str | None, body: bytes, *,
             extra: list[tuple[bytes, bytes]] | None = None) -> StreamResult:
        """One whole request (headers, `body`, END_STREAM) and its answer."""
        stream_id = self.start(path, api_key, extra=extra)
        self.send(stream_id, body, end_stream=True)
        return self.wait(stream_id)

    # -- receiving -------------------------------------------------------------------------

    def wait(self, stream_id: int, timeout: float | None = None) -> StreamResult:
        """Reads until the stream finishes or `timeout` (default: the connection's) passes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.results[stream_id].finished and time.monotonic() < deadline:
            self._receive(deadline)
        return self.results[stream_id]

    def poll(self, seconds: float = 0.0) -> None:
        """Handles whatever arrives within `seconds` (PINGs, SETTINGS, window updates)."""
        self._receive(time.monotonic() + seconds)

    def _receive(self, deadline: float) -> None:
        if self.closed:
            return
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_all()
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._close_all()
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        result = self.results.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived) and result is not None:
            result.headers = _decode(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and result is not None:
            result.trailers = _decode(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if result is not None:
                result.data += event.data
            if event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and result is not None:
            result.ended = True
        elif isinstance(event, h2.events.StreamReset) and result is not None:
            result.reset_code = int(event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close_all()

    def _close_all(self) -> None:
        self.closed = True
        for result in self.results.values():
            if not result.finished:
                result.connection_closed = True

    def close(self) -> None:
        if not self.closed:
            try:
                self.conn.close_connection()
                self._flush()
            except h2.exceptions.ProtocolError:
                pass
        self.closed = True
        self.sock.close()

    def __enter__(self) -> RawGrpcConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
