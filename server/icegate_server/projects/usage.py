"""Usage reports: a project's rate-limit position and session counts, read off the store."""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass

from icegate_server.access.rate_limit import RateLimitPolicy, RateUsage, usage_at
from icegate_server.clock import Clock
from icegate_server.projects.records import Project
from icegate_server.store import Store
from icegate_server.store.base import month_of


@dataclass(frozen=True)
class ProjectUsage:
    """Everything GetUsage reports about one project."""

    rate: RateUsage
    sessions_this_month: int
    active_sessions: int
    quota_resets_at_ms: int


def next_month_start_ms(now_ms: int) -> int:
    """The first millisecond of the UTC calendar month after the one holding `now_ms`."""
    t = time.gmtime(now_ms // 1000)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


class UsageReporter:
    """Reads a project's usage figures."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def usage(self, project: Project) -> ProjectUsage:
        now_ms = int(self._clock.now() * 1000)
        tat = await self._store.rate_position(project.project_id)
        used, active = await self._store.session_counts(
            project_id=project.project_id, month=month_of(now_ms), now_ms=now_ms)
        policy = RateLimitPolicy.of(project.rate_limit_requests,
                                    project.rate_limit_window_seconds)
        return ProjectUsage(rate=usage_at(tat, now_ms, policy), sessions_this_month=used,
                            active_sessions=active, quota_resets_at_ms=next_month_start_ms(now_ms))
