"""State stores behind one Protocol: SQLite (embedded default, one process) and Redis (shared by
workers and replicas)."""

from __future__ import annotations

from icegate_server.store.base import Store


async def open_store(url: str, *, timeout: float = 0.1, linger: float = 0.0) -> Store:
    """Opens the store `url` names: `sqlite:///path` (owned by this process) or `redis://...`
    (`redis+sentinel://...` for a Sentinel-managed one: shared by every worker and replica).

    Args:
        url: The store URL.
        timeout: Redis only: how long one store call may take.
        linger: Redis only: how long a busy server's admissions may wait to go out together.
    """
    if url.startswith("sqlite:///"):
        from icegate_server.store.sqlite import SqliteStore

        return await SqliteStore.open(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://",
                       "rediss+sentinel://")):
        from icegate_server.store.redis import RedisStore

        return await RedisStore.open(url, timeout=timeout, linger=linger)
    raise ValueError(f"unsupported store URL scheme in {url.split(':', 1)[0]!r}")


__all__ = ["Store", "open_store"]
