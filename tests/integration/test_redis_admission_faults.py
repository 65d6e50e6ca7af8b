"""What a caller of `RedisStore.admit` sees when the admissions' own connection meets a fault.

Admissions go to Redis in batches over a connection of their own (store/redis_admission.py),
written as bytes and read by hiredis. Each test drives a real redis-server, and where a fault
needs one, a proxy in front of it that splits replies, resets the connection or answers
garbage. A caller of a batch that cannot be answered gets `StoreUnavailableError`; nothing is
counted twice, nor counted for a caller told "unavailable"; the next calls work on a new
connection without a reopen.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio

from harness.redis_server import RedisServer
from icegate_server.access.rate_limit import RateLimitPolicy, gcra_admit
from icegate_server.errors import StoreUnavailableError
from icegate_server.projects.records import ApiKey, Project
from icegate_server.store import redis_admission
from icegate_server.store.base import Admission, AdmitOutcome
from icegate_server.store.redis import _ADMIT, RedisStore
from icegate_server.store.redis_admission import AdmissionConnection

pytestmark = pytest.mark.redis

T = TypeVar("T")
NOW = 1_700_000_000_000
POLICY = RateLimitPolicy.of(1000, 60)
DIGEST = bytes(range(32))


def reference_tat(calls: int) -> int | None:
    tat = None
    for _ in range(calls):
        tat = gcra_admit(tat, NOW, POLICY)
    return tat


async def setup(store: RedisStore) -> None:
    await store.create_project(Project("alpha", rate_limit_requests=POLICY.limit,
                                       rate_limit_window_seconds=POLICY.window_ms // 1000))
    await store.create_api_key(ApiKey(key_id="k1", project_id="alpha", display_name="one",
                                      create_time=1.5, key_prefix="igk_k1"), DIGEST)


async def admit(store: RedisStore, digest: bytes | None = DIGEST) -> Admission:
    return await store.admit(digest=digest, project_id="", now_ms=NOW, count=True)


async def admit_many(store: RedisStore, n: int) -> list[Admission | BaseException]:
    return await asyncio.gather(*(admit(store) for _ in range(n)), return_exceptions=True)


def assert_unavailable(outcomes: list[Admission | BaseException]) -> None:
    for outcome in outcomes:
        assert isinstance(outcome, StoreUnavailableError), outcome
        assert outcome.message.startswith("Redis store unavailable")


def run_with_store(url: str, scenario: Callable[[RedisStore], Awaitable[T]], *,
                   linger: float = 0.0) -> T:
    async def main() -> T:
        store = await RedisStore.open(url, linger=linger)
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


class FaultProxy:
    """A TCP proxy in front of Redis, on the test's event loop, that can misbehave.

    `chunk`: replies are forwarded this many bytes at a time, each piece a separate write
    after a turn of the loop the client shares, so the client reads them apart.
    `on_admit`: what to do, instead of forwarding, with data that carries the admission
    script's SHA (the admissions' batch): "reset" the client's connection, or answer it
    with "garbage".
    """

    def __init__(self, redis_port: int, admit_sha: str) -> None:
        self._redis_port = redis_port
        self._admit_sha = admit_sha.encode()
        self.chunk = 0
        self.on_admit = ""
        self.faults = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._redis_port)
        for pump in (self._upstream(reader, writer, up_writer),
                     self._downstream(up_reader, writer)):
            task = asyncio.ensure_future(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _upstream(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                        redis: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.on_admit and self._admit_sha in data:
                    self.faults += 1
                    if self.on_admit == "garbage":
                        client.write(b"!this is not RESP\r\n")
                        continue
                    sock = client.get_extra_info("socket")
                    # Closing with a zero linger sends a reset, not an orderly FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    client.transport.abort()
                    redis.close()
                    return
                redis.write(data)
                await redis.drain()
        redis.close()

    async def _downstream(self, redis: asyncio.StreamReader,
                          client: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await redis.read(65536):
                step = self.chunk or len(data)
                for start in range(0, len(data), step):
                    client.write(data[start:start + step])
                    await client.drain()
                    if self.chunk:
                        await asyncio.sleep(0)
        client.close()


def with_proxy(redis_server: RedisServer,
               scenario: Callable[[RedisStore, FaultProxy], Awaitable[T]], *,
               timeout: float = 0.1) -> T:
    async def main() -> T:
        sha = hashlib.sha1(_ADMIT.encode(), usedforsecurity=False).hexdigest()
        proxy = FaultProxy(redis_server.port, sha)
        url = await proxy.start()
        store = await RedisStore.open(url, timeout=timeout)
        try:
            return await scenario(store, proxy)
        finally:
            await store.close()
            await proxy.stop()

    return asyncio.run(main())


def test_redis_killed_with_a_batch_on_the_wire(redis_server: RedisServer) -> None:
    """The batch Redis never ran fails; after a restart the same store counts on exactly."""
    async def scenario(store: RedisStore) -> None:
        await setup(store)
        assert (await admit(store)).tat_ms == reference_tat(1)
        redis_server.pause()  # the batch reaches Redis's socket, and stays there
        batch = asyncio.ensure_future(admit_many(store, 5))
        await asyncio.sleep(0.02)
        redis_server.kill()
        assert_unavailable(await batch)

        redis_server.start()
        # No reopen, no failed call: a new connection, the scripts loaded again.
        assert [(await admit(store)).tat_ms for _ in range(3)] == [
            reference_tat(n) for n in (2, 3, 4)]

    run_with_store(redis_server.url, scenario)


def test_redis_paused_past_the_timeout(redis_server: RedisServer) -> None:
    """Every caller of the batch hears "unavailable" while Redis is still paused; the batch
    runs when Redis wakes, past its deadline, and counts nothing."""
    async def scenario(store: RedisStore) -> None:
        await setup(store)
        assert (await admit(store)).tat_ms == reference_tat(1)
        redis_server.pause()
        try:
            outcomes = await admit_many(store, 5)
            still_paused = redis_server.running and redis_server._paused
        finally:
            redis_server.resume()
        assert still_paused
        assert_unavailable(outcomes)

        await asyncio.sleep(0.1)  # Redis runs what it was sent: fenced, it changes nothing
        assert await store.rate_position("alpha") == reference_tat(1)
        assert [a.tat_ms for a in await admit_many(store, 3)] == [  # type: ignore[union-attr]
            reference_tat(n) for n in (2, 3, 4)]

    run_with_store(redis_server.url, scenario)


def test_replies_split_across_reads_answer_every_caller(redis_server: RedisServer) -> None:
    """Replies arriving a few bytes at a time (a slow or congested link) are put together:
    each caller of a batch gets its own answer, of whichever shape."""
    async def scenario(store: RedisStore, proxy: FaultProxy) -> None:
        await setup(store)
        proxy.chunk = 5
        callers = [admit(store) for _ in range(8)]
        callers.insert(3, admit(store, digest=bytes(32)))  # an unknown key: a shorter reply
        outcomes = await asyncio.gather(*callers)
        assert [a.outcome for a in outcomes] == (
            [AdmitOutcome.ADMITTED] * 3 + [AdmitOutcome.UNKNOWN_KEY]
            + [AdmitOutcome.ADMITTED] * 5)
        admitted = [a for a in outcomes if a.outcome is AdmitOutcome.ADMITTED]
        assert sorted(a.tat_ms for a in admitted) == [  # type: ignore[type-var]
            reference_tat(n) for n in range(1, 9)]
        assert {a.key.key_id for a in admitted} == {"k1"}  # type: ignore[union-attr]
        assert {a.project.project_id for a in admitted} == {"alpha"}  # type: ignore[union-attr]

    # Some 400 pieces of 5 bytes take longer than the default 0.1 s on a busy machine.
    with_proxy(redis_server, scenario, timeout=5.0)


def test_scripts_flushed_under_a_batch_are_loaded_and_each_call_counted_once(
        redis_server: RedisServer) -> None:
    async def scenario(store: RedisStore) -> None:
        await setup(store)
        assert (await admit(store)).tat_ms == reference_tat(1)
        redis_server.command("SCRIPT", "FLUSH")
        outcomes = await admit_many(store, 10)
        assert sorted(a.tat_ms for a in outcomes) == [  # type: ignore[union-attr,type-var]
            reference_tat(n) for n in range(2, 12)]
        assert await store.rate_position("alpha") == reference_tat(11)

    run_with_store(redis_server.url, scenario)


def test_connections_killed_while_idle_fail_no_call(redis_server: RedisServer) -> None:
    async def scenario(store: RedisStore) -> None:
        await setup(store)
        assert (await admit(store)).tat_ms == reference_tat(1)
        killed = redis_server.command("CLIENT", "KILL", "TYPE", "normal")
        assert isinstance(killed, int) and killed >= 1
        await asyncio.sleep(0.05)  # a running service's loop sees the connection close
        assert [a.tat_ms for a in await admit_many(store, 3)] == [  # type: ignore[union-attr]
            reference_tat(n) for n in (2, 3, 4)]

    run_with_store(redis_server.url, scenario)


def test_connection_reset_with_a_batch_on_the_wire(redis_server: RedisServer) -> None:
    """The reset comes before Redis saw the batch: its callers hear "unavailable", nothing
    is counted, and the next call goes out on a new connection."""
    async def scenario(store: RedisStore, proxy: FaultProxy) -> None:
        await setup(store)
        assert (await admit(store)).tat_ms == reference_tat(1)
        proxy.on_admit = "reset"
        outcomes = await admit_many(store, 4)
        assert proxy.faults == 1
        assert_unavailable(outcomes)
        proxy.on_admit = ""
        assert await store.rate_position("alpha") == reference_tat(1)
        assert (await admit(store)).tat_ms == reference_tat(2)

    with_proxy(redis_server, scenario)


def test_a_reply_that_is_not_resp_fails_its_batch(redis_server: RedisServer) -> None:
    async def scenario(store: RedisStore, proxy: FaultProxy) -> None:
        await setup(store)
        proxy.on_admit = "garbage"
        outcomes = await admit_many(store, 3)
        assert_unavailable(outcomes)
        for outcome in outcomes:
            assert "Protocol error" in str(outcome)
        proxy.on_admit = ""
        assert (await admit(store)).tat_ms == reference_tat(1)

    with_proxy(redis_server, scenario)


# -- batches that linger while the loop is busy ---------------------------------------------

PING = b"*1\r\n$4\r\nPING\r\n"


@pytest.fixture
def busy_share(monkeypatch: pytest.MonkeyPatch) -> None:
    # A quarter: the test's loop works most of its window, but the suite's other processes
    # may take the core from it for part of the wall time.
    monkeypatch.setattr(redis_admission, "BUSY_SHARE", 0.25)


def work_the_loop() -> None:
    """Keeps the loop's thread working, without a turn of the loop, for more than a busy
    window of its own CPU time: what a saturated server's loop does."""
    until = time.thread_time() + redis_admission.BUSY_WINDOW * 3
    while time.thread_time() < until:
        pass


