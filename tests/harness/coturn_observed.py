"""A real coturn that icegate can observe and act on: stats to a Redis, and its admin CLI.

`ObservedCoturn` is `harness.coturn.Coturn` with `redis-statsdb` pointed at a Redis (where
coturn publishes allocation events and keeps their status keys) and its telnet CLI on a free
loopback port with a password (coturn's `no-cli` line dropped). `RelayingClient` runs
`turnutils_uclient` in the background, relaying for as long as a test needs an allocation
alive. `coturn_cli_sessions` asks coturn's CLI which sessions it holds, and `StatsTotals` adds up
the totals coturn publishes, both independently of icegate's own code, so a test can check
what icegate did.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import icegate
from harness.coturn import Coturn
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET
from harness.ports import LOOPBACK, free_tcp_port
from harness.pytest_plugin import require_binaries
from harness.redis_server import RedisServer

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


class StatsTotals:
    """Adds up coturn's own relay-side totals (`total_traffic/peer`, rcvb + sentb) of the
    allocations that ended, per username, as coturn publishes them: what icegate must count."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, decode_responses=True,
                                            encoding_errors="replace")
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(**{"turn/realm/*/user/*/allocation/*": self._handle})
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}
        self._ended: dict[str, int] = {}
        self._thread = self._pubsub.run_in_thread(sleep_time=0.01, daemon=True)

    def _handle(self, message: dict[str, Any]) -> None:
        channel, data = message["channel"], message["data"]
        if not channel.startswith("turn/realm/icegate.test/user/") \
                or not channel.endswith("/total_traffic/peer"):
            return
        username = channel.split("/user/", 1)[1].rsplit("/allocation/", 1)[0]
        counters = dict(part.strip().split("=") for part in data.split(","))
        with self._lock:
            self._totals[username] = (self._totals.get(username, 0) + int(counters["rcvb"])
                                      + int(counters["sentb"]))
            self._ended[username] = self._ended.get(username, 0) + 1

    def ended(self, username: str) -> int:
        """How many allocations of `username` coturn reported ended (with their totals)."""
        with self._lock:
            return self._ended.get(username, 0)

    def total(self, username: str) -> int:
        with self._lock:
            return self._totals.get(username, 0)

    def close(self) -> None:
        self._thread.stop()
        self._client.close()


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


__all__ = ["CLI_PASSWORD", "ObservedCoturn", "RelayingClient", "StatsTotals",
           "coturn_cli_sessions", "coturn_totals", "issue_credential", "live_on_coturn",
           "metering_live", "observed_coturn", "stats_redis", "turn_usage", "wait_for"]


# -- fixtures (import them by name into a test module) ---------------------------------------


@pytest.fixture
def stats_redis() -> Iterator[RedisServer]:
    """A fresh Redis for coturn's stats, apart from icegate's store; append-only, as the docs
    advise, so coturn's status keys survive `kill()` and `start()`."""
    require_binaries("redis-server")
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def observed_coturn(stats_redis: RedisServer) -> Iterator[ObservedCoturn]:
    """A coturn with the test TURN secret, publishing to `stats_redis`, its CLI on."""
    require_binaries("turnserver", "turnutils_uclient")
    with ObservedCoturn([TEST_TURN_SECRET], statsdb_port=stats_redis.port) as server:
        yield server


@pytest.fixture
def coturn_totals(stats_redis: RedisServer) -> Iterator[StatsTotals]:
    """coturn's own relay-side totals, read off `stats_redis` as the test runs."""
    totals = StatsTotals(stats_redis.url)
    yield totals
    totals.close()


# -- what a test asks icegate and coturn ------------------------------------------------------


def turn_usage(target: str, project_id: str, user_id: str = "") -> Any:
    """GetUsage's `turn` figures of a project (and of one of its users), as an admin."""
    with icegate.Client(target, TEST_ADMIN_KEY) as client:
        return client.get_usage(project_id, turn_user_id=user_id).turn


def issue_credential(target: str, project_id: str, user_id: str) -> tuple[str, str]:
    """(username, password) of a fresh TURN credential icegate issues."""
    with icegate.Client(target, TEST_ADMIN_KEY) as client:
        issued = client.issue_turn_credentials(user_id, project_id=project_id)
    return issued.username, issued.password


def live_on_coturn(coturn: ObservedCoturn, username: str) -> int:
    """How many sessions coturn's CLI lists for `username` now."""
    return sum(1 for _, listed in coturn_cli_sessions(coturn) if listed == username)


def metering_live(target: str, project_id: str) -> None:
    """Waits until icegate says it meters coturn's stream."""
    from icegate.v1 import usage_pb2

    wait_for(lambda: turn_usage(target, project_id).metering == usage_pb2.TURN_METERING_LIVE,
             message="metering live")
