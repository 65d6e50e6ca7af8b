"""The server side of a WebSocket on a fake's own HTTP connection (websockets, sans I/O).

The fakes are `http.server` threads; a request asking to upgrade is handed, with its socket,
to the emulation, which speaks WebSocket on it through `websockets`' protocol object: the
same port and path as the provider's (`/v1/realtime?call_id=...` on OpenAI's host).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

MAX_MESSAGE_BYTES = 1024 * 1024


class ServerWebSocket:
    """One accepted WebSocket; `send` may be called from any thread."""

    def __init__(self, connection: socket.socket, raw_request: bytes) -> None:
        self._socket = connection
        self._lock = threading.Lock()
        self._protocol = ServerProtocol(max_size=MAX_MESSAGE_BYTES)
        self._protocol.receive_data(raw_request)
        (request,) = self._protocol.events_received()
        self._protocol.send_response(self._protocol.accept(request))
        self._flush()

    def _flush(self) -> None:
        for data in self._protocol.data_to_send():
            if data:
                self._socket.sendall(data)
            else:  # the protocol's signal that the server closes the TCP connection now
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_WR)

    def send(self, text: str) -> None:
        with self._lock:
            if self._protocol.state is State.OPEN:
                self._protocol.send_text(text.encode())
                self._flush()

    def close(self) -> None:
        with self._lock:
            if self._protocol.state is State.OPEN:
                self._protocol.send_close(1000, "call ended")
                self._flush()

    def messages(self) -> Iterator[str]:
        """The text messages the client sends, until it closes (or the socket does)."""
        while True:
            try:
                data = self._socket.recv(65536)
            except OSError:
                return
            with self._lock:
                if data:
                    self._protocol.receive_data(data)
                else:
                    self._protocol.receive_eof()
                events = self._protocol.events_received()
                self._flush()
            for event in events:
                if getattr(event, "opcode", None) is Opcode.TEXT:
                    yield event.data.decode()
            if not data or self._protocol.state is State.CLOSED or \
                    self._protocol.close_expected():
                return
