"""icegate.v1.CredentialService: TURN credentials and ICE server lists."""

from __future__ import annotations

from typing import Any

import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2

from icegate.v1 import credentials_pb2, credentials_pb2_grpc
from icegate_server.access.guard import current_call
from icegate_server.turn.credentials import TurnCredential, TurnCredentialIssuer
from icegate_server.turn.ice_servers import build_ice_servers

Context = grpc.aio.ServicerContext[Any, Any]


def requested_ttl(request: Any, *, field: str = "ttl") -> float | None:
    """The span a request's Duration field asks for, in seconds; None when it is unset."""
    if not request.HasField(field):
        return None
    ttl: duration_pb2.Duration = getattr(request, field)
    return ttl.seconds + ttl.nanos / 1e9


class CredentialServicer(credentials_pb2_grpc.CredentialServiceServicer):
    """Issues TURN credentials and RTCIceServer lists."""

    def __init__(self, issuer: TurnCredentialIssuer, stun_uris: tuple[str, ...]) -> None:
        self._issuer = issuer
        self._stun_uris = stun_uris

    def _issue(self, request: Any) -> TurnCredential:
        project = current_call().project
        assert project is not None  # the call guard admits credential calls for a project
        return self._issuer.issue_for(project, request.user_id, requested_ttl(request))

    async def IssueTurnCredentials(
        self, request: credentials_pb2.IssueTurnCredentialsRequest, context: Context
    ) -> credentials_pb2.IssueTurnCredentialsResponse:
        credential = self._issue(request)
        return credentials_pb2.IssueTurnCredentialsResponse(
            username=credential.username,
            password=credential.password,
            ttl=duration_pb2.Duration(seconds=credential.ttl_seconds),
            expire_time=timestamp_pb2.Timestamp(seconds=credential.expires_at),
            uris=credential.uris,
        )

    async def GetIceServers(
        self, request: credentials_pb2.GetIceServersRequest, context: Context
    ) -> credentials_pb2.GetIceServersResponse:
        credential = self._issue(request)
        servers = build_ice_servers(self._stun_uris, credential)
        response = credentials_pb2.GetIceServersResponse(ice_servers=[
            credentials_pb2.IceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in servers
        ])
        if credential.uris:
            response.expire_time.seconds = credential.expires_at
        return response
