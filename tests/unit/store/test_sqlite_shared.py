"""Workers sharing one SQLite file (`icegate-server --workers N`): each is a `SqliteStore`
opened with `shared=True`, here two in one process (each has its own connections and its own
descriptor of the positions table, so they exclude each other as two processes would)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from icegate_server.projects.records import ApiKey, Project
from icegate_server.store import positions
from icegate_server.store.base import AdmitOutcome
from icegate_server.store.sqlite import SqliteStore

NOW = 1_700_000_000_000
ADMITTED, LIMITED = AdmitOutcome.ADMITTED, AdmitOutcome.RATE_LIMITED


def with_workers(path: Path, scenario: Callable[[SqliteStore, SqliteStore], Awaitable[None]]
                 ) -> None:
    async def main() -> None:
        first = await SqliteStore.open(str(path), shared=True)
        second = await SqliteStore.open(str(path), shared=True)
        try:
            await scenario(first, second)
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())


async def spend(store: SqliteStore, project_id: str, calls: int) -> list[AdmitOutcome]:
    return [(await store.admit(digest=None, project_id=project_id, now_ms=NOW,
                               count=True)).outcome for _ in range(calls)]


def test_the_limit_is_exact_across_workers(tmp_path: Path) -> None:
    async def scenario(first: SqliteStore, second: SqliteStore) -> None:
        await first.create_project(Project("alpha", rate_limit_requests=5,
                                           rate_limit_window_seconds=3600))
        outcomes = []
        for _ in range(4):
            outcomes += await spend(first, "alpha", 1) + await spend(second, "alpha", 1)
        assert outcomes.count(ADMITTED) == 5
        assert outcomes[5:] == [LIMITED] * 3
        assert await first.rate_position("alpha") == await second.rate_position("alpha")

    with_workers(tmp_path / "w.sqlite3", scenario)


def test_a_change_through_one_worker_is_seen_by_the_other_on_its_next_call(
        tmp_path: Path) -> None:
    secret = b"\x01" * 32

    async def scenario(first: SqliteStore, second: SqliteStore) -> None:
        async def by_key(store: SqliteStore) -> AdmitOutcome:
            return (await store.admit(digest=secret, project_id="", now_ms=NOW,
                                      count=True)).outcome

        await first.create_project(Project("alpha", rate_limit_requests=100,
                                           rate_limit_window_seconds=60))
        await first.create_api_key(ApiKey(key_id="k1", project_id="alpha",
                                          display_name="k", create_time=1.0), secret)
        assert await by_key(second) is ADMITTED  # the key and the project now in memory
        stored = await first.get_project("alpha")
        assert stored is not None
        assert await first.update_project(replace(stored, rate_limit_requests=1))
        assert await by_key(second) is LIMITED  # the new limit, and the shared position
        await first.revoke_api_key("k1", NOW)
        assert await by_key(second) is AdmitOutcome.UNKNOWN_KEY
        assert await first.delete_project("alpha", NOW)
        assert (await spend(second, "alpha", 1)) == [AdmitOutcome.NO_PROJECT]
        await first.create_project(Project("alpha", rate_limit_requests=1,
                                           rate_limit_window_seconds=60))
        # Made again, it starts from rest in every worker.
        assert await spend(second, "alpha", 2) == [ADMITTED, LIMITED]
        assert await spend(first, "alpha", 1) == [LIMITED]

    with_workers(tmp_path / "w.sqlite3", scenario)


def test_projects_beyond_the_shared_table_are_counted_in_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A table of 2 slots with 1 probe each: most of these projects find no slot.
    monkeypatch.setattr(positions, "SLOTS", 2)
    monkeypatch.setattr(positions, "_MAX_PROBES", 1)
    names = [f"p{n}" for n in range(8)]

    async def scenario(first: SqliteStore, second: SqliteStore) -> None:
        for name in names:
            await first.create_project(Project(name, rate_limit_requests=3,
                                               rate_limit_window_seconds=3600))
        for name in names:
            outcomes = []
            for _ in range(3):
                outcomes += await spend(first, name, 1) + await spend(second, name, 1)
            assert outcomes.count(ADMITTED) == 3, name
        held = [name for name in names if first._positions.known(name)[0]]
        assert 0 < len(held) <= 2  # some in the table, the others in the file

    with_workers(tmp_path / "w.sqlite3", scenario)


def test_workers_after_a_single_server_start_from_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    three = Project("alpha", rate_limit_requests=3, rate_limit_window_seconds=3600)

    async def workers_spend_two(first: SqliteStore, second: SqliteStore) -> None:
        await first.create_project(three)
        assert await spend(first, "alpha", 1) + await spend(second, "alpha", 1) == [
            ADMITTED, ADMITTED]

    async def single_server_remakes_the_project() -> None:
        owner = await SqliteStore.open(str(path))
        try:
            assert await owner.delete_project("alpha", NOW)
            await owner.create_project(three)
            assert await spend(owner, "alpha", 1) == [ADMITTED]
        finally:
            await owner.close()

    async def workers_again(first: SqliteStore, second: SqliteStore) -> None:
        # One of three used, as the single server left it; not the two of the first run.
        assert await spend(first, "alpha", 1) + await spend(second, "alpha", 2) == [
            ADMITTED, ADMITTED, LIMITED]

    with_workers(path, workers_spend_two)
    asyncio.run(single_server_remakes_the_project())
    with_workers(path, workers_again)
