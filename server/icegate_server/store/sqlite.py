"""The embedded SQLite store: one file, WAL, all access on one dedicated thread.

SQLite calls block, so none runs on the event loop: a single-thread executor owns the one
connection, which also serialises writers inside the process (SQLite allows one writer at a
time anyway). With WAL and `synchronous=NORMAL` a commit appends to the log without fsync;
durability is at checkpoint, which is the trade SQLite documents for WAL mode.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from icegate_server.errors import StoreUnavailableError

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class SqliteStore:
    """The `Store` on a SQLite file."""

    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = connection
        self._executor = executor

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        """Opens (creating with mode 0600 if needed) the database file at `path`."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icegate-sqlite")
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(executor, _connect, path)
        except (OSError, sqlite3.Error) as error:
            executor.shutdown(wait=False)
            raise StoreUnavailableError(f"cannot open SQLite store {path}: {error}") from None
        return cls(connection, executor)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, work, self._db)
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"SQLite store error: {error}") from None

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)


def _connect(path: str) -> sqlite3.Connection:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Create the file 0600 before SQLite opens it: it will hold key digests and sealed keys.
    os.close(os.open(file, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=2000")
    db.executescript(_SCHEMA)
    db.execute("INSERT OR IGNORE INTO schema_meta(key, value) VALUES ('version', ?)",
               (str(SCHEMA_VERSION),))
    return db
