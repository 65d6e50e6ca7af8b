"""The synchronous icegate client. `icegate.aio.AsyncClient` is its asyncio twin."""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icegate import requests
from icegate.connection import CHANNEL_OPTIONS, DEFAULT_TIMEOUT, Connection, Metadata
from icegate.errors import from_rpc_error
from icegate.v1 import credentials_pb2, credentials_pb2_grpc

log = logging.getLogger("icegate")

Response = TypeVar("Response")


class Client:
    """Calls icegate synchronously over one reused channel.

    Args:
        target: `host:port` of icegate; `ICEGATE_TARGET` or 127.0.0.1:50051 when omitted.
        api_key: The caller key; `ICEGATE_API_KEY` (or the `make run` dev key) when omitted.
        default_timeout: Seconds a call may take when it names no `timeout`.
        debug: Log every call (method, duration, outcome; never a key or a credential).

    Every method takes keyword-only `timeout` (seconds) and `metadata`, and raises a subclass
    of `icegate.errors.IcegateError` on failure.
    """

    def __init__(self, target: str | None = None, api_key: str | None = None, *,
                 default_timeout: float = DEFAULT_TIMEOUT, debug: bool = False) -> None:
        self._connection = Connection.resolve(target, api_key, default_timeout=default_timeout,
                                              debug=debug)
        self._channel = grpc.insecure_channel(self._connection.target, options=CHANNEL_OPTIONS)
        self._credentials = credentials_pb2_grpc.CredentialServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, rpc: Any, request: Any, timeout: float | None, metadata: Metadata,
              *, authenticated: bool = True) -> Any:
        connection = self._connection
        started = time.perf_counter()
        try:
            response = rpc(
                request,
                timeout=connection.timeout(timeout),
                metadata=connection.call_metadata(metadata) if authenticated else tuple(metadata),
            )
        except grpc.RpcError as error:
            typed = from_rpc_error(error)
            if connection.debug:
                log.debug("icegate %s failed in %.1f ms: %s", type(request).__name__,
                          (time.perf_counter() - started) * 1e3, typed)
            raise typed from None
        if connection.debug:
            log.debug("icegate %s ok in %.1f ms", type(request).__name__,
                      (time.perf_counter() - started) * 1e3)
        return response

    def issue_turn_credentials(
        self, user_id: str, *, ttl: requests.Ttl = None, project_id: str = "",
        timeout: float | None = None, metadata: Metadata = (),
    ) -> credentials_pb2.IssueTurnCredentialsResponse:
        """Issues a TURN credential for `user_id` (lifetime `ttl`, else the server default)."""
        return self._call(self._credentials.IssueTurnCredentials,  # type: ignore[no-any-return]
                          requests.issue_turn_credentials(user_id, ttl, project_id),
                          timeout, metadata)

    def get_ice_servers(
        self, user_id: str, *, ttl: requests.Ttl = None, project_id: str = "",
        timeout: float | None = None, metadata: Metadata = (),
    ) -> credentials_pb2.GetIceServersResponse:
        """The RTCIceServer list for `user_id`; `icegate.rtc_ice_servers` turns it into JSON."""
        return self._call(self._credentials.GetIceServers,  # type: ignore[no-any-return]
                          requests.get_ice_servers(user_id, ttl, project_id),
                          timeout, metadata)

    def health(self, service: str = "", *, timeout: float | None = None,
               metadata: Metadata = ()) -> str:
        """The serving status of the server (or of one service): e.g. "SERVING"."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                              timeout, metadata, authenticated=False)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
