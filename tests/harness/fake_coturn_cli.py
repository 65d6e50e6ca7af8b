"""A stand-in for coturn's admin CLI where no real coturn runs: it speaks coturn 4.6.1's
dialogue (password prompt, `ps`/`psp` listings, `cs`), holding no session, on a free loopback
port, in a thread. For tests of icegate's RPCs that end allocations (the real CLI is tested
against a real coturn in tests/integration/test_turn_revocation*.py)."""

from __future__ import annotations

import socketserver
import threading
from types import TracebackType

from harness.ports import LOOPBACK

FAKE_CLI_PASSWORD = "fake-cli-password-1"
GREETING = b"TURN Server\r\nCoturn-4.6.1 'Gorst'\r\n\r\nType '?' for help\r\nEnter password: \r\n"


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.wfile.write(GREETING)
        authenticated = False
        for raw in self.rfile:
            command = raw.strip().decode(errors="replace")
            if not authenticated:
                authenticated = command == self.server.password
                self.wfile.write(b"> " if authenticated else b"Enter password: \r\n")
            elif command in ("quit", "q", "exit", "bye"):
                return
            elif command.startswith(("ps", "psp")):
                self.wfile.write(b"\r\n  Total sessions: 0\r\n\r\n> ")
            else:
                self.wfile.write(b"> ")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    password = ""


class FakeCoturnCli:
    """The stand-in, listening until `stop()` (or the end of a `with` block)."""

    def __init__(self, password: str = FAKE_CLI_PASSWORD) -> None:
        self.password = password
        self._server = _Server((LOOPBACK, 0), _Handler)
        self._server.password = password
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> FakeCoturnCli:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeCoturnCli:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
