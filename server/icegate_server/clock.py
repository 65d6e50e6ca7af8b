"""Time, injected: domain code asks a `Clock` instead of calling `time`, so tests freeze it."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    """A source of wall-clock time (Unix seconds) and of monotonic time for measuring spans."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FrozenClock:
    """A clock that moves only when told to: for tests and for replaying a scenario."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._monotonic = 0.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Moves both clocks forward by `seconds`."""
        self._now += seconds
        self._monotonic += seconds

    def set(self, unix_seconds: float) -> None:
        """Jumps the wall clock to `unix_seconds` (the monotonic clock follows the same step)."""
        self._monotonic += max(0.0, unix_seconds - self._now)
        self._now = unix_seconds


def utc_datetime(unix_seconds: float) -> datetime:
    """The aware UTC datetime of a Unix timestamp."""
    return datetime.fromtimestamp(unix_seconds, tz=timezone.utc)
