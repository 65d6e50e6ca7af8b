"""A scriptable HTTP server on a real socket (127.0.0.1, port 0) in a background thread.

Each request is recorded; the answer is the next canned response queued by the test, or,
when the queue is empty, whatever the provider emulation (`responder`) says.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class CannedResponse:
    """One scripted answer.

    Attributes:
        status: HTTP status.
        json_body: Encoded as JSON when set.
        raw_body: Sent as is when set (wins over json_body): for malformed answers.
        headers: Extra response headers.
        delay: Seconds to wait before answering (cut short when the server stops).
        reset: "" to answer normally; "before" to reset the connection without answering;
            "mid_body" to send the status, headers and half the body, then reset.
    """

    status: int = 200
    json_body: Any = None
    raw_body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: str = ""

    def body_bytes(self) -> bytes:
        if self.raw_body is not None:
            return self.raw_body
        return b"" if self.json_body is None else json.dumps(self.json_body).encode()


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


Responder = Callable[[RecordedRequest], CannedResponse]
WebSocketResponder = Callable[[RecordedRequest, socket.socket, bytes], None]
"""Takes over a connection asking to upgrade to WebSocket: the request, its socket, and the
request's head as sent (to hand to a WebSocket protocol)."""


def _not_scripted(request: RecordedRequest) -> CannedResponse:
    return CannedResponse(500, {"error": {"message": f"unscripted {request.path}"}})


class FakeUpstream:
    """The server; use as a context manager or call `start()` / `stop()`."""

    def __init__(self, responder: Responder = _not_scripted) -> None:
        self.responder = responder
        self.websocket: WebSocketResponder | None = getattr(responder, "websocket", None)
        self.requests: list[RecordedRequest] = []
        self._queue: deque[CannedResponse] = deque()
        self._always: CannedResponse | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        # A short poll interval: stop() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def enqueue(self, *responses: CannedResponse) -> None:
        """Answers the next requests with these, in order, before the emulation resumes."""
        with self._lock:
            self._queue.extend(responses)

    def always(self, response: CannedResponse) -> None:
        """Answers every request (once the queue is empty) with this."""
        self._always = response

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Blocks until `count` requests have arrived; False on timeout."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def _next_response(self, request: RecordedRequest) -> CannedResponse:
        with self._lock:
            self.requests.append(request)
            self._arrived.notify_all()
            if self._queue:
                return self._queue.popleft()
        return self._always or self.responder(request)


def _make_handler(fake: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urlsplit(self.path)
            request = RecordedRequest(
                method=self.command,
                path=url.path,
                query=parse_qs(url.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            if self.headers.get("Upgrade", "").lower() == "websocket" and fake.websocket:
                with fake._lock:
                    fake.requests.append(request)
                    fake._arrived.notify_all()
                self.close_connection = True
                head = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
                fake.websocket(request, self.connection,
                               f"{self.requestline}\r\n{head}\r\n".encode("latin-1"))
                return
            canned = fake._next_response(request)
            if canned.delay and fake._stopping.wait(canned.delay):
                self._reset()
                return
            if canned.reset == "before":
                self._reset()
                return
            payload = canned.body_bytes()
            head = [f"HTTP/1.1 {canned.status} X"]
            headers = {"Content-Type": "application/json", **canned.headers}
            head += [f"{k}: {v}" for k, v in headers.items()]
            head.append(f"Content-Length: {len(payload)}")
            if canned.reset == "mid_body":
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            self.wfile.flush()

        def _reset(self) -> None:
            # SO_LINGER 0 makes close() send RST instead of FIN: a hard connection reset.
            self.close_connection = True
            try:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            except OSError:
                pass

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler


def unused_port() -> int:
    """A local port with nothing listening (for connection-refused tests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
