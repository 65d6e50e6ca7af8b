"""What every target is asked, so that all of them do the same work and answer the same bytes.

The TURN settings, the user, the TTL and the project are shared by icegate, the bare grpc.aio
server and the FastAPI endpoint; the request bodies are written once to files for h2load.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

from google.protobuf import duration_pb2, timestamp_pb2
from loadgen import grpc_frame

from icegate.v1 import credentials_pb2, sessions_pb2

TURN_SECRET = "bench-turn-secret-0123456789abcdef"
TURN_URIS = ("turn:127.0.0.1:3478?transport=udp", "turns:turn.bench.test:5349?transport=tcp")
STUN_URIS = ("stun:127.0.0.1:3478",)
ADMIN_KEY = "igk_bench_admin_key_0123456789abcdef"
MASTER_KEY = base64.b64encode(bytes(range(32))).decode()
PROJECT_ID = "bench"
USER_ID = "user-0042@example.com"
TTL_SECONDS = 3600
OPENAI_KEY = "sk-bench-0123456789abcdefghijklmnopqrstuv"

ISSUE = "/icegate.v1.CredentialService/IssueTurnCredentials"
ICE = "/icegate.v1.CredentialService/GetIceServers"
CREATE_SESSION = "/icegate.v1.SessionService/CreateSession"

# -- the HMAC every target computes --------------------------------------------------------

_SIGNER = hmac.new(TURN_SECRET.encode(), digestmod=hashlib.sha1)


def sign(username: str) -> str:
    mac = _SIGNER.copy()
    mac.update(username.encode())
    return base64.b64encode(mac.digest()).decode("ascii")


def credential(user_id: str, ttl: int) -> tuple[str, str, int]:
    """(username, password, expiry) as icegate forms them: `<expiry>:<project>/<user>`."""
    expires_at = int(time.time()) + ttl
    username = f"{expires_at}:{PROJECT_ID}/{user_id}"
    return username, sign(username), expires_at


def issue_response(user_id: str, ttl: int) -> credentials_pb2.IssueTurnCredentialsResponse:
    username, password, expires_at = credential(user_id, ttl)
    return credentials_pb2.IssueTurnCredentialsResponse(
        username=username, password=password, ttl=duration_pb2.Duration(seconds=ttl),
        expire_time=timestamp_pb2.Timestamp(seconds=expires_at), uris=TURN_URIS)


def ice_response(user_id: str, ttl: int) -> credentials_pb2.GetIceServersResponse:
    username, password, expires_at = credential(user_id, ttl)
    return credentials_pb2.GetIceServersResponse(
        ice_servers=[credentials_pb2.IceServer(urls=STUN_URIS),
                     credentials_pb2.IceServer(urls=TURN_URIS, username=username,
                                               credential=password)],
        expire_time=timestamp_pb2.Timestamp(seconds=expires_at))


# -- request bodies for h2load -------------------------------------------------------------


def write_bodies(directory: Path) -> dict[str, Path]:
    """Writes each request body once; returns their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    ttl = duration_pb2.Duration(seconds=TTL_SECONDS)
    bodies = {
        "issue": grpc_frame(credentials_pb2.IssueTurnCredentialsRequest(
            user_id=USER_ID, ttl=ttl).SerializeToString()),
        "ice": grpc_frame(credentials_pb2.GetIceServersRequest(
            user_id=USER_ID, ttl=ttl).SerializeToString()),
        "session": grpc_frame(sessions_pb2.CreateSessionRequest(
            provider=sessions_pb2.PROVIDER_OPENAI, user_id=USER_ID,
            options=sessions_pb2.SessionOptions(model="gpt-realtime", voice="alloy"),
        ).SerializeToString()),
        "json": json.dumps({"user_id": USER_ID, "ttl": TTL_SECONDS}).encode(),
        # Connect unary: the bare message, binary protobuf (`application/proto`).
        "issue-proto": credentials_pb2.IssueTurnCredentialsRequest(
            user_id=USER_ID, ttl=ttl).SerializeToString(),
        "ice-proto": credentials_pb2.GetIceServersRequest(
            user_id=USER_ID, ttl=ttl).SerializeToString(),
    }
    paths = {}
    for name, body in bodies.items():
        path = directory / f"{name}.body"
        path.write_bytes(body)
        paths[name] = path
    return paths