def pings(redis_server: RedisServer, *, linger: float) -> tuple[
        AdmissionConnection[asyncio.Future[object]], list[int]]:
    """An admissions connection sending PINGs to `redis_server`, and the sizes of the
    batches it sent."""
    async def connect() -> redis.asyncio.Connection:
        connection = redis.asyncio.Connection(port=redis_server.port)
        await connection.connect()
        return connection

    def pack(batch: list[asyncio.Future[object]]) -> bytes:
        sizes.append(len(batch))
        return PING * len(batch)

    sizes: list[int] = []
    return AdmissionConnection(
        connect, timeout=5.0, pack=pack, answer=lambda future, reply: future.set_result(reply),
        fail=lambda future, error: future.set_exception(error),
        gone=lambda future: future.done(), linger=linger), sizes


def ping(connection: AdmissionConnection[asyncio.Future[object]], *,
         may_linger: bool = True) -> asyncio.Future[object]:
    future = asyncio.get_running_loop().create_future()
    connection.submit(future, may_linger)
    return future


async def admit_lingering(store: RedisStore) -> Admission:
    return await store.admit(digest=DIGEST, project_id="", now_ms=NOW, count=True,
                             may_linger=True)


def test_a_busy_loop_sends_the_calls_of_several_turns_in_one_batch(
        redis_server: RedisServer, busy_share: None) -> None:
    async def scenario() -> list[int]:
        connection, sizes = pings(redis_server, linger=0.5)
        try:
            assert await ping(connection) == b"PONG"  # not busy yet: sent at once
            work_the_loop()
            calls = []
            for _ in range(10):
                calls.append(ping(connection))
                await asyncio.sleep(0)  # a turn of the loop between calls
            assert await asyncio.gather(*calls) == [b"PONG"] * 10
        finally:
            await connection.close()
        return sizes

    assert asyncio.run(scenario()) == [1, 10]


