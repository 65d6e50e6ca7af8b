"""Faults in what icegate depends on: a clear status, no corruption, recovery, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

import icegate
from fake_upstreams import CannedResponse, FakeUpstream, OpenAIEmulation
from harness.icegate_server import TEST_ADMIN_KEY, TEST_TURN_SECRET, RunningServer, server_settings
from harness.server_process import ServerProcess
from icegate_server.clock import FrozenClock

OPENAI_KEY = "sk-test-FAULTS-openai-key-0042"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m"):
    """A tiny filesystem of our own (root only): to fill up, or to remount read-only."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def retry_until_ok(call, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except icegate.UnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def integrity_ok(database: Path) -> bool:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sqlite_disk_full_is_unavailable_then_recovers(tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        settings = server_settings(tmp_path, store=f"sqlite:///{disk / 'icegate.sqlite3'}")
        with RunningServer(settings) as server, \
                icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
            admin.issue_turn_credentials("u")
            filler = disk / "filler"
            # Unbuffered: what did not fit is refused by write, not left for close to flush.
            with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * 65536)
            with pytest.raises(icegate.UnavailableError) as caught:
                for index in range(200):  # until the WAL needs a page the disk lacks
                    admin.create_project(f"fill-{index}", display_name="x" * 200)
            assert "full" in caught.value.message
            filler.unlink()
            retry_until_ok(lambda: admin.create_project("after-full"))
            assert admin.get_project("after-full").project_id == "after-full"
        assert integrity_ok(disk / "icegate.sqlite3")


