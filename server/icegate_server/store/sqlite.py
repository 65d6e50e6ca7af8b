"""The embedded SQLite store: one file in WAL mode, owned by one process, written without ever
waiting on the loop.

Two connections:
- the *thread* connection, owned by a single-thread executor, runs everything that may wait:
  admin writes, session transactions, checkpoints (the only fsyncs), and any call that found
  the database locked;
- the *hot* connection serves what `admit` reads (a first sight of a key, a project or a
  position) and the short session statements of CreateSession, on the event loop itself,
  because a thread hop per call costs more than the work: with WAL and `synchronous=NORMAL` a
  write appends a page to the log with no fsync, and the connection never waits: its busy
  timeout is 0 and its automatic checkpoint is off. When the thread connection holds the
  write lock, the call moves to the thread, which waits up to `BUSY_TIMEOUT_MS`.

Ownership. One process owns the file: `icegate-server` with one worker (more processes, as
`--workers N` or replicas, share a Redis store; the command line refuses `--workers N` on
SQLite). A lock beside the file (`<file>.lock`, an exclusive `flock`) makes a second server
on the same file stop at start instead of silently splitting its limits. The owner admits
from memory: caller keys and projects are cached when first read (and dropped by the store's
own writes that change them, before the write returns), and the projects' GCRA positions
are kept in a dict, written back to the file every `CHECKPOINT_SECONDS` and on close. A
credential call then touches no SQL at all. The rule is the one `rate_limit.gcra_admit`
states, applied with no await between reading and writing a position, so it is atomic; after
a crash the positions of the last second are lost, which lets a restarted server admit at
most that second's requests again.

The two connections are serialised by SQLite's own lock: every read-modify-write is one
`BEGIN IMMEDIATE` transaction, and counters change through `INSERT ... ON CONFLICT DO UPDATE
... RETURNING`, never through Python arithmetic on a value read earlier. A checkpoint runs on
the thread every `CHECKPOINT_SECONDS` (durability comes at checkpoint: the trade SQLite
documents for WAL mode with `synchronous=NORMAL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from icegate_server.access.rate_limit import RateLimitPolicy, gcra_admit
from icegate_server.errors import StoreUnavailableError
from icegate_server.projects.records import DEFAULT_PROJECT_ID, ApiKey, Project
from icegate_server.store.base import (
    PURGE_BATCH,
    Admission,
    AdmitOutcome,
    ProviderKeyRecord,
    SessionAdmission,
    SessionOutcome,
    SessionPolicyRecord,
    SessionRecord,
    TurnAdmission,
    TurnAllocationEvent,
    TurnEventKind,
    TurnMeterState,
    TurnProjectChange,
    TurnSecretRecord,
    TurnUsageFigures,
    month_of,
    parse_api_key_cursor,
)

T = TypeVar("T")

SCHEMA_VERSION = 5
BUSY_TIMEOUT_MS = 1000
CHECKPOINT_SECONDS = 1.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS projects (
    project_id TEXT PRIMARY KEY,
    record     TEXT NOT NULL              -- the Project dataclass as JSON
);
CREATE TABLE IF NOT EXISTS api_keys (
    digest       BLOB PRIMARY KEY,        -- SHA-256 of the key; the key itself is never kept
    key_id       TEXT NOT NULL UNIQUE,
    project_id   TEXT NOT NULL,           -- '' for admin keys
    admin        INTEGER NOT NULL,
    display_name TEXT NOT NULL,
    key_prefix   TEXT NOT NULL,
    create_time  REAL NOT NULL,
    revoke_time  REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS api_keys_by_project ON api_keys(project_id);
-- ListApiKeys pages in this order, and each page is one range of this index.
CREATE INDEX IF NOT EXISTS api_keys_listed ON api_keys(project_id, admin, create_time, key_id);
CREATE TABLE IF NOT EXISTS rate_limits (
    project_id TEXT PRIMARY KEY,
    tat_ms     INTEGER NOT NULL           -- GCRA theoretical arrival time (see limits.py)
);
CREATE TABLE IF NOT EXISTS session_quota (
    project_id TEXT NOT NULL,
    month      TEXT NOT NULL,             -- YYYY-MM, UTC
    used       INTEGER NOT NULL,
    PRIMARY KEY (project_id, month)
);
CREATE TABLE IF NOT EXISTS leases (
    project_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    pending    INTEGER NOT NULL DEFAULT 0, -- 1 until the provider answered (confirm_session)
    PRIMARY KEY (project_id, session_id)
);
-- The quota counts a project's live pending leases, found by range among the few in flight.
CREATE INDEX IF NOT EXISTS pending_leases_by_expiry ON leases(project_id, expires_ms)
    WHERE pending = 1;
-- A project's expired leases are found by range, and its leases counted by the triggers
-- below: starting a session costs the same with ten thousand live sessions as with none.
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases(project_id, expires_ms);
CREATE TABLE IF NOT EXISTS lease_counts (
    project_id TEXT PRIMARY KEY,
    leases     INTEGER NOT NULL           -- rows in leases, expired or not
);
CREATE TRIGGER IF NOT EXISTS lease_counted AFTER INSERT ON leases BEGIN
    INSERT INTO lease_counts(project_id, leases) VALUES (NEW.project_id, 1)
    ON CONFLICT(project_id) DO UPDATE SET leases = leases + 1;
END;
CREATE TRIGGER IF NOT EXISTS lease_uncounted AFTER DELETE ON leases BEGIN
    UPDATE lease_counts SET leases = leases - 1 WHERE project_id = OLD.project_id;
END;
CREATE TABLE IF NOT EXISTS turn_secrets (
    secret_id    TEXT PRIMARY KEY,
    sealed       BLOB NOT NULL,           -- sealed by the vault, never in clear
    created_ms   INTEGER NOT NULL,
    retire_at_ms INTEGER NOT NULL         -- 0 for the signer
);
-- TURN usage metered from coturn (turn/coturn_stats.py): who meters, each allocation, and
-- per project (user_id '') and per user id each month's relayed bytes and last activity.
CREATE TABLE IF NOT EXISTS turn_meter (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    owner         TEXT NOT NULL,
    expires_ms    INTEGER NOT NULL,
    connected     INTEGER NOT NULL,
    changed_ms    INTEGER NOT NULL,
    last_event_ms INTEGER NOT NULL,
    batch         INTEGER NOT NULL DEFAULT 0  -- the owner's last batch applied
);
CREATE TABLE IF NOT EXISTS turn_allocations (
    allocation TEXT PRIMARY KEY,          -- coturn's id and the username
    project_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    live       INTEGER NOT NULL,
    counted    INTEGER NOT NULL,          -- bytes counted for it so far
    seen_ms    INTEGER NOT NULL,          -- last event while live (the sweep's order)
    ended_ms   INTEGER NOT NULL DEFAULT 0,
    swept      INTEGER NOT NULL DEFAULT 0 -- 1: ended by a sweep (coturn no longer listed it)
);
CREATE INDEX IF NOT EXISTS turn_allocations_live
    ON turn_allocations(project_id, user_id) WHERE live = 1;
CREATE INDEX IF NOT EXISTS turn_allocations_seen ON turn_allocations(seen_ms) WHERE live = 1;
CREATE INDEX IF NOT EXISTS turn_allocations_ended ON turn_allocations(ended_ms) WHERE live = 0;
CREATE TABLE IF NOT EXISTS turn_usage (
    project_id    TEXT NOT NULL,
    month         TEXT NOT NULL,          -- YYYY-MM, UTC
    user_id       TEXT NOT NULL,          -- '' for the project's own figures
    relayed_bytes INTEGER NOT NULL,
    last_ms       INTEGER NOT NULL,
    PRIMARY KEY (project_id, month, user_id)
);
CREATE TABLE IF NOT EXISTS session_turn (
    project_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    username   TEXT NOT NULL,             -- the TURN credential its ICE servers carried
    due_ms     INTEGER NOT NULL,          -- when its allocations are to end (the lease's end)
    PRIMARY KEY (project_id, session_id)
);
CREATE INDEX IF NOT EXISTS session_turn_due ON session_turn(due_ms);
CREATE TABLE IF NOT EXISTS turn_revocations (
    project_id TEXT NOT NULL,
    subject    TEXT NOT NULL,             -- a user or session id
    until_ms   INTEGER NOT NULL,          -- new TURN credentials refused until then
    PRIMARY KEY (project_id, subject)
);
CREATE TABLE IF NOT EXISTS provider_keys (
    project_id     TEXT NOT NULL,
    provider       TEXT NOT NULL,
    sealed         BLOB NOT NULL,
    last4          TEXT NOT NULL,
    update_time_ms INTEGER NOT NULL,
    PRIMARY KEY (project_id, provider)
);
CREATE TABLE IF NOT EXISTS session_policies (
    project_id     TEXT NOT NULL,
    provider       TEXT NOT NULL,            -- the provider family: openai, azure, ...
    policy         TEXT NOT NULL,            -- sessions.policy.SessionPolicy as JSON
    update_time_ms INTEGER NOT NULL,
    PRIMARY KEY (project_id, provider)
);
CREATE TABLE IF NOT EXISTS session_records (
    project_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    provider   TEXT NOT NULL,
    ends_ms    INTEGER NOT NULL,             -- 0: no end beyond the lease
    call_id    TEXT NOT NULL,                -- the provider's call, '' for none
    PRIMARY KEY (project_id, session_id)
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    project_id  TEXT NOT NULL,
    delivery_id TEXT NOT NULL,              -- the sender's webhook-id
    until_ms    INTEGER NOT NULL,           -- forgotten after (a replay is stale by then)
    PRIMARY KEY (project_id, delivery_id)
);
CREATE INDEX IF NOT EXISTS session_records_by_end ON session_records(project_id, ends_ms)
    WHERE ends_ms > 0;
"""


