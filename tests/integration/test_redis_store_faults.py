"""What the Redis store does when Redis dies, stalls or forgets its scripts.

Each test drives a real redis-server (`redis_server` fixture, append-only so a SIGKILL keeps
the data) and one `RedisStore` object through the fault and back: a call fails fast with
`StoreUnavailableError`, the same object works again once Redis is back, and nothing is
counted twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from harness.redis_server import RedisServer
from icegate_server.access.rate_limit import RateLimitPolicy, gcra_admit
from icegate_server.errors import StoreUnavailableError
from icegate_server.projects.records import ApiKey, Project
from icegate_server.store import open_store
from icegate_server.store.base import (
    PURGE_BATCH,
    AdmitOutcome,
    ProviderKeyRecord,
    SessionOutcome,
    api_key_cursor,
)
from icegate_server.store.redis import PREFIX, RedisStore, _key_fields

pytestmark = pytest.mark.redis

T = TypeVar("T")
NOW = 1_700_000_000_000
POLICY = RateLimitPolicy.of(10, 60)
FAIL_FAST_LIMIT_S = 0.5
"""The store's timeout is 0.1 s; the bound leaves room for a loaded test machine."""


def run_with_store(url: str, scenario: Callable[[RedisStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = await RedisStore.open(url)
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def setup_project(store: RedisStore) -> None:
    await store.create_project(Project("alpha", rate_limit_requests=POLICY.limit,
                                       rate_limit_window_seconds=POLICY.window_ms // 1000))
    await store.put_provider_key(ProviderKeyRecord("alpha", "openai", b"sealed", "abcd", NOW))


async def admit(store: RedisStore) -> int | None:
    admission = await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
    assert admission.outcome is AdmitOutcome.ADMITTED
    return admission.tat_ms


def reference_tat(calls: int) -> int | None:
    tat = None
    for _ in range(calls):
        tat = gcra_admit(tat, NOW, POLICY)
    return tat


async def time_failure(call: Callable[[], Awaitable[object]], label: str) -> float:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"^Redis store unavailable"):
        await call()
    elapsed = time.monotonic() - started
    print(f"{label}: StoreUnavailableError after {elapsed * 1000:.1f} ms")
    assert elapsed < FAIL_FAST_LIMIT_S
    return elapsed


def test_a_killed_redis_fails_fast_and_the_same_store_recovers(
        redis_server: RedisServer) -> None:
    async def scenario(store: RedisStore) -> None:
        await setup_project(store)
        # Fill the pool with several connections: every one of them goes stale.
        await asyncio.gather(*(admit(store) for _ in range(3)))

        redis_server.kill()
        await time_failure(lambda: admit(store), "killed redis, admit")
        await time_failure(store.ping, "killed redis, ping")
        await time_failure(lambda: store.begin_session(
            project_id="alpha", session_id="s1", month="2023-11", now_ms=NOW, pending_ms=1_000,
            quota=5, max_concurrent=5, provider="openai"), "killed redis, begin_session")

        redis_server.start()
        # No reopen: every following call works at once, even on formerly pooled connections
        # and with Redis's script cache empty (NOSCRIPT is answered by loading the script).
        tats = [await admit(store) for _ in range(3)]
        assert tats == [reference_tat(n) for n in (4, 5, 6)]
        await store.ping()

    run_with_store(redis_server.url, scenario)


def test_a_paused_redis_fails_fast_and_counts_nothing_it_was_sent(
        redis_server: RedisServer) -> None:
    async def scenario(store: RedisStore) -> None:
        await setup_project(store)
        assert await admit(store) == reference_tat(1)

        redis_server.pause()
        try:
            await time_failure(lambda: admit(store), "paused redis, admit")
            await time_failure(lambda: store.begin_session(
                project_id="alpha", session_id="s1", month="2023-11", now_ms=NOW,
                pending_ms=60_000, quota=5, max_concurrent=5, provider="openai"),
                "paused redis, begin_session")
            await time_failure(store.ping, "paused redis, ping")
            await asyncio.sleep(0.2)
        finally:
            redis_server.resume()

        # The admit and begin_session the store gave up on reached Redis's socket before it
        # stopped, and run when it wakes: their deadline has passed, so they change nothing.
        await asyncio.sleep(0.1)
        assert await store.rate_position("alpha") == reference_tat(1)
        assert await store.session_counts(project_id="alpha", month="2023-11",
                                          now_ms=NOW) == (0, 0)
        assert await admit(store) == reference_tat(2)
        started = await store.begin_session(project_id="alpha", session_id="s2",
                                            month="2023-11", now_ms=NOW, pending_ms=60_000,
                                            quota=5, max_concurrent=5, provider="openai")
        assert (started.outcome, started.active_sessions, started.sessions_this_month) == (
            SessionOutcome.STARTED, 1, 1)

    run_with_store(redis_server.url, scenario)


def test_scripts_are_reloaded_after_redis_forgets_them(redis_server: RedisServer) -> None:
    async def scenario(store: RedisStore) -> None:
        await setup_project(store)
        assert await admit(store) == reference_tat(1)
        redis_server.command("SCRIPT", "FLUSH")
        assert await admit(store) == reference_tat(2)
        redis_server.restart()  # a restarted Redis starts with an empty script cache too
        # restart() blocked this event loop; a running service's loop sees Redis close the
        # pooled connections while Redis restarts, and the pool then reconnects them.
        await asyncio.sleep(0.05)
        assert await admit(store) == reference_tat(3)
        started = await store.begin_session(project_id="alpha", session_id="s1",
                                            month="2023-11", now_ms=NOW, pending_ms=60_000,
                                            quota=5, max_concurrent=5, provider="openai")
        assert started.outcome is SessionOutcome.STARTED

    run_with_store(redis_server.url, scenario)


def test_opening_an_unreachable_redis_fails_fast_without_the_password(
        free_port_unused: int) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port_unused}/0"

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as raised:
            await open_store(url, timeout=0.1)
        assert time.monotonic() - started < FAIL_FAST_LIMIT_S
        assert raised.value.message.startswith("Redis store unavailable")
        assert "hunter2-secret" not in str(raised.value)

    asyncio.run(scenario())


def test_open_store_picks_redis_for_redis_urls(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = await open_store(redis_server.url, timeout=0.2)
        try:
            assert isinstance(store, RedisStore)
            await store.ping()
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_clock_step_after_open_costs_one_refused_attempt_not_a_double_count(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our wall clock jumps back 10 s: the first deadline looks past to Redis, which runs
    nothing; the store re-measures the offset from that answer and retries once."""
    import icegate_server.store.redis as redis_store

    async def scenario(store: RedisStore) -> None:
        await setup_project(store)
        real_wall_ms = redis_store._wall_ms
        monkeypatch.setattr(redis_store, "_wall_ms", lambda: real_wall_ms() - 10_000)
        assert await admit(store) == reference_tat(1)
        assert await admit(store) == reference_tat(2)
        assert await store.rate_position("alpha") == reference_tat(2)

    run_with_store(redis_server.url, scenario)


def test_more_concurrent_calls_than_connections_wait_for_one(redis_server) -> None:
    """A burst beyond the pool's connections queues (up to the timeout) instead of failing
    with redis-py's "Too many connections"."""
    from icegate_server.projects.records import Project
    from icegate_server.store.base import AdmitOutcome
    from icegate_server.store.redis import MAX_CONNECTIONS, RedisStore

    async def scenario() -> list[AdmitOutcome]:
        store = await RedisStore.open(redis_server.url, timeout=5.0)
        try:
            await store.create_project(Project("burst", rate_limit_requests=10**6))
            admissions = await asyncio.gather(*(
                store.admit(digest=None, project_id="burst", now_ms=1_700_000_000_000,
                            count=True) for _ in range(MAX_CONNECTIONS + 200)))
            return [a.outcome for a in admissions]
        finally:
            await store.close()

    outcomes = asyncio.run(scenario())
    assert outcomes == [AdmitOutcome.ADMITTED] * (MAX_CONNECTIONS + 200)


def test_key_listings_of_an_earlier_version_are_moved_at_open(redis_server: RedisServer) -> None:
    """Data written by a version that listed keys in sets (`keys:<p>`, `admin-keys`) lists,
    pages and deletes the same after an upgrade: the store moves the sets at open, a batch
    per script."""
    keys = [ApiKey(key_id=f"{i:04x}", project_id="alpha", display_name=f"old {i}",
                   create_time=1_700_000_000.25 + (i % 7), key_prefix=f"igk_{i:04x}")
            for i in range(PURGE_BATCH + 30)]
    root = ApiKey(key_id="root", admin=True, create_time=5.5, key_prefix="igk_root")

    async def write(store: RedisStore) -> None:
        await store.create_project(Project("alpha"))

    run_with_store(redis_server.url, write)
    for key in [*keys, root]:  # as the earlier version wrote them
        digest = hashlib.sha256(key.key_id.encode()).hexdigest()
        fields = [item for pair in _key_fields(key).items() for item in pair]
        redis_server.command("HSET", f"{PREFIX}key:{digest}", *fields)
        redis_server.command("SET", f"{PREFIX}keyid:{key.key_id}", digest)
        listing = f"{PREFIX}admin-keys" if key.admin else f"{PREFIX}keys:alpha"
        redis_server.command("SADD", listing, key.key_id)

    async def read(store: RedisStore) -> None:
        listed: list[ApiKey] = []
        while page := await store.list_api_keys(
                "alpha", after=api_key_cursor(listed[-1]) if listed else "", limit=100):
            listed += page
        assert listed == sorted(keys, key=lambda k: (k.create_time, k.key_id))
        assert await store.list_api_keys(None, after="", limit=10) == [root]
        assert await store.delete_project("alpha", NOW)
        assert await store.list_api_keys("alpha", after="", limit=10) == []

    run_with_store(redis_server.url, read)
    assert redis_server.command("EXISTS", f"{PREFIX}keys:alpha", f"{PREFIX}admin-keys") == 0
    assert redis_server.command("KEYS", f"{PREFIX}keyid:0*") == []
