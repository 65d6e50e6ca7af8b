"""RealtimeSessions: a session started is confirmed and counted once; one that fails or is
cancelled gives its unit and lease back; a refusal takes nothing. A real SQLite store, a fake
provider, a frozen clock; each test checks the counts GetUsage would report."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from icegate_server.clock import FrozenClock
from icegate_server.errors import (
    ConcurrentLimitError,
    InvalidFieldError,
    NotFoundError,
    QuotaExceededError,
    UpstreamNotConfiguredError,
    UpstreamUnavailableError,
)
from icegate_server.projects.records import Project
from icegate_server.sessions.provider_keys import ProviderKeys
from icegate_server.sessions.providers import MintedToken, ProviderKind, SessionOptions
from icegate_server.sessions.realtime import SESSION_ID_PATTERN, RealtimeSessions
from icegate_server.sessions.vault import MasterKeyring, Vault
from icegate_server.store import open_store
from icegate_server.store.base import month_of
from icegate_server.turn.credentials import TurnCredentialIssuer, TurnSecretKeyring

T = TypeVar("T")

OPENAI_KEY = "sk-test-realtime-openai-key-0123"
START = 1_800_000_000.0
LEASE_SECONDS = 600
OPTIONS = SessionOptions(model="gpt-realtime", voice="echo")
PROJECT = Project("acme", monthly_session_quota=3, max_concurrent_sessions=2)


class FakeProvider:
    """An OpenAI stand-in: answers a token, or raises `failure`, or waits for `release`."""

    kind = ProviderKind.OPENAI
    default_token_ttl_seconds = 600

    def __init__(self) -> None:
        self.keys_used: list[str] = []
        self.failure: Exception | None = None
        self.entered = asyncio.Event()
        self.release: asyncio.Event | None = None

    def validate(self, options: SessionOptions) -> None:
        pass

    async def mint(self, api_key: str, options: SessionOptions, *,
                   timeout: float | None) -> MintedToken:
        self.keys_used.append(api_key)
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        if self.failure is not None:
            raise self.failure
        return MintedToken(value="ek_test", expires_at=START + 60, upstream_session_id="sess_1",
                           model=options.model, voice=options.voice)


class World:
    """Project acme (at most 2 live sessions, 3 a month) with an OpenAI key, and the service."""

    def __init__(self, sessions: RealtimeSessions, store: Any, provider: FakeProvider,
                 clock: FrozenClock) -> None:
        self.sessions = sessions
        self.store = store
        self.provider = provider
        self.clock = clock
        self.project = PROJECT

    async def create(self) -> str:
        created = await self.sessions.create(self.project, ProviderKind.OPENAI, OPTIONS,
                                             user_id="alice", turn_ttl=None, timeout=10.0)
        return created.session_id

    async def counts(self) -> tuple[int, int]:
        """(sessions counted this month, live leases), as GetUsage reports them."""
        now_ms = int(self.clock.now() * 1000)
        return await self.store.session_counts(project_id="acme", month=month_of(now_ms),
                                               now_ms=now_ms)


def run(tmp_path: Path, script: Callable[[World], Awaitable[T]]) -> T:
    async def main() -> T:
        store = await open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
        try:
            clock = FrozenClock(START)
            await store.create_project(PROJECT)
            keys = ProviderKeys(store, Vault(MasterKeyring([bytes(range(32))])), clock)
            await keys.set("acme", "openai", OPENAI_KEY)
            provider = FakeProvider()
            issuer = TurnCredentialIssuer(TurnSecretKeyring(["test-turn-secret-0123456789"]),
                                          clock, ["turn:127.0.0.1:3478"])
            sessions = RealtimeSessions(store, keys, {ProviderKind.OPENAI: provider}, issuer,
                                        ("stun:127.0.0.1:3478",), clock,
                                        lease_seconds=LEASE_SECONDS, upstream_seconds=5.0)
            return await script(World(sessions, store, provider, clock))
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_started_session_is_confirmed_and_counted_once(tmp_path):
    async def script(world: World) -> tuple[Any, tuple[int, int]]:
        created = await world.sessions.create(world.project, ProviderKind.OPENAI, OPTIONS,
                                              user_id="alice", turn_ttl=None, timeout=10.0)
        return created, await world.counts()

    created, counts = run(tmp_path, script)
    assert counts == (1, 1)
    assert SESSION_ID_PATTERN.fullmatch(created.session_id)
    assert created.token.value == "ek_test"
    assert created.create_time == START
    assert created.lease_expires_at == START + LEASE_SECONDS
    stun, turn = created.ice_servers
    assert (stun.urls, turn.urls) == (("stun:127.0.0.1:3478",), ("turn:127.0.0.1:3478",))
    assert turn.username == f"{int(START) + 3600}:acme/alice"


def test_the_provider_is_called_with_the_projects_key_opened(tmp_path):
    async def script(world: World) -> list[str]:
        await world.create()
        return world.provider.keys_used

    assert run(tmp_path, script) == [OPENAI_KEY]


def test_a_provider_failure_gives_the_unit_and_the_lease_back(tmp_path):
    async def script(world: World) -> tuple[tuple[int, int], tuple[int, int]]:
        world.provider.failure = UpstreamUnavailableError("provider down", provider="openai")
        for _ in range(4):  # more than the quota and the concurrency limit
            with pytest.raises(UpstreamUnavailableError):
                await world.create()
        after_failures = await world.counts()
        world.provider.failure = None
        await world.create()
        return after_failures, await world.counts()

    assert run(tmp_path, script) == ((0, 0), (1, 1))


def test_a_cancellation_during_the_provider_call_gives_back(tmp_path):
    async def script(world: World) -> tuple[tuple[int, int], tuple[int, int]]:
        world.provider.release = asyncio.Event()
        call = asyncio.ensure_future(world.create())
        await world.provider.entered.wait()
        during = await world.counts()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return during, await world.counts()

    during, after = run(tmp_path, script)
    assert during == (0, 1)  # a pending lease, not yet counted
    assert after == (0, 0)


def test_the_concurrency_limit_refuses_and_takes_nothing(tmp_path):
    async def script(world: World) -> tuple[int, int]:
        await world.create()
        await world.create()
        with pytest.raises(ConcurrentLimitError) as caught:
            await world.create()
        assert (caught.value.current, caught.value.maximum) == (2, 2)
        assert len(world.provider.keys_used) == 2  # the refused start never called it
        return await world.counts()

    assert run(tmp_path, script) == (2, 2)


def test_the_monthly_quota_refuses_and_takes_nothing(tmp_path):
    async def script(world: World) -> tuple[int, int]:
        for _ in range(3):
            await world.sessions.end(world.project, await world.create())
        with pytest.raises(QuotaExceededError) as caught:
            await world.create()
        assert (caught.value.used, caught.value.included) == (3, 3)
        assert len(world.provider.keys_used) == 3
        return await world.counts()

    assert run(tmp_path, script) == (3, 0)


def test_a_missing_provider_key_refuses_and_takes_nothing(tmp_path):
    async def script(world: World) -> tuple[int, int]:
        await world.store.delete_provider_key("acme", "openai")
        with pytest.raises(UpstreamNotConfiguredError):
            await world.create()
        assert world.provider.keys_used == []
        return await world.counts()

    assert run(tmp_path, script) == (0, 0)


def test_keep_alive_renews_and_end_frees_the_slot(tmp_path):
    async def script(world: World) -> tuple[float, tuple[int, int]]:
        session_id = await world.create()
        world.clock.advance(LEASE_SECONDS - 1)
        renewed = await world.sessions.keep_alive(world.project, session_id)
        world.clock.advance(LEASE_SECONDS - 1)  # past the first lease, within the renewed one
        assert await world.counts() == (1, 1)
        await world.sessions.end(world.project, session_id)
        return renewed, await world.counts()

    renewed, counts = run(tmp_path, script)
    assert renewed == START + 2 * LEASE_SECONDS - 1
    assert counts == (1, 0)  # ended: the slot is free, the month's count stays


@pytest.mark.parametrize("operation", ["keep_alive", "end"])
def test_an_unknown_or_ended_session_is_not_found(tmp_path, operation):
    async def script(world: World) -> None:
        call = getattr(world.sessions, operation)
        with pytest.raises(NotFoundError):
            await call(world.project, "ses_never_created_0000")
        ended = await world.create()
        await world.sessions.end(world.project, ended)
        with pytest.raises(NotFoundError):
            await call(world.project, ended)

    run(tmp_path, script)


@pytest.mark.parametrize("operation", ["keep_alive", "end"])
@pytest.mark.parametrize("session_id", ["", "ses_", "sess_0000000000", "ses_a b c d",
                                        "ses_" + "a" * 61, "ses_0000\n"])
def test_a_malformed_session_id_is_an_invalid_field(tmp_path, operation, session_id):
    async def script(world: World) -> None:
        await getattr(world.sessions, operation)(world.project, session_id)

    with pytest.raises(InvalidFieldError) as caught:
        run(tmp_path, script)
    assert [violation.field for violation in caught.value.violations] == ["session_id"]
