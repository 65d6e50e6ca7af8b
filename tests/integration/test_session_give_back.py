"""A CreateSession that fails keeps nothing: not when its deadline expires while the session
start waits on the store, not when the caller cancels, not when the provider answers after
the lease would have expired, not when the server is killed in the middle of a burst.

Each scenario ends the way a user would check it: GetUsage through the client, whose
`used_this_month` must equal the sessions callers actually received and whose `active` must
come back to the sessions they hold. Real servers, real stores, the fake OpenAI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

import icegate
from fake_upstreams import CannedResponse, FakeUpstream, OpenAIEmulation, openai_error
from harness.delay_proxy import DelayProxy
from harness.icegate_server import TEST_ADMIN_KEY, RunningServer, ServerFactory, server_settings
from harness.redis_server import RedisServer
from harness.server_process import ServerProcess
from icegate_server.clock import FrozenClock, SystemClock

OPENAI_KEY = "sk-test-SECRET-openai-key-1234"
NOVEMBER = datetime(2026, 11, 10, 12, 0, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def openai() -> Iterator[FakeUpstream]:
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as fake:
        yield fake


def usage(client: icegate.Client) -> tuple[int, int]:
    """(sessions counted this month, concurrency slots taken), as GetUsage reports them."""
    sessions = client.get_usage().sessions
    return sessions.used_this_month, sessions.active


def settle(client: icegate.Client, expected: tuple[int, int],
           within: float = 5.0) -> tuple[int, int]:
    """The usage once it equals `expected`, or as it stands after `within` seconds: a give-back
    whose store call was still running when the caller left completes a little later."""
    deadline = time.monotonic() + within
    seen = usage(client)
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        seen = usage(client)
    return seen


def admin_client(target: str, **project: int) -> icegate.Client:
    client = icegate.Client(target, TEST_ADMIN_KEY)
    client.set_provider_key("default", "openai", OPENAI_KEY)
    client.update_project("default", **project)
    return client


def in_threads(count: int, call: Callable[[int], object]) -> list[object]:
    """Runs `call(i)` for each i at once, each in its own thread; its result or its error."""
    results: list[object] = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = call(i)
        except Exception as error:  # the outcome is what is collected
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def sessions_received(results: list[object]) -> int:
    return sum(not isinstance(result, Exception) for result in results)


# -- the deadline expires while the session start waits on the store ------------------------------

def test_a_deadline_expiring_while_sqlite_is_locked_keeps_nothing(tmp_path: Path,
                                                                  openai: FakeUpstream) -> None:
    settings = server_settings(tmp_path, openai_base_url=openai.base_url,
                               session_lease_seconds=600)
    with RunningServer(settings, FrozenClock(NOVEMBER)) as server, \
            admin_client(server.target, max_concurrent_sessions=3) as admin:
        # Another process holds the write lock past the callers' deadlines (0.3 s), and lets
        # go before the store gives up waiting (1 s): the session starts then succeed.
        holder = sqlite3.connect(settings.store_url.removeprefix("sqlite:///"),
                                 isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(0.6, holder.execute, args=("ROLLBACK",)).start()
        results = in_threads(3, lambda _: admin.create_session("openai", timeout=0.3))
        assert all(isinstance(r, icegate.DeadlineExceededError) for r in results), results
        assert settle(admin, (0, 0)) == (0, 0)
        holder.close()
        # The three slots are free: three sessions start at once.
        assert sessions_received(in_threads(3, lambda _: admin.create_session("openai"))) == 3
        assert usage(admin) == (3, 3)


def test_a_caller_cancelling_while_sqlite_is_locked_keeps_nothing(tmp_path: Path,
                                                                  openai: FakeUpstream) -> None:
    settings = server_settings(tmp_path, openai_base_url=openai.base_url)
    with RunningServer(settings, FrozenClock(NOVEMBER)) as server, \
            admin_client(server.target, max_concurrent_sessions=2) as admin:
        holder = sqlite3.connect(settings.store_url.removeprefix("sqlite:///"),
                                 isolation_level=None, check_same_thread=False)

        async def cancel_two() -> None:
            async with icegate.AsyncClient(server.target, TEST_ADMIN_KEY) as client:
                holder.execute("BEGIN IMMEDIATE")
                calls = [asyncio.ensure_future(client.create_session("openai"))
                         for _ in range(2)]
                await asyncio.sleep(0.3)
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
                await asyncio.sleep(0.2)  # the server has seen the cancellation
                holder.execute("ROLLBACK")

        asyncio.run(cancel_two())
        holder.close()
        assert settle(admin, (0, 0)) == (0, 0)


def test_a_caller_cancelling_during_the_provider_call_keeps_nothing(
        tmp_path: Path, openai: FakeUpstream) -> None:
    settings = server_settings(tmp_path, openai_base_url=openai.base_url)
    with RunningServer(settings, FrozenClock(NOVEMBER)) as server, \
            admin_client(server.target, max_concurrent_sessions=1) as admin:
        openai.enqueue(CannedResponse(200, {}, delay=3.0))

        async def cancel() -> None:
            async with icegate.AsyncClient(server.target, TEST_ADMIN_KEY) as client:
                call = asyncio.ensure_future(client.create_session("openai"))
                await asyncio.get_running_loop().run_in_executor(
                    None, openai.wait_for_requests, 1)
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

        asyncio.run(cancel())
        assert settle(admin, (0, 0)) == (0, 0)
        admin.create_session("openai")  # the single slot is free


def test_deadlines_expiring_behind_a_slow_redis_keep_nothing(
        tmp_path: Path, openai: FakeUpstream, redis_server: RedisServer) -> None:
    # 25 ms each way in front of Redis: every store call takes 50 ms or more, and the
    # callers' deadlines (50 ms to 1 s, growing by 8 % a call, so that some calls get through
    # however loaded the machine is) expire at every step of the session start.
    with DelayProxy(redis_server.port, 0.025) as proxy:
        settings = server_settings(tmp_path, openai_base_url=openai.base_url, store=proxy.url,
                                   store_timeout=1.0, session_lease_seconds=600)
        with RunningServer(settings, SystemClock()) as server, \
                admin_client(server.target, max_concurrent_sessions=1000) as admin:
            results = []
            for i in range(40):
                try:
                    results.append(admin.create_session("openai", timeout=0.05 * 1.08 ** i))
                except icegate.DeadlineExceededError as error:
                    results.append(error)
            received = sessions_received(results)
            assert 0 < received < 40
            assert settle(admin, (received, received)) == (received, received)


# -- the provider answers after the lease would have expired -------------------------------------

@pytest.fixture
def frozen_server(server_factory: ServerFactory, store_url: str,
                  openai: FakeUpstream) -> RunningServer:
    """A server on each store, its clock frozen in November, with 1 s session leases."""
    return server_factory(FrozenClock(NOVEMBER), store=store_url,
                          openai_base_url=openai.base_url, session_lease_seconds=1)


def test_an_upstream_refusing_after_the_lease_time_keeps_nothing(
        frozen_server: RunningServer, openai: FakeUpstream) -> None:
    clock = frozen_server.clock
    assert isinstance(clock, FrozenClock)
    with admin_client(frozen_server.target, max_concurrent_sessions=2) as admin:
        # The lease is 1 s; the provider refuses the key 2 s after the session start, and
        # meanwhile another session starts (which clears the project's expired leases).
        refusal = openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        openai.enqueue(dataclasses.replace(refusal, delay=1.0))

        def meanwhile() -> None:
            openai.wait_for_requests(1)
            clock.advance(2.0)
            admin.create_session("openai")

        other = threading.Thread(target=meanwhile)
        other.start()
        with pytest.raises(icegate.UpstreamAuthFailedError):
            admin.create_session("openai")
        other.join(10)
        assert usage(admin) == (1, 1)


# -- the server is killed in the middle of a burst ------------------------------------------------

@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_sigkill_mid_burst_gives_back_the_in_flight_slots(
        tmp_path: Path, openai: FakeUpstream, store: str,
        request: pytest.FixtureRequest) -> None:
    stored = {} if store == "sqlite" else {
        "store": request.getfixturevalue("redis_server").url}
    server = ServerProcess(tmp_path / "server", openai_base_url=openai.base_url,
                           session_lease_seconds="600", **stored)
    with server, admin_client(server.target, max_concurrent_sessions=4) as admin:
        received = [admin.create_session("openai") for _ in range(2)]
        # The provider holds the next two requests; the other calls of the burst are refused
        # at the concurrent limit (2 live + 2 starting).
        openai.enqueue(*[CannedResponse(200, {}, delay=20.0)] * 2)
        burst = threading.Thread(target=in_threads, args=(
            6, lambda _: admin.create_session("openai", timeout=2.0)))
        burst.start()
        assert openai.wait_for_requests(4, timeout=10)
        server.stop(signal.SIGKILL)
        burst.join(30)
        server.start()
        # What callers got is what is counted; the two starts in flight free their slots
        # within their pending life (the 2 s deadline plus the margin).
        assert usage(admin)[0] == len(received)
        assert settle(admin, (2, 2), within=10.0) == (2, 2)
        admin.create_session("openai")
        admin.create_session("openai")
        assert usage(admin) == (4, 4)
