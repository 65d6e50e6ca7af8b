"""The store interface every backend implements and every backend's contract test drives."""

from __future__ import annotations

from typing import Protocol


class Store(Protocol):
    """Durable state shared by every icegate process using the same store URL.

    Every counter update is atomic inside the backend (one transaction or one Lua script),
    never read-modify-write in Python. Failures to reach the backend raise
    `StoreUnavailableError`.
    """

    async def ping(self) -> None:
        """Checks the backend answers; raises `StoreUnavailableError` when it does not."""
        ...

    async def close(self) -> None:
        """Releases connections and threads; the store is unusable afterwards."""
        ...