_PROJECT_FIELDS = frozenset(f.name for f in dataclasses.fields(Project))


@functools.lru_cache(maxsize=16384)
def _project_from_json(text: str) -> Project:
    # Cached by the record's text: a changed project is a new text, so never stale, and the
    # hot path skips the JSON parse (the costliest step of an admit after the commit).
    return Project(**{k: v for k, v in json.loads(text).items() if k in _PROJECT_FIELDS})


def _project_json(project: Project) -> str:
    return json.dumps(dataclasses.asdict(project), separators=(",", ":"))


_KEY_COLUMNS = "key_id, project_id, admin, display_name, create_time, revoke_time, key_prefix"
_PROVIDER_KEY_COLUMNS = "project_id, provider, sealed, last4, update_time_ms"
# A project's session figures as columns of one SELECT (named parameters :project, :now,
# :month): its leases, expired ones included (kept by the schema's triggers), the expired
# ones among them (through `leases_by_expiry`), and the sessions begun in the month. Live
# leases are the first minus the second; the first and the last are NULL before any.
_SESSION_FIGURES = (
    "(SELECT leases FROM lease_counts WHERE project_id = :project), "
    "(SELECT count(*) FROM leases WHERE project_id = :project AND expires_ms <= :now), "
    "(SELECT used FROM session_quota WHERE project_id = :project AND month = :month)")
# The live pending leases of a project (session starts waiting on their provider).
_PENDING_FIGURE = (
    "(SELECT count(*) FROM leases "
    "WHERE project_id = :project AND pending = 1 AND expires_ms > :now)")


def _key_from_row(row: tuple[Any, ...]) -> ApiKey:
    key_id, project_id, admin, display_name, create_time, revoke_time, prefix = row
    return ApiKey(key_id=key_id, project_id=project_id, admin=bool(admin),
                  display_name=display_name, create_time=create_time,
                  revoke_time=revoke_time, key_prefix=prefix)


