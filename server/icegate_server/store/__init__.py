"""State stores behind one Protocol: SQLite (embedded default) and Redis (shared by replicas)."""

from __future__ import annotations

from icegate_server.store.base import Store


async def open_store(url: str, *, timeout: float = 0.1, shared: bool = False) -> Store:
    """Opens the store `url` names: `sqlite:///path` or `redis://...`.

    Args:
        url: The store URL.
        timeout: Redis only: how long one store call may take.
        shared: SQLite only: whether other processes (`--workers`) use the file too; by
            default the process owns it (see `icegate_server.store.sqlite`). A Redis store
            is always shared.
    """
    if url.startswith("sqlite:///"):
        from icegate_server.store.sqlite import SqliteStore

        return await SqliteStore.open(url.removeprefix("sqlite:///"), shared=shared)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from icegate_server.store.redis import RedisStore

        return await RedisStore.open(url, timeout=timeout)
    raise ValueError(f"unsupported store URL scheme in {url.split(':', 1)[0]!r}")


__all__ = ["Store", "open_store"]