def test_sqlite_on_a_read_only_disk_stops_with_one_line_then_recovers(tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        store = f"sqlite:///{disk / 'icegate.sqlite3'}"
        with ServerProcess(tmp_path / "one", store=store) as server, \
                icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
            admin.create_project("kept")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        try:
            refused = ServerProcess(tmp_path / "two", store=store)
            with pytest.raises(RuntimeError) as caught:
                refused.start(timeout=10)
            log_lines = refused.read_log().strip().splitlines()
            assert len(log_lines) == 1, caught.value
            assert "read-only" in log_lines[0].lower() or "readonly" in log_lines[0].lower()
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        with ServerProcess(tmp_path / "three", store=store) as server, \
                icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
            assert admin.get_project("kept").project_id == "kept"
        assert integrity_ok(disk / "icegate.sqlite3")


def test_sqlite_busy_is_a_prompt_unavailable(tmp_path):
    """Another process locking the file: what needs the file fails fast with UNAVAILABLE,
    and credentials for a project already seen keep coming (the owner admits from memory)."""
    database = tmp_path / "icegate.sqlite3"
    with RunningServer(server_settings(tmp_path, store=f"sqlite:///{database}")) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        admin.issue_turn_credentials("u")
        locked, release = threading.Event(), threading.Event()

        def hold_the_write_lock() -> None:
            with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
                db.execute("BEGIN EXCLUSIVE")
                locked.set()
                release.wait(10)
                db.execute("ROLLBACK")

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        try:
            assert locked.wait(5)
            started = time.monotonic()
            with pytest.raises(icegate.UnavailableError) as caught:
                admin.create_project("blocked", timeout=10)
            assert "locked" in caught.value.message
            assert time.monotonic() - started < 8  # ~1 s busy timeout per attempt, 3 attempts
            assert admin.issue_turn_credentials("u", timeout=10).username.endswith(":default/u")
        finally:
            release.set()
            holder.join()
        admin.issue_turn_credentials("u")


def test_sigterm_under_load_loses_no_lease_and_no_quota_unit(tmp_path):
    """In-flight CreateSession calls finish within the grace period; counts survive restart."""
    with FakeUpstream(OpenAIEmulation(OPENAI_KEY)) as openai:
        openai.always(CannedResponse(200, {
            "value": "ek_slow", "expires_at": int(time.time()) + 600,
            "session": {"id": "sess_slow", "model": "gpt-realtime"}}, delay=1.0))
        store = f"sqlite:///{tmp_path / 'state.sqlite3'}"
        server = ServerProcess(tmp_path / "one", store=store, openai_base_url=openai.base_url,
                               shutdown_grace="10").start()
        try:
            with icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
                admin.update_project("default", rate_limit_requests=1000,
                                     max_concurrent_sessions=50)
                admin.set_provider_key("default", "openai", OPENAI_KEY)

            async def load() -> list[str]:
                async with icegate.AsyncClient(server.target, TEST_ADMIN_KEY) as client:
                    async def one() -> str:
                        try:
                            await client.create_session("openai", timeout=15)
                            return "ok"
                        except icegate.IcegateError as error:
                            return error.code.name
                    calls = [asyncio.ensure_future(one()) for _ in range(12)]
                    while len(openai.requests) < 12:  # noqa: ASYNC110 - polling a thread's list
                        await asyncio.sleep(0.02)
                    server.process.send_signal(signal.SIGTERM)
                    return await asyncio.gather(*calls)

            outcomes = asyncio.run(load())
            assert server.process.wait(15) == 0
        finally:
            server.stop()
        assert outcomes == ["ok"] * 12, outcomes

        with ServerProcess(tmp_path / "two", store=store,
                           openai_base_url=openai.base_url) as restarted, \
                icegate.Client(restarted.target, TEST_ADMIN_KEY) as admin:
            sessions = admin.get_usage().sessions
            assert (sessions.used_this_month, sessions.active) == (12, 12)


@pytest.mark.coturn
def test_credentials_work_again_after_coturn_restarts(tmp_path, coturn_factory):
    coturn = coturn_factory([TEST_TURN_SECRET])
    with RunningServer(server_settings(tmp_path, turn_uris=(coturn.turn_uri,)),
                       FrozenClock(time.time())) as server, \
            icegate.Client(server.target, TEST_ADMIN_KEY) as admin:
        before = admin.issue_turn_credentials("alice")
        coturn.restart()
        after = admin.issue_turn_credentials("alice")
    assert coturn.allocate(after.username, after.password).ok
    assert coturn.allocate(before.username, before.password).ok


def test_sqlite_writes_commit_right_after_a_checkpoint(tmp_path):
    """A statement left running on the store's connection (a checkpoint's unread result row)
    once kept later writes uncommitted: a confirmed key or revocation could be lost."""
    import hashlib

    from icegate_server.projects.records import ApiKey, Project
    from icegate_server.store.base import ProviderKeyRecord
    from icegate_server.store.sqlite import SqliteStore

    database = tmp_path / "icegate.sqlite3"

    async def scenario() -> None:
        store = await SqliteStore.open(str(database))
        try:
            await store.create_project(Project("acme"))
            await store._run(lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)"))
            await store.create_api_key(ApiKey("k1", "acme"), hashlib.sha256(b"k1").digest())
            with contextlib.closing(sqlite3.connect(database)) as other:
                assert other.execute("SELECT key_id FROM api_keys").fetchall() == [("k1",)]
            await store.put_provider_key(ProviderKeyRecord("acme", "openai", b"x", "abcd", 1))
            started = await store.begin_session(project_id="acme", session_id="s", month="m",
                                                now_ms=1, pending_ms=10, quota=5,
                                                max_concurrent=5, provider="openai")
            assert started.active_sessions == 1
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_second_server_on_the_same_sqlite_file_stops_at_start_with_one_line(tmp_path):
    """The first server owns the file and admits from memory: a second one must not split
    the limits with it silently, so it refuses to start, naming Redis for more processes."""
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with ServerProcess(tmp_path / "one", store=store) as first, \
            icegate.Client(first.target, TEST_ADMIN_KEY) as admin:
        admin.issue_turn_credentials("u", timeout=10)
        second = ServerProcess(tmp_path / "two", store=store)
        with pytest.raises(RuntimeError):
            second.start(timeout=10)
        log_lines = second.read_log().strip().splitlines()
        assert len(log_lines) == 1
        assert "in use" in log_lines[0] and "--workers" in log_lines[0]
        assert "ICEGATE_STORE" in log_lines[0] and "redis://" in log_lines[0]
        assert admin.issue_turn_credentials("u", timeout=10).username.endswith(":default/u")
    # Once the first has stopped, the file is free again.
    with ServerProcess(tmp_path / "three", store=store) as third, \
            icegate.Client(third.target, TEST_ADMIN_KEY) as admin:
        admin.issue_turn_credentials("u", timeout=10)
