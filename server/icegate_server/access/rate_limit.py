"""Per-project rate limiting with GCRA (the generic cell rate algorithm), in integer milliseconds.

The choice, and its accuracy
----------------------------
A limit of L requests per window W is enforced as GCRA with emission interval T = W / L and
a burst of L: a project may send L requests at once, and then regains one request every T.
The state is one number per project, the theoretical arrival time (TAT): a request at `now`
is admitted when `max(TAT, now) + T - now <= W`, and then TAT becomes `max(TAT, now) + T`.
Both store backends apply exactly this rule atomically (a SQLite UPSERT inside a transaction,
one Redis Lua script), so replicas sharing a store share one TAT and the limit is exact
across them.

What users get:
- From rest, exactly L requests pass in a burst, the (L+1)th is refused (the test of
  exactness across replicas relies on this).
- In any span of length W, at most 2L - 1 requests pass (a full burst, then the steady
  rate); a fixed window would let 2L through within a second across its edge, GCRA never
  lets more than L through at once.
- There is no window edge: capacity comes back smoothly, one request every T, and the
  `reset_at` a refused caller is told is the exact moment its next request would pass.
- Arithmetic is integer milliseconds, so there is no float drift; T is rounded up to a whole
  millisecond, which can only make the limit (very slightly) stricter.

The clock is the caller's (injected), passed into the store: replicas must share time via NTP,
as every distributed limiter must.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimitPolicy:
    """L requests per W milliseconds."""

    limit: int
    window_ms: int

    @property
    def interval_ms(self) -> int:
        """T: the spacing at which capacity comes back (rounded up: never more lenient)."""
        return -(-self.window_ms // self.limit)

    @classmethod
    def of(cls, requests: int, window_seconds: int) -> RateLimitPolicy:
        return cls(limit=requests, window_ms=window_seconds * 1000)


def gcra_admit(tat_ms: int | None, now_ms: int, policy: RateLimitPolicy) -> int | None:
    """The reference rule both backends implement: the new TAT if admitted, else None."""
    candidate = max(tat_ms or now_ms, now_ms) + policy.interval_ms
    return candidate if candidate - now_ms <= policy.window_ms else None


@dataclass(frozen=True)
class RateUsage:
    """A project's rate-limit position at one moment."""

    limit: int
    window_seconds: int
    used: int
    remaining: int
    reset_at_ms: int
    """When the project is back to its full burst (all of `used` returned)."""
    retry_after_ms: int
    """How long until the next request passes (0 when one would pass now)."""


def usage_at(tat_ms: int | None, now_ms: int, policy: RateLimitPolicy) -> RateUsage:
    """Reads the usage figures off a TAT: requests counted, remaining, reset and retry times."""
    backlog = max((tat_ms or now_ms) - now_ms, 0)
    used = min(math.ceil(backlog / policy.interval_ms), policy.limit)
    # The next request passes once backlog + T <= W.
    retry_after = max(backlog + policy.interval_ms - policy.window_ms, 0)
    return RateUsage(
        limit=policy.limit,
        window_seconds=policy.window_ms // 1000,
        used=used,
        remaining=policy.limit - used,
        reset_at_ms=now_ms + backlog,
        retry_after_ms=retry_after,
    )
