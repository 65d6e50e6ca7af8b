"""The metrics port under idle and half-sent connections, on a real server in this process.

Before the bounded server, 300 connections that sent half a request held 300 threads and 300
sockets of the process for as long as the clients liked. Now at most `max_connections` are
held, each for at most the read timeout, while /metrics and the gRPC service keep answering.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, server_settings
from icegate_server.clock import FrozenClock
from icegate_server.observability.metrics import MetricsServerLimits
from icegate_server.server import IcegateServer, create_server

HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: icegate\r\n"  # no blank line: never complete
MAX_CONNECTIONS = 8


class ServerWithLimits:
    """A real icegate server on its own event loop thread, metrics bounded by `limits`."""

    def __init__(self, data_dir: Path, limits: MetricsServerLimits) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        settings = server_settings(data_dir, metrics_listen="127.0.0.1:0")
        self.server: IcegateServer
        self.server, port = self._run(create_server(settings, clock=FrozenClock(),
                                                    metrics_limits=limits))
        self._run(self.server.start())
        self.target = f"127.0.0.1:{port}"
        assert self.server.metrics_port is not None
        self.metrics_port: int = self.server.metrics_port

    def _run(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def stop(self) -> None:
        self._run(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def start(tmp_path) -> Iterator[Callable[[MetricsServerLimits], ServerWithLimits]]:
    servers: list[ServerWithLimits] = []

    def started(limits: MetricsServerLimits) -> ServerWithLimits:
        servers.append(ServerWithLimits(tmp_path / str(len(servers)), limits))
        return servers[-1]

    yield started
    for server in servers:
        server.stop()


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def server_side_sockets(port: int) -> int:
    """Sockets this process holds whose local port is `port`: the listener and every
    connection it accepted (the test's own client sockets have `port` as their remote end)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Polls `condition`; the timeout only stops a broken test, it measures nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def hung_up(connection: socket.socket) -> bool:
    """Whether the server closed `connection` (EOF or reset waiting to be read)."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1) == b""
    except OSError:
        return True


def open_idle(port: int, count: int, payload: bytes) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        if payload:
            connection.sendall(payload)
        connections.append(connection)
    return connections


def scrape(port: int) -> str:
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200
    return answer.text


def test_300_half_requests_hold_a_bounded_number_of_threads_and_sockets(start):
    # A read timeout far beyond the test: whatever is dropped here is dropped by the limit.
    server = start(MetricsServerLimits(read_timeout_seconds=120,
                                       max_connections=MAX_CONNECTIONS))
    port = server.metrics_port
    client = icegate.Client(server.target, TEST_ADMIN_KEY)
    connections: list[socket.socket] = []
    try:
        assert client.get_ice_servers("warm-up").ice_servers  # the client's own threads
        scrape(port)
        baseline = threads()

        connections = open_idle(port, 300, HALF_REQUEST)
        # Each connection over the limit displaces the longest-waiting one, at once.
        wait_until(lambda: sum(hung_up(c) for c in connections) >= 300 - MAX_CONNECTIONS,
                   "the connections over the limit are closed")
        assert server_side_sockets(port) <= MAX_CONNECTIONS + 1  # + the listener
        assert threads() <= baseline + MAX_CONNECTIONS

        # Meanwhile a real scrape gets in, and the gRPC service answers.
        assert "icegate_rpcs_total" in scrape(port)
        for n in range(20):
            assert client.get_ice_servers(f"user-{n}").ice_servers
        assert client.health() == "SERVING"
        assert threads() <= baseline + MAX_CONNECTIONS
        assert server_side_sockets(port) <= MAX_CONNECTIONS + 1
    finally:
        client.close()
        for connection in connections:
            connection.close()


@pytest.mark.parametrize("payload", [b"", HALF_REQUEST[:10], HALF_REQUEST],
                         ids=["silent", "half-request-line", "half-headers"])
def test_idle_connections_are_dropped_after_the_read_timeout(start, payload):
    server = start(MetricsServerLimits(read_timeout_seconds=0.3,
                                       max_connections=MAX_CONNECTIONS))
    port = server.metrics_port
    scrape(port)
    baseline = threads()

    connections = open_idle(port, MAX_CONNECTIONS - 2, payload)  # under the limit
    try:
        wait_until(lambda: all(hung_up(c) for c in connections),
                   "every idle connection is closed by the server")
        wait_until(lambda: server_side_sockets(port) == 1, "only the listener is left")
        wait_until(lambda: threads() <= baseline, "the handler threads are gone")
        assert "icegate_rpcs_total" in scrape(port)
    finally:
        for connection in connections:
            connection.close()


def test_a_scrape_that_stalls_midway_does_not_block_the_next_one(start):
    server = start(MetricsServerLimits(read_timeout_seconds=120, max_connections=1))
    port = server.metrics_port
    (stalled,) = open_idle(port, 1, HALF_REQUEST)
    try:
        # The only slot is held by a half-sent request: the new scrape displaces it.
        assert "icegate_rpcs_total" in scrape(port)
        wait_until(lambda: hung_up(stalled), "the stalled connection is closed")
    finally:
        stalled.close()


def test_stop_hangs_up_on_idle_connections(start):
    server = start(MetricsServerLimits(read_timeout_seconds=120,
                                       max_connections=MAX_CONNECTIONS))
    connections = open_idle(server.metrics_port, 3, HALF_REQUEST)
    try:
        wait_until(lambda: server_side_sockets(server.metrics_port) == 4, "all accepted")
        server.server.metrics_endpoint.stop()  # type: ignore[union-attr]
        wait_until(lambda: all(hung_up(c) for c in connections), "every connection closed")
    finally:
        for connection in connections:
            connection.close()
