"""Client options for production callers, against a real server, over each transport:
fail fast by default, wait_for_ready."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import icegate
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, server_settings
from harness.server_process import free_port


def dialled(transport: str, grpc_port: int, http_port: int) -> str:
    """The target a client dials for `transport`."""
    return (f"http://127.0.0.1:{http_port}" if transport == "connect"
            else f"127.0.0.1:{grpc_port}")


def late_server(tmp_path, grpc_port: int, http_port: int) -> RunningServer:
    return RunningServer(server_settings(tmp_path, listen=f"127.0.0.1:{grpc_port}",
                                         http_listen=f"127.0.0.1:{http_port}"))


def test_fail_fast_by_default_when_icegate_is_not_up(transport):
    with icegate.Client(dialled(transport, free_port(), free_port()), TEST_ADMIN_KEY) as client:
        started = time.monotonic()
        with pytest.raises(icegate.UnavailableError):
            client.issue_turn_credentials("alice", timeout=10)
    assert time.monotonic() - started < 5  # refused at once, not at the deadline


def test_wait_for_ready_rides_out_a_server_that_starts_late(transport, tmp_path):
    ports = free_port(), free_port()
    servers: list[RunningServer] = []

    def start_late() -> None:
        time.sleep(0.5)
        servers.append(late_server(tmp_path, *ports))

    starter = threading.Thread(target=start_late)
    try:
        with icegate.Client(dialled(transport, *ports), TEST_ADMIN_KEY,
                            wait_for_ready=True) as client:
            starter.start()
            credential = client.issue_turn_credentials("alice", timeout=15)
        assert credential.username.endswith(":default/alice")
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_async_client_waits_for_ready_too(transport, tmp_path):
    ports = free_port(), free_port()

    async def call() -> str:
        async with icegate.AsyncClient(dialled(transport, *ports), TEST_ADMIN_KEY,
                                       wait_for_ready=True) as client:
            waiting = asyncio.ensure_future(client.get_ice_servers("alice", timeout=15))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # no server yet: the call waits instead of failing
            server = await asyncio.to_thread(late_server, tmp_path, *ports)
            try:
                response = await waiting
            finally:
                await asyncio.to_thread(server.stop)
            return response.ice_servers[0].urls[0]

    assert asyncio.run(call()).startswith("stun:")
