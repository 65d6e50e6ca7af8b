"""Plain-data views of icegate answers, for JSON and for browsers."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from google.protobuf import timestamp_pb2

from icegate.v1 import credentials_pb2


def rtc_ice_servers(servers: Iterable[credentials_pb2.IceServer]) -> list[dict[str, Any]]:
    """The `iceServers` value for `new RTCPeerConnection({iceServers})`.

    STUN entries carry only `urls`; TURN entries add `username` and `credential`.
    """
    result: list[dict[str, Any]] = []
    for server in servers:
        entry: dict[str, Any] = {"urls": list(server.urls)}
        if server.username or server.credential:
            entry["username"] = server.username
            entry["credential"] = server.credential
        result.append(entry)
    return result


def iso_timestamp(value: timestamp_pb2.Timestamp | datetime) -> str:
    """ISO 8601 in UTC to the millisecond, as browsers and people read it, in protobuf JSON's
    style: `2026-01-02T08:04:55.299Z` (never `.299000064Z`), `2026-01-02T08:04:55Z` for a
    whole second."""
    moment = (value.ToDatetime(tzinfo=timezone.utc)
              if isinstance(value, timestamp_pb2.Timestamp) else value.astimezone(timezone.utc))
    spec = "seconds" if moment.microsecond < 1000 else "milliseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")
