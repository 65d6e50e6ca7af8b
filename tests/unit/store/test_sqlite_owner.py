"""The SQLite owner's memory: what it writes back, and when it must not."""

from __future__ import annotations

import asyncio
from pathlib import Path

from icegate_server.access.rate_limit import RateLimitPolicy
from icegate_server.projects.records import Project
from icegate_server.store.base import AdmitOutcome
from icegate_server.store.sqlite import SqliteStore

NOW = 1_700_000_000_000


def test_a_position_of_a_deleted_project_is_never_written_back(tmp_path: Path) -> None:
    """The write-back runs on the store thread after whatever was queued before it: a position
    taken while its project was being deleted must not outlive the project (a project made
    again under the same id would start rate limited)."""
    path = str(tmp_path / "owner.sqlite3")

    async def scenario() -> None:
        store = await SqliteStore.open(path)
        try:
            await store.create_project(Project("alpha", rate_limit_requests=1,
                                               rate_limit_window_seconds=3600))
            admitted = await store.admit(digest=None, project_id="alpha", now_ms=NOW,
                                         count=True)
            assert admitted.outcome is AdmitOutcome.ADMITTED
            assert await store.delete_project("alpha", NOW)
            # As if the admission had raced the deletion: its position is still in memory.
            store._positions["alpha"] = NOW + RateLimitPolicy.of(1, 3600).interval_ms
            store._unwritten.add("alpha")
            await store._write_back_positions()
            await store.create_project(Project("alpha", rate_limit_requests=1,
                                               rate_limit_window_seconds=3600))
            store._positions.pop("alpha")  # read back from the file
            again = await store.admit(digest=None, project_id="alpha", now_ms=NOW, count=True)
            assert again.outcome is AdmitOutcome.ADMITTED
        finally:
            await store.close()

    asyncio.run(scenario())


def test_positions_are_written_back_on_close(tmp_path: Path) -> None:
    path = str(tmp_path / "owner.sqlite3")

    async def first() -> int | None:
        store = await SqliteStore.open(path)
        try:
            await store.create_project(Project("alpha", rate_limit_requests=2,
                                               rate_limit_window_seconds=60))
            return (await store.admit(digest=None, project_id="alpha", now_ms=NOW,
                                      count=True)).tat_ms
        finally:
            await store.close()  # well before the periodic write-back

    async def reopened() -> int | None:
        store = await SqliteStore.open(path)  # nothing in memory yet: reads the file
        try:
            return await store.rate_position("alpha")
        finally:
            await store.close()

    written = asyncio.run(first())
    assert written == NOW + 30_000
    assert asyncio.run(reopened()) == written
