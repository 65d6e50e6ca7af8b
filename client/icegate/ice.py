"""Plain-data views of icegate answers, for JSON and for browsers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
