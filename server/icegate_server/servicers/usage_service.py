"""icegate.v1.UsageService: a project's position against its limits."""

from __future__ import annotations

from typing import Any

import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2

from icegate.v1 import usage_pb2, usage_pb2_grpc
from icegate_server.access.guard import current_call
from icegate_server.projects.usage import UsageReporter
from icegate_server.turn.coturn_stats import MeteringStatus

Context = grpc.aio.ServicerContext[Any, Any]

_METERING = {
    MeteringStatus.OFF: usage_pb2.TURN_METERING_OFF,
    MeteringStatus.LIVE: usage_pb2.TURN_METERING_LIVE,
    MeteringStatus.INTERRUPTED: usage_pb2.TURN_METERING_INTERRUPTED,
}


def _set_ms(stamp: timestamp_pb2.Timestamp, unix_ms: int) -> None:
    if unix_ms > 0:
        stamp.FromMilliseconds(unix_ms)


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    """Reports usage for the project the call guard admitted."""

    def __init__(self, reporter: UsageReporter) -> None:
        self._reporter = reporter

    async def GetUsage(self, request: usage_pb2.GetUsageRequest,
                       context: Context) -> usage_pb2.GetUsageResponse:
        project = current_call().project
        assert project is not None
        usage = await self._reporter.usage(project, turn_user_id=request.turn_user_id)
        rate = usage.rate
        reset = timestamp_pb2.Timestamp()
        reset.FromMilliseconds(rate.reset_at_ms)
        quota_reset = timestamp_pb2.Timestamp()
        quota_reset.FromMilliseconds(usage.quota_resets_at_ms)
        turn = usage_pb2.TurnUsage(
            live_allocations=usage.turn.live_allocations,
            relayed_bytes_this_month=usage.turn.relayed_bytes,
            byte_quota=project.byte_quota, max_allocations=project.max_allocations,
            metering=_METERING[usage.metering.status])
        _set_ms(turn.last_activity_time, usage.turn.last_activity_ms)
        _set_ms(turn.metering_since, usage.metering.since_ms)
        if usage.turn_user is not None:
            turn.user.user_id = request.turn_user_id
            turn.user.live_allocations = usage.turn_user.live_allocations
            turn.user.relayed_bytes_this_month = usage.turn_user.relayed_bytes
            _set_ms(turn.user.last_activity_time, usage.turn_user.last_activity_ms)
        return usage_pb2.GetUsageResponse(
            project_id=project.project_id,
            rate_limit=usage_pb2.RateLimitUsage(
                limit=rate.limit, window=duration_pb2.Duration(seconds=rate.window_seconds),
                used=rate.used, remaining=rate.remaining, reset_time=reset),
            sessions=usage_pb2.SessionUsage(
                monthly_quota=project.monthly_session_quota,
                used_this_month=usage.sessions_this_month,
                remaining_this_month=max(project.monthly_session_quota
                                         - usage.sessions_this_month, 0),
                quota_reset_time=quota_reset,
                max_concurrent=project.max_concurrent_sessions,
                active=usage.active_sessions),
            plan=project.plan,
            upgrade_url=project.upgrade_url,
            turn=turn,
        )
