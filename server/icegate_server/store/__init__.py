"""State stores behind one Protocol: SQLite (embedded default) and Redis (shared by replicas)."""

from __future__ import annotations

from icegate_server.store.base import Store


async def open_store(url: str) -> Store:
    """Opens the store `url` names: `sqlite:///path` or `redis://...`."""
    if url.startswith("sqlite:///"):
        from icegate_server.store.sqlite import SqliteStore

        return await SqliteStore.open(url.removeprefix("sqlite:///"))
    raise ValueError(f"unsupported store URL scheme in {url.split(':', 1)[0]!r}")


__all__ = ["Store", "open_store"]
