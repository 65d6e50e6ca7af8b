"""Request messages built from keyword arguments: one function per RPC, shared by both clients."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf import duration_pb2

from icegate.v1 import credentials_pb2

Ttl = int | float | timedelta | None
"""A lifetime: seconds, a timedelta, or None for the server's default."""


def duration(value: int | float | timedelta) -> duration_pb2.Duration:
    """A protobuf Duration from seconds or a timedelta."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    whole = int(seconds // 1)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def issue_turn_credentials(user_id: str, ttl: Ttl, project_id: str
                           ) -> credentials_pb2.IssueTurnCredentialsRequest:
    request = credentials_pb2.IssueTurnCredentialsRequest(user_id=user_id, project_id=project_id)
    if ttl is not None:
        request.ttl.CopyFrom(duration(ttl))
    return request


def get_ice_servers(user_id: str, ttl: Ttl, project_id: str) -> credentials_pb2.GetIceServersRequest:
    request = credentials_pb2.GetIceServersRequest(user_id=user_id, project_id=project_id)
    if ttl is not None:
        request.ttl.CopyFrom(duration(ttl))
    return request
