"""`icegate-server --workers 2`: two processes on one port and one Redis, one supervisor, one
lifecycle; and the refusal of more than one worker on SQLite, which one process owns.

Which worker serves a connection is read from the kernel (Linux /proc): the worker process that
owns the server side of the established TCP connection. No product change is needed to see it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

import icegate
from fake_upstreams import FakeUpstream, OpenAIEmulation
from fake_upstreams.server import CannedResponse, RecordedRequest
from harness.icegate_server import TEST_ADMIN_KEY
from harness.redis_server import RedisServer
from harness.server_process import ServerProcess, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads sockets and processes from Linux /proc")
redis = pytest.mark.redis
BIN = Path(sys.executable).parent

OPENAI_KEY = "sk-test-workers-openai-key-0001"
# Each channel gets its own connection: gRPC otherwise shares one between equal channels.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
_LISTEN, _ESTABLISHED = "0A", "01"


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: fields follow the last ")".
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def socket_inodes(port: int, state: str) -> set[int]:
    """Inodes of the local TCP sockets on `port` in `state` (the server's side)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == state:
                    inodes.add(int(fields[9]))
    return inodes


def owners(pids: set[int], inodes: set[int]) -> dict[int, int]:
    """How many of `inodes` each of `pids` holds open."""
    held = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        count = 0
        for fd in fd_dir.iterdir() if fd_dir.exists() else ():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                count += 1
        if count:
            held[pid] = count
    return held


def serving_workers(server: ServerProcess) -> dict[int, int]:
    """Worker pid -> established connections it serves on the server's port."""
    assert server.process is not None
    return owners(children_of(server.process.pid), socket_inodes(server.port, _ESTABLISHED))


def wait_for_listening_workers(server: ServerProcess, count: int, timeout: float = 20) -> set[int]:
    assert server.process is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = owners(children_of(server.process.pid), socket_inodes(server.port, _LISTEN))
        if len(listening) == count:
            return set(listening)
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not listen within {timeout} s:\n"
                         f"{server.read_log()}")


def on_redis(workdir: Path, redis_server: RedisServer, **settings: str) -> ServerProcess:
    """A server process on the test's Redis. The store timeout is well above the default
    0.1 s: these tests count outcomes exactly, and on a loaded 2-core machine a Redis reply
    can take longer (UNAVAILABLE, not a limit's answer)."""
    return ServerProcess(workdir, store=redis_server.url, store_timeout="2", **settings)


@pytest.fixture
def workers(tmp_path, redis_server) -> Iterator[ServerProcess]:
    server = on_redis(tmp_path / "workers", redis_server, workers="2").start()
    try:
        wait_for_listening_workers(server, 2)
        yield server
    finally:
        server.stop()


def own_client(target: str, key: str) -> icegate.Client:
    return icegate.Client(target, key, channel=grpc.insecure_channel(target, OWN_CONNECTION))


@redis
def test_calls_over_fresh_connections_are_served_by_both_workers(workers):
    clients = [own_client(workers.target, TEST_ADMIN_KEY) for _ in range(16)]
    try:
        for client in clients:
            assert client.issue_turn_credentials("alice").username.endswith(":default/alice")
        served = serving_workers(workers)
    finally:
        for client in clients:
            client.close()
    assert len(served) == 2, served
    assert sum(served.values()) == 16


@redis
def test_the_workers_share_the_http_listener_too(tmp_path, redis_server):
    http_port = free_port()
    server = on_redis(tmp_path / "http-workers", redis_server, workers="2",
                      http_listen=f"127.0.0.1:{http_port}").start()
    try:
        workers = wait_for_listening_workers(server, 2)
        # Each worker listens on the HTTP port too, once its server has started (the gRPC
        # port above may be seen listening earlier).
        deadline = time.monotonic() + 20
        while set(owners(workers, socket_inodes(http_port, _LISTEN))) != workers:
            assert time.monotonic() < deadline, server.read_log()
            time.sleep(0.05)
        # Each client has its own connection pool, so each its own connection.
        clients = [icegate.Client(f"http://127.0.0.1:{http_port}", TEST_ADMIN_KEY)
                   for _ in range(16)]
        try:
            for client in clients:
                assert client.issue_turn_credentials("a").username.endswith(":default/a")
            served = owners(workers, socket_inodes(http_port, _ESTABLISHED))
        finally:
            for client in clients:
                client.close()
        assert len(served) == 2, served
    finally:
        assert server.stop() == 0


