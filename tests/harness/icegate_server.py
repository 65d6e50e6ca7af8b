"""A real icegate server on free loopback ports (gRPC and HTTP), in a thread with its own loop.

Tests drive it with the real sync client from the test's thread and with the async client
from their own loop, exactly as callers do. The clock is injected, so tests freeze time.
Tests get servers from the `server_factory` fixture (harness/pytest_plugin.py), which stops
every server it started when the test ends.

Every test server listens on both transports; `target` is what the test's clients dial: the
gRPC `host:port`, or the Connect URL when the test runs under the `transport` fixture's
"connect" (`grpc_target` and `http_url` name each one whatever the transport).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from icegate_server.clock import Clock, FrozenClock
from icegate_server.server import IcegateServer, create_server
from icegate_server.settings import Settings

if TYPE_CHECKING:
    from icegate_server.observability.spans import Tracing

T = TypeVar("T")

TEST_TURN_SECRET = "test-turn-secret-0123456789"
TEST_ADMIN_KEY = "igk_test_admin_key_0123456789abcdef"
TEST_MASTER_KEY = base64.b64encode(bytes(range(32))).decode()


def server_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: port 0, its own data dir, known secrets, no dev secrets."""
    base = Settings(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        turn_secrets=(TEST_TURN_SECRET,),
        turn_uris=("turn:127.0.0.1:3478?transport=udp", "turns:turn.example.test:5349"),
        stun_uris=("stun:127.0.0.1:3478",),
        api_keys=(TEST_ADMIN_KEY,),
        master_key=TEST_MASTER_KEY,
        dev_secrets=False,
        shutdown_grace=2.0,
        http_listen="127.0.0.1:0",
        # Not the 0.1 s default: under the whole suite's load on two cores a Redis reply can
        # take longer, and a call that timed out may have counted (tests of store timeouts
        # set their own).
        store_timeout=1.0,
    )
    return dataclasses.replace(base, **overrides)


class RunningServer:
    """An icegate server running on a background event loop until `stop()`."""

    def __init__(self, settings: Settings, clock: Clock | None = None, *,
                 transport: str = "grpc", tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.transport = transport
        self.clock = clock or FrozenClock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="icegate-test-server",
                                        daemon=True)
        self._thread.start()
        self.server: IcegateServer
        self.server, self.port = self.run(create_server(settings, clock=self.clock,
                                                        tracing=tracing))
        self.run(self.server.start())

    @property
    def grpc_target(self) -> str:
        """The gRPC port as clients dial it, `127.0.0.1:<port>`."""
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP listener's URL (Connect), `http[s]://127.0.0.1:<port>`."""
        listener = self.server.http_listener
        assert listener is not None, "this server was started without ICEGATE_HTTP_LISTEN"
        return f"{listener.scheme}://127.0.0.1:{listener.port}"

    @property
    def target(self) -> str:
        """What the test's clients dial: `http_url` under the Connect transport, else
        `grpc_target`."""
        return self.http_url if self.transport == "connect" else self.grpc_target

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Runs `coroutine` on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float | None = 0.5) -> None:
        if self.loop.is_closed():
            return
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerFactory:
    """Starts test servers on one data directory, and stops every one of them in `stop_all`.

    `factory(clock, **overrides)` starts a `RunningServer` with `server_settings(data_dir,
    **overrides)` and the given clock (a fresh `FrozenClock` when None). A server started again
    on the same data directory finds the data the previous one left, as a restart would; pass
    `data_dir=` for a server of its own (two live servers must not share a SQLite file).
    """

    def __init__(self, data_dir: Path, transport: str = "grpc") -> None:
        self.data_dir = data_dir
        self.transport = transport
        self._running = contextlib.ExitStack()

    def __call__(self, clock: Clock | None = None, *, data_dir: Path | None = None,
                 tracing: Tracing | None = None, **overrides: Any) -> RunningServer:
        server = RunningServer(server_settings(data_dir or self.data_dir, **overrides), clock,
                               transport=self.transport, tracing=tracing)
        self._running.callback(server.stop)  # a no-op for a server already stopped
        return server

    def stop_all(self) -> None:
        """Stops every server still running, the last started first (all, even if one fails)."""
        self._running.close()
