"""Connect calls with metadata chosen by the test (the icegate client always sends its key)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.errors import ConnectError
from connectrpc.request import Headers

from icegate.errors import from_connect_error
from icegate.v1 import credentials_connect, credentials_pb2


def connect_status(url: str, request: credentials_pb2.IssueTurnCredentialsRequest,
                   metadata: Iterable[tuple[str, str]]) -> grpc.StatusCode:
    """The status an IssueTurnCredentials call over Connect with exactly `metadata` (names may
    repeat) as its headers ends with, as a gRPC status code."""
    headers = Headers()
    for name, value in metadata:
        headers.add(name, value)
    with credentials_connect.CredentialServiceClientSync(
            url, codec=google_protobuf_binary_codec(), send_compression=None) as client:
        try:
            client.issue_turn_credentials(request, headers=headers, timeout_ms=5000)
        except ConnectError as error:
            return from_connect_error(error).code
    return grpc.StatusCode.OK