@redis
def test_rate_limit_is_exact_across_the_workers(workers):
    with icegate.Client(workers.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("shared", rate_limit_requests=20, rate_limit_window=3600)
        key = admin.create_api_key("shared").secret

    async def hammer() -> tuple[list[str], dict[int, int]]:
        clients = [icegate.AsyncClient(workers.target, key, channel=grpc.aio.insecure_channel(
            workers.target, OWN_CONNECTION)) for _ in range(8)]
        try:
            async def one(index: int) -> str:
                try:
                    await clients[index % len(clients)].issue_turn_credentials("u")
                    return "ok"
                except icegate.IcegateError as error:
                    return error.reason or error.code.name
            outcomes = await asyncio.gather(*(one(i) for i in range(60)))
            return outcomes, serving_workers(workers)
        finally:
            for client in clients:
                await client.close()

    outcomes, served = asyncio.run(hammer())
    assert len(served) == 2, served  # both processes admitted calls against the one limit
    assert outcomes.count("ok") == 20
    assert outcomes.count("RATE_LIMITED") == 40


@redis
def test_sigterm_stops_every_worker_and_exits_zero_within_the_grace(workers):
    assert workers.process is not None
    worker_pids = wait_for_listening_workers(workers, 2)
    started = time.monotonic()
    assert workers.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5  # ICEGATE_SHUTDOWN_GRACE in the harness
    assert not any(Path(f"/proc/{pid}").exists() for pid in worker_pids)


@redis
def test_sigint_to_the_whole_process_group_stops_each_worker_once(tmp_path, redis_server):
    # A terminal's Ctrl-C reaches the supervisor and its workers at once.
    server = on_redis(tmp_path, redis_server, workers="2")
    server.new_session = True
    server.start()
    try:
        wait_for_listening_workers(server, 2)
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGINT)
        assert server.process.wait(10) == 0
    finally:
        server.stop()
    log = server.read_log()
    assert log.count("shutting down: finishing in-flight calls") == 2
    assert "Traceback" not in log


@redis
def test_in_flight_call_finishes_after_sigterm(tmp_path, redis_server):
    def slow_openai(request: RecordedRequest) -> CannedResponse:
        return dataclasses.replace(OpenAIEmulation(OPENAI_KEY)(request), delay=1.5)

    with FakeUpstream(slow_openai) as openai:
        server = on_redis(tmp_path, redis_server, workers="2",
                          openai_base_url=openai.base_url).start()
        try:
            wait_for_listening_workers(server, 2)
            with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
                admin.create_project("live")
                admin.set_provider_key("live", "openai", OPENAI_KEY)
                key = admin.create_api_key("live").secret
            results: list[object] = []
            with icegate.Client(server.target, key) as caller:
                call = threading.Thread(target=lambda: results.append(
                    caller.create_session(provider="openai")))
                call.start()
                assert openai.wait_for_requests(1)
                assert server.stop(signal.SIGTERM) == 0
                call.join(5)
            assert len(results) == 1 and results[0].session_id  # type: ignore[attr-defined]
        finally:
            server.stop()


@redis
def test_a_worker_dying_stops_the_others_and_the_supervisor_exits_nonzero(workers):
    assert workers.process is not None
    first, second = sorted(wait_for_listening_workers(workers, 2))
    os.kill(first, signal.SIGKILL)
    assert workers.process.wait(30) != 0
    assert not Path(f"/proc/{second}").exists()
    assert "exited with code -9; stopping the others" in workers.read_log()


@redis
def test_workers_stop_when_their_supervisor_is_killed(workers):
    assert workers.process is not None
    worker_pids = wait_for_listening_workers(workers, 2)
    workers.process.kill()
    workers.process.wait(5)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}/stat").exists() and " Z " not in
              Path(f"/proc/{pid}/stat").read_text() for pid in worker_pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.1)


@redis
@pytest.mark.parametrize(("first_workers", "second_workers"),
                         [("2", "1"), ("2", "2"), ("1", "2")])
def test_a_second_server_on_the_same_port_is_refused(tmp_path, redis_server, first_workers,
                                                     second_workers):
    first = on_redis(tmp_path / "first", redis_server, workers=first_workers).start()
    try:
        if first_workers != "1":
            wait_for_listening_workers(first, int(first_workers))
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        env = {**first.env, "ICEGATE_WORKERS": second_workers}
        result = subprocess.run([str(BIN / "icegate-server")],
                                cwd=second_dir, env=env, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 1
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"icegate-server: cannot listen on {first.target}: ")
        assert "Traceback" not in result.stderr
        # The first server still serves, alone.
        with icegate.Client(first.target, TEST_ADMIN_KEY) as client:
            assert client.health() == "SERVING"
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("given", ["flag", "environment", "toml"])
def test_more_than_one_worker_on_sqlite_stops_at_start_naming_the_store(tmp_path, given):
    # One process owns a SQLite file; more share a Redis. ServerProcess's environment has no
    # ICEGATE_STORE: the default SQLite file under the data directory.
    env = ServerProcess(tmp_path / "env").env
    argv = [str(BIN / "icegate-server")]
    if given == "flag":
        argv += ["--workers", "2"]
    elif given == "environment":
        env.update(ICEGATE_WORKERS="2", ICEGATE_STORE=f"sqlite:///{tmp_path / 'x.sqlite3'}")
    else:
        config = tmp_path / "icegate.toml"
        config.write_text(f'workers = 3\nstore = "sqlite:///{tmp_path / "x.sqlite3"}"\n')
        argv += ["--config", str(config)]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("icegate-server: invalid setting ICEGATE_STORE: ")
    assert "redis://" in lines[0] and "Traceback" not in result.stderr
    # Nothing started half-configured: no store file, no data directory.
    assert not (tmp_path / "x.sqlite3").exists() and not (tmp_path / ".icegate").exists()


def test_one_worker_on_sqlite_still_serves(tmp_path):
    with ServerProcess(tmp_path, workers="1") as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as client:
        assert client.issue_turn_credentials("alice").username.endswith(":default/alice")
        assert client.health() == "SERVING"
    assert server.stop() == 0
    assert (tmp_path / ".icegate" / "icegate.sqlite3").exists()
