"""The TURN limits a credential call is checked against, on what its admission read.

A call that issues TURN credentials (IssueTurnCredentials, GetIceServers, CreateSession)
reads the project's TURN state in its one store round trip (`Store.admit` with a
`turn_subject`: live allocations, the month's relayed bytes, and until when the user or
session it names is revoked), and is refused here, before anything is signed:

- a revoked subject first (it concerns that user whatever the project's figures);
- then `max_allocations` (live allocations at or above it), then `byte_quota` (the month's
  relayed bytes at or above it); 0 means none.

The figures come from coturn's stats stream (`turn.coturn_stats`), so the limits are as fresh
as metering (a second or so): a burst of credentials issued before their allocations show can
go past `max_allocations`, which coturn's own `total-quota`/`user-quota` bound.
"""

from __future__ import annotations

from icegate_server.clock import utc_datetime
from icegate_server.errors import (
    TurnAllocationLimitError,
    TurnByteQuotaExceededError,
    TurnCredentialsRevokedError,
)
from icegate_server.projects.records import Project
from icegate_server.projects.usage import next_month_start_ms
from icegate_server.store.base import TurnAdmission


def check_turn_limits(project: Project, turn: TurnAdmission, *, subject: str,
                      now_ms: int) -> None:
    """Raises the refusal of a TURN credential call, or returns when it may go on.

    Raises:
        TurnCredentialsRevokedError: `subject` is revoked at `now_ms`.
        TurnAllocationLimitError: The project holds `max_allocations` live allocations.
        TurnByteQuotaExceededError: The project relayed its `byte_quota` this month.
    """
    if turn.revoked_until_ms > now_ms:
        raise TurnCredentialsRevokedError(subject=subject,
                                          revoked_until=utc_datetime(turn.revoked_until_ms / 1000))
    if project.max_allocations and turn.live_allocations >= project.max_allocations:
        raise TurnAllocationLimitError(current=turn.live_allocations,
                                       maximum=project.max_allocations)
    if project.byte_quota and turn.relayed_bytes >= project.byte_quota:
        raise TurnByteQuotaExceededError(
            plan=project.plan, used=turn.relayed_bytes, quota=project.byte_quota,
            upgrade_url=project.upgrade_url,
            resets_at=utc_datetime(next_month_start_ms(now_ms) / 1000))