def test_a_call_that_may_not_linger_is_never_held(
        redis_server: RedisServer, busy_share: None) -> None:
    """Connect's calls: sent on the next turn of a busy loop, as the calls of a loop with
    time to spare are; one that may linger behind them still waits."""
    async def scenario() -> list[int]:
        connection, sizes = pings(redis_server, linger=60.0)
        try:
            assert await ping(connection) == b"PONG"
            work_the_loop()
            for _ in range(3):
                assert await asyncio.wait_for(ping(connection, may_linger=False), 5) == b"PONG"
            lingering = ping(connection)
            await asyncio.sleep(0.05)
            assert not lingering.done()
        finally:
            await connection.close()
        assert lingering.result() == b"PONG"
        return sizes

    assert asyncio.run(scenario()) == [1, 1, 1, 1, 1]


def test_a_loop_with_time_to_spare_never_holds_a_call(
        redis_server: RedisServer, busy_share: None) -> None:
    """With a linger of a minute, every call is still answered at once."""
    async def scenario() -> list[int]:
        connection, sizes = pings(redis_server, linger=60.0)
        try:
            for _ in range(3):
                assert await asyncio.wait_for(ping(connection), 5) == b"PONG"
                await asyncio.sleep(redis_admission.BUSY_WINDOW * 2)  # the loop idles
        finally:
            await connection.close()
        return sizes

    assert asyncio.run(scenario()) == [1, 1, 1]


