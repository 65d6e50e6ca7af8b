"""Usage reports: a project's rate-limit position, session counts and TURN usage, read off the
store (TURN usage as metered from coturn's stats stream: `turn.coturn_stats`)."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass

from icegate_server.access.rate_limit import RateLimitPolicy, RateUsage, usage_at
from icegate_server.clock import Clock
from icegate_server.projects.records import Project
from icegate_server.store import Store
from icegate_server.store.base import TurnUsageFigures, month_of
from icegate_server.turn.coturn_stats import Metering, MeteringStatus
from icegate_server.turn.credentials import validate_user_id


@dataclass(frozen=True)
class ProjectUsage:
    """Everything GetUsage reports about one project."""

    rate: RateUsage
    sessions_this_month: int
    active_sessions: int
    quota_resets_at_ms: int
    turn: TurnUsageFigures
    metering: Metering
    turn_user: TurnUsageFigures | None = None
    """The figures of the end user asked about, None when none was."""


def next_month_start_ms(now_ms: int) -> int:
    """The first millisecond of the UTC calendar month after the one holding `now_ms`."""
    t = time.gmtime(now_ms // 1000)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


class UsageReporter:
    """Reads a project's usage figures."""

    def __init__(self, store: Store, clock: Clock,
                 metering: Callable[[], Metering] | None = None) -> None:
        """`metering` tells how TURN metering stands (None: no stats stream configured)."""
        self._store = store
        self._clock = clock
        self._metering = metering

    async def usage(self, project: Project, *, turn_user_id: str = "") -> ProjectUsage:
        """The project's figures now, and its end user `turn_user_id`'s TURN figures.

        Raises:
            InvalidFieldError: `turn_user_id` could not be a user id.
        """
        if turn_user_id:
            validate_user_id(turn_user_id, field="turn_user_id")
        now_ms = int(self._clock.now() * 1000)
        month = month_of(now_ms)
        tat = await self._store.rate_position(project.project_id)
        used, active = await self._store.session_counts(
            project_id=project.project_id, month=month, now_ms=now_ms)
        turn = await self._store.turn_usage(project_id=project.project_id, month=month)
        turn_user = None
        if turn_user_id:
            turn_user = await self._store.turn_usage(project_id=project.project_id,
                                                     month=month, user_id=turn_user_id)
        policy = RateLimitPolicy.of(project.rate_limit_requests,
                                    project.rate_limit_window_seconds)
        metering = (self._metering() if self._metering is not None
                    else Metering(MeteringStatus.OFF))
        return ProjectUsage(rate=usage_at(tat, now_ms, policy), sessions_this_month=used,
                            active_sessions=active, quota_resets_at_ms=next_month_start_ms(now_ms),
                            turn=turn, metering=metering, turn_user=turn_user)