@contextmanager
def _write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so two connections never both read a value
    # and then race to write it.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # Also when COMMIT itself failed (busy, disk full): never leave the connection inside
        # a transaction, or every later BEGIN fails.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SqliteStore:
    """The `Store` on a SQLite file."""

    def __init__(self, connection: sqlite3.Connection, hot: sqlite3.Connection,
                 executor: ThreadPoolExecutor, path: str, *, lock_fd: int) -> None:
        self._db = connection
        self._hot = hot
        self._executor = executor
        self._path = path
        self._lock_fd = lock_fd
        # The owner's memory (module docstring): keys by digest and projects by id as read,
        # GCRA positions by project (None: the project has none yet), and the projects whose
        # position moved since it was last written back.
        self._keys: dict[bytes, ApiKey] = {}
        self._projects: dict[str, Project] = {}
        self._positions: dict[str, int | None] = {}
        self._unwritten: set[str] = set()
        # TURN state for admissions: (month, live allocations, bytes that month) by project,
        # kept up to date by this store's own metering writes; and every revocation in force
        # (few: they lapse when the credentials they cover have expired), loaded at open.
        self._turn: dict[str, tuple[str, int, int]] = {}
        self._revoked: dict[tuple[str, str], int] = dict(
            ((project_id, subject), until_ms) for project_id, subject, until_ms in
            connection.execute("SELECT project_id, subject, until_ms FROM turn_revocations"))
        self._checkpoints = asyncio.get_running_loop().create_task(self._checkpoint_forever())

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        """Opens (creating with mode 0600 if needed) the database file at `path`, for this
        process alone.

        Raises:
            StoreUnavailableError: The file cannot be opened, or another process owns it.
        """
        lock_fd = _own(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icegate-sqlite")
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(executor, _connect, path)
            hot = _connect_hot(path)
        except (OSError, sqlite3.Error) as error:
            executor.shutdown(wait=False)
            os.close(lock_fd)
            raise StoreUnavailableError(f"cannot open SQLite store {path}: {error}") from None
        return cls(connection, hot, executor, path, lock_fd=lock_fd)

    async def _checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            with contextlib.suppress(StoreUnavailableError):
                await self._write_back_positions()
                await self._run(
                    lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    async def _write_back_positions(self) -> None:
        # Taken and queued in one step on the loop: the single store thread then applies
        # write-backs and deletions in the order the loop asked for them.
        if not self._unwritten:
            return
        positions = self._positions
        rows = [(project_id, positions[project_id]) for project_id in self._unwritten
                if project_id in positions]
        self._unwritten.clear()
        try:
            # Only for projects that still exist: a position taken while its project was
            # being deleted must not come back as the position of a project made again.
            await self._run(lambda db: db.executemany(
                "INSERT INTO rate_limits(project_id, tat_ms) SELECT :p, :t "
                "WHERE EXISTS (SELECT 1 FROM projects WHERE project_id = :p) "
                "ON CONFLICT(project_id) DO UPDATE SET tat_ms = excluded.tat_ms",
                [{"p": project_id, "t": tat} for project_id, tat in rows]))
        except StoreUnavailableError:
            self._unwritten.update(project_id for project_id, _ in rows
                                   if project_id in self._positions)
            raise

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, _finished, work, self._db)
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"SQLite store error: {error}") from None

    async def _run_on_loop(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `work` on the loop's never-waiting connection, or on the thread when the file
        is locked: for the short statements of a session (what a CreateSession reads and
        writes), where a thread hop each way costs more than the work."""
        try:
            return _finished(work, self._hot)
        except sqlite3.OperationalError:
            pass  # locked (a write transaction rolls itself back): the thread may wait
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"SQLite store error: {error}") from None
        return await self._run(work)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        self._checkpoints.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._checkpoints
        with contextlib.suppress(StoreUnavailableError):
            await self._write_back_positions()
        self._hot.close()
        self._positions.clear()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)
        os.close(self._lock_fd)

    # -- projects ---------------------------------------------------------------------------

    async def create_project(self, project: Project) -> bool:
        def work(db: sqlite3.Connection) -> bool | None:
            with _write_transaction(db):
                if _read_project(db, project.project_id) is not None:
                    return False
                # Keys a deletion cut short left behind go first, a batch per transaction
                # (None: more to go); no key can be added meanwhile, its project being absent.
                if _purge_keys(db, project.project_id) == PURGE_BATCH:
                    return None
                db.execute("INSERT INTO projects(project_id, record) VALUES (?, ?)",
                           (project.project_id, _project_json(project)))
                return True

        try:
            while (created := await self._run(work)) is None:
                pass
            return created
        finally:
            self._keys.clear()  # a key of the purged leftovers may have been read meanwhile

    async def get_project(self, project_id: str) -> Project | None:
        return await self._run(lambda db: _read_project(db, project_id))

    async def list_projects(self, *, after: str, limit: int) -> list[Project]:
        rows = await self._run(lambda db: db.execute(
            "SELECT record FROM projects WHERE project_id > ? ORDER BY project_id LIMIT ?",
            (after, limit)).fetchall())
        return [_project_from_json(row[0]) for row in rows]

    async def update_project(self, project: Project) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute("UPDATE projects SET record = ? WHERE project_id = ?",
                                (_project_json(project), project.project_id))
            return cursor.rowcount == 1

        try:
            return await self._run(work)
        finally:
            self._projects.pop(project.project_id, None)

    async def delete_project(self, project_id: str, now_ms: int) -> bool:
        # The record first, with what is bounded per project (counters, a month's quota rows,
        # provider keys; leases are bounded by max_concurrent_sessions): its keys are refused
        # from then on, their project being gone. Then the keys, a bounded batch per
        # transaction, so the write lock is never held in proportion to the project's size.
        def work(db: sqlite3.Connection) -> bool:
            with _write_transaction(db):
                deleted = db.execute("DELETE FROM projects WHERE project_id = ?",
                                     (project_id,)).rowcount == 1
                for table in ("rate_limits", "session_quota", "leases", "lease_counts",
                              "provider_keys", "session_policies", "session_records",
                              "turn_allocations", "turn_usage", "turn_revocations",
                              "session_turn", "webhook_deliveries"):
                    db.execute(f"DELETE FROM {table} WHERE project_id = ?",  # noqa: S608
                               (project_id,))
            return deleted

        def purge(db: sqlite3.Connection) -> int:
            with _write_transaction(db):
                return _purge_keys(db, project_id)

        self._forget_project(project_id)
        try:
            deleted = await self._run(work)
            while await self._run(purge) == PURGE_BATCH:
                pass
            return deleted
        finally:
            self._forget_project(project_id)
            self._keys.clear()

    def _forget_project(self, project_id: str) -> None:
        self._projects.pop(project_id, None)
        self._positions.pop(project_id, None)
        self._unwritten.discard(project_id)
        self._turn.pop(project_id, None)
        for revoked in [key for key in self._revoked if key[0] == project_id]:
            del self._revoked[revoked]

    # -- caller keys ---------------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey, digest: bytes) -> bool:
        # Only while its project exists (in the same statement): a key written while its
        # project is being deleted would otherwise outlive it.
        return await self._run(lambda db: db.execute(
            "INSERT INTO api_keys(digest, key_id, project_id, admin, display_name, key_prefix, "
            "create_time, revoke_time) SELECT ?, ?, ?, ?, ?, ?, ?, ? "
            "WHERE ? OR EXISTS (SELECT 1 FROM projects WHERE project_id = ?)",
            (digest, key.key_id, key.project_id, int(key.admin), key.display_name,
             key.key_prefix, key.create_time, key.revoke_time, int(key.admin),
             key.project_id)).rowcount == 1)

    async def list_api_keys(self, project_id: str | None, *, after: str,
                            limit: int) -> list[ApiKey]:
        position = parse_api_key_cursor(after) if after else (-1.0, "")
        if position is None or limit <= 0:
            return []
        # One range of the api_keys_listed index: the work is the page, not the project.
        rows = await self._run(lambda db: db.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys "  # noqa: S608
            "WHERE project_id = ? AND admin = ? AND (create_time, key_id) > (?, ?) "
            "ORDER BY create_time, key_id LIMIT ?",
            (project_id or "", int(project_id is None), *position, limit)).fetchall())
        return [_key_from_row(row) for row in rows]

    async def revoke_api_key(self, key_id: str, now_ms: int) -> ApiKey | None:
        def work(db: sqlite3.Connection) -> ApiKey | None:
            row = db.execute(
                "UPDATE api_keys SET revoke_time = CASE WHEN revoke_time = 0 THEN ? "  # noqa: S608
                f"ELSE revoke_time END WHERE key_id = ? RETURNING {_KEY_COLUMNS}",
                (now_ms / 1000, key_id)).fetchone()
            return _key_from_row(row) if row else None

        try:
            return await self._run(work)
        finally:
            self._keys.clear()  # by key id: which cached digest it was is not known here

    # -- the hot path --------------------------------------------------------------------------

    async def admit(self, *, digest: bytes | None, project_id: str, now_ms: int,
                    count: bool, turn_subject: str | None = None,
                    may_linger: bool = False) -> Admission:
        try:
            return self._admit_from_memory(digest, project_id, now_ms, count, turn_subject)
        except sqlite3.OperationalError:
            # Locked by the thread connection's write (or a transient I/O error): the reads
            # move to the thread, which may wait for it, or report it, so the loop never does;
            # the decision stays on the loop.
            month = month_of(now_ms)
            read = await self._run(lambda db: _read_for_admit(db, digest, project_id, month))
            return self._admit_from_memory(digest, project_id, now_ms, count, turn_subject,
                                           read)

    def _admit_from_memory(self, digest: bytes | None, project_id: str, now_ms: int,
                           count: bool, turn_subject: str | None,
                           read: _AdmitReads | None = None) -> Admission:
        # The admission rule on the owner's memory; only a first sight of a key, project or
        # position reads the file: on the loop's never-waiting connection, or, when that
        # found the file locked, `read` brings what the thread read for this call.
        # A hand-built fast path that pays: counting each call in the file instead (the GCRA
        # `INSERT ... ON CONFLICT ... RETURNING` in a write transaction on the hot connection,
        # keys and projects still cached) costs 632k instructions per IssueTurnCredentials
        # call against 547k from memory, +15.6 % (`bench/instructions.py`, issue 16).
        key = None
        if digest is not None:
            key = self._keys.get(digest)
            if key is None:
                key = read.key if read else _read_key(self._hot, digest)
                if key is None:
                    return Admission(AdmitOutcome.UNKNOWN_KEY)
                self._keys[digest] = key
            acts_on = _project_for_key(key, project_id)
            if isinstance(acts_on, Admission):
                return acts_on
            project_id = acts_on
        project_id = project_id or DEFAULT_PROJECT_ID
        project = self._projects.get(project_id)
        if project is None:
            project = read.project if read else _read_project(self._hot, project_id)
            if project is None:
                return Admission(AdmitOutcome.NO_PROJECT, key=key)
            self._projects[project_id] = project
        positions = self._positions
        if project_id in positions:
            tat = positions[project_id]
        else:
            tat = positions[project_id] = (
                read.position if read else _read_position(self._hot, project_id))
        turn = None
        if turn_subject is not None:
            month = month_of(now_ms)
            state = self._turn.get(project_id)
            if state is None or state[0] != month:
                live, relayed = (read.turn if read and read.turn is not None
                                 else _read_turn_state(self._hot, project_id, month))
                state = self._turn[project_id] = (month, live, relayed)
            revoked = self._revoked.get((project_id, turn_subject), 0)
            turn = TurnAdmission(state[1], state[2], revoked)
        if not count:
            return Admission(AdmitOutcome.ADMITTED, key, project, tat, turn)
        admitted = gcra_admit(tat, now_ms, _policy(project.rate_limit_requests,
                                                   project.rate_limit_window_seconds))
        if admitted is None:
            return Admission(AdmitOutcome.RATE_LIMITED, key, project, tat)
        positions[project_id] = admitted
        self._unwritten.add(project_id)
        return Admission(AdmitOutcome.ADMITTED, key, project, admitted, turn)

    async def rate_position(self, project_id: str) -> int | None:
        if project_id in self._positions:
            return self._positions[project_id]
        return await self._run(lambda db: _read_position(db, project_id))

    # -- sessions ----------------------------------------------------------------------------

    async def begin_session(self, *, project_id: str, session_id: str, month: str,
                            now_ms: int, pending_ms: int, quota: int, max_concurrent: int,
                            provider: str, turn_username: str = "") -> SessionAdmission:
        def work(db: sqlite3.Connection) -> SessionAdmission:
            with _write_transaction(db):
                # Every read in one statement: the key and the session figures.
                row = db.execute(
                    f"SELECT {_PROVIDER_KEY_COLUMNS}, {_SESSION_FIGURES}, "  # noqa: S608
                    f"{_PENDING_FIGURE} FROM provider_keys "
                    "WHERE project_id = :project AND provider = :provider",
                    {"project": project_id, "provider": provider, "now": now_ms,
                     "month": month}).fetchone()
                if row is None:
                    return SessionAdmission(SessionOutcome.NO_PROVIDER_KEY, 0, 0)
                *key_row, leases, expired, used, pending = row
                if expired:
                    db.execute("DELETE FROM leases WHERE project_id = ? AND expires_ms <= ?",
                               (project_id, now_ms))
                # Units held: the month's confirmed sessions and the starts in flight.
                active, held = (leases or 0) - expired, (used or 0) + pending
                # Concurrency first: a caller at its concurrent limit should end a session,
                # which a quota error would not tell it.
                if active >= max_concurrent:
                    return SessionAdmission(SessionOutcome.CONCURRENT_LIMIT, active, held)
                if held >= quota:
                    return SessionAdmission(SessionOutcome.QUOTA_EXCEEDED, active, held)
                db.execute(
                    "INSERT INTO leases(project_id, session_id, expires_ms, pending) "
                    "VALUES (?, ?, ?, 1) ON CONFLICT(project_id, session_id) "
                    "DO UPDATE SET expires_ms = excluded.expires_ms, pending = 1",
                    (project_id, session_id, now_ms + pending_ms))
                if turn_username:
                    db.execute(
                        "INSERT INTO session_turn(project_id, session_id, username, due_ms) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT(project_id, session_id) DO UPDATE SET "
                        "username = excluded.username, due_ms = excluded.due_ms",
                        (project_id, session_id, turn_username, now_ms + pending_ms))
                return SessionAdmission(SessionOutcome.STARTED, active + 1, held + 1,
                                        ProviderKeyRecord(*key_row))

        return await self._run_on_loop(work)

    async def confirm_session(self, *, project_id: str, session_id: str, month: str,
                              now_ms: int, lease_ms: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            with _write_transaction(db):
                row = db.execute(
                    "SELECT pending, expires_ms FROM leases "
                    "WHERE project_id = ? AND session_id = ?", (project_id, session_id)).fetchone()
                if row is None:
                    return False
                pending, expires_ms = row
                if not pending:
                    return True  # confirmed already: counted once
                if expires_ms <= now_ms:
                    db.execute("DELETE FROM leases WHERE project_id = ? AND session_id = ?",
                               (project_id, session_id))
                    return False
                db.execute("UPDATE leases SET pending = 0, expires_ms = ? "
                           "WHERE project_id = ? AND session_id = ?",
                           (now_ms + lease_ms, project_id, session_id))
                db.execute("UPDATE session_turn SET due_ms = ? "
                           "WHERE project_id = ? AND session_id = ?",
                           (now_ms + lease_ms, project_id, session_id))
                db.execute(
                    "INSERT INTO session_quota(project_id, month, used) VALUES (?, ?, 1) "
                    "ON CONFLICT(project_id, month) DO UPDATE SET used = used + 1",
                    (project_id, month))
                return True

        return await self._run_on_loop(work)

    async def renew_session(self, *, project_id: str, session_id: str, now_ms: int,
                            lease_ms: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            with _write_transaction(db):
                renewed = db.execute(
                    "UPDATE leases SET expires_ms = ? "
                    "WHERE project_id = ? AND session_id = ? AND expires_ms > ?",
                    (now_ms + lease_ms, project_id, session_id, now_ms)).rowcount == 1
                if renewed:
                    db.execute("UPDATE session_turn SET due_ms = ? "
                               "WHERE project_id = ? AND session_id = ?",
                               (now_ms + lease_ms, project_id, session_id))
                return renewed

        return await self._run_on_loop(work)

    async def end_session(self, *, project_id: str, session_id: str, now_ms: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            with _write_transaction(db):
                ended = db.execute(
                    "DELETE FROM leases WHERE project_id = ? AND session_id = ? "
                    "AND expires_ms > ?", (project_id, session_id, now_ms)).rowcount == 1
                db.execute("UPDATE session_turn SET due_ms = min(due_ms, ?) "
                           "WHERE project_id = ? AND session_id = ?",
                           (now_ms, project_id, session_id))
                return ended

        return await self._run_on_loop(work)

    async def cancel_session(self, *, project_id: str, session_id: str, month: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            with _write_transaction(db):
                # Expired or not: a confirmed session the caller never got is uncounted.
                released = db.execute(
                    "DELETE FROM leases WHERE project_id = ? AND session_id = ? "
                    "RETURNING pending", (project_id, session_id)).fetchall()
                db.execute("DELETE FROM session_turn WHERE project_id = ? AND session_id = ?",
                           (project_id, session_id))
                if released and not released[0][0]:
                    db.execute("UPDATE session_quota SET used = max(used - 1, 0) "
                               "WHERE project_id = ? AND month = ?", (project_id, month))

        await self._run_on_loop(work)

    async def session_counts(self, *, project_id: str, month: str,
                             now_ms: int) -> tuple[int, int]:
        def work(db: sqlite3.Connection) -> tuple[int, int]:
            leases, expired, used = db.execute(
                f"SELECT {_SESSION_FIGURES}",
                {"project": project_id, "now": now_ms, "month": month}).fetchone()
            return used or 0, (leases or 0) - expired

        return await self._run(work)

    # -- provider keys -------------------------------------------------------------------------

    async def put_provider_key(self, record: ProviderKeyRecord) -> None:
        await self._run(lambda db: db.execute(
            "INSERT INTO provider_keys(project_id, provider, sealed, last4, update_time_ms) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(project_id, provider) DO UPDATE SET "
            "sealed = excluded.sealed, last4 = excluded.last4, "
            "update_time_ms = excluded.update_time_ms",
            (record.project_id, record.provider, record.sealed, record.last4,
             record.update_time_ms)))

    async def get_provider_key(self, project_id: str, provider: str) -> ProviderKeyRecord | None:
        row = await self._run_on_loop(lambda db: db.execute(
            f"SELECT {_PROVIDER_KEY_COLUMNS} FROM provider_keys "  # noqa: S608
            "WHERE project_id = ? AND provider = ?", (project_id, provider)).fetchone())
        return ProviderKeyRecord(*row) if row else None

    async def list_provider_keys(self, project_id: str | None) -> list[ProviderKeyRecord]:
        query = f"SELECT {_PROVIDER_KEY_COLUMNS} FROM provider_keys"  # noqa: S608
        args: tuple[str, ...] = ()
        if project_id is not None:
            query, args = query + " WHERE project_id = ?", (project_id,)
        rows = await self._run(lambda db: db.execute(query + " ORDER BY project_id, provider",
                                                     args).fetchall())
        return [ProviderKeyRecord(*row) for row in rows]

    async def delete_provider_key(self, project_id: str, provider: str) -> bool:
        return await self._run(lambda db: db.execute(
            "DELETE FROM provider_keys WHERE project_id = ? AND provider = ?",
            (project_id, provider)).rowcount == 1)

    # -- session policies and session records -------------------------------------------------

    async def put_session_policy(self, record: SessionPolicyRecord) -> bool:
        # Only while its project exists (in the same statement), as for caller keys.
        return await self._run(lambda db: db.execute(
            "INSERT INTO session_policies(project_id, provider, policy, update_time_ms) "
            "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM projects WHERE project_id = ?) "
            "ON CONFLICT(project_id, provider) DO UPDATE SET policy = excluded.policy, "
            "update_time_ms = excluded.update_time_ms",
            (record.project_id, record.provider, record.policy_json, record.update_time_ms,
             record.project_id)).rowcount == 1)

    async def get_session_policy(self, project_id: str,
                                 provider: str) -> SessionPolicyRecord | None:
        # On the loop: CreateSession reads it before it begins the session.
        row = await self._run_on_loop(lambda db: db.execute(
            "SELECT project_id, provider, policy, update_time_ms FROM session_policies "
            "WHERE project_id = ? AND provider = ?", (project_id, provider)).fetchone())
        return SessionPolicyRecord(*row) if row else None

    async def delete_session_policy(self, project_id: str, provider: str) -> bool:
        return await self._run(lambda db: db.execute(
            "DELETE FROM session_policies WHERE project_id = ? AND provider = ?",
            (project_id, provider)).rowcount == 1)

    async def put_session_record(self, record: SessionRecord, now_ms: int) -> None:
        def work(db: sqlite3.Connection) -> None:
            with _write_transaction(db):
                # A call's record waits for take_ended_calls (its call is hung up then).
                db.execute("DELETE FROM session_records WHERE project_id = ? AND call_id = '' "
                           "AND ends_ms > 0 AND ends_ms <= ?", (record.project_id, now_ms))
                db.execute(
                    "INSERT INTO session_records(project_id, session_id, provider, ends_ms, "
                    "call_id) VALUES (?, ?, ?, ?, ?) ON CONFLICT(project_id, session_id) DO "
                    "UPDATE SET provider = excluded.provider, ends_ms = excluded.ends_ms, "
                    "call_id = excluded.call_id",
                    (record.project_id, record.session_id, record.provider, record.ends_ms,
                     record.call_id))

        await self._run_on_loop(work)

    async def get_session_record(self, project_id: str, session_id: str) -> SessionRecord | None:
        row = await self._run_on_loop(lambda db: db.execute(
            "SELECT project_id, session_id, provider, ends_ms, call_id FROM session_records "
            "WHERE project_id = ? AND session_id = ?", (project_id, session_id)).fetchone())
        return SessionRecord(*row) if row else None

    async def take_session_record(self, project_id: str,
                                  session_id: str) -> SessionRecord | None:
        row = await self._run_on_loop(lambda db: db.execute(
            "DELETE FROM session_records WHERE project_id = ? AND session_id = ? "
            "RETURNING project_id, session_id, provider, ends_ms, call_id",
            (project_id, session_id)).fetchone())
        return SessionRecord(*row) if row else None

    async def take_ended_calls(self, now_ms: int, limit: int) -> list[SessionRecord]:
        rows = await self._run(lambda db: db.execute(
            "DELETE FROM session_records WHERE rowid IN ("
            " SELECT r.rowid FROM session_records r LEFT JOIN leases l"
            " ON l.project_id = r.project_id AND l.session_id = r.session_id"
            " AND l.expires_ms > :now"
            " WHERE r.call_id != '' AND l.session_id IS NULL LIMIT :limit) "
            "RETURNING project_id, session_id, provider, ends_ms, call_id",
            {"now": now_ms, "limit": limit}).fetchall())
        return [SessionRecord(*row) for row in rows]

    # -- webhook deliveries ---------------------------------------------------------------

    async def claim_webhook_delivery(self, project_id: str, delivery_id: str, *, now_ms: int,
                                     until_ms: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            with _write_transaction(db):
                db.execute("DELETE FROM webhook_deliveries WHERE project_id = ? AND "
                           "until_ms <= ?", (project_id, now_ms))
                return bool(db.execute(
                    "INSERT INTO webhook_deliveries(project_id, delivery_id, until_ms) "
                    "VALUES (?, ?, ?) ON CONFLICT(project_id, delivery_id) DO NOTHING",
                    (project_id, delivery_id, until_ms)).rowcount == 1)

        return await self._run(work)

    # -- the TURN secret ring --------------------------------------------------------------

    async def list_turn_secrets(self) -> list[TurnSecretRecord]:
        rows = await self._run(lambda db: db.execute(
            "SELECT secret_id, sealed, created_ms, retire_at_ms FROM turn_secrets "
            "ORDER BY created_ms DESC, secret_id").fetchall())
        return [TurnSecretRecord(*row) for row in rows]

    async def rotate_turn_secret(self, record: TurnSecretRecord, *, now_ms: int,
                                 retire_at_ms: int, min_age_ms: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            with _write_transaction(db):
                young = db.execute(
                    "SELECT 1 FROM turn_secrets WHERE retire_at_ms = 0 AND created_ms > ? LIMIT 1",
                    (now_ms - min_age_ms,)).fetchall()
                if young:
                    return False
                db.execute("UPDATE turn_secrets SET retire_at_ms = ? WHERE retire_at_ms = 0",
                           (retire_at_ms,))
                db.execute("INSERT INTO turn_secrets(secret_id, sealed, created_ms, "
                           "retire_at_ms) VALUES (?, ?, ?, 0)",
                           (record.secret_id, record.sealed, record.created_ms))
                return True

        return await self._run(work)

    async def purge_turn_secrets(self, now_ms: int) -> int:
        return await self._run(lambda db: db.execute(
            "DELETE FROM turn_secrets WHERE retire_at_ms > 0 AND retire_at_ms <= ?",
            (now_ms,)).rowcount)

    # -- TURN usage ------------------------------------------------------------------------------

    async def claim_turn_meter(self, state: TurnMeterState, *, now_ms: int) -> TurnMeterState:
        def work(db: sqlite3.Connection) -> TurnMeterState:
            with _write_transaction(db):
                current = _read_meter(db)
                if current.owner not in ("", state.owner) and current.lease_expires_ms > now_ms:
                    return current
                if state.lease_expires_ms == 0 and current.owner != state.owner:
                    return current
                db.execute(
                    "INSERT INTO turn_meter(id, owner, expires_ms, connected, changed_ms, "
                    "last_event_ms) VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "batch = CASE WHEN owner = excluded.owner THEN batch ELSE 0 END, "
                    "owner = excluded.owner, expires_ms = excluded.expires_ms, "
                    "connected = excluded.connected, changed_ms = excluded.changed_ms, "
                    "last_event_ms = excluded.last_event_ms",
                    (state.owner, state.lease_expires_ms, int(state.connected),
                     state.changed_ms, state.last_event_ms))
                return state

        return await self._run(work)

    async def turn_meter_state(self) -> TurnMeterState:
        return await self._run(_read_meter)

    async def record_turn_events(self, events: Sequence[TurnAllocationEvent], *, owner: str,
                                 batch: int, now_ms: int, month: str
                                 ) -> dict[str, TurnProjectChange] | None:
        def work(db: sqlite3.Connection) -> dict[str, TurnProjectChange] | None:
            with _write_transaction(db):
                if not _holds_meter(db, owner, now_ms):
                    return None
                if db.execute("UPDATE turn_meter SET batch = ? WHERE id = 1 AND batch < ?",
                              (batch, batch)).rowcount == 0:
                    return {}  # applied already
                turn = _TurnBook(db, now_ms, month)
                for event in events:
                    turn.apply(event)
                _purge_ended_allocations(db, now_ms)
                return turn.changes()

        changes = await self._run(work)
        if changes:
            self._remember_turn(changes, month)
        return changes

    def _remember_turn(self, changes: dict[str, TurnProjectChange], month: str) -> None:
        """Brings the admissions' TURN state up to date with a metering write."""
        for project_id, change in changes.items():
            state = self._turn.get(project_id)
            if state is None:
                continue
            if month and state[0] != month:
                del self._turn[project_id]
            else:
                self._turn[project_id] = (state[0], change.live_allocations,
                                          state[2] + change.relayed_bytes)

    async def sweep_turn_allocations(self, *, owner: str, seen_before_ms: int, now_ms: int,
                                     limit: int
                                     ) -> tuple[int, dict[str, TurnProjectChange]] | None:
        def work(db: sqlite3.Connection) -> tuple[int, dict[str, TurnProjectChange]] | None:
            with _write_transaction(db):
                if not _holds_meter(db, owner, now_ms):
                    return None
                stale = db.execute(
                    "SELECT allocation, project_id FROM turn_allocations "
                    "WHERE live = 1 AND seen_ms < ? ORDER BY seen_ms LIMIT ?",
                    (seen_before_ms, limit)).fetchall()
                turn = _TurnBook(db, now_ms, "")
                for allocation, project_id in stale:
                    turn.finish(allocation, project_id, swept=True)
                return len(stale), turn.changes()

        swept = await self._run(work)
        if swept is not None:
            self._remember_turn(swept[1], "")
        return swept

    async def revoke_turn_subject(self, *, project_id: str, subject: str, until_ms: int,
                                  now_ms: int) -> int:
        def work(db: sqlite3.Connection) -> int:
            with _write_transaction(db):
                db.execute("DELETE FROM turn_revocations WHERE until_ms <= ?", (now_ms,))
                (until,) = db.execute(
                    "INSERT INTO turn_revocations(project_id, subject, until_ms) "
                    "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM projects WHERE project_id = ?) "
                    "ON CONFLICT(project_id, subject) DO UPDATE SET "
                    "until_ms = max(until_ms, excluded.until_ms) RETURNING until_ms",
                    (project_id, subject, until_ms, project_id)).fetchone() or (until_ms,)
                return int(until)

        until = await self._run(work)
        self._revoked = {key: value for key, value in self._revoked.items() if value > now_ms}
        self._revoked[(project_id, subject)] = until
        return until

    async def revoked_turn_subjects(self, *, project_id: str, subjects: Sequence[str],
                                    now_ms: int) -> set[str]:
        # The owner holds every revocation in force in memory (loaded at open, written
        # through by `revoke_turn_subject`).
        return {subject for subject in subjects
                if self._revoked.get((project_id, subject), 0) > now_ms}

    async def lift_turn_subject(self, *, project_id: str, subject: str, now_ms: int) -> bool:
        lifted = await self._run(lambda db: db.execute(
            "DELETE FROM turn_revocations WHERE project_id = ? AND subject = ? "
            "RETURNING until_ms", (project_id, subject)).fetchall())
        self._revoked.pop((project_id, subject), None)
        return bool(lifted) and lifted[0][0] > now_ms

    async def session_turn_username(self, *, project_id: str, session_id: str) -> str | None:
        row = await self._run(lambda db: db.execute(
            "SELECT username FROM session_turn WHERE project_id = ? AND session_id = ?",
            (project_id, session_id)).fetchone())
        return row[0] if row else None

    async def take_ended_session_turn(self, *, now_ms: int,
                                      limit: int) -> list[tuple[str, str, str]]:
        def work(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
            return [(row[0], row[1], row[2]) for row in db.execute(
                "DELETE FROM session_turn WHERE rowid IN (SELECT rowid FROM session_turn "
                "WHERE due_ms <= ? ORDER BY due_ms LIMIT ?) "
                "RETURNING project_id, session_id, username", (now_ms, limit)).fetchall()]

        return await self._run(work)

    async def turn_usage(self, *, project_id: str, month: str,
                         user_id: str | None = None) -> TurnUsageFigures:
        def work(db: sqlite3.Connection) -> TurnUsageFigures:
            live_query = ("SELECT count(*) FROM turn_allocations "
                          "WHERE project_id = :p AND live = 1")
            if user_id is not None:
                live_query += " AND user_id = :u"
            live, relayed, last = db.execute(
                f"SELECT ({live_query}), "  # noqa: S608
                "(SELECT relayed_bytes FROM turn_usage "
                " WHERE project_id = :p AND month = :m AND user_id = :u), "
                "(SELECT last_ms FROM turn_usage "
                " WHERE project_id = :p AND month = :m AND user_id = :u)",
                {"p": project_id, "m": month, "u": user_id or ""}).fetchone()
            return TurnUsageFigures(live, relayed or 0, last or 0)

        return await self._run(work)


def _finished(work: Callable[[sqlite3.Connection], T], db: sqlite3.Connection) -> T:
    """Runs `work`, and never leaves a statement running on the shared connection.

    A cursor with unread rows keeps its statement active, and while one is active the
    connection's writes cannot commit: a returned cursor is drained and closed here.
    """
    result = work(db)
    if isinstance(result, sqlite3.Cursor):
        result.fetchall()
        result.close()
    return result


TURN_TOMBSTONE_MS = 3600 * 1000
"""How long an ended allocation's row stays, for the totals coturn sends after its end."""


def _read_meter(db: sqlite3.Connection) -> TurnMeterState:
    row = db.execute("SELECT owner, expires_ms, connected, changed_ms, last_event_ms "
                     "FROM turn_meter WHERE id = 1").fetchone()
    if row is None:
        return TurnMeterState()
    owner, expires_ms, connected, changed_ms, last_event_ms = row
    return TurnMeterState(owner, expires_ms, bool(connected), changed_ms, last_event_ms)


def _holds_meter(db: sqlite3.Connection, owner: str, now_ms: int) -> bool:
    meter = _read_meter(db)
    return meter.owner == owner and meter.lease_expires_ms > now_ms


def _purge_ended_allocations(db: sqlite3.Connection, now_ms: int) -> None:
    db.execute("DELETE FROM turn_allocations WHERE rowid IN (SELECT rowid FROM "
               "turn_allocations WHERE live = 0 AND ended_ms < ? LIMIT 500)",
               (now_ms - TURN_TOMBSTONE_MS,))


class _TurnBook:
    """The allocation bookkeeping of one transaction (`Store.record_turn_events`); the same
    rules as the Redis store's `_RECORD_TURN_EVENTS` script."""

    def __init__(self, db: sqlite3.Connection, now_ms: int, month: str) -> None:
        self._db = db
        self._now_ms = now_ms
        self._month = month
        self._bytes: dict[str, int] = {}
        self._exists: dict[str, bool] = {}

    def apply(self, event: TurnAllocationEvent) -> None:
        db, project_id = self._db, event.project_id
        exists = self._exists.get(project_id)
        if exists is None:
            exists = self._exists[project_id] = db.execute(
                "SELECT 1 FROM projects WHERE project_id = ?", (project_id,)).fetchone() is not None
        if not exists:
            return
        self._bytes.setdefault(project_id, 0)
        row = db.execute("SELECT live, counted, user_id, swept FROM turn_allocations "
                         "WHERE allocation = ?", (event.allocation,)).fetchone()
        live, counted, user_id, swept = ((bool(row[0]), row[1], row[2], bool(row[3])) if row
                                         else (False, 0, event.user_id, False))
        kind = event.kind
        if kind is TurnEventKind.ENDED:
            if live:
                self.finish(event.allocation, project_id, swept=False)
        elif kind is TurnEventKind.RELAYED_TOTAL:
            if event.relayed_bytes > counted:
                self._relayed(project_id, user_id, event.relayed_bytes - counted)
            # Its end without its start: remember the total, so a second one adds nothing.
            db.execute(
                "INSERT INTO turn_allocations(allocation, project_id, user_id, live, counted, "
                "seen_ms, ended_ms) VALUES (?, ?, ?, 0, ?, ?, ?) ON CONFLICT(allocation) "
                "DO UPDATE SET counted = max(counted, excluded.counted)",
                (event.allocation, project_id, user_id, event.relayed_bytes, self._now_ms,
                 self._now_ms))
        else:
            # An allocation coturn said it ended only starts again as a new one (ids start
            # again when coturn does): an alive or relayed report of it is stale. One a sweep
            # ended (coturn no longer listed it) lives again when reported.
            if not live and (row is None or kind is TurnEventKind.STARTED or swept):
                fresh = row is None or kind is TurnEventKind.STARTED
                db.execute(
                    "INSERT INTO turn_allocations(allocation, project_id, user_id, live, "
                    "counted, seen_ms) VALUES (?, ?, ?, 1, 0, ?) ON CONFLICT(allocation) DO "
                    "UPDATE SET live = 1, seen_ms = excluded.seen_ms, ended_ms = 0, swept = 0, "
                    "counted = CASE WHEN ? THEN 0 ELSE counted END",
                    (event.allocation, project_id, user_id, self._now_ms, fresh))
            elif live:
                db.execute("UPDATE turn_allocations SET seen_ms = ? WHERE allocation = ?",
                           (self._now_ms, event.allocation))
            if kind is TurnEventKind.RELAYED:
                self._relayed(project_id, user_id, event.relayed_bytes)
                db.execute("UPDATE turn_allocations SET counted = counted + ? "
                           "WHERE allocation = ?", (event.relayed_bytes, event.allocation))
        for user in ("", user_id):
            db.execute(
                "INSERT INTO turn_usage(project_id, month, user_id, relayed_bytes, last_ms) "
                "VALUES (?, ?, ?, 0, ?) ON CONFLICT(project_id, month, user_id) "
                "DO UPDATE SET last_ms = excluded.last_ms",
                (project_id, self._month, user, self._now_ms))

    def finish(self, allocation: str, project_id: str, *, swept: bool) -> None:
        self._db.execute("UPDATE turn_allocations SET live = 0, ended_ms = ?, swept = ? "
                         "WHERE allocation = ?", (self._now_ms, swept, allocation))
        self._bytes.setdefault(project_id, 0)

    def _relayed(self, project_id: str, user_id: str, relayed_bytes: int) -> None:
        if relayed_bytes <= 0:
            return
        for user in ("", user_id):
            self._db.execute(
                "INSERT INTO turn_usage(project_id, month, user_id, relayed_bytes, last_ms) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(project_id, month, user_id) "
                "DO UPDATE SET relayed_bytes = relayed_bytes + excluded.relayed_bytes",
                (project_id, self._month, user, relayed_bytes, self._now_ms))
        self._bytes[project_id] += relayed_bytes

    def changes(self) -> dict[str, TurnProjectChange]:
        return {project_id: TurnProjectChange(self._db.execute(
            "SELECT count(*) FROM turn_allocations WHERE project_id = ? AND live = 1",
            (project_id,)).fetchone()[0], relayed)
            for project_id, relayed in self._bytes.items()}


def _purge_keys(db: sqlite3.Connection, project_id: str) -> int:
    """Deletes up to `PURGE_BATCH` keys of a project (inside the caller's transaction)."""
    return db.execute(
        "DELETE FROM api_keys WHERE digest IN (SELECT digest FROM api_keys "
        "WHERE project_id = ? AND admin = 0 LIMIT ?)", (project_id, PURGE_BATCH)).rowcount


def _project_for_key(key: ApiKey, project_id: str) -> Admission | str:
    """The project a stored key's call acts on (as named, or the key's own), or the refusal:
    a revoked key is unknown, a project key naming another project is forbidden."""
    if key.revoked:
        return Admission(AdmitOutcome.UNKNOWN_KEY)
    if key.admin:
        return project_id
    if project_id and project_id != key.project_id:
        return Admission(AdmitOutcome.FORBIDDEN, key=key)
    return key.project_id


class _AdmitReads(NamedTuple):
    """What an owner's admission reads from the file, read on the thread."""

    key: ApiKey | None
    project: Project | None
    position: int | None
    turn: tuple[int, int] | None = None
    """The project's (live allocations, bytes relayed in the month of the call)."""


def _read_for_admit(db: sqlite3.Connection, digest: bytes | None,
                    project_id: str, month: str) -> _AdmitReads:
    key = _read_key(db, digest) if digest is not None else None
    acts_on = _project_for_key(key, project_id) if key is not None else project_id
    project_id = (acts_on if isinstance(acts_on, str) else project_id) or DEFAULT_PROJECT_ID
    return _AdmitReads(key, _read_project(db, project_id), _read_position(db, project_id),
                       _read_turn_state(db, project_id, month))


def _read_turn_state(db: sqlite3.Connection, project_id: str, month: str) -> tuple[int, int]:
    """A project's live allocations and the bytes it relayed in `month`."""
    live, relayed = db.execute(
        "SELECT (SELECT count(*) FROM turn_allocations WHERE project_id = :p AND live = 1), "
        "(SELECT relayed_bytes FROM turn_usage "
        " WHERE project_id = :p AND month = :m AND user_id = '')",
        {"p": project_id, "m": month}).fetchone()
    return live, relayed or 0


def _read_key(db: sqlite3.Connection, digest: bytes) -> ApiKey | None:
    row = db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE digest = ?",  # noqa: S608
                     (digest,)).fetchone()
    return _key_from_row(row) if row else None


def _read_project(db: sqlite3.Connection, project_id: str) -> Project | None:
    row = db.execute("SELECT record FROM projects WHERE project_id = ?",
                     (project_id,)).fetchone()
    return _project_from_json(row[0]) if row else None


def _read_position(db: sqlite3.Connection, project_id: str) -> int | None:
    row = db.execute("SELECT tat_ms FROM rate_limits WHERE project_id = ?",
                     (project_id,)).fetchone()
    return int(row[0]) if row else None


@functools.lru_cache(maxsize=1024)
def _policy(requests: int, window_seconds: int) -> RateLimitPolicy:
    return RateLimitPolicy.of(requests, window_seconds)


def _own(path: str) -> int:
    """Takes `<path>.lock` exclusively: one process owns the file (module docstring)."""
    lock_path = f"{path}.lock"
    try:
        Path(lock_path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise StoreUnavailableError(f"cannot open SQLite store {path}: {error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreUnavailableError(
            f"SQLite store {path} is in use by another icegate-server process: one process "
            "per SQLite file; for more (--workers, replicas) set ICEGATE_STORE to "
            "redis://...") from None
    return fd


def _connect_hot(path: str) -> sqlite3.Connection:
    """The loop's connection: never waits for a lock, never checkpoints (see the docstring)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=0")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db


def _connect(path: str) -> sqlite3.Connection:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Create the file 0600 before SQLite opens it: it holds key digests and sealed keys.
    os.close(os.open(file, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    # Short enough that a stuck writer (another process holding the lock) turns into a
    # prompt UNAVAILABLE instead of a call that outlives its deadline.
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA foreign_keys=ON")
    columns = {row[1] for row in db.execute("PRAGMA table_info(leases)")}
    if columns and "pending" not in columns:
        # Files from before pending leases (version < 4): every lease they hold is confirmed.
        db.execute("ALTER TABLE leases ADD COLUMN pending INTEGER NOT NULL DEFAULT 0")
    db.executescript(_SCHEMA)
    with _write_transaction(db):
        row = db.execute("SELECT value FROM schema_meta WHERE key = 'version'").fetchone()
        if row is not None and int(row[0]) < 3:
            # Files from before the lease counter: count the leases they already hold.
            db.execute("DELETE FROM lease_counts")
            db.execute("INSERT INTO lease_counts(project_id, leases) "
                       "SELECT project_id, count(*) FROM leases GROUP BY project_id")
        db.execute("INSERT INTO schema_meta(key, value) VALUES ('version', ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (str(SCHEMA_VERSION),))
    return db
