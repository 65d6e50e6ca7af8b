"""The ceiling for Python gRPC here: a bare grpc.aio server whose handlers only sign.

Same generated stubs, same response messages and the same HMAC as icegate, on uvloop as
icegate runs; no interceptor, no key check, no store, no validation.

    python bench/bare_grpc_server.py --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc.aio
import scenario
import uvloop

from icegate.v1 import credentials_pb2, credentials_pb2_grpc


class BareCredentialServicer(credentials_pb2_grpc.CredentialServiceServicer):
    async def IssueTurnCredentials(
        self, request: credentials_pb2.IssueTurnCredentialsRequest, context: Any
    ) -> credentials_pb2.IssueTurnCredentialsResponse:
        return scenario.issue_response(request.user_id, request.ttl.seconds)

    async def GetIceServers(
        self, request: credentials_pb2.GetIceServersRequest, context: Any
    ) -> credentials_pb2.GetIceServersResponse:
        return scenario.ice_response(request.user_id, request.ttl.seconds)


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    credentials_pb2_grpc.add_CredentialServiceServicer_to_server(BareCredentialServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
