"""The store contract: every backend (SQLite, Redis) passes the same tests.

Each test is one scenario, written once against the `Store` Protocol, and run by the
`backend` fixture on every backend: a fresh SQLite file, or a fresh real redis-server. Time is
frozen: the scenarios pass `now_ms` themselves, so nothing sleeps. pytest-asyncio is not used:
`Backend.run` opens a store inside `asyncio.run`, runs the scenario and closes it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from icegate.v1 import admin_pb2
from icegate_server.access.rate_limit import RateLimitPolicy, gcra_admit
from icegate_server.errors import StoreUnavailableError
from icegate_server.projects.admin import MAX_PAGE_SIZE
from icegate_server.projects.records import DEFAULT_PROJECT_ID, MAX_DISPLAY_NAME, ApiKey, Project
from icegate_server.servicers.admin_service import api_key_to_proto
from icegate_server.store.base import (
    PURGE_BATCH,
    AdmitOutcome,
    ProviderKeyRecord,
    SessionOutcome,
    SessionPolicyRecord,
    SessionRecord,
    Store,
    TurnSecretRecord,
    api_key_cursor,
)
from icegate_server.store.redis import RedisStore
from icegate_server.store.sqlite import SqliteStore

T = TypeVar("T")
Scenario = Callable[[Store], Awaitable[T]]

NOW = 1_700_000_000_000
"""A frozen "now" (Unix ms, November 2023) that scenarios advance by hand."""
MONTH = "2023-11"


@dataclass
class Backend:
    """How to open one backend's store, and how to restart what lies behind it."""

    name: str
    open: Callable[[], Awaitable[Store]]
    restart: Callable[[], None]

    def run(self, scenario: Scenario[T]) -> T:
        """Opens a store, runs `scenario` on it in a fresh event loop, and closes it."""
        async def main() -> T:
            store = await self.open()
            try:
                return await scenario(store)
            finally:
                await store.close()

        return asyncio.run(main())


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn: SQLite on a fresh file, owned by the process, and Redis on a
    fresh redis-server."""
    if request.param == "sqlite":
        path = str(tmp_path / "s.sqlite3")
        return Backend("sqlite", lambda: SqliteStore.open(path), lambda: None)
    server = request.getfixturevalue("redis_server")
    return Backend("redis", lambda: RedisStore.open(server.url), server.restart)


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def every_key(store: Store, project_id: str | None, *,
                    page_size: int = 1000) -> list[ApiKey]:
    """Every key of a listing, page by page as ListApiKeys walks it (a page is read again
    after a store timeout: a loaded machine can hold a page's script past the 0.1 s)."""
    keys: list[ApiKey] = []
    while page := await retried(functools.partial(
            store.list_api_keys, project_id,
            after=api_key_cursor(keys[-1]) if keys else "", limit=page_size)):
        assert len(page) <= page_size
        keys += page
    return keys


def project(project_id: str, **fields: object) -> Project:
    return replace(Project(project_id=project_id, create_time=1.5, update_time=1.5),
                   **fields)  # type: ignore[arg-type]


def project_key(key_id: str, project_id: str, create_time: float = 10.0) -> ApiKey:
    return ApiKey(key_id=key_id, project_id=project_id, display_name=f"key {key_id}",
                  create_time=create_time, key_prefix=f"igk_{key_id}")


def admin_key(key_id: str, create_time: float = 10.0) -> ApiKey:
    return ApiKey(key_id=key_id, admin=True, display_name=f"admin {key_id}",
                  create_time=create_time, key_prefix=f"igk_{key_id}")


# -- projects ---------------------------------------------------------------------------------

def test_project_round_trips_every_field(backend: Backend) -> None:
    original = Project(
        project_id="alpha", display_name="Alpha — test", rate_limit_requests=7,
        rate_limit_window_seconds=30, turn_ttl_default_seconds=600, turn_ttl_max_seconds=7200,
        plan="pro", upgrade_url="https://example.test/upgrade", monthly_session_quota=12,
        max_concurrent_sessions=3, create_time=1_700_000_000.25, update_time=1_700_000_001.5)

    async def scenario(store: Store) -> None:
        assert await store.create_project(original) is True
        assert await store.get_project("alpha") == original
        assert await store.get_project("missing") is None

    backend.run(scenario)


def test_creating_an_existing_project_changes_nothing(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        assert await store.create_project(project("alpha", plan="first"))
        assert await store.create_project(project("alpha", plan="second")) is False
        stored = await store.get_project("alpha")
        assert stored is not None and stored.plan == "first"
        assert [p.project_id for p in await store.list_projects(after="", limit=10)] == ["alpha"]

    backend.run(scenario)


def test_projects_are_listed_in_id_order_page_by_page(backend: Backend) -> None:
    ids = ["delta", "a", "b-2", "alpha", "b", "charlie", "a1", "zulu"]

    async def scenario(store: Store) -> None:
        for project_id in ids:
            assert await store.create_project(project(project_id))
        everything = [p.project_id for p in await store.list_projects(after="", limit=100)]
        assert everything == sorted(ids)

        paged: list[str] = []
        after = ""
        while page := await store.list_projects(after=after, limit=3):
            assert len(page) <= 3
            paged += [p.project_id for p in page]
            after = page[-1].project_id
        assert paged == sorted(ids)

        # `after` need not exist; it is a strict lower bound.
        assert [p.project_id for p in await store.list_projects(after="b", limit=2)] == [
            "b-2", "charlie"]
        assert [p.project_id for p in await store.list_projects(after="bz", limit=10)] == [
            "charlie", "delta", "zulu"]
        assert await store.list_projects(after="zulu", limit=10) == []

    backend.run(scenario)


def test_update_replaces_an_existing_project_only(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        changed = project("alpha", rate_limit_requests=3, plan="pro", update_time=9.0)
        assert await store.update_project(changed) is True
        assert await store.get_project("alpha") == changed
        assert await store.update_project(project("ghost")) is False
        assert await store.get_project("ghost") is None

    backend.run(scenario)


def test_a_deleted_project_leaves_nothing_a_new_one_with_its_id_could_see(
        backend: Backend) -> None:
    secret, revoked_secret = digest_of("alpha-key"), digest_of("alpha-revoked")

    async def scenario(store: Store) -> None:
        policy = RateLimitPolicy.of(5, 60)
        await store.create_project(project("alpha", rate_limit_requests=5,
                                           rate_limit_window_seconds=60))
        await store.create_project(project("beta"))
        await store.create_api_key(project_key("k-alpha", "alpha"), secret)
        await store.create_api_key(project_key("k-old", "alpha", 5.0), revoked_secret)
        await store.revoke_api_key("k-old", NOW)
        await store.create_api_key(project_key("k-beta", "beta"), digest_of("beta-key"))
        await store.create_api_key(admin_key("root"), digest_of("root"))
        for _ in range(3):
            admitted = await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
            assert admitted.outcome is AdmitOutcome.ADMITTED
        await store.put_provider_key(ProviderKeyRecord("alpha", "openai", b"sealed", "abcd", 1))
        started = await store.begin_session(project_id="alpha", session_id="s1", month=MONTH,
                                            now_ms=NOW, pending_ms=60_000, quota=10,
                                            max_concurrent=5, provider="openai")
        assert started.outcome is SessionOutcome.STARTED
        await begin(store, "s2", confirm=False)  # one still pending too

        assert await store.delete_project("alpha", NOW + 5_000) is True
        assert await store.get_project("alpha") is None
        assert [p.project_id for p in await store.list_projects(after="", limit=10)] == ["beta"]
        assert await every_key(store, "alpha") == []
        # Its keys are gone with it: no record to revoke, no secret that authenticates.
        assert await store.revoke_api_key("k-alpha", NOW) is None
        assert await store.revoke_api_key("k-old", NOW) is None
        gone = await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
        assert gone.outcome is AdmitOutcome.UNKNOWN_KEY
        # Other projects and the admin keys keep theirs.
        [kept] = await every_key(store, "beta")
        assert kept.key_id == "k-beta" and not kept.revoked
        assert [k.key_id for k in await every_key(store, None)] == ["root"]
        assert await store.delete_project("alpha", NOW) is False
        # No key may be created for a project that does not exist (or is being deleted).
        assert await store.create_api_key(project_key("k-late", "alpha"),
                                          digest_of("late")) is False

        # A new project with the same id sees nothing of the old one.
        assert await store.create_project(project("alpha", rate_limit_requests=5,
                                                  rate_limit_window_seconds=60))
        assert await every_key(store, "alpha") == []
        assert await store.revoke_api_key("k-alpha", NOW) is None
        for old in (secret, revoked_secret, digest_of("late")):
            refused = await store.admit(digest=old, project_id="alpha", now_ms=NOW, count=True)
            assert refused.outcome is AdmitOutcome.UNKNOWN_KEY
        assert await store.rate_position("alpha") is None
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (0, 0)
        assert await store.list_provider_keys("alpha") == []
        assert await store.get_provider_key("alpha", "openai") is None
        fresh = await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
        assert fresh.tat_ms == gcra_admit(None, NOW, policy)
        # Its keys are its own again.
        assert await store.create_api_key(project_key("k-new", "alpha"), digest_of("new"))
        assert [k.key_id for k in await every_key(store, "alpha")] == ["k-new"]

    backend.run(scenario)


BIG_PROJECT_KEYS = 20_000
CLIENT_RECEIVE_LIMIT = 4 * 1024 * 1024
"""gRPC's default limit on a message a client receives."""


def test_a_project_of_20000_keys_is_listed_in_bounded_pages_and_deleted(
        backend: Backend) -> None:
    """Every listing page and every deletion step is bounded work: each page is one bounded
    store call (on Redis one script of at most a page), the pages list every key exactly
    once, and the deletion (in bounded steps too) leaves none of them."""
    label = "l" * MAX_DISPLAY_NAME

    async def scenario(store: Store) -> None:
        assert await store.create_project(project("big"))
        await store.create_project(project("small"))
        await store.create_api_key(project_key("small-key", "small"), digest_of("small"))
        # Seeded through the store API, 50 calls in flight at a time; half of the keys share
        # one creation time, so the order falls back on the key id. Creating a key again is
        # idempotent, so a write that a loaded machine's fsync (the fixture's Redis syncs
        # every write) held past the 0.1 s timeout is simply sent again.
        for start in range(0, BIG_PROJECT_KEYS, 50):
            created = await asyncio.gather(*(
                retried(lambda i=i: store.create_api_key(  # type: ignore[misc]
                    replace(project_key(f"{i:08x}", "big", 10.0 + (i // 2) * (i % 2)),
                            display_name=label),
                    digest_of(f"big-{i}")))
                for i in range(start, start + 50)))
            assert all(created)
        listed = await every_key(store, "big", page_size=MAX_PAGE_SIZE)
        assert len(listed) == BIG_PROJECT_KEYS
        assert len({k.key_id for k in listed}) == BIG_PROJECT_KEYS
        assert listed == sorted(listed, key=lambda k: (k.create_time, k.key_id))
        assert {k.display_name for k in listed} == {label}
        for start in range(0, BIG_PROJECT_KEYS, MAX_PAGE_SIZE):
            answer = admin_pb2.ListApiKeysResponse(
                api_keys=[api_key_to_proto(k) for k in listed[start:start + MAX_PAGE_SIZE]],
                next_page_token="t" * 196)
            assert answer.ByteSize() < CLIENT_RECEIVE_LIMIT / 4
        # A cursor need not be a stored key's: it is a strict lower bound.
        middle = listed[BIG_PROJECT_KEYS // 2]
        after_middle = await store.list_api_keys(
            "big", after=api_key_cursor(replace(middle, key_id=middle.key_id + "-")), limit=3)
        assert after_middle == listed[BIG_PROJECT_KEYS // 2 + 1:BIG_PROJECT_KEYS // 2 + 4]

        # A retry finishes a deletion a timeout cut short (a fsync held past it, as above).
        await retried(lambda: store.delete_project("big", NOW))
        assert await store.get_project("big") is None
        assert await every_key(store, "big") == []
        for i in (0, BIG_PROJECT_KEYS // 2, BIG_PROJECT_KEYS - 1):
            refused = await store.admit(digest=digest_of(f"big-{i}"), project_id="",
                                        now_ms=NOW, count=False)
            assert refused.outcome is AdmitOutcome.UNKNOWN_KEY
        assert await store.create_project(project("big"))
        assert await every_key(store, "big") == []
        assert [k.key_id for k in await every_key(store, "small")] == ["small-key"]

    backend.run(scenario)


def test_a_deletion_cut_short_is_finished_before_the_id_is_used_again(
        backend: Backend) -> None:
    """A server that dies between the deletion's steps leaves keys of a project that no
    longer exists: they are refused, and creating the project again removes them first."""
    key_count = 3 * PURGE_BATCH + 7

    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        # Seeded as in the test above: idempotent creates, sent again after a timeout.
        for start in range(0, key_count, 50):
            await asyncio.gather(*(
                retried(lambda i=i: store.create_api_key(  # type: ignore[misc]
                    project_key(f"{i:08x}", "alpha"), digest_of(f"a-{i}")))
                for i in range(start, min(start + 50, key_count))))
        stop_after = iter([True, True, False])  # the record, one batch of keys, then "dies"
        await cut_short(store, "alpha", lambda: next(stop_after))
        assert await store.get_project("alpha") is None
        left = await every_key(store, "alpha")
        assert 0 < len(left) < key_count
        for key in (left[0], left[-1]):
            refused = await store.admit(digest=digest_of(f"a-{int(key.key_id, 16)}"),
                                        project_id="", now_ms=NOW, count=True)
            assert refused.outcome is not AdmitOutcome.ADMITTED

        assert await store.create_project(project("alpha"))
        assert await every_key(store, "alpha") == []
        refused = await store.admit(digest=digest_of(f"a-{int(left[0].key_id, 16)}"),
                                    project_id="alpha", now_ms=NOW, count=True)
        assert refused.outcome is AdmitOutcome.UNKNOWN_KEY

    backend.run(scenario)


async def retried(call: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """`call()`, sent again after a store timeout (for idempotent calls only)."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except StoreUnavailableError:
            pass
    return await call()


async def cut_short(store: Store, project_id: str, go_on: Callable[[], bool]) -> None:
    """Runs `store.delete_project` until `go_on` says stop, between two of its store calls
    (as a server killed there would leave it)."""
    class Stopped(Exception):
        pass

    if isinstance(store, SqliteStore):
        original = store._run

        async def run(work: Callable[[Any], T]) -> T:
            if not go_on():
                raise Stopped
            return await original(work)

        store._run = run  # type: ignore[method-assign]
    else:
        assert isinstance(store, RedisStore)
        original_call = store._call

        async def call(*args: Any) -> Any:
            if not go_on():
                raise Stopped
            return await original_call(*args)

        store._call = call  # type: ignore[method-assign]
    try:
        with pytest.raises(Stopped):
            await store.delete_project(project_id, NOW)
    finally:
        if isinstance(store, SqliteStore):
            del store._run
        else:
            del store._call


# -- caller keys --------------------------------------------------------------------------------

def test_keys_are_listed_per_project_and_admin_keys_apart(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        await store.create_project(project("beta"))
        a2, a1 = project_key("a2", "alpha", 20.0), project_key("a1", "alpha", 10.0)
        b1 = project_key("b1", "beta", 15.0)
        root = admin_key("root", 5.0)
        for key in (a2, a1, b1, root):
            assert await store.create_api_key(key, digest_of(key.key_id))
        revoked = await store.revoke_api_key("a2", NOW)
        assert revoked == replace(a2, revoke_time=NOW / 1000)

        assert await every_key(store, "alpha") == [a1, revoked]
        assert await every_key(store, "beta") == [b1]
        assert await every_key(store, None) == [root]
        assert await every_key(store, "nobody") == []

    backend.run(scenario)


def test_keys_are_listed_oldest_first_page_by_page(backend: Backend) -> None:
    times = [30.0, 10.0, 20.0, 10.0, 0.0, 1_700_000_000.123456, 10.0, 20.5]

    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        keys = [project_key(f"k{n}", "alpha", t) for n, t in enumerate(times)]
        for key in keys:
            await store.create_api_key(key, digest_of(key.key_id))
        oldest_first = sorted(keys, key=lambda k: (k.create_time, k.key_id))
        for size in (1, 3, 8, 100):
            assert await every_key(store, "alpha", page_size=size) == oldest_first
        assert await store.list_api_keys("alpha", after="", limit=2) == oldest_first[:2]
        assert await store.list_api_keys(
            "alpha", after=api_key_cursor(oldest_first[-1]), limit=5) == []
        assert await store.list_api_keys("alpha", after="", limit=0) == []

    backend.run(scenario)


def test_a_revoked_key_is_refused_from_the_next_call_on(backend: Backend) -> None:
    secret = digest_of("alpha-key")

    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        await store.create_api_key(project_key("k1", "alpha"), secret)
        await store.create_api_key(admin_key("root"), digest_of("root"))
        before = await store.admit(digest=secret, project_id="alpha", now_ms=NOW, count=True)
        assert before.outcome is AdmitOutcome.ADMITTED
        tat = await store.rate_position("alpha")

        first = await store.revoke_api_key("k1", NOW + 1_000)
        assert first is not None and first.revoke_time == (NOW + 1_000) / 1000
        after = await store.admit(digest=secret, project_id="alpha", now_ms=NOW, count=True)
        assert after.outcome is AdmitOutcome.UNKNOWN_KEY and after.key is None
        assert await store.rate_position("alpha") == tat  # the refused call counted nothing

        # Revoking again keeps the first revocation time; unknown ids give None.
        again = await store.revoke_api_key("k1", NOW + 9_000)
        assert again is not None and again.revoke_time == (NOW + 1_000) / 1000
        assert await store.revoke_api_key("no-such-key", NOW) is None

        await store.revoke_api_key("root", NOW)
        admin = await store.admit(digest=digest_of("root"), project_id="alpha", now_ms=NOW,
                                  count=False)
        assert admin.outcome is AdmitOutcome.UNKNOWN_KEY

    backend.run(scenario)


def test_an_unknown_digest_is_an_unknown_key(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        for project_id in ("", "alpha", "missing"):
            admission = await store.admit(digest=digest_of("never stored"),
                                          project_id=project_id, now_ms=NOW, count=True)
            assert admission.outcome is AdmitOutcome.UNKNOWN_KEY
            assert admission.key is None and admission.project is None
        assert await store.rate_position("alpha") is None

    backend.run(scenario)


# -- admit: who may act on which project ----------------------------------------------------------

def test_a_project_key_is_admitted_on_its_own_project(backend: Backend) -> None:
    secret = digest_of("alpha-key")
    policy = RateLimitPolicy.of(100, 900)

    async def scenario(store: Store) -> None:
        alpha = project("alpha")
        await store.create_project(alpha)
        key = project_key("k1", "alpha")
        await store.create_api_key(key, secret)
        implicit = await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
        assert implicit.outcome is AdmitOutcome.ADMITTED
        assert implicit.key == key and implicit.project == alpha
        assert implicit.tat_ms == gcra_admit(None, NOW, policy)
        explicit = await store.admit(digest=secret, project_id="alpha", now_ms=NOW, count=True)
        assert explicit.outcome is AdmitOutcome.ADMITTED and explicit.project == alpha
        assert explicit.tat_ms == gcra_admit(implicit.tat_ms, NOW, policy)

    backend.run(scenario)


def test_a_project_key_naming_another_project_is_forbidden_and_counts_nothing(
        backend: Backend) -> None:
    secret = digest_of("alpha-key")

    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        await store.create_project(project("beta"))
        await store.create_api_key(project_key("k1", "alpha"), secret)
        await store.admit(digest=None, project_id="beta", now_ms=NOW, count=True)
        beta_tat = await store.rate_position("beta")
        for _ in range(3):
            refused = await store.admit(digest=secret, project_id="beta", now_ms=NOW,
                                        count=True)
            assert refused.outcome is AdmitOutcome.FORBIDDEN
            assert refused.key is not None and refused.key.key_id == "k1"
        assert await store.rate_position("beta") == beta_tat
        assert await store.rate_position("alpha") is None
        # Naming a project that does not exist is forbidden too, not a probe for ids.
        ghost = await store.admit(digest=secret, project_id="ghost", now_ms=NOW, count=True)
        assert ghost.outcome is AdmitOutcome.FORBIDDEN

    backend.run(scenario)


def test_an_admin_key_may_act_on_any_project(backend: Backend) -> None:
    secret = digest_of("root")

    async def scenario(store: Store) -> None:
        for project_id in ("alpha", "beta", DEFAULT_PROJECT_ID):
            await store.create_project(project(project_id))
        root = admin_key("root")
        await store.create_api_key(root, secret)
        for project_id in ("alpha", "beta"):
            admission = await store.admit(digest=secret, project_id=project_id, now_ms=NOW,
                                          count=True)
            assert admission.outcome is AdmitOutcome.ADMITTED
            assert admission.key == root
            assert admission.project is not None
            assert admission.project.project_id == project_id
            assert await store.rate_position(project_id) == admission.tat_ms
        default = await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
        assert default.outcome is AdmitOutcome.ADMITTED
        assert default.project is not None and default.project.project_id == DEFAULT_PROJECT_ID

    backend.run(scenario)


def test_a_static_admin_acts_on_the_project_it_names(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha"))
        named = await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
        assert named.outcome is AdmitOutcome.ADMITTED and named.key is None
        assert named.project is not None and named.project.project_id == "alpha"
        assert named.tat_ms is not None and await store.rate_position("alpha") == named.tat_ms
        # "" means the default project, which does not exist yet here.
        unnamed = await store.admit(digest=None, project_id="", now_ms=NOW, count=True)
        assert unnamed.outcome is AdmitOutcome.NO_PROJECT
        await store.create_project(project(DEFAULT_PROJECT_ID))
        unnamed = await store.admit(digest=None, project_id="", now_ms=NOW, count=True)
        assert unnamed.outcome is AdmitOutcome.ADMITTED
        assert unnamed.project is not None and unnamed.project.project_id == DEFAULT_PROJECT_ID

    backend.run(scenario)


def test_a_missing_project_is_no_project(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_api_key(admin_key("root"), digest_of("root"))
        # A key whose project is gone (a deletion cut short after its first step).
        await store.create_project(project("gone"))
        assert await store.create_api_key(project_key("orphan", "gone"), digest_of("orphan"))
        stop_after = iter([True, False])
        await cut_short(store, "gone", lambda: next(stop_after))
        for digest in (None, digest_of("root")):
            missing = await store.admit(digest=digest, project_id="ghost", now_ms=NOW,
                                        count=True)
            assert missing.outcome is AdmitOutcome.NO_PROJECT and missing.project is None
        orphan = await store.admit(digest=digest_of("orphan"), project_id="", now_ms=NOW,
                                   count=True)
        assert orphan.outcome is AdmitOutcome.NO_PROJECT
        assert orphan.key is not None and orphan.key.key_id == "orphan"
        assert await store.rate_position("ghost") is None

    backend.run(scenario)


def test_an_uncounted_call_reads_the_tat_without_moving_it(backend: Backend) -> None:
    secret = digest_of("alpha-key")

    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=2,
                                           rate_limit_window_seconds=60))
        await store.create_api_key(project_key("k1", "alpha"), secret)
        never = await store.admit(digest=secret, project_id="", now_ms=NOW, count=False)
        assert never.outcome is AdmitOutcome.ADMITTED and never.tat_ms is None
        assert await store.rate_position("alpha") is None
        for _ in range(2):
            await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
        tat = await store.rate_position("alpha")
        assert tat == NOW + 60_000
        # Uncounted calls pass even at the limit, and leave the TAT where it is.
        for _ in range(5):
            read = await store.admit(digest=secret, project_id="", now_ms=NOW, count=False)
            assert read.outcome is AdmitOutcome.ADMITTED and read.tat_ms == tat
        assert await store.rate_position("alpha") == tat

    backend.run(scenario)


# -- rate limits (GCRA, frozen time) --------------------------------------------------------------

def test_exactly_the_limit_passes_from_rest_then_rate_limited(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=10,
                                           rate_limit_window_seconds=60))
        outcomes = [(await store.admit(digest=None, project_id="alpha", now_ms=NOW,
                                       count=True)).outcome for _ in range(13)]
        assert outcomes == [AdmitOutcome.ADMITTED] * 10 + [AdmitOutcome.RATE_LIMITED] * 3
        refused = await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
        assert refused.project is not None and refused.project.project_id == "alpha"
        assert refused.tat_ms == NOW + 60_000  # RATE_LIMITED leaves the TAT unchanged
        assert await store.rate_position("alpha") == NOW + 60_000

    backend.run(scenario)


def test_capacity_returns_one_request_per_interval(backend: Backend) -> None:
    interval = 6_000  # 10 requests per 60 s

    async def admit(store: Store, now_ms: int) -> AdmitOutcome:
        return (await store.admit(digest=None, project_id="alpha", now_ms=now_ms,
                                  count=True)).outcome

    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=10,
                                           rate_limit_window_seconds=60))
        for _ in range(10):
            assert await admit(store, NOW) is AdmitOutcome.ADMITTED
        assert await admit(store, NOW + interval - 1) is AdmitOutcome.RATE_LIMITED
        assert await admit(store, NOW + interval) is AdmitOutcome.ADMITTED
        assert await admit(store, NOW + interval) is AdmitOutcome.RATE_LIMITED
        assert await admit(store, NOW + 2 * interval - 1) is AdmitOutcome.RATE_LIMITED
        assert await admit(store, NOW + 2 * interval) is AdmitOutcome.ADMITTED

    backend.run(scenario)


def test_a_full_burst_is_back_after_one_window(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=10,
                                           rate_limit_window_seconds=60))
        for now_ms in (NOW, NOW + 60_000, NOW + 180_000):
            outcomes = [(await store.admit(digest=None, project_id="alpha", now_ms=now_ms,
                                           count=True)).outcome for _ in range(11)]
            assert outcomes == [AdmitOutcome.ADMITTED] * 10 + [AdmitOutcome.RATE_LIMITED]

    backend.run(scenario)


def test_projects_are_rate_limited_independently(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=3,
                                           rate_limit_window_seconds=60))
        await store.create_project(project("beta", rate_limit_requests=5,
                                           rate_limit_window_seconds=60))
        for _ in range(3):
            await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
        exhausted = await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
        assert exhausted.outcome is AdmitOutcome.RATE_LIMITED
        outcomes = [(await store.admit(digest=None, project_id="beta", now_ms=NOW,
                                       count=True)).outcome for _ in range(6)]
        assert outcomes == [AdmitOutcome.ADMITTED] * 5 + [AdmitOutcome.RATE_LIMITED]
        assert await store.rate_position("alpha") == NOW + 60_000

    backend.run(scenario)


@pytest.mark.parametrize("seed", range(4))
def test_every_step_matches_the_gcra_reference(backend: Backend, seed: int) -> None:
    """A random walk of (advance, admit) steps, checked against `limits.gcra_admit`."""
    rng = random.Random(seed)
    # Windows of 10 s or more: the Redis TAT expires after window + interval of real time.
    policies = {
        f"p{i}": RateLimitPolicy.of(rng.choice([1, 2, 3, 7, 10, 60, 100]),
                                    rng.choice([10, 13, 60, 900]))
        for i in range(3)
    }

    async def scenario(store: Store) -> None:
        for project_id, policy in policies.items():
            await store.create_project(project(
                project_id, rate_limit_requests=policy.limit,
                rate_limit_window_seconds=policy.window_ms // 1000))
        expected: dict[str, int | None] = dict.fromkeys(policies)
        seen: list[AdmitOutcome] = []
        now = NOW
        for step in range(400):
            project_id = rng.choice(list(policies))
            policy = policies[project_id]
            t = policy.interval_ms
            now += rng.choice([0, 0, 0, 1, t - 1, t, t + 1, rng.randrange(2 * policy.window_ms)])
            count = rng.random() < 0.9
            admission = await store.admit(digest=None, project_id=project_id, now_ms=now,
                                          count=count)
            tat = expected[project_id]
            new_tat = gcra_admit(tat, now, policy)
            if not count:
                assert admission.outcome is AdmitOutcome.ADMITTED, step
                assert admission.tat_ms == tat, step
            elif new_tat is None:
                assert admission.outcome is AdmitOutcome.RATE_LIMITED, step
                assert admission.tat_ms == tat, step
            else:
                assert admission.outcome is AdmitOutcome.ADMITTED, step
                assert admission.tat_ms == new_tat, step
                expected[project_id] = new_tat
            seen.append(admission.outcome)
        # The walk must visit both sides of the limit many times to prove anything.
        assert seen.count(AdmitOutcome.RATE_LIMITED) >= 40
        assert seen.count(AdmitOutcome.ADMITTED) >= 40
        for project_id, tat in expected.items():
            assert await store.rate_position(project_id) == tat

    backend.run(scenario)


def test_concurrent_calls_admit_exactly_the_limit(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=20,
                                           rate_limit_window_seconds=60))
        await store.create_api_key(project_key("k1", "alpha"), digest_of("alpha-key"))
        admissions = await asyncio.gather(*(
            store.admit(digest=digest_of("alpha-key"), project_id="alpha", now_ms=NOW,
                        count=True) for _ in range(50)))
        outcomes = [a.outcome for a in admissions]
        assert outcomes.count(AdmitOutcome.ADMITTED) == 20
        assert outcomes.count(AdmitOutcome.RATE_LIMITED) == 30
        admitted_tats = [a.tat_ms or 0 for a in admissions if a.outcome is AdmitOutcome.ADMITTED]
        assert sorted(admitted_tats) == [NOW + 3_000 * i for i in range(1, 21)]
        assert await store.rate_position("alpha") == NOW + 60_000

    backend.run(scenario)


# -- sessions: concurrency leases and the monthly quota ------------------------------------------

async def begin(store: Store, session_id: str, *, now_ms: int = NOW, month: str = MONTH,
                quota: int = 100, max_concurrent: int = 10, lease_ms: int = 60_000,
                project_id: str = "alpha",
                confirm: bool = True) -> tuple[SessionOutcome, int, int]:
    """begin_session with the project's OpenAI key (a stand-in is put when it has none), then
    confirm_session when it started (unless `confirm` is False: the session stays pending,
    for `lease_ms`). The outcome and the counts begin_session answered."""
    if await store.get_provider_key(project_id, "openai") is None:
        await store.put_provider_key(ProviderKeyRecord(project_id, "openai", b"k", "abcd", 1))
    started = await store.begin_session(project_id=project_id, session_id=session_id,
                                        month=month, now_ms=now_ms, pending_ms=lease_ms,
                                        quota=quota, max_concurrent=max_concurrent,
                                        provider="openai")
    if confirm and started.outcome is SessionOutcome.STARTED:
        assert await store.confirm_session(project_id=project_id, session_id=session_id,
                                           month=month, now_ms=now_ms, lease_ms=lease_ms)
    return started.outcome, started.active_sessions, started.sessions_this_month


async def confirm(store: Store, session_id: str, *, now_ms: int = NOW,
                  lease_ms: int = 60_000) -> bool:
    return await store.confirm_session(project_id="alpha", session_id=session_id,
                                       month=MONTH, now_ms=now_ms, lease_ms=lease_ms)


async def cancel(store: Store, session_id: str) -> None:
    await store.cancel_session(project_id="alpha", session_id=session_id, month=MONTH)


async def counts(store: Store, now_ms: int = NOW) -> tuple[int, int]:
    return await store.session_counts(project_id="alpha", month=MONTH, now_ms=now_ms)


def test_a_session_begins_only_with_the_provider_key_it_reads_in_the_same_step(
        backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        def start(session_id: str, provider: str):  # type: ignore[no-untyped-def]
            return store.begin_session(project_id="alpha", session_id=session_id, month=MONTH,
                                       now_ms=NOW, pending_ms=60_000, quota=100,
                                       max_concurrent=10, provider=provider)

        missing = await start("s1", "openai")
        assert missing.outcome is SessionOutcome.NO_PROVIDER_KEY
        assert missing.provider_key is None
        # Refused for want of a key: no quota unit, no lease.
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (0, 0)
        sealed = bytes(range(256))
        record = ProviderKeyRecord("alpha", "openai", sealed, "wxyz", NOW)
        await store.put_provider_key(record)
        started = await start("s1", "openai")
        assert started.outcome is SessionOutcome.STARTED
        assert started.provider_key == record
        assert await confirm(store, "s1")
        # Another provider's key does not stand in for the one asked for.
        assert (await start("s2", "gemini")).outcome is SessionOutcome.NO_PROVIDER_KEY
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (1, 1)

    backend.run(scenario)


def test_sessions_begin_up_to_the_concurrent_limit(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        for i in range(1, 4):
            assert await begin(store, f"s{i}", max_concurrent=3) == (
                SessionOutcome.STARTED, i, i)
        assert await begin(store, "s4", max_concurrent=3) == (
            SessionOutcome.CONCURRENT_LIMIT, 3, 3)
        # A refused session counts nothing.
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (3, 3)
        # Another project has its own slots.
        assert await begin(store, "s1", max_concurrent=3, project_id="beta") == (
            SessionOutcome.STARTED, 1, 1)

    backend.run(scenario)


def test_sessions_begin_up_to_the_monthly_quota(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        for i in range(1, 4):
            outcome, _, used = await begin(store, f"s{i}", quota=3)
            assert (outcome, used) == (SessionOutcome.STARTED, i)
            await store.end_session(project_id="alpha", session_id=f"s{i}", now_ms=NOW)
        assert await begin(store, "s4", quota=3) == (SessionOutcome.QUOTA_EXCEEDED, 0, 3)
        # Concurrency is checked first: at both limits the caller is told to end a session.
        assert await begin(store, "s5", quota=4) == (SessionOutcome.STARTED, 1, 4)
        assert await begin(store, "s6", quota=4, max_concurrent=1) == (
            SessionOutcome.CONCURRENT_LIMIT, 1, 4)

    backend.run(scenario)


def test_a_new_month_starts_from_zero(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        for i in range(2):
            await begin(store, f"s{i}", quota=2, lease_ms=1_000)
        assert (await begin(store, "s2", quota=2))[0] is SessionOutcome.QUOTA_EXCEEDED
        later = NOW + 30 * 86_400_000
        assert await begin(store, "s3", month="2023-12", now_ms=later, quota=2) == (
            SessionOutcome.STARTED, 1, 1)
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=later) == (2, 1)

    backend.run(scenario)


def test_an_expired_lease_frees_its_slot(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        assert (await begin(store, "s1", max_concurrent=1, lease_ms=5_000))[0] is \
            SessionOutcome.STARTED
        assert (await begin(store, "s2", max_concurrent=1, now_ms=NOW + 4_999))[0] is \
            SessionOutcome.CONCURRENT_LIMIT
        assert await begin(store, "s2", max_concurrent=1, now_ms=NOW + 5_000) == (
            SessionOutcome.STARTED, 1, 2)

    backend.run(scenario)


def test_a_renewed_lease_outlives_its_first_expiry(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await begin(store, "s1", max_concurrent=1, lease_ms=5_000)
        assert await store.renew_session(project_id="alpha", session_id="s1",
                                         now_ms=NOW + 4_000, lease_ms=5_000) is True
        # Past the first expiry (NOW + 5 s) the slot is still taken, until NOW + 9 s.
        assert (await begin(store, "s2", max_concurrent=1, now_ms=NOW + 8_999))[0] is \
            SessionOutcome.CONCURRENT_LIMIT
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW + 8_999) == (1, 1)
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW + 9_000) == (1, 0)
        assert (await begin(store, "s2", max_concurrent=1, now_ms=NOW + 9_000))[0] is \
            SessionOutcome.STARTED

    backend.run(scenario)


def test_renewing_an_expired_or_unknown_lease_fails(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await begin(store, "s1", lease_ms=5_000)
        assert await store.renew_session(project_id="alpha", session_id="s1",
                                         now_ms=NOW + 5_000, lease_ms=5_000) is False
        assert await store.renew_session(project_id="alpha", session_id="nope",
                                         now_ms=NOW, lease_ms=5_000) is False
        assert await store.renew_session(project_id="beta", session_id="s1",
                                         now_ms=NOW, lease_ms=5_000) is False
        # The failed renewal did not bring the lease back.
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW + 5_000) == (1, 0)

    backend.run(scenario)


def test_ending_a_session_frees_its_slot_and_keeps_the_count(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await begin(store, "s1", max_concurrent=1)
        assert await store.end_session(project_id="alpha", session_id="s1",
                                       now_ms=NOW + 10) is True
        assert await store.end_session(project_id="alpha", session_id="s1",
                                       now_ms=NOW + 10) is False
        assert await store.end_session(project_id="alpha", session_id="nope",
                                       now_ms=NOW) is False
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW + 10) == (1, 0)
        assert await begin(store, "s2", max_concurrent=1, now_ms=NOW + 10) == (
            SessionOutcome.STARTED, 1, 2)

    backend.run(scenario)


def test_cancelling_a_session_gives_back_its_slot_and_its_quota_unit(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await begin(store, "s1", quota=2)
        await begin(store, "s2", quota=2)
        assert (await begin(store, "s3", quota=2))[0] is SessionOutcome.QUOTA_EXCEEDED
        await store.cancel_session(project_id="alpha", session_id="s2", month=MONTH)
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (1, 1)
        # Cancelling again (or an unknown session) gives nothing more back.
        await store.cancel_session(project_id="alpha", session_id="s2", month=MONTH)
        await store.cancel_session(project_id="alpha", session_id="nope", month=MONTH)
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (1, 1)
        assert await begin(store, "s3", quota=2) == (SessionOutcome.STARTED, 2, 2)

    backend.run(scenario)


def test_a_pending_session_holds_a_slot_and_a_unit_and_counts_on_confirmation(
        backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        assert await begin(store, "s1", quota=2, confirm=False) == (SessionOutcome.STARTED, 1, 1)
        # In flight: its slot is taken, the month's count is not.
        assert await counts(store) == (0, 1)
        assert await begin(store, "s2", quota=2, confirm=False) == (SessionOutcome.STARTED, 2, 2)
        # Two starts in flight hold the quota's two units.
        assert await begin(store, "s3", quota=2) == (SessionOutcome.QUOTA_EXCEEDED, 2, 2)
        assert await confirm(store, "s1") is True
        assert await counts(store) == (1, 2)
        # Confirming again (a retried call) counts once.
        assert await confirm(store, "s1") is True
        assert await counts(store) == (1, 2)
        # A confirmed lease lives `lease_ms` from its confirmation.
        assert await confirm(store, "s2", now_ms=NOW + 1_000, lease_ms=5_000) is True
        assert await counts(store, NOW + 5_999) == (2, 2)
        assert await counts(store, NOW + 6_000) == (2, 1)

    backend.run(scenario)


def test_a_pending_session_frees_its_slot_by_itself_uncounted(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        # A start that never completes (a crash, a lost reply) holds its slot for its
        # pending life only, and leaves nothing counted.
        await begin(store, "lost", max_concurrent=1, quota=1, lease_ms=5_000, confirm=False)
        assert (await begin(store, "s2", max_concurrent=1, quota=1, now_ms=NOW + 4_999))[0] \
            is SessionOutcome.CONCURRENT_LIMIT
        assert await counts(store, NOW + 5_000) == (0, 0)
        assert await begin(store, "s2", max_concurrent=1, quota=1, now_ms=NOW + 5_000) == (
            SessionOutcome.STARTED, 1, 1)
        # Its provider answering now is too late: nothing is confirmed or counted.
        assert await confirm(store, "lost", now_ms=NOW + 5_000) is False
        assert await counts(store, NOW + 5_000) == (1, 1)
        # Also when no other start has cleared it yet.
        await begin(store, "late", lease_ms=1_000, now_ms=NOW + 6_000, confirm=False)
        assert await confirm(store, "late", now_ms=NOW + 7_000) is False
        assert await counts(store, NOW + 7_000) == (1, 1)
        assert await confirm(store, "late", now_ms=NOW + 7_000) is False

    backend.run(scenario)


def test_cancelling_gives_back_exactly_what_was_taken_in_any_state(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await begin(store, "kept")
        # Pending: the slot comes back, and there was no unit to give back.
        await begin(store, "pending", confirm=False)
        await cancel(store, "pending")
        assert await counts(store) == (1, 1)
        # Confirmed: slot and unit back; cancelling again changes nothing.
        await begin(store, "confirmed")
        assert await counts(store) == (2, 2)
        await cancel(store, "confirmed")
        await cancel(store, "confirmed")
        assert await counts(store) == (1, 1)
        # A confirmed lease that already expired still gives its unit back.
        await begin(store, "expired", lease_ms=1_000)
        assert await counts(store, NOW + 2_000) == (2, 1)
        await cancel(store, "expired")
        assert await counts(store, NOW + 2_000) == (1, 1)
        # An expired pending lease had nothing counted: nothing is uncounted.
        await begin(store, "lapsed", lease_ms=1_000, confirm=False)
        await cancel(store, "lapsed")
        await cancel(store, "never-begun")
        assert await counts(store, NOW + 2_000) == (1, 1)
        # A cancelled start cannot be confirmed afterwards.
        await begin(store, "cancelled-first", confirm=False)
        await cancel(store, "cancelled-first")
        assert await confirm(store, "cancelled-first") is False
        assert await counts(store) == (1, 1)

    backend.run(scenario)


def test_session_counts_ignore_expired_leases(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (0, 0)
        await begin(store, "short", lease_ms=1_000)
        await begin(store, "long", lease_ms=10_000)
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW + 999) == (2, 2)
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW + 1_000) == (2, 1)
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW + 10_000) == (2, 0)
        assert await store.session_counts(project_id="alpha", month="2023-12",
                                          now_ms=NOW) == (0, 2)

    backend.run(scenario)


def test_concurrent_session_starts_stop_exactly_at_the_limit(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        results = await asyncio.gather(*(begin(store, f"s{i}", max_concurrent=7)
                                         for i in range(30)))
        outcomes = [outcome for outcome, _, _ in results]
        assert outcomes.count(SessionOutcome.STARTED) == 7
        assert outcomes.count(SessionOutcome.CONCURRENT_LIMIT) == 23
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (7, 7)

    backend.run(scenario)


# -- provider keys --------------------------------------------------------------------------------

def test_provider_keys_round_trip_their_sealed_bytes(backend: Backend) -> None:
    sealed = bytes(range(256)) + b"\xff\xfe\x00\x80"  # not UTF-8, with NUL bytes
    openai = ProviderKeyRecord("alpha", "openai", sealed, "wxyz", NOW)
    gemini = ProviderKeyRecord("alpha", "gemini", b"\x00", "0000", NOW + 1)
    azure = ProviderKeyRecord("beta", "azure", b"\xc3\x28", "1234", NOW + 2)

    async def scenario(store: Store) -> None:
        assert await store.get_provider_key("alpha", "openai") is None
        for record in (openai, gemini, azure):
            await store.put_provider_key(record)
        assert await store.get_provider_key("alpha", "openai") == openai
        assert await store.list_provider_keys("alpha") == [gemini, openai]
        assert await store.list_provider_keys("beta") == [azure]
        assert await store.list_provider_keys(None) == [gemini, openai, azure]

        replaced = ProviderKeyRecord("alpha", "openai", b"\x01new", "new4", NOW + 5)
        await store.put_provider_key(replaced)
        assert await store.get_provider_key("alpha", "openai") == replaced
        assert await store.list_provider_keys("alpha") == [gemini, replaced]

        assert await store.delete_provider_key("beta", "azure") is True
        assert await store.delete_provider_key("beta", "azure") is False
        assert await store.get_provider_key("beta", "azure") is None
        assert await store.list_provider_keys(None) == [gemini, replaced]

    backend.run(scenario)


# -- persistence ----------------------------------------------------------------------------------

def test_state_survives_closing_and_reopening(backend: Backend) -> None:
    secret = digest_of("alpha-key")
    record = ProviderKeyRecord("alpha", "openai", b"\x00\xffsealed", "abcd", NOW)

    async def write(store: Store) -> int | None:
        await store.create_project(project("alpha", rate_limit_requests=3,
                                           rate_limit_window_seconds=60))
        await store.create_api_key(project_key("k1", "alpha"), secret)
        await store.create_api_key(project_key("k2", "alpha"), digest_of("other"))
        await store.revoke_api_key("k2", NOW)
        for _ in range(2):
            await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
        await begin(store, "s1", quota=5, max_concurrent=2)
        await store.put_provider_key(record)
        return await store.rate_position("alpha")

    async def read(store: Store) -> None:
        assert await store.get_project("alpha") == project(
            "alpha", rate_limit_requests=3, rate_limit_window_seconds=60)
        assert [k.key_id for k in await every_key(store, "alpha")] == ["k1", "k2"]
        assert await store.rate_position("alpha") == tat
        # The third request of the burst still passes, the fourth does not.
        third = await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
        assert third.outcome is AdmitOutcome.ADMITTED and third.tat_ms == NOW + 60_000
        fourth = await store.admit(digest=secret, project_id="", now_ms=NOW, count=True)
        assert fourth.outcome is AdmitOutcome.RATE_LIMITED
        revoked = await store.admit(digest=digest_of("other"), project_id="", now_ms=NOW,
                                    count=True)
        assert revoked.outcome is AdmitOutcome.UNKNOWN_KEY
        assert await store.session_counts(project_id="alpha", month=MONTH,
                                          now_ms=NOW) == (1, 1)
        assert await begin(store, "s2", quota=5, max_concurrent=2) == (
            SessionOutcome.STARTED, 2, 2)
        assert await store.get_provider_key("alpha", "openai") == record

    tat = backend.run(write)
    assert tat == NOW + 40_000
    backend.restart()
    backend.run(read)


# -- the TURN secret ring ---------------------------------------------------------------------


def test_turn_secret_rotation_retires_the_previous_signers(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        first = TurnSecretRecord("first", b"\x00sealed-1", NOW)
        assert await store.rotate_turn_secret(first, now_ms=NOW, retire_at_ms=NOW + 5_000,
                                              min_age_ms=0)
        second = TurnSecretRecord("second", b"sealed-2\xff", NOW + 1_000)
        assert await store.rotate_turn_secret(second, now_ms=NOW + 1_000,
                                              retire_at_ms=NOW + 6_000, min_age_ms=0)
        ring = await store.list_turn_secrets()
        assert ring == [TurnSecretRecord("second", b"sealed-2\xff", NOW + 1_000, 0),
                        TurnSecretRecord("first", b"\x00sealed-1", NOW, NOW + 6_000)]
        assert await store.purge_turn_secrets(NOW + 5_999) == 0
        assert await store.purge_turn_secrets(NOW + 6_000) == 1
        assert [r.secret_id for r in await store.list_turn_secrets()] == ["second"]

    backend.run(scenario)


def test_turn_secret_rotation_happens_once_per_interval(backend: Backend) -> None:
    """Replicas rotating on the same schedule rotate once between them, not once each."""
    async def scenario(store: Store) -> None:
        await store.rotate_turn_secret(TurnSecretRecord("a", b"a", NOW), now_ms=NOW,
                                       retire_at_ms=NOW + 10, min_age_ms=0)
        attempts = [store.rotate_turn_secret(TurnSecretRecord(f"r{i}", b"r", NOW + 60_000),
                                             now_ms=NOW + 60_000, retire_at_ms=NOW + 70_000,
                                             min_age_ms=60_000) for i in range(5)]
        results = await asyncio.gather(*attempts)
        assert sorted(results) == [False, False, False, False, True]
        assert not await store.rotate_turn_secret(
            TurnSecretRecord("early", b"e", NOW + 90_000), now_ms=NOW + 90_000,
            retire_at_ms=NOW + 100_000, min_age_ms=60_000)
        ring = await store.list_turn_secrets()
        assert len(ring) == 2 and ring[1].secret_id == "a"

    backend.run(scenario)


# -- what admission remembers (the SQLite owner admits from memory) ------------------------------

def test_the_rate_position_survives_closing_and_reopening_the_store(backend: Backend) -> None:
    async def spend(store: Store, calls: int) -> list[AdmitOutcome]:
        return [(await store.admit(digest=None, project_id="alpha", now_ms=NOW,
                                   count=True)).outcome for _ in range(calls)]

    async def first(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=5,
                                           rate_limit_window_seconds=60))
        assert await spend(store, 3) == [AdmitOutcome.ADMITTED] * 3

    async def after_reopening(store: Store) -> None:
        assert await store.rate_position("alpha") == NOW + 3 * 12_000
        assert await spend(store, 3) == [AdmitOutcome.ADMITTED] * 2 + [AdmitOutcome.RATE_LIMITED]

    backend.run(first)
    backend.run(after_reopening)


def test_admission_sees_every_change_on_the_very_next_call(backend: Backend) -> None:
    secret = digest_of("igk_warm_secret")

    async def admit(store: Store) -> AdmitOutcome:
        return (await store.admit(digest=secret, project_id="", now_ms=NOW,
                                  count=True)).outcome

    async def scenario(store: Store) -> None:
        await store.create_project(project("alpha", rate_limit_requests=100,
                                           rate_limit_window_seconds=60))
        await store.create_api_key(project_key("warm", "alpha"), secret)
        assert await admit(store) is AdmitOutcome.ADMITTED  # key and project now known
        stored = await store.get_project("alpha")
        assert stored is not None
        assert await store.update_project(replace(stored, rate_limit_requests=1))
        assert await admit(store) is AdmitOutcome.RATE_LIMITED  # the new limit, at once
        await store.revoke_api_key("warm", NOW)
        assert await admit(store) is AdmitOutcome.UNKNOWN_KEY
        other = digest_of("igk_other_secret")
        await store.create_api_key(project_key("other", "alpha"), other)
        assert (await store.admit(digest=other, project_id="", now_ms=NOW + 60_000,
                                  count=True)).outcome is AdmitOutcome.ADMITTED
        assert await store.delete_project("alpha", NOW)
        assert (await store.admit(digest=None, project_id="alpha", now_ms=NOW,
                                  count=True)).outcome is AdmitOutcome.NO_PROJECT
        await store.create_project(project("alpha", rate_limit_requests=1,
                                           rate_limit_window_seconds=60))
        # A project made again starts from rest: nothing of the deleted one's position.
        assert (await store.admit(digest=None, project_id="alpha", now_ms=NOW,
                                  count=True)).outcome is AdmitOutcome.ADMITTED

    backend.run(scenario)


# -- session policies and session records --------------------------------------------------------

def test_session_policies_belong_to_an_existing_project_and_go_with_it(backend: Backend) -> None:
    text = '{"allowed_voices":["marin"],"instructions":"Caf\\u00e9 \\u2615"}'
    openai = SessionPolicyRecord("alpha", "openai", text, NOW)
    gemini = SessionPolicyRecord("alpha", "gemini", "{}", NOW + 1)

    async def scenario(store: Store) -> None:
        assert await store.put_session_policy(openai) is False  # no project alpha yet
        await store.create_project(project("alpha"))
        assert await store.get_session_policy("alpha", "openai") is None
        assert await store.put_session_policy(openai) is True
        assert await store.put_session_policy(gemini) is True
        assert await store.get_session_policy("alpha", "openai") == openai
        replaced = SessionPolicyRecord("alpha", "openai", "{}", NOW + 5)
        assert await store.put_session_policy(replaced) is True
        assert await store.get_session_policy("alpha", "openai") == replaced
        assert await store.delete_session_policy("alpha", "openai") is True
        assert await store.delete_session_policy("alpha", "openai") is False
        assert await store.get_session_policy("alpha", "gemini") == gemini
        await store.delete_project("alpha", NOW)
        await store.create_project(project("alpha"))
        assert await store.get_session_policy("alpha", "gemini") is None

    backend.run(scenario)


def test_session_records_last_until_deleted_or_ended(backend: Backend) -> None:
    ending = SessionRecord("alpha", "ses_ending", "openai", NOW + 1000)
    endless = SessionRecord("alpha", "ses_endless", "azure", 0)

    async def scenario(store: Store) -> None:
        await store.put_session_record(ending, NOW)
        await store.put_session_record(endless, NOW)
        assert await store.get_session_record("alpha", "ses_ending") == ending
        assert await store.get_session_record("beta", "ses_ending") is None
        # A later write drops what ended by then; what never ends stays until deleted.
        await store.put_session_record(SessionRecord("alpha", "ses_new", "openai", 0),
                                       NOW + 1000)
        assert await store.get_session_record("alpha", "ses_ending") is None
        assert await store.get_session_record("alpha", "ses_endless") == endless
        assert await store.take_session_record("alpha", "ses_endless") == endless
        assert await store.take_session_record("alpha", "ses_endless") is None  # once
        assert await store.get_session_record("alpha", "ses_endless") is None

    backend.run(scenario)


def test_the_records_of_calls_whose_lease_is_gone_are_taken_once(backend: Backend) -> None:
    async def scenario(store: Store) -> list[list[SessionRecord]]:
        await store.create_project(project("alpha"))
        await store.put_provider_key(ProviderKeyRecord("alpha", "openai", b"k", "0000", NOW))
        calls = {}
        for name in ("live", "expiring", "ended", "ending"):
            session_id = f"ses_{name}"
            await store.begin_session(project_id="alpha", session_id=session_id, month=MONTH,
                                      now_ms=NOW, pending_ms=5000, quota=10, max_concurrent=10,
                                      provider="openai")
            lease_ms = 1000 if name == "expiring" else 60_000
            await store.confirm_session(project_id="alpha", session_id=session_id,
                                        month=MONTH, now_ms=NOW, lease_ms=lease_ms)
            ends_ms = NOW + 500 if name == "ending" else 0
            calls[name] = SessionRecord("alpha", session_id, "openai", ends_ms,
                                        call_id=f"rtc_{name}")
            await store.put_session_record(calls[name], NOW)
        # A record without a call is never taken here.
        await store.put_session_record(SessionRecord("alpha", "ses_token", "openai"), NOW)
        await store.end_session(project_id="alpha", session_id="ses_ended", now_ms=NOW)
        first = await store.take_ended_calls(NOW + 2000, 10)
        # Past its end, a call's record stays until taken (its lease decides).
        await store.put_session_record(SessionRecord("alpha", "ses_x", "openai"), NOW + 2000)
        again = await store.take_ended_calls(NOW + 2000, 10)
        later = await store.take_ended_calls(NOW + 61_000, 10)
        assert await store.get_session_record("alpha", "ses_token") is not None
        return [sorted(first, key=lambda r: r.session_id), again, later]

    first, again, later = backend.run(scenario)
    assert [r.call_id for r in first] == ["rtc_ended", "rtc_expiring"]
    assert again == []
    assert sorted(r.call_id for r in later) == ["rtc_ending", "rtc_live"]


def test_a_webhook_delivery_is_claimed_once_until_forgotten(backend: Backend) -> None:
    async def scenario(store: Store) -> list[bool]:
        first = await store.claim_webhook_delivery("alpha", "wh_1", now_ms=NOW,
                                                   until_ms=NOW + 600_000)
        replay = await store.claim_webhook_delivery("alpha", "wh_1", now_ms=NOW + 1000,
                                                    until_ms=NOW + 601_000)
        other_project = await store.claim_webhook_delivery("beta", "wh_1", now_ms=NOW,
                                                           until_ms=NOW + 600_000)
        together = await asyncio.gather(*(
            store.claim_webhook_delivery("alpha", "wh_2", now_ms=NOW, until_ms=NOW + 600_000)
            for _ in range(4)))
        return [first, replay, other_project, sum(together) == 1]

    assert backend.run(scenario) == [True, False, True, True]
