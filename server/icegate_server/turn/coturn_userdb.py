"""Writing the TURN secrets in force into coturn's own database, so coturn follows rotations.

coturn (`use-auth-secret` with a userdb) reads its shared secrets per realm from
- Redis (`redis-userdb`): the set `turn/realm/<realm>/secret`;
- SQLite (`userdb=<file>`): the table `turn_secret(realm, value)`.
It reads them at each allocation, so a change takes effect without a restart. icegate owns
that realm's secrets: `replace` makes the stored set exactly the secrets in force.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Set
from typing import Protocol

import redis.asyncio as aioredis

from icegate_server.errors import StoreUnavailableError


class CoturnSecretSink(Protocol):
    """A coturn database icegate keeps the realm's secrets in."""

    async def replace(self, secrets: Set[str]) -> None:
        """Makes the realm's secrets exactly `secrets`."""
        ...

    async def close(self) -> None: ...


def redis_secret_key(realm: str) -> str:
    """The Redis set coturn reads a realm's shared secrets from."""
    return f"turn/realm/{realm}/secret"


class CoturnRedisSecrets:
    """coturn's `redis-userdb`: the set `turn/realm/<realm>/secret`."""

    def __init__(self, url: str, realm: str, *, timeout: float = 1.0) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout,
                                              socket_connect_timeout=timeout,
                                              decode_responses=True, protocol=2)
        self._key = redis_secret_key(realm)

    async def replace(self, secrets: Set[str]) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key)
                pipe.sadd(self._key, *sorted(secrets))
                await pipe.execute()
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as error:
            raise StoreUnavailableError(
                f"coturn's Redis unavailable: {type(error).__name__}") from None

    async def close(self) -> None:
        await self._redis.aclose()


COTURN_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS turn_secret (
    realm varchar(127) default '',
    value varchar(256),
    primary key (realm, value)
);
"""
"""The table as coturn's own schema (turndb's schema.sql) creates it."""


class CoturnSqliteSecrets:
    """coturn's SQLite userdb: rows of `turn_secret(realm, value)`."""

    def __init__(self, path: str, realm: str) -> None:
        self._path = path
        self._realm = realm

    def _replace(self, secrets: Set[str]) -> None:
        db = sqlite3.connect(self._path, timeout=5)
        try:
            with db:
                db.executescript(COTURN_SQLITE_SCHEMA)
                db.execute("DELETE FROM turn_secret WHERE realm = ?", (self._realm,))
                db.executemany("INSERT INTO turn_secret(realm, value) VALUES (?, ?)",
                               [(self._realm, value) for value in sorted(secrets)])
        finally:
            db.close()

    async def replace(self, secrets: Set[str]) -> None:
        try:
            await asyncio.to_thread(self._replace, secrets)
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"coturn's SQLite userdb: {error}") from None

    async def close(self) -> None:
        return None
