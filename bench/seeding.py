"""Fills a store directly through its API (`create_project`, `create_api_key`, `begin_session`)
before icegate starts on it: the scaling runs' projects, keys and active leases.

Every project gets the benchmark's unreachable limits and one caller key (as a real tenant
would), so key lookups, project lookups and rate-limit rows all grow with the project count.
Leases are spread evenly over the projects, each one live for a day.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import scenario
from targets import UNLIMITED

from icegate_server.access.keys import key_digest
from icegate_server.projects.records import ApiKey, Project, new_key_secret
from icegate_server.store import open_store
from icegate_server.store.base import ProviderKeyRecord, SessionOutcome, month_of

LEASE_MS = 86_400_000
_BATCH = 64


@dataclass(frozen=True)
class Seeded:
    """What was written, and the key of the load project."""

    projects: int
    leases: int
    load_key: str
    seconds: float


def _project(project_id: str, now: float) -> Project:
    return Project(
        project_id=project_id, display_name=project_id,
        rate_limit_requests=UNLIMITED["rate_limit_requests"],
        rate_limit_window_seconds=UNLIMITED["rate_limit_window"],
        monthly_session_quota=UNLIMITED["monthly_session_quota"],
        max_concurrent_sessions=UNLIMITED["max_concurrent_sessions"],
        create_time=now, update_time=now)


async def seed(store_url: str, *, projects: int, leases: int) -> Seeded:
    """Writes `projects` projects (the load project first) and `leases` active leases."""
    started = time.monotonic()
    store = await open_store(store_url, timeout=5.0)
    try:
        now = time.time()
        ids = [scenario.PROJECT_ID] + [f"tenant-{i:05d}" for i in range(1, projects)]
        load_key = ""
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start:start + _BATCH]
            created = await asyncio.gather(*(store.create_project(_project(p, now))
                                             for p in chunk))
            assert all(created), "seeding expects an empty store"
            secrets = [new_key_secret() for _ in chunk]
            await asyncio.gather(*(
                store.create_api_key(ApiKey(key_id=key_id, project_id=p, display_name="bench",
                                            create_time=now, key_prefix=secret[:12]),
                                     key_digest(secret))
                for p, (key_id, secret) in zip(chunk, secrets, strict=True)))
            if start == 0:
                load_key = secrets[0][1]

        now_ms = int(now * 1000)
        month = month_of(now_ms)
        # A session needs its provider key in the store; these leases never mint, so the
        # sealed bytes are a stand-in.
        holders = ids[:min(leases, len(ids))]
        for start in range(0, len(holders), _BATCH):
            await asyncio.gather(*(store.put_provider_key(
                ProviderKeyRecord(p, "openai", b"seeded", "seed", now_ms))
                for p in holders[start:start + _BATCH]))
        for start in range(0, leases, _BATCH):
            batch = range(start, min(start + _BATCH, leases))
            outcomes = await asyncio.gather(*(store.begin_session(
                project_id=ids[n % len(ids)], session_id=f"ses_seed{n:09d}", month=month,
                now_ms=now_ms, pending_ms=LEASE_MS, quota=UNLIMITED["monthly_session_quota"],
                max_concurrent=UNLIMITED["max_concurrent_sessions"], provider="openai")
                for n in batch))
            assert all(o.outcome is SessionOutcome.STARTED for o in outcomes)
            confirmed = await asyncio.gather(*(store.confirm_session(
                project_id=ids[n % len(ids)], session_id=f"ses_seed{n:09d}", month=month,
                now_ms=now_ms, lease_ms=LEASE_MS) for n in batch))
            assert all(confirmed)
    finally:
        await store.close()
    return Seeded(projects, leases, load_key, time.monotonic() - started)


def seed_store(store_url: str, *, projects: int, leases: int) -> Seeded:
    return asyncio.run(seed(store_url, projects=projects, leases=leases))
