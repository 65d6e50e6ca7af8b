"""The store's reply is lost: Redis SIGKILLed in the middle of a CreateSession burst through two
replicas, then started again from its append-only file. Issue 15 part 1 saw, before the fix,
one unit and one lease kept for a call answered UNAVAILABLE in 2 of 6 such rounds.

Redis is reached through a delay proxy (30 ms each way), so that at the kill some session
starts and confirmations have run in Redis, are on disk (appendfsync always) and have their
replies on the wire: the kill cuts the proxy's connections too, and those replies are lost
for certain rather than by the luck of a microsecond window. The burst is spread out, so at
the kill some calls are in the session start, some wait on the provider, some confirm.

What is checked is what a user sees through GetUsage: the month's count equals the sessions
callers received, and the live slots equal the sessions received and not ended, once the
pending life has passed (here `min(deadline, 0.5 s + 1 s)` + 2 s = 3.5 s); every failed call
got a typed error within its deadline; ended, the slots and the units all come back.

Two rounds: Redis back within the give-back's first retry (0.2 s down), and Redis down past
it (1.5 s). The second kept a confirmed session's unit and slot for the whole lease (1 to 4
per run, 6 of 6 runs) while the give-back tried only twice in 0.5 s; it now retries, backing
off, until the store answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import icegate
from fake_upstreams import CannedResponse, FakeUpstream, OpenAIEmulation, RecordedRequest
from harness.delay_proxy import DelayProxy
from harness.icegate_server import TEST_ADMIN_KEY
from harness.redis_server import RedisServer
from harness.server_process import ServerProcess

pytestmark = pytest.mark.redis

OPENAI_KEY = "sk-test-redis-kill-openai-key-0001"
DEADLINE = 2.0
"""Each caller's deadline."""
UPSTREAM_CONNECT, UPSTREAM_READ = 0.5, 1.0
"""The replicas' upstream timeouts: they bound the provider call, hence the pending life."""
PENDING_LIFE = min(DEADLINE, UPSTREAM_CONNECT + UPSTREAM_READ) + 2.0
"""How long a pending lease lives (docs/RELIABILITY.md, "Sessions: nothing kept ...")."""
PROVIDER_DELAY = 0.3
"""How long the fake OpenAI takes to answer each session request."""
PROXY_DELAY = 0.05
SPACING, KILL_AT, AFTER = 0.03, 1.3, 0.8
"""The burst: a call every 30 ms; Redis is killed 1.3 s in (a session start takes about 1 s
here), and calls go on until 0.8 s after it is started again."""
MAX_CONCURRENT, QUOTA, REFILL = 200, 1000, 10
ERRORS_EXPECTED = (icegate.UnavailableError, icegate.DeadlineExceededError)
"""What a call may fail with while the store is down: UNAVAILABLE (the store, or the
provider call cut short), DEADLINE_EXCEEDED. Both are typed; neither is INTERNAL."""


class CuttingProxy(DelayProxy):
    """A delay proxy whose connections can be cut at once: what it still holds is dropped."""

    def cut(self) -> None:
        async def abort() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        asyncio.run_coroutine_threadsafe(abort(), self._loop).result(5)


def slow_openai(request: RecordedRequest, emulation: OpenAIEmulation) -> CannedResponse:
    return dataclasses.replace(emulation(request), delay=PROVIDER_DELAY)


Stack = tuple[ServerProcess, ServerProcess, CuttingProxy, FakeUpstream]


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer) -> Iterator[Stack]:
    assert redis_server.appendonly  # the kill keeps what Redis ran: the lost replies count
    emulation = OpenAIEmulation(OPENAI_KEY)
    settings = {"session_lease_seconds": "600", "store_timeout": "1",
                "upstream_connect_timeout": str(UPSTREAM_CONNECT),
                "upstream_read_timeout": str(UPSTREAM_READ)}
    with FakeUpstream(lambda request: slow_openai(request, emulation)) as openai, \
            CuttingProxy(redis_server.port, PROXY_DELAY) as proxy, \
            contextlib.ExitStack() as stop:
        first, second = (ServerProcess(tmp_path / name, store=proxy.url,
                                       openai_base_url=openai.base_url, **settings)
                         for name in ("a", "b"))
        starting = [threading.Thread(target=replica.start) for replica in (first, second)]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(30)
        for replica in (first, second):
            stop.callback(replica.stop)
            assert replica.process is not None and replica.process.poll() is None
        yield first, second, proxy, openai


@dataclasses.dataclass
class Outcome:
    session_id: str | None
    error: icegate.IcegateError | None
    seconds: float


