"""A real coturn that icegate can observe and act on: stats to a Redis, and its admin CLI.

`ObservedCoturn` is `harness.coturn.Coturn` with `redis-statsdb` pointed at a Redis (where
coturn publishes allocation events and keeps their status keys) and its telnet CLI on a free
loopback port with a password (coturn's `no-cli` line dropped). `RelayingClient` runs
`turnutils_uclient` in the background, relaying for as long as a test needs an allocation
alive. `coturn_cli_sessions` asks coturn's CLI which sessions it holds, independently of
icegate's own CLI client, so a test can check what icegate did.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from typing import Any

from harness.coturn import Coturn
from harness.ports import LOOPBACK, free_tcp_port

CLI_PASSWORD = "cli-test-password-1"


class ObservedCoturn(Coturn):
    """A coturn publishing its stats to the Redis on `statsdb_port`, with its CLI on."""

    def __init__(self, secrets: Any = (), *, statsdb_port: int, statsdb_db: int = 0,
                 cli_password: str = CLI_PASSWORD, **kwargs: Any) -> None:
        super().__init__(secrets, **kwargs)
        self.statsdb_port = statsdb_port
        self.statsdb_db = statsdb_db
        self.cli_password = cli_password
        self.cli_port = 0

    def _adjust_config(self, config: str) -> str:
        self.cli_port = free_tcp_port(self.host)
        lines = [line for line in config.splitlines() if line.strip() != "no-cli"]
        lines += [
            f'redis-statsdb="ip={LOOPBACK} dbname={self.statsdb_db} port={self.statsdb_port} '
            'connect_timeout=5"',
            f"cli-ip={LOOPBACK}",
            f"cli-port={self.cli_port}",
            f"cli-password={self.cli_password}",
        ]
        return "\n".join(lines) + "\n"

    @property
    def cli_address(self) -> str:
        return f"{self.host}:{self.cli_port}"


class RelayingClient:
    """`turnutils_uclient` relaying between two allocations of one credential, in the
    background, for about `seconds` (a packet every 5 ms each way)."""

    def __init__(self, coturn: Coturn, username: str, password: str, *,
                 seconds: float = 30.0, client_binary: str = "turnutils_uclient") -> None:
        self.username = username
        messages = max(int(seconds * 1000 / 5), 1)
        self.process = subprocess.Popen(
            [client_binary, "-p", str(coturn.port), "-n", str(messages), "-z", "5", "-c",
             "-m", "1", "-l", "200", "-y", "-u", username, "-w", password,
             "-e", coturn.host, coturn.host],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)

    def stop(self) -> str:
        """Stops the client (if still running) and returns its output."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            output, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate(timeout=10)
        return output.decode(errors="replace") if output else ""

    def __enter__(self) -> RelayingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SESSION_LINE = re.compile(r"\s*\d+\) id=(\d+), user <(.*)>:")


def coturn_cli_sessions(coturn: ObservedCoturn, *, timeout: float = 5.0) -> list[tuple[str, str]]:
    """(session id, username) of every session coturn's CLI lists now."""
    with socket.create_connection((coturn.host, coturn.cli_port), timeout=timeout) as sock:
        _read_until(sock, b"Enter password:", timeout)
        sock.sendall(coturn.cli_password.encode() + b"\r\n")
        _read_until(sock, b"> ", timeout)
        sock.sendall(b"ps\r\n")
        output = _read_until(sock, b"> ", timeout).decode(errors="replace")
    return [(m[1], m[2]) for m in map(_SESSION_LINE.match, output.splitlines()) if m]


def _read_until(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.rstrip().endswith(marker.strip()):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"coturn's CLI closed the connection; got {data!r}")
        data += chunk
    return data


def wait_for(condition: Any, *, timeout: float = 15.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Polls `condition()` until it returns something true; its value. Fails after `timeout`
    (a bound for a stuck test, never a speed requirement)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout} s")
        time.sleep(interval)


__all__ = ["CLI_PASSWORD", "ObservedCoturn", "RelayingClient", "coturn_cli_sessions",
           "wait_for"]