def test_close_sends_a_lingering_batch(redis_server: RedisServer, busy_share: None) -> None:
    async def scenario() -> list[int]:
        connection, sizes = pings(redis_server, linger=60.0)
        assert await ping(connection) == b"PONG"
        work_the_loop()
        calls = [ping(connection) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(call.done() for call in calls)  # held
        await asyncio.wait_for(connection.close(), 5)
        assert [call.result() for call in calls] == [b"PONG"] * 3
        return sizes

    assert asyncio.run(scenario()) == [1, 3]


def test_a_call_cancelled_while_its_batch_lingers_takes_nothing(
        redis_server: RedisServer, busy_share: None) -> None:
    async def scenario(store: RedisStore) -> None:
        await setup(store)
        assert (await admit_lingering(store)).tat_ms == reference_tat(1)  # not busy yet
        work_the_loop()
        calls = [asyncio.ensure_future(admit_lingering(store)) for _ in range(5)]
        await asyncio.sleep(0.05)  # each has submitted; the batch is held
        for call in calls[1:3]:
            call.cancel()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(o) for o in outcomes[1:3]] == [asyncio.CancelledError] * 2
        admitted = [outcomes[0], *outcomes[3:]]
        assert sorted(a.tat_ms for a in admitted) == [  # type: ignore[union-attr,type-var]
            reference_tat(n) for n in (2, 3, 4)]
        assert await store.rate_position("alpha") == reference_tat(4)

    run_with_store(redis_server.url, scenario, linger=0.3)


def test_redis_killed_while_a_batch_lingers(redis_server: RedisServer,
                                            busy_share: None) -> None:
    """The held callers hear "unavailable" when their batch meets the dead connection; after
    a restart the store counts on exactly."""
    async def scenario(store: RedisStore) -> None:
        await setup(store)
        assert (await admit_lingering(store)).tat_ms == reference_tat(1)  # not busy yet
        work_the_loop()
        batch = asyncio.gather(*(admit_lingering(store) for _ in range(4)),
                               return_exceptions=True)
        await asyncio.sleep(0.05)
        redis_server.kill()
        assert_unavailable(await batch)

        redis_server.start()
        assert [(await admit(store)).tat_ms for _ in range(3)] == [
            reference_tat(n) for n in (2, 3, 4)]

    run_with_store(redis_server.url, scenario, linger=0.3)