async def burst(targets: list[str], key: str, redis: RedisServer, proxy: CuttingProxy,
                openai: FakeUpstream, *, down_for: float) -> tuple[list[Outcome], float]:
    """CreateSession calls `SPACING` apart, alternating between the replicas; Redis is
    SIGKILLed (its replies on the wire lost) `KILL_AT` in, and started `down_for` later.
    Returns each call's outcome and when (monotonic) Redis was killed."""
    calls = round((KILL_AT + down_for + AFTER) / SPACING)
    clients = [icegate.AsyncClient(target, key) for target in targets]
    killed_at: list[float] = []

    def crash() -> None:
        redis.kill()
        proxy.cut()

    async def one(index: int) -> Outcome:
        await asyncio.sleep(index * SPACING)
        started = time.monotonic()
        try:
            created = await clients[index % len(clients)].create_session(
                "openai", timeout=DEADLINE)
            return Outcome(created.session_id, None, time.monotonic() - started)
        except icegate.IcegateError as error:
            return Outcome(None, error, time.monotonic() - started)

    async def kill_and_restart() -> None:
        await asyncio.sleep(KILL_AT)
        # Aim at one confirmation: the next provider request is answered PROVIDER_DELAY after
        # it arrives; its confirmation then reaches Redis PROXY_DELAY later and runs, and its
        # reply is on the wire for another PROXY_DELAY. Kill in the middle of that.
        arrived = len(openai.requests)
        await asyncio.to_thread(openai.wait_for_requests, arrived + 1)
        await asyncio.sleep(PROVIDER_DELAY + 1.5 * PROXY_DELAY)
        killed_at.append(time.monotonic())
        await asyncio.to_thread(crash)
        await asyncio.sleep(down_for)
        await asyncio.to_thread(redis.start)

    try:
        *outcomes, _ = await asyncio.gather(*(one(i) for i in range(calls)),
                                            kill_and_restart())
        return outcomes, killed_at[0]
    finally:
        for client in clients:
            await client.close()


async def end_all(target: str, key: str, session_ids: list[str]) -> None:
    async with icegate.AsyncClient(target, key) as client:
        await asyncio.gather(*(client.end_session(s, timeout=5) for s in session_ids))


def usage(client: icegate.Client) -> tuple[int, int]:
    """(sessions counted this month, concurrency slots taken), as GetUsage reports them."""
    sessions = client.get_usage(timeout=5).sessions
    return sessions.used_this_month, sessions.active


@pytest.mark.parametrize("down_for", [
    pytest.param(0.2, id="back-within-the-give-back-retry"),
    pytest.param(1.5, id="down-past-the-give-back-retry"),
])
def test_redis_killed_mid_burst_keeps_nothing_for_the_failed_calls(
        stack: Stack, redis_server: RedisServer, down_for: float) -> None:
    first, second, proxy, openai = stack
    with icegate.Client(first.target, TEST_ADMIN_KEY) as admin:
        admin.create_project("burst", max_concurrent_sessions=MAX_CONCURRENT,
                             monthly_session_quota=QUOTA, rate_limit_requests=10_000)
        admin.set_provider_key("burst", "openai", OPENAI_KEY)
        key = admin.create_api_key("burst").secret

    outcomes, killed_at = asyncio.run(burst([first.target, second.target], key, redis_server,
                                            proxy, openai, down_for=down_for))

    failed = [o for o in outcomes if o.error is not None]
    received = [o.session_id for o in outcomes if o.session_id is not None]
    summary = sorted({type(o.error).__name__ for o in failed})
    # The burst straddles the kill: some calls got a session, some failed, each with a typed
    # error and none past its deadline (with a little room for the answer to come back).
    assert received and failed, (len(received), summary)
    assert all(isinstance(o.error, ERRORS_EXPECTED) for o in failed), \
        [repr(o.error) for o in failed]
    assert max(o.seconds for o in outcomes) < DEADLINE + 0.5, \
        sorted(o.seconds for o in outcomes)[-3:]

    with icegate.Client(second.target, key) as caller:
        right_after = usage(caller)
        # What callers got is what is counted, and holds a slot; whatever a lost reply or the
        # unreachable store left behind was pending, and has freed itself once the pending
        # life has passed since the kill (every start begun after it has been settled by now).
        time.sleep(max(0.0, killed_at + down_for + PENDING_LIFE - time.monotonic()))
        seen = usage(caller)
        assert seen == (len(received), len(received)), (
            f"{len(received)} sessions received, {len(failed)} calls failed ({summary}); "
            f"usage (counted, live) when the burst ended {right_after}, once the pending life "
            f"had passed {seen}")

        asyncio.run(end_all(second.target, key, received))
        assert usage(caller) == (len(received), 0)

    # Every slot and every unit is back: with a limit of `REFILL` slots and `REFILL` more units
    # than counted, `REFILL` sessions start at once, and the next one is refused for the quota.
    with icegate.Client(first.target, TEST_ADMIN_KEY) as admin:
        admin.update_project("burst", max_concurrent_sessions=REFILL,
                             monthly_session_quota=len(received) + REFILL)

    async def fill() -> list[object]:
        async with icegate.AsyncClient(first.target, key) as client:
            return await asyncio.gather(
                *(client.create_session("openai", timeout=DEADLINE) for _ in range(REFILL)),
                return_exceptions=True)

    refilled = asyncio.run(fill())
    assert not [r for r in refilled if isinstance(r, Exception)], refilled
    with icegate.Client(second.target, key) as caller:
        assert usage(caller) == (len(received) + REFILL, REFILL)
        asyncio.run(end_all(second.target, key,
                            [r.session_id for r in refilled]))  # type: ignore[attr-defined]
        with pytest.raises(icegate.QuotaExceededError):
            caller.create_session("openai", timeout=DEADLINE)
