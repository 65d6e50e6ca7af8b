"""A SQLite file written by an earlier icegate keeps what it holds when a newer one opens it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from icegate_server.store.base import ProviderKeyRecord, SessionOutcome
from icegate_server.store.sqlite import SqliteStore

NOW = 1_700_000_000_000
MONTH = "2023-11"

# The lease table as schema version 2 wrote it: no index on expiry, no lease counter.
_VERSION_2 = """
CREATE TABLE schema_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO schema_meta VALUES ('version', '2');
CREATE TABLE leases (
    project_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (project_id, session_id)
);
"""


def test_live_sessions_of_an_older_file_still_count_against_the_concurrent_limit(
        tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_VERSION_2)
        db.executemany("INSERT INTO leases VALUES (?, ?, ?)",
                       [("alpha", "live-1", NOW + 60_000), ("alpha", "live-2", NOW + 60_000),
                        ("alpha", "expired", NOW - 1), ("beta", "live-3", NOW + 60_000)])
    db.close()

    async def scenario() -> None:
        store = await SqliteStore.open(str(path))
        try:
            assert await store.session_counts(project_id="alpha", month=MONTH,
                                              now_ms=NOW) == (0, 2)
            await store.put_provider_key(ProviderKeyRecord("alpha", "openai", b"x", "abcd", 1))
            full = await store.begin_session(project_id="alpha", session_id="new", month=MONTH,
                                             now_ms=NOW, pending_ms=60_000, quota=10,
                                             max_concurrent=2, provider="openai")
            assert full.outcome is SessionOutcome.CONCURRENT_LIMIT
            assert full.active_sessions == 2
            assert await store.end_session(project_id="alpha", session_id="live-1", now_ms=NOW)
            started = await store.begin_session(project_id="alpha", session_id="new",
                                                month=MONTH, now_ms=NOW, pending_ms=60_000,
                                                quota=10, max_concurrent=2, provider="openai")
            assert started.outcome is SessionOutcome.STARTED
            assert started.active_sessions == 2
            assert await store.session_counts(project_id="beta", month=MONTH,
                                              now_ms=NOW) == (0, 1)
        finally:
            await store.close()

    asyncio.run(scenario())
