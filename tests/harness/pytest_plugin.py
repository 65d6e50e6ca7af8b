"""pytest fixtures that start real icegate, coturn and Redis servers for a test.

Loaded from tests/conftest.py with `pytest_plugins = ["harness.pytest_plugin"]`.

- `server_factory` (and `module_server_factory`, for a module's shared server) starts icegate
  servers with settings overrides and a clock; thin fixtures in a test module give it that
  module's defaults. `icegate_server` is the plain one.
- `store_url` runs a server-level test on each store: SQLite, then Redis.
- `transport` runs a test (or a module, with `pytestmark = pytest.mark.usefixtures("transport")`)
  once over gRPC and once over Connect: the servers `server_factory` starts for it give the
  Connect URL as their `target`, so the same client code drives either transport.

When `turnserver`, `turnutils_uclient` or `redis-server` is not installed, a test that needs it
is skipped on a developer machine, and fails when the environment variable CI is "true": CI
must never pass by skipping the tests that talk to real servers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from harness.coturn import DEFAULT_REALM, Coturn
from harness.icegate_server import RunningServer, ServerFactory
from harness.ports import free_tcp_port
from harness.redis_server import RedisServer

CoturnFactory = Callable[..., Coturn]

_INSTALL_HINT = "run scripts/install-system-packages to install it"


def require_binaries(*names: str) -> None:
    """Skips the running test (fails it on CI) unless every named executable is on PATH."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not found on PATH; {_INSTALL_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def coturn_factory() -> Iterator[CoturnFactory]:
    """A function that starts a `Coturn` and stops it when the test ends.

    Call it as `coturn_factory(secrets=["new", "old"], realm="example.test")` or, to read
    secrets from Redis, `coturn_factory(redis_port=redis_server.port)`.
    """
    require_binaries("turnserver", "turnutils_uclient")
    started: list[Coturn] = []

    def start(secrets: Sequence[str] = (), *, realm: str = DEFAULT_REALM,
              redis_port: int | None = None, sqlite_userdb: Path | None = None) -> Coturn:
        coturn = Coturn(secrets, realm=realm, redis_port=redis_port,
                        sqlite_userdb=sqlite_userdb)
        started.append(coturn)
        return coturn.start()

    yield start
    for coturn in reversed(started):
        coturn.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty `redis-server` (appendonly, so `kill()` keeps data) for this test."""
    require_binaries("redis-server")
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    """One `redis-server` shared by the whole session; tests must not kill or pause it.

    Use it where starting a server per test costs too much, and keep each test's keys apart
    (a unique prefix) or FLUSHDB at the start.
    """
    require_binaries("redis-server")
    with RedisServer() as server:
        yield server


TRANSPORTS = ("grpc", "connect")


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport the contract is served on, in turn: "grpc", then "connect"."""
    return str(request.param)


def _transport_of(request: pytest.FixtureRequest) -> str:
    # The test's transport when it runs under the `transport` fixture, else gRPC.
    if "transport" in request.fixturenames:
        return str(request.getfixturevalue("transport"))
    return "grpc"


@pytest.fixture
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerFactory]:
    """Starts icegate servers for this test (data in `tmp_path`); stops them when it ends.

    `server_factory(clock, **overrides)` returns a running `RunningServer`; see
    `ServerFactory` for the data directory a second server uses.
    """
    factory = ServerFactory(tmp_path, _transport_of(request))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_server_factory(request: pytest.FixtureRequest,
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """`server_factory` for servers a whole module shares (stopped when the module ends);
    their `target` is the gRPC port (see `transport_server_factory` for both)."""
    factory = ServerFactory(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]))
    yield factory
    factory.stop_all()


@pytest.fixture
def icegate_server(server_factory: ServerFactory) -> RunningServer:
    """A real icegate server on a free port with a frozen clock (`.clock`), on SQLite."""
    return server_factory()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store backend a server can run on, in turn: the `store` setting for it.

    SQLite is the file the server would use by default in `tmp_path`; Redis is a fresh
    `redis_server` (skipped without redis-server on a developer machine, failed on CI).
    """
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url
    return f"sqlite:///{tmp_path / 'icegate.sqlite3'}"


@pytest.fixture
def free_port_unused() -> int:
    """A loopback TCP port nothing listens on."""
    return free_tcp_port()
