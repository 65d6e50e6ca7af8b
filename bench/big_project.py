"""Reproduces issue 15 part 4 on both stores and prints its figures: what a deleted project
leaves behind, and what listing and deleting a project with many caller keys costs.

    .venv/bin/python bench/big_project.py [--keys 20000]

For each store (a fresh SQLite file; a fresh redis-server): seeds one project with `--keys`
keys (200-character labels, the longest allowed) through the store API, then reports
- the ListApiKeys answer as the server would send it: bytes of the largest page (the whole
  list before paging), against the client's 4 MiB receive limit;
- the longest single Redis script of the listing and of DeleteProject, from Redis's own
  SLOWLOG (microseconds spent inside the script, while every other client waits);
- what a new project made with the same id sees of the old one: keys listed, and whether
  the old key's secret still authenticates.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.redis_server import RedisServer
from icegate.v1 import admin_pb2
from icegate_server.access.keys import key_digest
from icegate_server.projects.records import ApiKey, Project
from icegate_server.servicers.admin_service import api_key_to_proto
from icegate_server.store.base import AdmitOutcome, Store
from icegate_server.store.redis import RedisStore
from icegate_server.store.sqlite import SqliteStore

CLIENT_LIMIT = 4 * 1024 * 1024
NOW_MS = 1_700_000_000_000


async def seed(store: Store, project_id: str, count: int) -> str:
    """Creates `count` keys for the project, 500 at a time; returns the first key's secret."""
    label = "k" * 200
    secret0 = f"igk_{0:012x}_secret"
    for start in range(0, count, 500):
        await asyncio.gather(*(
            store.create_api_key(
                ApiKey(key_id=f"{i:012x}", project_id=project_id, display_name=label,
                       create_time=NOW_MS / 1000 + i / 1000, key_prefix=f"igk_{i:012x}"[:12]),
                key_digest(f"igk_{i:012x}_secret"))
            for i in range(start, min(start + 500, count))))
    return secret0


async def list_pages(store: Store, project_id: str) -> list[list[ApiKey]]:
    if "limit" not in inspect.signature(store.list_api_keys).parameters:
        return [await store.list_api_keys(project_id)]  # type: ignore[call-arg]
    pages: list[list[ApiKey]] = []
    after = ""
    while True:
        page = await store.list_api_keys(project_id, after=after, limit=1000)
        if not page:
            return pages
        pages.append(page)
        after = store_cursor(page[-1])


def store_cursor(key: ApiKey) -> str:
    from icegate_server.store.base import api_key_cursor  # type: ignore[attr-defined]

    return api_key_cursor(key)  # type: ignore[no-any-return]


async def measure(name: str, store: Store, redis: RedisServer | None, keys: int) -> None:
    project = Project(project_id="big", create_time=NOW_MS / 1000, update_time=NOW_MS / 1000)
    await store.create_project(project)
    started = time.perf_counter()
    secret = await seed(store, "big", keys)
    print(f"[{name}] seeded {keys} keys in {time.perf_counter() - started:.1f} s")
    if redis is not None:
        redis.command("CONFIG", "SET", "slowlog-log-slower-than", "0")
        redis.command("SLOWLOG", "RESET")

    started = time.perf_counter()
    pages = await list_pages(store, "big")
    elapsed = time.perf_counter() - started
    sizes = [admin_pb2.ListApiKeysResponse(api_keys=[api_key_to_proto(k) for k in page]).ByteSize()
             for page in pages]
    listed = [k.key_id for page in pages for k in page]
    print(f"[{name}] ListApiKeys: {len(pages)} page(s), largest answer {max(sizes)} bytes "
          f"({max(sizes) / CLIENT_LIMIT:.0%} of the client's 4 MiB), {len(listed)} keys listed, "
          f"{len(set(listed))} distinct, {elapsed * 1000:.0f} ms in all")
    if redis is not None:
        print(f"[{name}] longest Redis command while listing: {slowest(redis)} us")
        redis.command("SLOWLOG", "RESET")

    started = time.perf_counter()
    assert await store.delete_project("big", NOW_MS)
    print(f"[{name}] DeleteProject: {(time.perf_counter() - started) * 1000:.0f} ms")
    if redis is not None:
        print(f"[{name}] longest Redis command while deleting: {slowest(redis)} us")
        redis.command("CONFIG", "SET", "slowlog-log-slower-than", "10000")
    await store.create_project(project)
    after = await list_pages(store, "big")
    admitted = await store.admit(digest=key_digest(secret), project_id="", now_ms=NOW_MS,
                                 count=False)
    print(f"[{name}] after delete + re-create: {sum(len(p) for p in after)} old keys listed, "
          f"old key's secret: {admitted.outcome.name}"
          f"{' (authenticates!)' if admitted.outcome is AdmitOutcome.ADMITTED else ''}")


def slowest(redis: RedisServer) -> int:
    entries = redis.command("SLOWLOG", "GET", "100000")
    assert isinstance(entries, list)
    return max((int(entry[2]) for entry in entries if isinstance(entry, list)
                and isinstance(entry[2], int)), default=0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store: Store = await SqliteStore.open(f"{directory}/s.sqlite3")
        try:
            await measure("sqlite", store, None, args.keys)
        finally:
            await store.close()
    with RedisServer() as redis:
        store = await RedisStore.open(redis.url, timeout=5.0)
        try:
            await measure("redis", store, redis, args.keys)
        finally:
            await store.close()


if __name__ == "__main__":
    asyncio.run(main())
